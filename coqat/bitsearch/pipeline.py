"""``run_search``: budget -> (FP phase, cached) -> search method -> BitConfig -> final QAT.

This is the one entry point the CLI (``coqat search``), the Python API (``coqat.bitsearch``)
and the frontier sweep call, once per (budget, seed, method)::

    from coqat.config import RunConfig
    from coqat.bitsearch import run_search

    cfg = RunConfig.from_options("lm-tiny", seed=1, out="runs")
    run, record = run_search(cfg, "w4a4", method="gumbel")
    record.search.achieved_bops <= record.search.budget_bops; record.metric

Methods are ``coqat.bitsearch.methods`` objects (``gumbel``, ``optuna``, ``random``,
``uniform``; more can be registered). Every method ends in the *same* final QAT:
``runner.prepare(config, bits=chosen)`` + ``runner.execute``, i.e. exactly
``coqat train --bits <chosen bitconfig.json>`` with the same settings and seed.

FP phase cache. Methods with ``needs_fp`` start from FP-trained weights (searching from
random weights collapses to all-high bits, search_anchors.md §12). The FP phase is an
ordinary ``coqat train --bits fp`` run of ``fp_steps`` steps (``RunConfig.fp_phase``),
stored as a run directory under ``<out>/.fp-cache/<space>-s<seed>-<key>/``, where ``key``
hashes the workload table, the FP train settings, the seed, the device type and the data
dir (not the search keys: tuning the search reuses the FP phase). A later search with the
same key loads ``model.safetensors`` and skips training. The directory is trained under a
temporary name and renamed when complete, so a killed FP phase is never reused.
With ``Runtime.init_from`` (``--init-from RUN``, ``coqat.training.warmstart``) that run is
the FP phase: nothing is trained or cached, and the final QAT starts from its weights too.

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

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import coqat
from coqat.config import RunConfig
from coqat.cost import Budget
from coqat.errors import CoqatError
from coqat.records import RunRecord, SearchRecord
from coqat.rundir import RunDir
from coqat.bitsearch.baselines import fill_floor
from coqat.bitsearch.job import SearchContext, SearchJob
from coqat.bitsearch.methods import get_method
from coqat.bitsearch.problem import Assignment, SearchProblem
from coqat.targets import get_target
from coqat.training import runner
from coqat.training.distributed import DistEnv
from coqat.util import exclusive_lock, jsonl_appender

__all__ = ["plan_search", "execute_search", "run_search", "run_searches", "FP_CACHE",
           "SEARCH_DIR", "bits_histogram", "fp_cache_dir", "load_or_train_fp"]

FP_CACHE = ".fp-cache"
SEARCH_DIR = "search"


def plan_search(config: RunConfig, budget: str, method: str = "gumbel",
                target: str | None = None) -> SearchJob:
    """Validate a search (space, budget, method, settings, data, device); no files written."""
    chosen = get_method(method)
    if DistEnv.from_env().enabled:
        raise CoqatError("coqat search runs in one process; start it without torchrun (the"
                         " final QAT of a chosen config can run under torchrun with coqat train)")
    fp_steps, search_steps = config.search.resolved_steps(config.train.steps)
    prep = runner.prepare(config.fp_phase(fp_steps), bits="fp")
    problem = SearchProblem.build(prep.resolved, prep.cost, config.train.quantizer, target)
    parsed = Budget.parse(budget, prep.cost, prep.resolved.pinned)
    problem.check_budget(parsed.bops, parsed.expr)
    job = SearchJob(config, method, parsed, problem, prep, fp_steps, search_steps, target)
    check = getattr(chosen, "check", None)
    if check is not None:
        check(job)
    return job


def run_search(config: RunConfig, budget: str, method: str = "gumbel",
               target: str | None = None, final_qat: bool = True,
               seconds: float | None = None, say: Callable[[str], None] | None = None,
               run_dir: str | Path | None = None) -> tuple[RunDir, RunRecord]:
    """Search a config for ``budget`` with ``method``, train it, return (run, record).

    ``config``: the final QAT's settings, the search settings and the runtime.
    ``final_qat=False`` stops after writing the chosen bitconfig (metric None).
    ``seconds``: the time limit of time-boxed methods (Optuna; default: [search]
    optuna_seconds, else the estimated Gumbel search time). ``say``: where to print one-line
    phase notes. ``run_dir``: write the run exactly there (a new, empty directory; the
    frontier sweep names its points this way) instead of a stamped directory under
    ``config.runtime.out``.
    """
    job = plan_search(config, budget, method, target)
    return execute_search(job, final_qat=final_qat, seconds=seconds, say=say, run_dir=run_dir)


def run_searches(config: RunConfig, budget: str, methods: Sequence[str],
                 target: str | None = None, final_qat: bool = True,
                 say: Callable[[str], None] | None = None,
                 on_start: Callable[[SearchJob], None] | None = None) -> list[RunRecord]:
    """One search per method at the same budget (a method and its baselines). Every job is
    validated before the first one writes anything; Optuna gets the wall-clock of a Gumbel
    search that ran before it, so the two get equal time."""
    jobs = [plan_search(config, budget, m, target) for m in dict.fromkeys(methods)]
    records: list[RunRecord] = []
    seconds = None
    for job in jobs:
        if on_start is not None:
            on_start(job)
        _, rec = execute_search(job, final_qat=final_qat, seconds=seconds, say=say)
        if job.method == "gumbel" and rec.search is not None:
            seconds = rec.search.search_phase_wall_s
        records.append(rec)
    return records


def execute_search(job: SearchJob, final_qat: bool = True, seconds: float | None = None,
                   say: Callable[[str], None] | None = None,
                   run_dir: str | Path | None = None) -> tuple[RunDir, RunRecord]:
    say = say or (lambda _msg: None)
    rt, p, method = job.config.runtime, job.problem, get_method(job.method)
    if run_dir is None:
        run = RunDir.create(rt.out, f"{job.config.space.name}-{job.method}-"
                                    f"{job.budget.slug}-s{rt.seed}")
    else:
        run = RunDir.create_at(run_dir)
    trace = jsonl_appender(run.file(f"{SEARCH_DIR}/trace.jsonl"))
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    fp_dir = None
    if method.needs_fp and job.fp_prep.init is not None:   # --init-from: it is the FP phase
        init = job.fp_prep.init
        say(f"FP phase: the trained run {init['from']} ({init['metric_name']}"
            f" {init['metric']})")
        info["fp_phase"] = {"cache": init["from"], "reused": True, "metric": init["metric"],
                            "init_from": True}   # fp_dir stays None: nothing is written there
    elif method.needs_fp:
        info["fp_phase"] = load_or_train_fp(job, say)
        fp_dir = Path(info["fp_phase"]["cache"])
    choice = method.choose(job, SearchContext(trace, say, seconds, run, fp_dir))
    asg = choice.assignment
    info.update(choice.info)
    info["search_wall_s"] = round(time.perf_counter() - t0, 2)

    bops = p.bops(asg)
    if bops > job.budget.bops:  # a method's contract; a violation is a bug, not bad input
        raise RuntimeError(f"search method {job.method} returned {bops} BOPs over the budget"
                           f" {job.budget.bops}")
    free = job.budget.bops - p.fixed_bops
    macs = sum(p.macs[n] for n in p.searchable)
    fields = {f.name for f in dataclasses.fields(SearchRecord)}
    record = SearchRecord(
        method=job.method, budget_expr=job.budget.expr, budget_bops=job.budget.bops,
        achieved_bops=bops, achieved_over_budget=bops / job.budget.bops,
        fixed_bops=p.fixed_bops, searchable_budget_bops=free,
        searchable_over_budget=(bops - p.fixed_bops) / free,
        fill_floor_bops=fill_floor(p, job.budget.bops, job.settings.fill),
        bits_histogram=bits_histogram(p, asg),
        assignment={"w": list(asg.w), "a": list(asg.a)}, target=job.target,
        mean_wa=(bops - p.fixed_bops) / macs if macs else None,
        budget_mean_wa=free / macs if macs else None,
        **{k: v for k, v in info.items() if k in fields})
    cfg = p.config(asg, meta={
        "method": job.method, "budget_expr": job.budget.expr, "budget_bops": job.budget.bops,
        "achieved_bops": bops, "achieved_over_budget": record.achieved_over_budget,
        "searchable_over_budget": record.searchable_over_budget, "seed": rt.seed,
        "target": job.target, "repair": info.get("repair")})
    if job.target:
        get_target(job.target).check(cfg, {n: lc.op for n, lc in job.fp_prep.cost.layers.items()})
    summary = {**record.to_dict(), "seed": rt.seed, "space": job.config.space.name, **info,
               "settings": dataclasses.asdict(job.settings), "fp_steps": job.fp_steps,
               "search_steps": job.search_steps,
               "decisions": [{"name": d.name, "layers": list(d.layers),
                              "choices": list(d.choices)} for d in p.decisions]}
    run.write_json(f"{SEARCH_DIR}/search.json", summary)

    prep = runner.prepare(job.config, bits=cfg)
    prep.extra_config = {"search": {k: v for k, v in summary.items()
                                    if k not in ("probs", "decisions")}}
    if final_qat:
        say(f"final QAT of the {job.method} config ({bops / 1e9:.4g} of"
            f" {job.budget.bops / 1e9:.4g} GBOPs)")
        run, rec = runner.execute(prep, run=run, command="search", search=record)
    else:
        runner.write_run_header(run, prep, "search")
        wl = job.fp_prep.workload
        rec = RunRecord(
            metric_name=wl.metric, metric=None, higher_is_better=wl.higher_is_better,
            bits=cfg.summary(), bops=bops, space=job.config.space.name, seed=rt.seed,
            method=job.method, final_qat=False, budget_bops=job.budget.bops, search=record,
            run_dir=str(run.path))
        rec.write(run)
    return run, rec


# ----- the FP phase -------------------------------------------------------------------------
def fp_cache_key(job: SearchJob) -> str:
    prep = job.fp_prep
    doc = {"workload": job.config.space.workload, "train": dataclasses.asdict(prep.settings),
           "seed": job.seed, "device": prep.device.type,
           "data_dir": job.config.runtime.data_dir, "coqat": coqat.__version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def fp_cache_dir(job: SearchJob) -> Path:
    return Path(job.config.runtime.out) / FP_CACHE / \
        f"{job.config.space.name}-s{job.seed}-{fp_cache_key(job)[:16]}"


def load_or_train_fp(job: SearchJob, say: Callable[[str], None]) -> dict[str, Any]:
    """Put FP-phase weights into ``job.fp_prep.model``: from the cache, or by training
    (then caching). Returns where they came from.

    Frontier workers that need the same FP phase at once take turns on a lock file: the
    first trains it, the others wait and reuse it instead of training it again.
    """
    cache = fp_cache_dir(job)
    with exclusive_lock(cache.with_name(cache.name + ".lock")):
        return _load_or_train_fp_locked(job, cache, say)


def _load_or_train_fp_locked(job: SearchJob, cache: Path,
                             say: Callable[[str], None]) -> dict[str, Any]:
    prep = job.fp_prep
    done = RunDir(cache)
    if done.finished and done.has("model.safetensors"):
        prep.model.load_state_dict(done.load_weights())
        metric = RunRecord.read(done).metric
        say(f"FP phase: reusing {cache} ({job.fp_steps} steps, {prep.workload.metric}"
            f" {metric})")
        return {"cache": str(cache), "reused": True, "metric": metric}
    # temporary directories of FP phases killed earlier (the lock is ours: none is live)
    for stale in cache.parent.glob(f"{cache.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
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
    return {"cache": str(cache), "reused": False, "metric": final.metric}


def bits_histogram(p: SearchProblem, asg: Assignment) -> dict[str, int]:
    """How many searchable layers sit at each (w, a): {"w4a4": 20, "w3a6": 4, ...}."""
    hist: dict[str, int] = {}
    for n in p.searchable:
        w, a = p.bits_of(asg, n)
        hist[f"w{w}a{a}"] = hist.get(f"w{w}a{a}", 0) + 1
    return dict(sorted(hist.items()))
