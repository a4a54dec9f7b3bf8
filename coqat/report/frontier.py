"""Frontier sweeps: one search (or baseline) per budget x seed x method, shared as an Optuna
study so that several processes or machines can work on it.

The study is a work queue. Every grid point is enqueued as a WAITING trial when the study
is created; a worker pops one, runs it (``run_point``) and reports (BOPs, metric) as the
trial's two objective values, so ``optuna-dashboard`` shows the Pareto front as it fills.

Storage: a journal file next to the sweep by default (``<sweep>/study.journal``), or any
Optuna RDB URL (``postgresql://user:pw@host/db``) for several machines::

    coqat frontier --space lm-tiny --budgets w3a3,w4a4 --storage postgresql://... --workers 2
    coqat worker --storage postgresql://... --study NAME      # on other machines

Fault tolerance, the same for every storage: a worker stamps its running trial with a
heartbeat every ``heartbeat`` seconds; any worker that finds a RUNNING trial whose heartbeat
is older than ``grace`` seconds marks it FAILED and enqueues the same point again (Optuna's
own heartbeat exists for RDB storages only; the journal file has none, so coqat keeps its
own). A point is never run twice: before running, a worker checks that no COMPLETE trial
and no live RUNNING trial holds the same point; a retried point starts its run over (the FP
phase is cached per seed under ``<sweep>/.fp-cache``, so only the search and the final QAT
are redone). Running the same ``coqat frontier`` command again resumes
the sweep; finished points are not redone.

The sweep directory::

    runs/<study>/frontier.json      the manifest (space, grid, storage, options)
    runs/<study>/study.journal      the default storage
    runs/<study>/trials/<point>/    one run directory per point (coqat search output)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from coqat.config import SearchSpace, load_space, parse_space
from coqat.errors import CoqatError
from coqat.report.runs import FRONTIER_MANIFEST
from coqat.util import atomic_write_json

POINT_ATTR = "coqat_point"           # trial system attr: the grid point's key
HEARTBEAT_ATTR = "coqat_heartbeat"   # trial system attr: last heartbeat (unix seconds)
OWNER_ATTR = "coqat_owner"           # trial system attr: host:pid of the worker
MANIFEST_ATTR = "coqat_manifest"     # study user attr: the manifest (JSON)
METHODS = ("gumbel", "uniform", "optuna", "random")


@dataclass
class Manifest:
    """Everything a worker needs to run any point of the sweep, stored in the study."""

    study: str
    space: dict[str, Any]                 # the parsed TOML of the space
    space_name: str
    space_sha256: str
    budgets: list[str]
    seeds: list[int]
    methods: list[str]
    options: dict[str, Any] = field(default_factory=dict)   # passed to every point
    storage: str = ""
    heartbeat: float = 10.0
    grace: float = 60.0

    def points(self) -> list[dict[str, Any]]:
        return [{"budget": b, "seed": s, "method": m}
                for b in self.budgets for m in self.methods for s in self.seeds]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls(**json.loads(text))


def point_key(point: dict[str, Any]) -> str:
    """A stable, filesystem-safe name for a grid point (budget expressions have * and ())."""
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in str(point["budget"]))
    digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:6]
    return f"{safe}-{point['method']}-s{point['seed']}-{digest}"


# ----- storage -------------------------------------------------------------------------------
def open_storage(url: str):
    """An Optuna storage for a journal file path / ``journal:PATH`` or an RDB URL, with a
    one-line error when it cannot be reached."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        if "://" not in url or url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = url.removeprefix("journal:")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                          skip_table_creation=False)
    except ImportError as e:
        raise CoqatError(f"storage {url!r} needs a database driver ({e}); for PostgreSQL"
                         " install it with pip install 'coqat[postgres]'") from None
    except Exception as e:  # sqlalchemy OperationalError etc.: say it in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CoqatError(f"cannot reach storage {_redact(url)} ({reason[:160]}); check the URL"
                         " and that the database server is running") from None


def _redact(url: str) -> str:
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# ----- creating / loading a sweep ----------------------------------------------------------------
def create_or_resume(space_ref: str | Path, budgets: Sequence[str], seeds: Sequence[int],
                     methods: Sequence[str], storage_url: str | None, out: str | Path,
                     name: str | None, options: dict[str, Any],
                     heartbeat: float = 10.0, grace: float = 60.0):
    """Create the study (or re-open it: same name, same space) and enqueue missing points.

    Returns (study, manifest, sweep_dir).
    """
    import optuna

    budgets = [b.strip() for b in budgets if b.strip()]
    if not budgets:
        raise CoqatError("--budgets is empty; give a comma-separated list such as w3a3,w4a4,w8a8")
    methods = [m.strip() for m in methods if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CoqatError(f"unknown method(s) {', '.join(bad) or '(none)'}; use {', '.join(METHODS)}")
    if not seeds:
        raise CoqatError("--seeds must be at least 1")
    space = load_space(space_ref)
    _check_budgets(space, budgets, methods)
    study_name = name or f"frontier-{space.name}"
    sweep_dir = Path(out) / study_name
    url = storage_url or str(sweep_dir / "study.journal")
    manifest = Manifest(study=study_name, space=space.raw, space_name=space.name,
                        space_sha256=space.fingerprint(), budgets=list(budgets),
                        seeds=list(seeds), methods=list(methods), options=dict(options),
                        storage=url, heartbeat=heartbeat, grace=grace)
    storage = open_storage(url)
    directions = ["minimize", "maximize" if _higher_is_better(space) else "minimize"]
    study = optuna.create_study(study_name=study_name, storage=storage, directions=directions,
                                load_if_exists=True)
    old = study.user_attrs.get(MANIFEST_ATTR)
    if old is not None:
        prev = Manifest.from_json(old)
        if prev.space_sha256 != manifest.space_sha256:
            raise CoqatError(
                f"study {study_name!r} in {_redact(url)} was created with a different search"
                f" space ({prev.space_name}, sha {prev.space_sha256[:12]}); use another --name"
                " or the original space file")
        # extend the grid with any new budgets / seeds / methods, keep the rest
        manifest.budgets = _union(prev.budgets, manifest.budgets)
        manifest.seeds = _union(prev.seeds, manifest.seeds)
        manifest.methods = _union(prev.methods, manifest.methods)
        manifest.options = {**prev.options, **manifest.options}
    study.set_user_attr(MANIFEST_ATTR, manifest.to_json())
    study.set_metric_names(["BOPs", _metric_name(space)])
    enqueue_missing(study, manifest)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / FRONTIER_MANIFEST, asdict(manifest))
    return study, manifest, sweep_dir


def load_study(storage_url: str, study_name: str):
    """(study, manifest) of an existing sweep, for ``coqat worker``."""
    import optuna

    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise CoqatError(f"no study {study_name!r} in {_redact(storage_url)}; studies there:"
                         f" {', '.join(names) or '(none)'}") from None
    text = study.user_attrs.get(MANIFEST_ATTR)
    if text is None:
        raise CoqatError(f"study {study_name!r} was not made by coqat frontier")
    return study, Manifest.from_json(text)


def enqueue_missing(study, manifest: Manifest) -> int:
    """Enqueue every grid point that has no COMPLETE, RUNNING or WAITING trial."""
    from optuna.trial import TrialState

    held = {_trial_key(t) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))}
    n = 0
    for p in manifest.points():
        if point_key(p) not in held:
            study.enqueue_trial(p, user_attrs={"point": point_key(p)})
            n += 1
    return n


def _trial_key(t) -> str | None:
    """The grid point a (frozen) trial holds, whatever its state."""
    if POINT_ATTR in t.system_attrs:
        return t.system_attrs[POINT_ATTR]
    params = _params_of(t)
    return point_key(params) if {"budget", "seed", "method"} <= set(params) else None


def _check_budgets(space: SearchSpace, budgets: Sequence[str], methods: Sequence[str]) -> None:
    """Check every budget now, before any point runs: it parses, some configuration of the
    space meets it and it leaves something to trade (the search's own rule), and a uniform
    baseline, if asked for, exists under it. One-line error naming the budget otherwise."""
    from coqat.api import model_and_inputs
    from coqat.cost import CostModel, parse_budget
    from coqat.search.baselines import uniform_at_budget
    from coqat.search.problem import SearchProblem

    model, inputs, sp, _ = model_and_inputs(space=str(space.path) if space.path else None)
    cost = CostModel.from_model(model, inputs)
    resolved = sp.resolve(list(cost.layers), cost.tie_groups)
    problem = SearchProblem.build(resolved, cost, sp.train.quantizer)
    for b in budgets:
        if b == "fp":
            continue
        bops = parse_budget(b, cost, resolved.pinned)
        problem.check_budget(bops, b)
        if "uniform" in methods:
            uniform_at_budget(problem, resolved.uniform_candidates(), bops)


def _higher_is_better(space: SearchSpace) -> bool:
    from coqat.workloads import registry

    cls = registry().get(space.workload_name)
    return bool(cls and cls.higher_is_better)


def _metric_name(space: SearchSpace) -> str:
    from coqat.workloads import registry

    cls = registry().get(space.workload_name)
    return cls.metric if cls else "metric"


def _union(a: Sequence, b: Sequence) -> list:
    out = list(a)
    out += [x for x in b if x not in out]
    return out


# ----- workers ---------------------------------------------------------------------------------
class _Heartbeat:
    """Stamps the running trial every ``interval`` seconds from a background thread."""

    def __init__(self, study, trial_id: int, interval: float):
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._beat()
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            self.study._storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
        except Exception:   # a finished trial can no longer be stamped; the beat ends here
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)


def fail_stale(study, grace: float) -> list[str]:
    """Mark RUNNING trials with a heartbeat (or, before the first beat, a start) older than
    ``grace`` s as FAILED and enqueue their points again. Returns the keys retried."""
    from optuna.trial import TrialState

    now = time.time()
    retried = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - _last_sign_of_life(t) <= grace:
            continue
        try:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except Exception:   # another worker got there first
            continue
        study.enqueue_trial(_params_of(t), user_attrs={
            "point": t.system_attrs.get(POINT_ATTR), "retry_of": t.number})
        retried.append(t.system_attrs.get(POINT_ATTR, str(t.number)))
    return retried


def _last_sign_of_life(t) -> float:
    """The trial's last heartbeat, or its start if it died before the first one."""
    beat = t.system_attrs.get(HEARTBEAT_ATTR)
    if beat is not None:
        return float(beat)
    return t.datetime_start.timestamp() if t.datetime_start is not None else time.time()


def _params_of(trial) -> dict[str, Any]:
    """The grid point a trial was given: its params (studies made before points stopped
    being suggested) or else the fixed params that enqueue_trial stored."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params") or {})


def progress(study, manifest: Manifest) -> dict[str, int]:
    from optuna.trial import TrialState

    keys = {point_key(p) for p in manifest.points()}
    complete = {_trial_key(t) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,))} & keys
    running = {_trial_key(t) for t in study.get_trials(
        deepcopy=False, states=(TrialState.RUNNING,))} & keys
    return {"total": len(keys), "complete": len(complete), "running": len(running - complete)}


RunPoint = Callable[[SearchSpace, dict[str, Any], dict[str, Any], Path], dict[str, Any]]


def default_run_point(space: SearchSpace, point: dict[str, Any], options: dict[str, Any],
                      run_dir: Path) -> dict[str, Any]:
    """Run one grid point with coqat's search (or the uniform baseline) into ``run_dir``.

    ``options`` (the manifest's): ``steps_scale`` scales the FP phase, the search and the
    final QAT alike; ``optimizer`` is the final QAT's; ``device``. The FP phase is cached
    under ``<sweep>/.fp-cache`` and shared by every point of the same seed. A finished
    ``run_dir`` is returned as it is; a partial one (a killed worker's) is started over.
    """
    import shutil

    from coqat.report.rundir import FINAL, RunDir
    from coqat.search import parse_search_settings, run_search
    from coqat.train.runner import TrainOptions

    run_dir = Path(run_dir)
    if RunDir(run_dir).finished:
        return RunDir(run_dir).read_json(FINAL)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    scale = float(options.get("steps_scale") or 1.0)
    fp_steps, search_steps = parse_search_settings(space).resolved_steps(space.train.steps)
    overrides = {"fp_steps": max(1, round(fp_steps * scale)),
                 "search_steps": max(1, round(search_steps * scale))}
    opts = TrainOptions(steps=max(1, round(space.train.steps * scale)), seed=int(point["seed"]),
                        optimizer=options.get("optimizer"), device=options.get("device", "auto"),
                        out=str(run_dir.parent.parent), progress=False)
    _, result = run_search(space, point["budget"], method=point["method"], options=opts,
                           overrides=overrides, run_dir=run_dir)
    return result


def work(study, manifest: Manifest, sweep_dir: Path, run_point: RunPoint | None = None,
         poll: float = 2.0, max_points: int | None = None, on_point=None) -> int:
    """Pop and run points until the whole grid is COMPLETE. Returns how many this worker ran."""
    from optuna.trial import TrialState

    run_point = run_point or default_run_point
    space = parse_space(manifest.space)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    done_here = 0
    while max_points is None or done_here < max_points:
        fail_stale(study, manifest.grace)
        prog = progress(study, manifest)
        if prog["complete"] >= prog["total"]:
            break
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            enqueue_missing(study, manifest)          # e.g. a point whose retry was lost
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                time.sleep(poll)                      # the rest is running elsewhere
                continue
        trial = study.ask()
        fixed = study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
        if not fixed:   # another worker took the last waiting point between check and ask
            study.tell(trial, state=TrialState.PRUNED)
            continue
        point = {"budget": fixed["budget"], "seed": int(fixed["seed"]), "method": fixed["method"]}
        # The point lives in the trial's fixed params (set by enqueue) and is shown as user
        # attributes. It is deliberately not suggest_categorical()'d: Optuna fixes a
        # categorical's choices per study, so extending the grid (a new seed or budget) would
        # make every later trial fail with "does not support dynamic value space".
        for k, v in point.items():
            trial.set_user_attr(k, v)
        key = point_key(point)
        study._storage.set_trial_system_attr(trial._trial_id, POINT_ATTR, key)
        study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, owner)
        if _held_elsewhere(study, key, trial.number, manifest.grace):
            study.tell(trial, state=TrialState.PRUNED)
            continue
        run_dir = sweep_dir / "trials" / key
        try:
            with _Heartbeat(study, trial._trial_id, manifest.heartbeat):
                result = run_point(space, point, manifest.options, run_dir)
        except CoqatError as e:
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=TrialState.FAIL)
            raise
        for k in ("metric", "bops", "bits", "metric_name", "budget_bops"):
            if k in result:
                trial.set_user_attr(k, result[k])
        trial.set_user_attr("run_dir", str(run_dir))
        study.tell(trial, [float(result["bops"]), float(result["metric"])])
        done_here += 1
        if on_point is not None:
            on_point(point, result)
    return done_here


def _held_elsewhere(study, key: str, number: int, grace: float) -> bool:
    """Another COMPLETE trial, or a live RUNNING one, already holds this point."""
    from optuna.trial import TrialState

    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.number == number or _trial_key(t) != key:
            continue
        if t.state == TrialState.COMPLETE:
            return True
        if now - _last_sign_of_life(t) <= grace:
            return True
    return False


def _worker_main(storage_url: str, study_name: str, sweep_dir: str) -> int:
    """Entry point of a local worker process (``coqat frontier --workers N``)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get(
        "COQAT_FRONTIER_WORKERS", "1"))))
    study, manifest = load_study(storage_url, study_name)
    return work(study, manifest, Path(sweep_dir))


def run_workers(manifest: Manifest, sweep_dir: Path, workers: int, console=None) -> None:
    """Run ``workers`` local worker processes until the grid is complete, with progress."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    os.environ["COQAT_FRONTIER_WORKERS"] = str(workers)
    procs = [ctx.Process(target=_worker_main, args=(manifest.storage, manifest.study,
                                                     str(sweep_dir)), daemon=False)
             for _ in range(workers)]
    for p in procs:
        p.start()
    study, _ = load_study(manifest.storage, manifest.study)
    try:
        _watch(study, manifest, procs, console)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise CoqatError(f"interrupted; run the same command again to resume the sweep"
                         f" ({manifest.study})") from None
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    prog = progress(study, manifest)
    if prog["complete"] < prog["total"]:
        raise CoqatError(f"{prog['total'] - prog['complete']} point(s) of {manifest.study} did"
                         f" not finish (worker exit codes {failed}); see the trials' 'error'"
                         " user attribute, fix it and run the same command again")


def _watch(study, manifest: Manifest, procs, console) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    total = progress(study, manifest)["total"]
    if console is not None and not console.is_terminal:
        _watch_plain(study, manifest, procs, console, total)
        return
    with Progress(TextColumn("[bold]frontier"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[running]} running"), TimeElapsedColumn(),
                  console=console, disable=console is None) as bar:
        task = bar.add_task("points", total=total, running=0)
        while any(p.is_alive() for p in procs):
            prog = progress(study, manifest)
            bar.update(task, completed=prog["complete"], running=prog["running"])
            time.sleep(1.0)
        prog = progress(study, manifest)
        bar.update(task, completed=prog["complete"], running=0)


def _watch_plain(study, manifest: Manifest, procs, console, total: int) -> None:
    """Progress for logs and pipes: one line each time a point finishes."""
    t0, last = time.monotonic(), -1
    while True:
        alive = any(p.is_alive() for p in procs)
        prog = progress(study, manifest)
        if prog["complete"] != last:
            last = prog["complete"]
            mins, secs = divmod(int(time.monotonic() - t0), 60)
            console.print(f"frontier: {last}/{total} points done, {prog['running']} running,"
                          f" {mins}:{secs:02d} elapsed", markup=False, highlight=False)
        if not alive:
            return
        time.sleep(1.0)
