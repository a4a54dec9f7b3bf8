"""``run_search``: budget -> (FP phase, cached) -> search -> repaired BitConfig -> final QAT.

This is the one entry point the CLI (``coqat search``) and the frontier sweep call, once per
(budget, seed, method)::

    from coqat.search import run_search
    from coqat.train.runner import TrainOptions

    run, result = run_search("lm-tiny", "w4a4", method="gumbel",
                             options=TrainOptions(seed=1, out="runs"))
    result["achieved_bops"] <= result["budget_bops"]; result["metric"]

Methods: ``gumbel`` (the differentiable search, ``coqat.search.gumbel``), ``optuna`` and
``random`` (black-box baselines) and ``uniform`` (uniform precision at the largest BOPs not
above the budget), see ``coqat.search.baselines``. Every method ends in the *same* final
QAT: ``runner.prepare(space, options, bitconfig=chosen)`` + ``runner.execute``, i.e. exactly
``coqat train --bits <chosen bitconfig.json>`` with the same options and seed.

FP phase cache. The Gumbel and Optuna methods start from FP-trained weights (searching from
random weights collapses to all-high bits, search_anchors.md §12). The FP phase is an
ordinary ``coqat train --bits fp`` run of ``fp_steps`` steps, stored as a run directory under
``<out>/.fp-cache/<space>-s<seed>-<key>/``, where ``key`` hashes the workload table, the
resolved FP train settings, the seed, the device type and the data dir (not the search
keys: tuning the search reuses the FP phase). A later search with the same key loads
``model.safetensors`` and skips training. The directory is trained under a temporary name
and renamed when complete, so a killed FP phase is never reused.

Run directory of a search (everything ``coqat train`` writes, plus ``search/``)::

    <out>/<space>-<method>-<budget>-s<seed>-<stamp>/
      bitconfig.json     chosen config; meta: budget, achieved/target, method, repair distance
      search/search.json summary (method, settings, repair, final probabilities, timings)
      search/trace.jsonl gumbel: per architecture step mu, temperature, E[BOPs]/B, holdout
                         loss, entropy; per-decision probabilities every trace_every steps
                         optuna: one line per trial (proxy loss, BOPs/B, feasible)
      config.json, metrics.jsonl, final.json, model.safetensors, ...   (the final QAT)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import coqat
from coqat.config import SearchSpace, load_space
from coqat.cost import parse_budget
from coqat.errors import CoqatError
from coqat.optim.schedules import Schedule
from coqat.report.rundir import FINAL, RunDir
from coqat.search.baselines import (fill_floor, optuna_search, proxy_loss_fn,
                                    random_assignment, repair_towards, uniform_at_budget)
from coqat.search.gumbel import GumbelSearch, GumbelSearchHooks, derive
from coqat.search.problem import Assignment, SearchProblem
from coqat.search.relax import set_assignment, to_search_model
from coqat.search.settings import SearchSettings, parse_search_settings
from coqat.train import runner
from coqat.train.distributed import DistEnv
from coqat.train.loop import train
from coqat.train.runner import TrainOptions
from coqat.workloads.sampling import stable_seed

METHODS = ("gumbel", "optuna", "random", "uniform")
FP_CACHE = ".fp-cache"
SEARCH_DIR = "search"


@dataclass
class SearchJob:
    """Everything validated before any file is written."""

    space: SearchSpace
    method: str
    budget_expr: str
    budget: int
    problem: SearchProblem
    settings: SearchSettings
    options: TrainOptions
    fp_prep: runner.Prepared          # model (fresh), cost, resolved space, workload, device
    fp_steps: int
    search_steps: int
    target: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_fp(self) -> bool:
        return self.method in ("gumbel", "optuna")


def plan_search(space_ref: str | Path | SearchSpace, budget: str, method: str = "gumbel",
                options: TrainOptions | None = None, target: str | None = None,
                overrides: dict[str, Any] | None = None) -> SearchJob:
    """Validate a search (space, budget, method, settings, data, device); no files written."""
    options = options or TrainOptions()
    if method not in METHODS:
        raise CoqatError(f"unknown search method {method!r}; use one of {', '.join(METHODS)}")
    if DistEnv.from_env().enabled:
        raise CoqatError("coqat search runs in one process; start it without torchrun (the"
                         " final QAT of a chosen config can run under torchrun with coqat train)")
    space = space_ref if isinstance(space_ref, SearchSpace) else load_space(space_ref)
    settings = parse_search_settings(space).replace(**(overrides or {}))
    space.train.replace(**options.settings_overrides())  # the final QAT's options are valid
    fp_steps, search_steps = settings.resolved_steps(options.steps or space.train.steps)
    fp_opts = TrainOptions(bits="fp", steps=fp_steps, lr=options.lr,
                           batch_size=options.batch_size, seed=options.seed,
                           device=options.device, data_dir=options.data_dir, out=options.out,
                           progress=options.progress)
    prep = runner.prepare(space, fp_opts)
    problem = SearchProblem.build(prep.resolved, prep.cost, prep.settings.quantizer, target)
    bops = parse_budget(budget, prep.cost, prep.resolved.pinned)
    problem.check_budget(bops, budget)
    if method == "uniform":
        uniform_at_budget(problem, prep.resolved.uniform_candidates(), bops)
    return SearchJob(space, method, str(budget).strip(), bops, problem, settings, options,
                     prep, fp_steps, search_steps, target)


def run_search(space: str | Path | SearchSpace, budget: str, method: str = "gumbel",
               options: TrainOptions | None = None, target: str | None = None,
               overrides: dict[str, Any] | None = None, final_qat: bool = True,
               optuna_seconds: float | None = None,
               say: Callable[[str], None] | None = None,
               run_dir: str | Path | None = None) -> tuple[RunDir, dict[str, Any]]:
    """Search a config for ``budget`` with ``method``, train it, return (run, result).

    ``options``: the final QAT's options (steps, seed, device, out, optimizer, ...; ``bits``
    is ignored). ``overrides``: search settings over the space's [search] keys.
    ``final_qat=False`` stops after writing the chosen bitconfig (metric None).
    ``optuna_seconds``: Optuna's time limit (default: [search] optuna_seconds, else the
    estimated Gumbel search time). ``say``: where to print one-line phase notes.
    ``run_dir``: write the run exactly there (a new, empty directory; the frontier sweep
    names its points this way) instead of a stamped directory under ``options.out``.
    """
    job = plan_search(space, budget, method, options, target, overrides)
    return execute_search(job, final_qat=final_qat, optuna_seconds=optuna_seconds, say=say,
                          run_dir=run_dir)


def execute_search(job: SearchJob, final_qat: bool = True, optuna_seconds: float | None = None,
                   say: Callable[[str], None] | None = None,
                   run_dir: str | Path | None = None) -> tuple[RunDir, dict[str, Any]]:
    say = say or (lambda _msg: None)
    opts, p = job.options, job.problem
    if run_dir is None:
        run = RunDir.create(opts.out, f"{job.space.name}-{job.method}-"
                                      f"{_slug(job.budget_expr)}-s{opts.seed}")
    else:
        Path(run_dir).mkdir(parents=True, exist_ok=False)
        run = RunDir(run_dir)
    trace_path = run.file(f"{SEARCH_DIR}/trace.jsonl")
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    trace = _jsonl_writer(trace_path)
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if job.needs_fp:
        info["fp_phase"] = load_or_train_fp(job, say)
    if job.method == "uniform":
        (w, a), asg = uniform_at_budget(p, job.fp_prep.resolved.uniform_candidates(), job.budget)
        info["uniform"] = f"w{w}a{a}"
        say(f"uniform baseline: w{w}a{a}")
    elif job.method == "random":
        ref = random_assignment(p, stable_seed(opts.seed, "random-config", job.budget))
        fixed = repair_towards(p, ref, job.budget, job.settings.fill)
        asg = fixed.assignment
        info["repair"] = _repair_info(p, ref, fixed, None)
    elif job.method == "gumbel":
        asg, gumbel_info = _run_gumbel(job, trace, say)
        info.update(gumbel_info)
    else:
        asg, optuna_info = _run_optuna(job, trace, optuna_seconds, say)
        info.update(optuna_info)
    info["search_wall_s"] = round(time.perf_counter() - t0, 2)

    bops = p.bops(asg)
    assert bops <= job.budget, (bops, job.budget)
    free = job.budget - p.fixed_bops
    record = {
        "method": job.method, "space": job.space.name, "seed": opts.seed,
        "target": job.target, "budget_expr": job.budget_expr, "budget_bops": job.budget,
        "achieved_bops": bops, "achieved_over_budget": bops / job.budget,
        "fixed_bops": p.fixed_bops, "searchable_budget_bops": free,
        "searchable_over_budget": (bops - p.fixed_bops) / free,
        "fill_floor_bops": fill_floor(p, job.budget, job.settings.fill),
        "bits_histogram": bits_histogram(p, asg),
        "assignment": {"w": list(asg.w), "a": list(asg.a)},
    }
    cfg = p.config(asg, meta={**{k: record[k] for k in (
        "method", "budget_expr", "budget_bops", "achieved_bops", "achieved_over_budget",
        "searchable_over_budget", "seed", "target")}, "repair": info.get("repair")})
    if job.target:
        from coqat.export.targets import get_target

        get_target(job.target).check(cfg, {n: lc.op for n, lc in job.fp_prep.cost.layers.items()})
    summary = {**record, **info, "settings": dataclasses.asdict(job.settings),
               "fp_steps": job.fp_steps, "search_steps": job.search_steps,
               "decisions": [{"name": d.name, "layers": list(d.layers),
                              "choices": list(d.choices)} for d in p.decisions]}
    run.write_json(f"{SEARCH_DIR}/search.json", summary)

    prep = runner.prepare(job.space, dataclasses.replace(opts, bits="fp"), bitconfig=cfg)
    prep.extra_config = {"search": {k: v for k, v in summary.items()
                                    if k not in ("probs", "decisions")}}
    short = {k: info[k] for k in ("search_wall_s", "search_phase_wall_s", "repair", "uniform",
                                  "fp_phase", "optuna", "mu_final", "arch_steps") if k in info}
    if final_qat:
        say(f"final QAT of the {job.method} config ({bops / 1e9:.4g} of {job.budget / 1e9:.4g}"
            f" GBOPs)")
        run, final = runner.execute(prep, run=run, command="search")
        result = {**final, **record, **short}
    else:
        runner.write_run_header(run, prep, "search")
        result = {"metric_name": job.fp_prep.workload.metric, "metric": None,
                  "higher_is_better": job.fp_prep.workload.higher_is_better,
                  "bits": cfg.summary(), "bops": bops, "final_qat": False, **record, **short}
    result.setdefault("bops", bops)
    result["run_dir"] = str(run.path)
    run.write_json(FINAL, result)
    return run, result


# ----- phases ----------------------------------------------------------------------------
def fp_cache_key(job: SearchJob) -> str:
    prep = job.fp_prep
    doc = {"workload": job.space.workload, "train": dataclasses.asdict(prep.settings),
           "seed": job.options.seed, "device": prep.device.type,
           "data_dir": job.options.data_dir, "coqat": coqat.__version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def fp_cache_dir(job: SearchJob) -> Path:
    return Path(job.options.out) / FP_CACHE / \
        f"{job.space.name}-s{job.options.seed}-{fp_cache_key(job)[:16]}"


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (POSIX advisory lock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:              # not POSIX: the rename below still keeps one copy
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_or_train_fp(job: SearchJob, say: Callable[[str], None]) -> dict[str, Any]:
    """Put FP-phase weights into ``job.fp_prep.model``: from the cache, or by training
    (then caching). Returns where they came from.

    Frontier workers that need the same FP phase at once take turns on a lock file: the
    first trains it, the others wait and reuse it instead of training it again.
    """
    cache = fp_cache_dir(job)
    with _exclusive(cache.with_name(cache.name + ".lock")):
        return _load_or_train_fp_locked(job, cache, say)


def _load_or_train_fp_locked(job: SearchJob, cache: Path,
                             say: Callable[[str], None]) -> dict[str, Any]:
    prep = job.fp_prep
    done = RunDir(cache)
    if done.finished and done.has("model.safetensors"):
        prep.model.load_state_dict(done.load_weights())
        metric = done.read_json(FINAL).get("metric")
        say(f"FP phase: reusing {cache} ({job.fp_steps} steps, {prep.workload.metric}"
            f" {metric})")
        return {"cache": str(cache), "reused": True, "metric": metric}
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir(parents=True)
    say(f"FP phase: training {job.fp_steps} steps (cached in {cache})")
    try:
        _, final = runner.execute(prep, run=RunDir(tmp), command="search-fp-phase")
        try:
            os.rename(tmp, cache)
        except OSError:          # another process cached the same phase first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"cache": str(cache), "reused": False, "metric": final.get("metric")}


def arch_step_count(search_steps: int, arch_every: int) -> int:
    """Architecture steps in a search: one every ``arch_every`` steps, and one at the end."""
    return search_steps // arch_every + (1 if search_steps % arch_every else 0)


class _CappedEvaluation:
    """The workload, with evaluations capped at ``max_batches``: the loop's end-of-search
    evaluation is a diagnostic (argmax config, search-phase weights), not a result, and a
    full validation pass would cost as much as part of the search."""

    def __init__(self, inner, max_batches: int):
        self._inner, self._max = inner, max_batches

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def evaluate(self, model, max_batches=None, batch_size=64, split="val"):
        cap = self._max if max_batches is None else min(max_batches, self._max)
        return self._inner.evaluate(model, max_batches=cap, batch_size=batch_size, split=split)


def _run_gumbel(job: SearchJob, trace: Callable[[dict], None],
                say: Callable[[str], None]) -> tuple[Assignment, dict[str, Any]]:
    prep, s, p = job.fp_prep, job.settings, job.problem
    model = prep.model
    modules = to_search_model(model, p)
    n_arch = arch_step_count(job.search_steps, s.arch_every)
    search = GumbelSearch(p, prep.cost, modules, job.budget, s, job.options.seed, prep.device,
                          arch_steps=n_arch)
    arch_bs = s.resolved_arch_batch(prep.settings.batch_size)
    hooks = GumbelSearchHooks(search, job.search_steps, arch_bs, trace=trace)
    settings = prep.settings.replace(
        steps=job.search_steps, lr=prep.settings.lr * s.weight_lr_scale, warmup_steps=0,
        eval_every=job.search_steps, checkpoint_every=job.search_steps,
        log_every=max(1, min(prep.settings.log_every, job.search_steps)))
    schedule = Schedule(job.search_steps, 0, decay_frac=0.0, min_lr_ratio=1.0)
    say(f"search: {job.search_steps} weight steps, {n_arch} architecture steps on holdout,"
        f" {len(p.w_decisions)} weight + {len(p.a_decisions)} activation decisions")
    t0 = time.perf_counter()
    capped = _CappedEvaluation(prep.workload, prep.settings.eval_batches)
    final = train(model=model, workload=capped,
                  settings=settings, schedule=schedule, bitconfig=None, device=prep.device,
                  run=None, hooks=[hooks], progress=job.options.progress,
                  label=f"search {job.budget_expr}")
    wall = time.perf_counter() - t0
    derived = derive(search, s.fill)
    asg = derived.assignment
    info = {
        "search_phase_wall_s": round(wall, 2),
        "arch_steps": n_arch, "arch_wall_s": round(hooks.t_arch, 2),
        "mu_final": search.mu, "tau_final": search.temperature(),
        "entropy_final": search.entropy(),
        "e_bops_over_budget_final": float(search.expected_bops().detach()) / job.budget,
        "argmax_eval": {k: final[k] for k in (prep.workload.metric,) if k in final},
        "repair": _repair_info(p, derived.argmax, derived.repaired, derived.logprob_lost),
        "probs": search.prob_table(),
    }
    say(f"search done: mu {search.mu:.3g}, E[BOPs]/B {info['e_bops_over_budget_final']:.3f},"
        f" argmax {derived.argmax_bops / job.budget:.3f} x budget, repair changed"
        f" {derived.layers_changed} layer(s)")
    return asg, info


def estimate_search_seconds(job: SearchJob, probe_steps: int = 3) -> float:
    """Wall-clock a Gumbel search of this job would take, from a few timed steps on a copy
    of the model (Optuna's time limit when no Gumbel search ran alongside)."""
    prep, s, p = job.fp_prep, job.settings, job.problem
    model = copy.deepcopy(prep.model).to(prep.device)
    modules = to_search_model(model, p)
    search = GumbelSearch(p, prep.cost, modules, job.budget, s, job.options.seed, prep.device)
    opt = torch.optim.AdamW(model.parameters(), lr=prep.settings.lr * s.weight_lr_scale)
    arch_bs = s.resolved_arch_batch(prep.settings.batch_size)
    times_w, times_a = [], []
    for i in range(probe_steps + 1):
        batch = tuple(t.to(prep.device) for t in prep.workload.get_batch(
            "train", i, prep.settings.batch_size))
        t0 = time.perf_counter()
        search.apply(search.sample(i, "weights", "hard"))
        prep.workload.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        hb = tuple(t.to(prep.device) for t in prep.workload.get_batch("holdout", i, arch_bs))
        search.arch_step(model, hb, prep.workload.loss, i)
        t2 = time.perf_counter()
        if i:  # the first step pays one-time costs
            times_w.append(t1 - t0)
            times_a.append(t2 - t1)
    n_arch = arch_step_count(job.search_steps, s.arch_every)
    return job.search_steps * sum(times_w) / len(times_w) + n_arch * sum(times_a) / len(times_a)


def _run_optuna(job: SearchJob, trace: Callable[[dict], None], seconds: float | None,
                say: Callable[[str], None]) -> tuple[Assignment, dict[str, Any]]:
    prep, s, p = job.fp_prep, job.settings, job.problem
    if seconds is None:
        seconds = s.optuna_seconds or estimate_search_seconds(job)
    model = prep.model.to(prep.device)   # FP weights loaded from the cache sit on the CPU
    modules = to_search_model(model, p)
    arch_bs = s.resolved_arch_batch(prep.settings.batch_size)
    proxy = proxy_loss_fn(model, lambda a: set_assignment(modules, p, a), prep.workload,
                          s.proxy_batches, arch_bs, prep.device)
    try:
        _, start = uniform_at_budget(p, prep.resolved.uniform_candidates(), job.budget)
    except CoqatError:
        start = None
    say(f"optuna: multi-objective TPE for {seconds:.0f} s"
        + (f" (at most {s.optuna_trials} trials)" if s.optuna_trials else ""))
    bar = _TrialProgress(seconds, job.options.progress)
    with bar:
        best, summary = optuna_search(p, proxy, job.budget, job.options.seed, seconds,
                                      s.optuna_trials, start,
                                      on_trial=lambda r: (trace({"kind": "trial", **r}),
                                                          bar.update(r)))
    fixed = repair_towards(p, best, job.budget, s.fill)
    say(f"optuna done: {summary['trials']} trials ({summary['feasible_trials']} feasible)")
    return fixed.assignment, {"optuna": summary,
                              "repair": _repair_info(p, best, fixed, None)}


# ----- helpers -----------------------------------------------------------------------------
def _repair_info(p: SearchProblem, ref: Assignment, fixed, logprob_lost: float | None
                 ) -> dict[str, Any]:
    out = {"from_bops": p.bops(ref), "to_bops": fixed.bops,
           "layers_changed": p.distance(ref, fixed.assignment), "exact": fixed.exact,
           "reached_fill": fixed.reached_lo}
    if logprob_lost is not None:
        out["logprob_lost"] = round(float(logprob_lost), 6)
    return out


def bits_histogram(p: SearchProblem, asg: Assignment) -> dict[str, int]:
    """How many searchable layers sit at each (w, a): {"w4a4": 20, "w3a6": 4, ...}."""
    hist: dict[str, int] = {}
    for n in p.searchable:
        w, a = p.bits_of(asg, n)
        hist[f"w{w}a{a}"] = hist.get(f"w{w}a{a}", 0) + 1
    return dict(sorted(hist.items()))


def _slug(expr: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", expr.replace("*", "x")).strip("_")[:40] or "budget"


def _jsonl_writer(path: Path) -> Callable[[dict], None]:
    def write(rec: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(rec, default=float) + "\n")

    return write


class _TrialProgress:
    """A rich bar over Optuna's time limit (trials are not known in advance)."""

    def __init__(self, seconds: float, enabled: bool):
        self.enabled, self.seconds, self.t0, self.best = enabled, seconds, 0.0, None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("[bold]optuna"), BarColumn(bar_width=24),
                               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
            self._task = self._p.add_task("optuna", total=max(seconds, 1e-3), note="")

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._p.update(self._task, completed=self.seconds)
            self._p.__exit__(*exc)

    def update(self, rec: dict) -> None:
        if rec["feasible"] and (self.best is None or rec["proxy_loss"] < self.best):
            self.best = rec["proxy_loss"]
        if self.enabled:
            note = f"trial {rec['trial'] + 1}" + (f", best feasible proxy {self.best:.4f}"
                                                  if self.best is not None else "")
            self._p.update(self._task, completed=min(time.perf_counter() - self.t0,
                                                     self.seconds), note=note)
