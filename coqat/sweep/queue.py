"""A work queue on an Optuna study, through Optuna's public API only.

Every grid point is enqueued as a WAITING trial whose user attributes are the point (a
small dict of JSON values). A worker pops one with ``study.ask()``, runs it, and reports
the point's two objective values with ``study.tell``; a point that cannot run is told
FAILED. Storage is any Optuna storage: a journal file (one machine, several processes) or
an RDB URL such as PostgreSQL (several machines).

Fault tolerance, the same for every storage: a worker stamps its running trial with a
heartbeat user attribute every ``heartbeat`` seconds; any worker that finds a RUNNING trial
whose last sign of life (heartbeat, else start) is older than ``grace`` seconds tells it
FAILED and enqueues the same point again. A point is never run twice: before running, a
worker checks that no COMPLETE trial and no live RUNNING trial holds the same point.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from coqat.errors import CoqatError

HEARTBEAT_ATTR = "coqat_heartbeat"   # user attr: last heartbeat (unix seconds)
OWNER_ATTR = "coqat_owner"           # user attr: host:pid of the worker running the point

__all__ = ["open_storage", "redact", "enqueue_missing", "trial_point", "progress",
           "fail_stale", "work_queue", "HEARTBEAT_ATTR", "OWNER_ATTR"]

#: a grid point: the user attributes that identify it
Point = Mapping[str, Any]


def open_storage(url: str):
    """An Optuna storage for a journal file path / ``journal:PATH`` or an RDB URL, with a
    one-line error when it cannot be reached."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Optuna's info lines ("A new study created ...") would break one-line errors and
    # --json output; coqat prints its own progress
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if "://" not in url or url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = url.removeprefix("journal:")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                          skip_table_creation=False)
    except ImportError as e:
        raise CoqatError(f"storage {redact(url)!r} needs a database driver ({e.name or e});"
                         " for PostgreSQL install it with pip install 'coqat[postgres]'") \
            from None
    except OSError as e:
        raise CoqatError(f"cannot open storage {redact(url)} ({e.strerror}); choose a writable"
                         " path") from None
    except Exception as e:  # sqlalchemy OperationalError etc.: say it in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CoqatError(f"cannot reach storage {redact(url)} ({redact(reason)[:160]}); check"
                         " the URL and that the database server is running") from None


def redact(text: str) -> str:
    """Hide the password of any ``scheme://user:pw@host`` in ``text``."""
    return re.sub(r"(\w+://)[^/@\s]*@", r"\1***@", str(text))


def _identity(point: Point, keys: Iterable[str]) -> tuple | None:
    try:
        return tuple(point[k] for k in keys)
    except KeyError:
        return None


def trial_point(trial, keys: Iterable[str]) -> dict[str, Any] | None:
    """The point a trial (live or frozen) holds, or None when it holds none (a trial asked
    for when no point was waiting, or one from an unrelated study)."""
    attrs = trial.user_attrs
    ident = _identity(attrs, keys)
    return None if ident is None else {k: attrs[k] for k in keys}


def _held(study, keys: tuple[str, ...], states) -> dict[tuple, list]:
    held: dict[tuple, list] = {}
    for t in study.get_trials(deepcopy=False, states=states):
        point = trial_point(t, keys)
        if point is not None:
            held.setdefault(_identity(point, keys), []).append(t)
    return held


def enqueue_missing(study, points: Iterable[Point], keys: tuple[str, ...]) -> int:
    """Enqueue every point that no COMPLETE, RUNNING or WAITING trial holds."""
    from optuna.trial import TrialState

    held = _held(study, keys, (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    n = 0
    for p in points:
        if _identity(p, keys) not in held:
            study.enqueue_trial({}, user_attrs=dict(p))
            n += 1
    return n


def progress(study, points: Iterable[Point], keys: tuple[str, ...]) -> dict[str, int]:
    from optuna.trial import TrialState

    wanted = {_identity(p, keys) for p in points}
    complete = set(_held(study, keys, (TrialState.COMPLETE,))) & wanted
    running = set(_held(study, keys, (TrialState.RUNNING,))) & wanted
    return {"total": len(wanted), "complete": len(complete),
            "running": len(running - complete)}


def _last_sign_of_life(t) -> float:
    """The trial's last heartbeat, or its start if it died before the first one."""
    beat = t.user_attrs.get(HEARTBEAT_ATTR)
    if beat is not None:
        return float(beat)
    return t.datetime_start.timestamp() if t.datetime_start is not None else time.time()


def fail_stale(study, grace: float, keys: tuple[str, ...]) -> list[int]:
    """Tell RUNNING trials silent for more than ``grace`` s FAILED and enqueue their points
    again. Returns the numbers of the trials failed."""
    from optuna.trial import TrialState

    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - _last_sign_of_life(t) <= grace:
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except Exception:   # another worker got there first
            continue
        point = trial_point(t, keys)
        if point is not None:
            study.enqueue_trial({}, user_attrs={**point, "retry_of": t.number})
        failed.append(t.number)
    return failed


def _held_elsewhere(study, point: Point, keys: tuple[str, ...], number: int,
                    grace: float) -> bool:
    """Another COMPLETE trial, or a live RUNNING one, already holds this point."""
    from optuna.trial import TrialState

    now = time.time()
    ident = _identity(point, keys)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.number == number or _identity(t.user_attrs, keys) != ident:
            continue
        if t.state == TrialState.COMPLETE or now - _last_sign_of_life(t) <= grace:
            return True
    return False


class _Heartbeat:
    """Stamps the running trial every ``interval`` seconds from a background thread."""

    def __init__(self, trial, interval: float):
        self.trial, self.interval = trial, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._beat()
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            self.trial.set_user_attr(HEARTBEAT_ATTR, time.time())
        except Exception:   # a finished trial can no longer be stamped; the beat ends here
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)


#: runs one point: (point, its run directory) -> (objective values, user attrs to record)
RunPoint = Callable[[dict[str, Any], Path], tuple[list[float], dict[str, Any]]]


def work_queue(study, points: list[Point], keys: tuple[str, ...], run_point: RunPoint,
               dir_of: Callable[[dict[str, Any]], Path], heartbeat: float, grace: float,
               poll: float = 2.0, max_points: int | None = None,
               on_point: Callable[[dict[str, Any], dict[str, Any]], None] | None = None) -> int:
    """Pop and run points until every one of ``points`` is COMPLETE. Returns how many this
    worker ran. A CoqatError from a point fails its trial (the error recorded as the
    ``error`` user attribute) and stops this worker with that error."""
    from optuna.trial import TrialState

    owner = f"{socket.gethostname()}:{os.getpid()}"
    done_here = 0
    while max_points is None or done_here < max_points:
        fail_stale(study, grace, keys)
        prog = progress(study, points, keys)
        if prog["complete"] >= prog["total"]:
            break
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            enqueue_missing(study, points, keys)      # e.g. a point whose retry was lost
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                time.sleep(poll)                      # the rest is running elsewhere
                continue
        trial = study.ask()
        point = trial_point(trial, keys)
        if point is None:   # another worker took the last waiting point between check and ask
            study.tell(trial, state=TrialState.PRUNED)
            continue
        trial.set_user_attr(OWNER_ATTR, owner)
        if _held_elsewhere(study, point, keys, trial.number, grace):
            study.tell(trial, state=TrialState.PRUNED)
            continue
        run_dir = dir_of(point)
        try:
            with _Heartbeat(trial, heartbeat):
                values, attrs = run_point(point, run_dir)
        except CoqatError as e:
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
            raise
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("run_dir", str(run_dir))
        study.tell(trial, values)
        done_here += 1
        if on_point is not None:
            on_point(point, attrs)
    return done_here
