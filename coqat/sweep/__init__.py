"""Distributed sweeps: a work queue on an Optuna study, and the frontier grid on top of it.

- ``coqat.sweep.queue``     points as WAITING trials, heartbeat, retry (public Optuna API)
- ``coqat.sweep.frontier``  the frontier: one search per budget x seed x method, and its
                            time estimate from earlier runs
- ``coqat.sweep.local``     resumable local grids of runs in worker processes (the
                            benchmarks' runner: LocalJob, run_local, read_finished)

Reports only read what the sweeps wrote (``coqat.reporting``).
"""

from coqat.sweep.frontier import (Estimate, Manifest, create_or_resume, estimate, load_study,
                                  point_key, progress, run_workers, work)
from coqat.sweep.local import JobOutcome, LocalJob, read_finished, run_local

__all__ = ["Estimate", "Manifest", "create_or_resume", "estimate", "load_study", "point_key",
           "progress", "run_workers", "work", "JobOutcome", "LocalJob", "read_finished",
           "run_local"]
