"""Frontier sweeps: one search (or baseline) per budget x seed x method, shared as an Optuna
study so that several processes or machines can work on it (``coqat.sweep.queue``).

Each trial reports (BOPs, metric) as its two objective values, so ``optuna-dashboard``
shows the Pareto front as it fills. Storage: a journal file next to the sweep by default
(``<sweep>/study.journal``), or any Optuna RDB URL for several machines::

    coqat frontier --space lm-tiny --budgets w3a3,w4a4 --storage postgresql://... --workers 2
    coqat worker --storage postgresql://... --study NAME      # on other machines

A retried point starts its run over (the FP phase is cached per seed under
``<sweep>/.fp-cache``, so only the search and the final QAT are redone). Running the same
``coqat frontier`` command again resumes the sweep; finished points are not redone, and new
budgets, seeds or methods extend the grid.

The sweep directory::

    runs/<study>/frontier.json      the manifest (space, grid, storage, options)
    runs/<study>/study.journal      the default storage
    runs/<study>/trials/<point>/    one run directory per point (coqat search output)

Trust: the manifest carries the search space as parsed data. A space names a built-in
workload; it never names code to import, so joining a sweep runs nothing a data file names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from coqat.config import RunConfig, SearchSpace, load_space, parse_space
from coqat.cost import Budget, CostModel
from coqat.errors import CoqatError
from coqat.records import RunRecord
from coqat.rundir import FINAL, FRONTIER_MANIFEST, RunDir
from coqat.bitsearch.baselines import uniform_at_budget
from coqat.bitsearch.methods import METHODS
from coqat.bitsearch.pipeline import run_search
from coqat.bitsearch.problem import SearchProblem
from coqat.sweep import queue
from coqat.util import atomic_write_json
from coqat.workloads import get_workload, load_user_model, use_user_model

MANIFEST_ATTR = "coqat_manifest"     # study user attr: the manifest (JSON)
POINT_KEYS = ("budget", "seed", "method")

__all__ = ["Manifest", "create_or_resume", "load_study", "work", "run_workers", "point_key",
           "progress", "default_run_point", "MANIFEST_ATTR", "POINT_KEYS"]


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
    steps_scale: float = 1.0              # scales the FP phase, the search and the final QAT
    train: dict[str, Any] = field(default_factory=dict)   # final-QAT setting overrides
    device: str = "auto"
    target: str | None = None
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
        """Parse a stored manifest (one-line error if it is damaged). Manifests written
        before the typed fields kept them in an ``options`` dict."""
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            opts = doc.pop("options", None) or {}
            for k in ("steps_scale", "device"):
                if k in opts:
                    doc.setdefault(k, opts[k])
            if opts.get("optimizer"):
                doc.setdefault("train", {"optimizer": opts["optimizer"]})
            known = {f.name for f in dataclasses.fields(cls)}
            m = cls(**{k: v for k, v in doc.items() if k in known})
        except (ValueError, TypeError) as e:
            raise CoqatError(f"the study's frontier manifest is damaged ({e}); start a new"
                             " sweep with another --name") from None
        return m.validate()

    def validate(self) -> "Manifest":
        if not (isinstance(self.steps_scale, (int, float)) and math.isfinite(self.steps_scale)
                and self.steps_scale > 0):
            raise CoqatError(f"steps scale must be a finite number > 0 (got"
                             f" {self.steps_scale!r}); e.g. 0.25 for a quick sweep")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise CoqatError(f"unknown method(s) {', '.join(map(str, bad)) or '(none)'}; use"
                             f" {', '.join(METHODS)}")
        if not self.budgets:
            raise CoqatError("the budget list is empty; give a comma-separated list such as"
                             " w3a3,w4a4,w8a8")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise CoqatError("seeds must be a non-empty list of integers >= 0")
        return self

    def config(self, space: SearchSpace, seed: int, run_dir: Path) -> RunConfig:
        """The RunConfig of one point: steps scaled, the sweep's train overrides."""
        base = RunConfig.build(space)
        fp_steps, search_steps = base.search.resolved_steps(space.train.steps)

        def scaled(n: int) -> int:
            return max(1, round(n * self.steps_scale))

        return RunConfig.build(
            space, train={**self.train, "steps": scaled(space.train.steps)},
            search={"fp_steps": scaled(fp_steps), "search_steps": scaled(search_steps)},
            runtime={"seed": int(seed), "device": self.device,
                     "out": str(run_dir.parent.parent), "progress": False})


def point_key(point: dict[str, Any]) -> str:
    """A stable, filesystem-safe name for a grid point (budget expressions have * and ())."""
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in str(point["budget"]))
    digest = hashlib.sha256(json.dumps({k: point[k] for k in POINT_KEYS},
                                       sort_keys=True).encode()).hexdigest()[:6]
    return f"{safe}-{point['method']}-s{point['seed']}-{digest}"


# ----- creating / loading a sweep ----------------------------------------------------------------
def create_or_resume(space_ref: str | Path | SearchSpace, budgets: Sequence[str],
                     seeds: Sequence[int], methods: Sequence[str], storage_url: str | None,
                     out: str | Path, name: str | None = None, steps_scale: float = 1.0,
                     train: dict[str, Any] | None = None, device: str = "auto",
                     target: str | None = None, heartbeat: float = 10.0, grace: float = 60.0):
    """Create the study (or re-open it: same name, same space) and enqueue missing points.
    Every budget is checked against the space before anything is created.

    Returns (study, manifest, sweep_dir).
    """
    import optuna

    space = space_ref if isinstance(space_ref, SearchSpace) else load_space(space_ref)
    manifest = Manifest(
        study=name or f"frontier-{space.name}", space=space.raw, space_name=space.name,
        space_sha256=space.fingerprint(),
        budgets=[b.strip() for b in budgets if b.strip()], seeds=list(seeds),
        methods=[m.strip() for m in methods if m.strip()], steps_scale=steps_scale,
        train=dict(train or {}), device=device, target=target, heartbeat=heartbeat,
        grace=grace).validate()
    RunConfig.build(space, train=manifest.train, runtime={"device": device})  # options valid
    check_budgets(space, manifest.budgets, manifest.methods, target)
    sweep_dir = Path(out) / manifest.study
    manifest.storage = storage_url or str(sweep_dir / "study.journal")
    storage = queue.open_storage(manifest.storage)
    workload = get_workload(space.workload_name, {k: v for k, v in space.workload.items()
                                                  if k != "name"})
    directions = ["minimize", "maximize" if workload.higher_is_better else "minimize"]
    study = optuna.create_study(study_name=manifest.study, storage=storage,
                                directions=directions, load_if_exists=True)
    old = study.user_attrs.get(MANIFEST_ATTR)
    if old is not None:
        prev = Manifest.from_json(old)
        if prev.space_sha256 != manifest.space_sha256:
            raise CoqatError(
                f"study {manifest.study!r} in {queue.redact(manifest.storage)} was created"
                f" with a different search space ({prev.space_name}, sha"
                f" {prev.space_sha256[:12]}); use another --name or the original space file")
        # extend the grid with any new budgets / seeds / methods, keep the rest
        manifest.budgets = _union(prev.budgets, manifest.budgets)
        manifest.seeds = _union(prev.seeds, manifest.seeds)
        manifest.methods = _union(prev.methods, manifest.methods)
        manifest.train = {**prev.train, **manifest.train}
    study.set_user_attr(MANIFEST_ATTR, manifest.to_json())
    study.set_metric_names(["BOPs", workload.metric])
    queue.enqueue_missing(study, manifest.points(), POINT_KEYS)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep_dir / FRONTIER_MANIFEST, asdict(manifest))
    return study, manifest, sweep_dir


def load_study(storage_url: str, study_name: str):
    """(study, manifest) of an existing sweep, for ``coqat worker``."""
    import optuna

    storage = queue.open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise CoqatError(f"no study {study_name!r} in {queue.redact(storage_url)}; studies"
                         f" there: {', '.join(names) or '(none)'}") from None
    text = study.user_attrs.get(MANIFEST_ATTR)
    if not isinstance(text, str):
        raise CoqatError(f"study {study_name!r} was not made by coqat frontier")
    return study, Manifest.from_json(text)


def check_budgets(space: SearchSpace, budgets: Sequence[str], methods: Sequence[str],
                  target: str | None = None) -> None:
    """Check every budget now, before any point runs: it parses, some configuration of the
    space meets it and it leaves something to trade (the search's own rule), and a uniform
    baseline, if asked for, exists under it. One-line error naming the budget otherwise."""
    workload = get_workload(space.workload_name, {k: v for k, v in space.workload.items()
                                                  if k != "name"})
    cost = CostModel.from_model(workload.build_model(), workload.example_inputs())
    resolved = space.resolve(list(cost.layers), cost.tie_groups)
    problem = SearchProblem.build(resolved, cost, space.train.quantizer, target)
    for b in budgets:
        budget = Budget.parse(b, cost, resolved.pinned)
        problem.check_budget(budget.bops, budget.expr)
        if "uniform" in methods:
            uniform_at_budget(problem, resolved.uniform_candidates(), budget.bops)


def _union(a: Sequence, b: Sequence) -> list:
    out = list(a)
    out += [x for x in b if x not in out]
    return out


def progress(study, manifest: Manifest) -> dict[str, int]:
    return queue.progress(study, manifest.points(), POINT_KEYS)


# ----- running points ------------------------------------------------------------------------------
#: runs one point of a sweep into its run directory and returns its record
PointRunner = Callable[[Manifest, SearchSpace, dict[str, Any], Path], RunRecord]


def default_run_point(manifest: Manifest, space: SearchSpace, point: dict[str, Any],
                      run_dir: Path) -> RunRecord:
    """Run one grid point with coqat's search (or a baseline) into ``run_dir``. A finished
    ``run_dir`` is returned as it is; a partial one (a killed worker's) is started over."""
    import shutil

    run = RunDir(run_dir)
    if run.finished:
        return RunRecord.read(run)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = manifest.config(space, int(point["seed"]), run_dir)
    _, record = run_search(config, point["budget"], method=point["method"],
                           target=manifest.target, run_dir=run_dir)
    return record


def work(study, manifest: Manifest, sweep_dir: Path, run_point: PointRunner | None = None,
         poll: float = 2.0, max_points: int | None = None, on_point=None) -> int:
    """Pop and run points until the whole grid is COMPLETE. Returns how many this worker ran."""
    run_point = run_point or default_run_point
    space = parse_space(manifest.space)

    def run_one(point: dict[str, Any], run_dir: Path) -> tuple[list[float], dict[str, Any]]:
        rec = run_point(manifest, space, point, run_dir)
        if rec.metric is None:
            raise CoqatError(f"point {point_key(point)} finished without a metric")
        attrs = {"metric": rec.metric, "bops": rec.bops, "bits": rec.bits,
                 "metric_name": rec.metric_name}
        if rec.budget_bops is not None:
            attrs["budget_bops"] = rec.budget_bops
        return [float(rec.bops), float(rec.metric)], attrs

    return queue.work_queue(study, manifest.points(), POINT_KEYS, run_one,
                            lambda p: sweep_dir / "trials" / point_key(p), manifest.heartbeat,
                            manifest.grace, poll=poll, max_points=max_points, on_point=on_point)


def _worker_main(storage_url: str, study_name: str, sweep_dir: str, threads: int,
                 model_ref: str | None = None) -> int:
    """Entry point of a local worker process (``coqat frontier --workers N``). ``model_ref``:
    the user's ``file.py:factory`` that the parent was given in this invocation."""
    import torch

    torch.set_num_threads(threads)
    if model_ref is not None:
        use_user_model(load_user_model(model_ref))
    study, manifest = load_study(storage_url, study_name)
    return work(study, manifest, Path(sweep_dir))


def run_workers(manifest: Manifest, sweep_dir: Path, workers: int,
                on_progress: Callable[[dict[str, int], float], None] | None = None,
                model_ref: str | None = None) -> None:
    """Run ``workers`` local worker processes until the grid is complete. ``on_progress``
    is called about once a second with the progress counts and the elapsed seconds."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    procs = [ctx.Process(target=_worker_main, args=(manifest.storage, manifest.study,
                                                     str(sweep_dir), threads, model_ref),
                         daemon=False)
             for _ in range(workers)]
    for p in procs:
        p.start()
    study, _ = load_study(manifest.storage, manifest.study)
    t0 = time.monotonic()
    try:
        while True:
            alive = any(p.is_alive() for p in procs)
            if on_progress is not None:
                on_progress(progress(study, manifest), time.monotonic() - t0)
            if not alive:
                break
            time.sleep(1.0)
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


# ----- time estimate -----------------------------------------------------------------------
@dataclass
class Estimate:
    """What a sweep will take, from earlier runs of the same space on this machine."""

    point_s: float            # one point with one worker: FP phase share, search, final QAT
    points: int
    runs_seen: int            # earlier runs the figure comes from

    def total_s(self, workers: int = 1) -> float:
        """Serial time / workers: a lower bound when the workers share CPU cores."""
        return self.point_s * self.points / max(1, workers)


def estimate(out: str | Path, space: SearchSpace, points: int, steps_scale: float = 1.0,
             max_runs: int = 200) -> Estimate | None:
    """Seconds per point of a frontier over ``space``, from the finished runs of that space
    under ``out`` (a demo, a search, an earlier sweep): the median of their seconds per
    training step (the final QAT's wall time plus the search's, over its steps) times the
    space's steps. None when there is no such run to go by."""
    root = Path(out)
    if not root.is_dir():
        return None
    finals = [f for depth in range(1, 5) for f in sorted(root.glob("*/" * depth + FINAL))
              if not any(part.startswith(".") for part in f.relative_to(root).parts)]
    per_step: list[float] = []
    for final in finals[:max_runs]:
        try:
            rec = RunRecord.read(RunDir.open(final.parent))
        except (CoqatError, OSError):
            continue
        if rec.space != space.name or rec.method == "fp" or rec.steps <= 0 or rec.wall_s <= 0:
            continue
        extra = (rec.search.search_wall_s or 0.0) if rec.search is not None else 0.0
        per_step.append((rec.wall_s + extra) / rec.steps)
    if not per_step:
        return None
    per_step.sort()
    median = per_step[len(per_step) // 2]
    steps = max(1, round(space.train.steps * steps_scale))
    return Estimate(point_s=median * steps, points=points, runs_seen=len(per_step))
