"""Local grids of runs: many trainings or searches on this machine, resumable.

A benchmark (or a script) describes each run as a ``LocalJob``: a stable key, the space and
flat options its ``RunConfig`` is built from, and either the bits of a training run or the
budget and method of a search. ``run_local`` runs the jobs in worker processes and returns
one ``JobOutcome`` per job, in the order of the jobs::

    jobs = [LocalJob(f"{b}-s{s}", "lm-tiny", {"seed": s, "steps": 100}, bits=b)
            for b in ("w4a4", "w8a8") for s in (0, 1)]
    outcomes = run_local(jobs, "runs/grid", workers=2, say=print)
    [o.record.metric for o in outcomes]

Each job's run directory is ``<out>/<key>``; searches share the FP-phase cache under
``<out>``. Calling again with the same jobs resumes the grid: a finished job
(``final.json``) is read back, not run; a job killed after a checkpoint continues from it;
one killed before its first checkpoint starts over. A directory found under a key must hold
that job's run (same space, training settings and seed; for a search also the same search
settings, budget and method), so a key reused for other settings is an error instead of
another run's numbers.

Unlike ``coqat.sweep.frontier`` there is no shared queue: one process owns the grid and its
directory. Sweeps across machines belong to the frontier.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from coqat.bitsearch.pipeline import run_search
from coqat.config import RunConfig, SearchSpace, run_config_from_json
from coqat.errors import CoqatError
from coqat.records import RunRecord
from coqat.rundir import CHECKPOINT, CONFIG, RunDir
from coqat.training import runner

__all__ = ["LocalJob", "JobOutcome", "run_local", "read_finished", "DONE", "CACHED", "FAILED",
           "SKIPPED", "MISSING"]

#: ``JobOutcome.status``: trained now | read back from an earlier call | raised an error
#: (``keep_going``) | not started before the deadline | not finished (``read_finished``)
DONE, CACHED, FAILED, SKIPPED, MISSING = "done", "cached", "failed", "skipped", "missing"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}")


@dataclass(frozen=True)
class LocalJob:
    """One run of a grid: a training run (``bits``) or a search (``budget`` and ``method``).

    ``key`` names the run directory and must stay the same between calls for the grid to
    resume. ``options`` are ``RunConfig.from_options`` keywords (fields of TrainSettings,
    SearchSettings and Runtime); ``out`` and ``progress`` are set by the grid.
    ``seconds`` is the time limit of time-boxed search methods (Optuna).
    """

    key: str
    space: str | Path | SearchSpace
    options: Mapping[str, Any] = field(default_factory=dict)
    bits: str | None = None
    budget: str | None = None
    method: str = "gumbel"
    target: str | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _KEY.fullmatch(self.key):
            raise CoqatError(f"job key {self.key!r} is not a plain directory name; use letters,"
                             " digits and . _ + = - (it names the job's run directory)")
        if (self.bits is None) == (self.budget is None):
            raise CoqatError(f"job {self.key}: give bits (a training run) or budget (a search),"
                             " exactly one of them")

    @property
    def is_search(self) -> bool:
        return self.budget is not None

    def config(self, out: str | Path) -> RunConfig:
        """The job's configuration, writing under ``out`` and without progress bars (the
        workers share one terminal)."""
        return RunConfig.from_options(self.space, **{**self.options, "out": str(out),
                                                     "progress": False})


@dataclass
class JobOutcome:
    """What became of one job. ``record`` is None unless the job has a finished run."""

    key: str
    status: str
    run_dir: str
    record: RunRecord | None = None
    wall_s: float = 0.0                # time spent on the job by this call
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.record is not None

    def describe(self) -> str:
        """One line for a progress display."""
        if self.record is None:
            return f"{self.key}: {self.status}" + (f": {self.error}" if self.error else "")
        rec = self.record
        result = "no final QAT" if rec.metric is None else f"{rec.metric_name} {rec.metric:.4f}"
        how = {CACHED: "finished earlier"}.get(self.status, f"{self.wall_s:.0f} s"
                                               + (", resumed" if rec.resumed else ""))
        return f"{self.key}: {result} ({how})"


def run_local(jobs: Sequence[LocalJob], out: str | Path, workers: int = 1,
              threads: int | None = None, deadline: float | None = None,
              keep_going: bool = False, drop_checkpoints: bool = False,
              say: Callable[[str], None] | None = None,
              on_outcome: Callable[[JobOutcome], None] | None = None) -> list[JobOutcome]:
    """Run every job that has not finished yet; outcomes in the order of ``jobs``.

    ``workers`` > 1: that many jobs at once, each in a fresh spawned process (a run's
    memory, CUDA context and global torch state go with it) with ``threads`` torch threads
    (default: the cores this process may use, shared out among the workers). ``workers`` = 1
    runs the jobs in this process, one after another.

    ``deadline``: a ``time.monotonic()`` moment; a job starts only if the slowest job of
    this call so far would still end before it (later jobs are ``SKIPPED``, to be run by a
    later call). ``keep_going``: a job that raises a CoqatError or RuntimeError (bad input,
    a diverged or out-of-memory run) becomes a ``FAILED`` outcome and the others go on;
    otherwise no job starts after the first error, which is raised once the running ones
    end. ``drop_checkpoints``: delete a finished run's checkpoint (only a resume needs it).
    ``say`` gets one line per finished job; ``on_outcome`` the outcome itself (e.g. to
    rewrite a report as results come in).
    """
    if not isinstance(workers, int) or workers < 1:
        raise CoqatError(f"workers must be an integer >= 1 (got {workers!r})")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise CoqatError(f"threads must be an integer >= 1 (got {threads!r})")
    out = Path(out)
    configs = _configs(jobs, out)          # every job is checked before any of them runs
    threads = threads or max(1, _cores() // workers)
    outcomes: dict[str, JobOutcome] = {}
    walls: list[float] = []

    def finish(o: JobOutcome) -> None:
        outcomes[o.key] = o
        if o.status in (DONE, FAILED):
            walls.append(o.wall_s)
        if say is not None:
            say(f"[{len(outcomes)}/{len(jobs)}] {o.describe()}")
        if on_outcome is not None:
            on_outcome(o)

    def may_start() -> bool:
        return deadline is None or time.monotonic() + max(walls, default=0.0) <= deadline

    pending = []
    for job, config in zip(jobs, configs):
        found = _read_back(job, config, out)
        if found is not None:
            finish(found)                  # finished by an earlier call: no process needed
        else:
            pending.append((job, config))
    args = (threads, keep_going, drop_checkpoints)
    if workers == 1:
        for job, config in pending:
            if not may_start():
                break
            try:
                finish(_execute(job, config, str(out / job.key), *args))
            except CoqatError as e:
                raise CoqatError(f"{job.key}: {e}") from None
    else:
        _run_pool(pending, out, workers, args, may_start, finish)
    return [outcomes.get(j.key) or JobOutcome(j.key, SKIPPED, str(out / j.key)) for j in jobs]


def read_finished(jobs: Sequence[LocalJob], out: str | Path) -> list[JobOutcome]:
    """The jobs' outcomes without running anything: ``CACHED`` with the record where the
    job has finished, ``MISSING`` otherwise (e.g. to report on a grid that is still running)."""
    out = Path(out)
    return [_read_back(job, config, out) or JobOutcome(job.key, MISSING, str(out / job.key))
            for job, config in zip(jobs, _configs(jobs, out))]


# ----- inside a worker ------------------------------------------------------------------------
def _execute(job: LocalJob, config: RunConfig, path: str, threads: int, keep_going: bool,
             drop_checkpoint: bool) -> JobOutcome:
    """Run one job (in a worker process, or in the caller's with workers = 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        record = _train_or_resume(job, config, RunDir(path))
    except (CoqatError, RuntimeError) as e:
        if not keep_going:
            raise
        return JobOutcome(job.key, FAILED, path, wall_s=round(time.perf_counter() - t0, 2),
                          error=" ".join(f"{type(e).__name__}: {e}".split()))
    finally:
        torch.set_num_threads(before)
    if drop_checkpoint:
        (Path(path) / CHECKPOINT).unlink(missing_ok=True)
    return JobOutcome(job.key, DONE, path, record, round(time.perf_counter() - t0, 2))


def _train_or_resume(job: LocalJob, config: RunConfig, run: RunDir) -> RunRecord:
    if run.path.exists():
        if run.has(CONFIG) and run.has(CHECKPOINT):
            _check_same_job(run, job, config)
            if job.is_search:              # the final QAT of a search: keeps its search record
                return runner.resume(run.path, progress=False)[1]
            return runner.execute(runner.prepare(config, job.bits), run=run, resume=True)[1]
        shutil.rmtree(run.path)            # killed before its first checkpoint: start over
    if job.is_search:
        return run_search(config, job.budget, job.method, target=job.target,
                          seconds=job.seconds, run_dir=run.path)[1]
    prep = runner.prepare(config, job.bits)  # bad input fails before the directory exists
    return runner.execute(prep, run=RunDir.create_at(run.path))[1]


# ----- in the calling process -----------------------------------------------------------------
def _run_pool(pending: list[tuple[LocalJob, RunConfig]], out: Path, workers: int,
              args: tuple[Any, ...], may_start: Callable[[], bool],
              finish: Callable[[JobOutcome], None]) -> None:
    queue = list(pending)
    first_error: tuple[LocalJob, BaseException] | None = None
    # spawn, not fork: a forked child would inherit the parent's torch threads and CUDA state
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        running: dict[Future, LocalJob] = {}
        while queue or running:
            while queue and len(running) < workers and first_error is None and may_start():
                job, config = queue.pop(0)
                running[pool.submit(_execute, job, config, str(out / job.key), *args)] = job
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    finish(fut.result())
                except BrokenProcessPool:
                    raise CoqatError(f"the worker process running {job.key} died (killed, or"
                                     " out of memory); run the grid again to resume") from None
                except Exception as e:     # raised once the running jobs have ended
                    first_error = first_error or (job, e)
    if first_error is not None:
        job, err = first_error
        if isinstance(err, CoqatError):
            raise CoqatError(f"{job.key}: {err}") from None
        raise err


def _configs(jobs: Sequence[LocalJob], out: Path) -> list[RunConfig]:
    seen: set[str] = set()
    for job in jobs:
        if job.key in seen:
            raise CoqatError(f"job key {job.key!r} appears twice; every job needs its own key")
        seen.add(job.key)
    configs = []
    for job in jobs:
        try:
            configs.append(job.config(out))
        except CoqatError as e:
            raise CoqatError(f"job {job.key}: {e}") from None
    return configs


def _read_back(job: LocalJob, config: RunConfig, out: Path) -> JobOutcome | None:
    run = RunDir(out / job.key)
    if not run.finished:
        return None
    _check_same_job(run, job, config)
    return JobOutcome(job.key, CACHED, str(run.path), RunRecord.read(run))


def _check_same_job(run: RunDir, job: LocalJob, config: RunConfig) -> None:
    """The run under a job's key was made from this job's description (a key reused for
    other settings would otherwise hand back another run's numbers)."""
    doc = run.read_json(CONFIG)
    found = run_config_from_json(doc, str(run.file(CONFIG)))
    search = doc.get("search") if isinstance(doc.get("search"), dict) else {}
    checks = [("search space", found.space.fingerprint() == config.space.fingerprint()),
              ("training settings", found.train == config.train),
              ("seed", found.runtime.seed == config.runtime.seed),
              ("initial weights", found.runtime.init_from == config.runtime.init_from)]
    if job.is_search:
        checks += [("search settings", found.search == config.search),
                   ("budget", search.get("budget_expr") == str(job.budget).strip()),
                   ("method", search.get("method") == job.method)]
    differ = [what for what, same in checks if not same]
    if differ:
        raise CoqatError(f"{run.path} holds a run with other {', '.join(differ)} than job"
                         f" {job.key}; give the job a new key or delete that directory")


def _cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                 # not Linux
        return os.cpu_count() or 1
