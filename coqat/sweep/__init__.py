"""Distributed sweeps: a work queue on an Optuna study, and the frontier grid on top of it.

- ``coqat.sweep.queue``     points as WAITING trials, heartbeat, retry (public Optuna API)
- ``coqat.sweep.frontier``  the frontier: one search per budget x seed x method

Reports only read what the sweeps wrote (``coqat.reporting``).
"""

from coqat.sweep.frontier import (Manifest, create_or_resume, load_study, point_key, progress,
                                  run_workers, work)

__all__ = ["Manifest", "create_or_resume", "load_study", "point_key", "progress",
           "run_workers", "work"]
