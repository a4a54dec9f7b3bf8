"""Search methods: one small object per way of choosing a configuration, one registry.

A method takes a validated ``SearchJob`` and returns a ``Choice``: an assignment whose
BOPs are within the budget, and notes on how it was found. Everything around it (the FP
phase, the run directory, the final QAT, the record) is the pipeline's, identical for every
method, so differences between methods come from the bits alone::

    class MyMethod:
        name = "mine"
        needs_fp = True           # start from the cached FP-phase weights
        def choose(self, job, ctx): ...
    register_method(MyMethod())

Built in: ``gumbel`` (the differentiable search), ``uniform``, ``random``, ``optuna``,
``sensitivity`` (measured per-tensor loss changes + the exact knapsack).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Protocol

import torch

from coqat.errors import CoqatError
from coqat.optim.schedules import Schedule
from coqat.bitsearch.baselines import (optuna_search, proxy_loss_fn, random_assignment,
                                    repair_towards, uniform_at_budget)
from coqat.bitsearch.gumbel import GumbelSearch, GumbelSearchHooks, derive
from coqat.bitsearch.job import Choice, SearchContext, SearchJob
from coqat.bitsearch.problem import Assignment, SearchProblem
from coqat.bitsearch.relax import set_assignment, to_search_model
from coqat.bitsearch import sensitivity
from coqat.training.loop import train
from coqat.util import exclusive_lock
from coqat.workloads.base import to_device
from coqat.workloads.sampling import stable_seed

__all__ = ["SearchMethod", "METHODS", "register_method", "get_method", "arch_step_count",
           "estimate_search_seconds", "repair_info"]


class SearchMethod(Protocol):
    name: str
    #: True: the method starts from the FP-phase weights (trained once per space and seed,
    #: then cached); False: it needs no trained weights (uniform, random)
    needs_fp: bool

    def choose(self, job: SearchJob, ctx: SearchContext) -> Choice: ...


METHODS: dict[str, SearchMethod] = {}


def register_method(method: SearchMethod) -> SearchMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> SearchMethod:
    if name not in METHODS:
        raise CoqatError(f"unknown search method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


# ----- the built-in methods -------------------------------------------------------------------
class UniformMethod:
    """Uniform precision at the largest BOPs not above the budget."""

    name, needs_fp = "uniform", False

    def choose(self, job: SearchJob, ctx: SearchContext) -> Choice:
        (w, a), asg = uniform_at_budget(job.problem, job.fp_prep.resolved.uniform_candidates(),
                                        job.budget.bops)
        ctx.say(f"uniform baseline: w{w}a{a}")
        return Choice(asg, {"uniform": f"w{w}a{a}"})

    def check(self, job: SearchJob) -> None:
        """A uniform config must exist under the budget (checked before anything runs)."""
        uniform_at_budget(job.problem, job.fp_prep.resolved.uniform_candidates(),
                          job.budget.bops)


class RandomMethod:
    """One seeded random configuration, repaired into the budget's fill window."""

    name, needs_fp = "random", False

    def choose(self, job: SearchJob, ctx: SearchContext) -> Choice:
        p = job.problem
        ref = random_assignment(p, stable_seed(job.seed, "random-config", job.budget.bops))
        fixed = repair_towards(p, ref, job.budget.bops, job.settings.fill)
        return Choice(fixed.assignment, {"repair": repair_info(p, ref, fixed, None)})


class GumbelMethod:
    """The differentiable search (``coqat.bitsearch.gumbel``) on the FP-phase weights."""

    name, needs_fp = "gumbel", True

    def choose(self, job: SearchJob, ctx: SearchContext) -> Choice:
        prep, s, p = job.fp_prep, job.settings, job.problem
        model = prep.model
        modules = to_search_model(model, p)
        n_arch = arch_step_count(job.search_steps, s.arch_every)
        search = GumbelSearch(p, prep.cost, modules, job.budget.bops, s, job.seed, prep.device,
                              arch_steps=n_arch)
        arch_bs = s.resolved_arch_batch(prep.settings.batch_size)
        hooks = GumbelSearchHooks(search, job.search_steps, arch_bs, trace=ctx.trace)
        settings = prep.settings.replace(
            steps=job.search_steps, lr=prep.settings.lr * s.weight_lr_scale, warmup_steps=0,
            eval_every=job.search_steps, checkpoint_every=job.search_steps,
            log_every=max(1, min(prep.settings.log_every, job.search_steps)))
        schedule = Schedule(job.search_steps, 0, decay_frac=0.0, min_lr_ratio=1.0)
        ctx.say(f"search: {job.search_steps} weight steps, {n_arch} architecture steps on"
                f" holdout, {len(p.w_decisions)} weight + {len(p.a_decisions)} activation"
                " decisions")
        t0 = time.perf_counter()
        capped = _CappedEvaluation(prep.workload, prep.settings.eval_batches)
        final = train(model=model, workload=capped, settings=settings, schedule=schedule,
                      bitconfig=None, device=prep.device, run=None, hooks=[hooks],
                      progress=job.config.runtime.progress, label=f"search {job.budget.expr}")
        wall = time.perf_counter() - t0
        derived = derive(search, s.fill)
        budget = job.budget.bops
        info = {
            "search_phase_wall_s": round(wall, 2),
            "arch_steps": n_arch, "arch_wall_s": round(hooks.t_arch, 2),
            "mu_final": search.mu, "tau_final": search.temperature(),
            "entropy_final": search.entropy(),
            "e_bops_over_budget_final": float(search.expected_bops().detach()) / budget,
            "argmax_eval": {k: final[k] for k in (prep.workload.metric,) if k in final},
            "repair": repair_info(p, derived.argmax, derived.repaired, derived.logprob_lost),
            "probs": search.prob_table(),
        }
        ctx.say(f"search done: mu {search.mu:.3g}, E[BOPs]/B"
                f" {info['e_bops_over_budget_final']:.3f}, argmax"
                f" {derived.argmax_bops / budget:.3f} x budget, repair changed"
                f" {derived.layers_changed} layer(s)")
        return Choice(derived.assignment, info)


class OptunaMethod:
    """Multi-objective TPE over every decision on a calibration-free proxy, time-boxed."""

    name, needs_fp = "optuna", True

    def choose(self, job: SearchJob, ctx: SearchContext) -> Choice:
        prep, s, p = job.fp_prep, job.settings, job.problem
        seconds = ctx.seconds
        if seconds is None:
            seconds = s.optuna_seconds or estimate_search_seconds(job)
        model = prep.model.to(prep.device)   # FP weights loaded from the cache sit on the CPU
        modules = to_search_model(model, p)
        arch_bs = s.resolved_arch_batch(prep.settings.batch_size)
        proxy = proxy_loss_fn(model, lambda a: set_assignment(modules, p, a), prep.workload,
                              s.proxy_batches, arch_bs, prep.device)
        try:
            _, start = uniform_at_budget(p, prep.resolved.uniform_candidates(), job.budget.bops)
        except CoqatError:
            start = None
        ctx.say(f"optuna: multi-objective TPE for {seconds:.0f} s"
                + (f" (at most {s.optuna_trials} trials)" if s.optuna_trials else ""))
        bar = _TrialProgress(seconds, job.config.runtime.progress)
        with bar:
            best, summary = optuna_search(p, proxy, job.budget.bops, job.seed, seconds,
                                          s.optuna_trials, start,
                                          on_trial=lambda r: (ctx.trace({"kind": "trial", **r}),
                                                              bar.update(r)))
        fixed = repair_towards(p, best, job.budget.bops, s.fill)
        ctx.say(f"optuna done: {summary['trials']} trials ({summary['feasible_trials']}"
                " feasible)")
        return Choice(fixed.assignment, {"optuna": summary,
                                         "repair": repair_info(p, best, fixed, None)})


class SensitivityMethod:
    """HAWQ-V3 / AutoQuantize style: measure each tensor's loss change at each width on the
    FP-phase weights (``coqat.bitsearch.sensitivity``), take minus that as the value of the
    choice, and let the exact knapsack pick the config of least predicted loss change in the
    budget's fill window. No training, no randomness: the same FP phase gives the same config.
    Each row is first made non-negative and non-increasing in bits (``[search]
    sensitivity_clean``, default "monotone"; see ``sensitivity.monotone_row``).

    The table is measured on ``[search] proxy_batches`` holdout batches of the eval batch
    size (the batches Optuna's proxy also uses) and written to ``search/sensitivity.json``;
    with ``[search] sensitivity_estimate = "fisher"`` it is the second-order estimate
    (``sensitivity.estimate``) on the same batches instead.
    """

    name, needs_fp = "sensitivity", True

    def choose(self, job: SearchJob, ctx: SearchContext) -> Choice:
        prep, s, p = job.fp_prep, job.settings, job.problem
        bs = prep.settings.eval_batch_size
        ctx.say(f"sensitivity: {len(p.w_decisions)} weight + {len(p.a_decisions)} activation"
                f" decisions, {s.proxy_batches} holdout batch(es) of {bs}")

        def measure() -> sensitivity.Sensitivity:
            return sensitivity.table(s.sensitivity_estimate, prep.model, p, prep.workload,
                                     batches=s.proxy_batches, batch_size=bs,
                                     device=prep.device, source=job.config.space.name,
                                     weights=(f"FP phase ({job.fp_steps} steps, seed"
                                              f" {job.seed})" if prep.init is None else
                                              f"the trained run {prep.init['from']}"))

        if ctx.fp_dir is None:
            table = measure()
        else:   # the table depends on the FP weights only: measured once per FP phase,
            # whatever the budget; searches of one seed running at once take turns on a lock
            # file, so the first measures it and the others read it
            cached = ctx.fp_dir / sensitivity.cache_name(p, s.proxy_batches, bs, prep.device,
                                                         s.sensitivity_estimate)
            with exclusive_lock(cached.with_name(cached.name + ".lock")):
                if cached.is_file():
                    table = sensitivity.Sensitivity.load(cached)
                    ctx.say(f"sensitivity: reusing {cached}")
                else:
                    table = measure()
                    table.save(cached)
        if ctx.run is not None:
            table.save(ctx.run.file(f"search/{sensitivity.FILE}"))
        wv, av = sensitivity.values(table, p, s.sensitivity_clean)
        # the best config without a budget: where the budget's pull starts from
        free = Assignment(tuple(d.choices[v.index(max(v))] for d, v in zip(p.w_decisions, wv)),
                          tuple(d.choices[v.index(max(v))] for d, v in zip(p.a_decisions, av)))
        fixed = sensitivity.knapsack(table, p, job.budget.bops, s.fill, s.sensitivity_clean)
        # what the raw table predicts for the config, and what the knapsack optimised
        predicted = sensitivity.predicted_delta(table, p, fixed.assignment)
        optimised = sensitivity.predicted_delta(table, p, fixed.assignment, s.sensitivity_clean)
        ctx.say(f"sensitivity done: {table.forward_passes} forward passes in {table.wall_s:.1f}"
                f" s; predicted loss change {predicted:+.4f} raw, {optimised:+.4f} read"
                f" {s.sensitivity_clean} (float loss {table.baseline_loss:.4f}, noise per cell"
                f" {table.noise() or 0:.2g})")
        return Choice(fixed.assignment, {
            "search_phase_wall_s": table.wall_s,
            "repair": repair_info(p, free, fixed, None),
            "sensitivity": {"file": f"search/{sensitivity.FILE}",
                            "predicted_delta_loss": predicted,
                            "clean": s.sensitivity_clean,
                            "predicted_delta_loss_clean": optimised,
                            "baseline_loss": table.baseline_loss, "noise": table.noise(),
                            "batches": table.batches, "batch_size": table.batch_size,
                            "forward_passes": table.forward_passes}})


for _m in (GumbelMethod(), OptunaMethod(), RandomMethod(), SensitivityMethod(),
           UniformMethod()):
    register_method(_m)


# ----- helpers ---------------------------------------------------------------------------------
def arch_step_count(search_steps: int, arch_every: int) -> int:
    """Architecture steps in a search: one every ``arch_every`` steps, and one at the end."""
    return search_steps // arch_every + (1 if search_steps % arch_every else 0)


def repair_info(p: SearchProblem, ref: Assignment, fixed, logprob_lost: float | None
                ) -> dict[str, Any]:
    out = {"from_bops": p.bops(ref), "to_bops": fixed.bops,
           "layers_changed": p.distance(ref, fixed.assignment), "exact": fixed.exact,
           "reached_fill": fixed.reached_lo}
    if logprob_lost is not None:
        out["logprob_lost"] = round(float(logprob_lost), 6)
    return out


def estimate_search_seconds(job: SearchJob, probe_steps: int = 3) -> float:
    """Wall-clock a Gumbel search of this job would take, from a few timed steps on a copy
    of the model (Optuna's time limit when no Gumbel search ran alongside)."""
    prep, s, p = job.fp_prep, job.settings, job.problem
    model = copy.deepcopy(prep.model).to(prep.device)
    modules = to_search_model(model, p)
    search = GumbelSearch(p, prep.cost, modules, job.budget.bops, s, job.seed, prep.device)
    opt = torch.optim.AdamW(model.parameters(), lr=prep.settings.lr * s.weight_lr_scale)
    arch_bs = s.resolved_arch_batch(prep.settings.batch_size)
    times_w, times_a = [], []
    for i in range(probe_steps + 1):
        batch = to_device(prep.workload.get_batch("train", i, prep.settings.batch_size),
                          prep.device)
        t0 = time.perf_counter()
        search.apply(search.sample(i, "weights", "hard"))
        prep.workload.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        hb = to_device(prep.workload.get_batch("holdout", i, arch_bs), prep.device)
        search.arch_step(model, hb, prep.workload.loss, i)
        t2 = time.perf_counter()
        if i:  # the first step pays one-time costs
            times_w.append(t1 - t0)
            times_a.append(t2 - t1)
    n_arch = arch_step_count(job.search_steps, s.arch_every)
    return job.search_steps * sum(times_w) / len(times_w) + n_arch * sum(times_a) / len(times_a)


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


class _TrialProgress:
    """A rich bar over Optuna's time limit (trials are not known in advance)."""

    def __init__(self, seconds: float, enabled: bool):
        self.enabled, self.seconds, self.t0, self.best = enabled, seconds, 0.0, None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("optuna", style="bold", markup=False),
                               BarColumn(bar_width=24),
                               TextColumn("{task.fields[note]}", markup=False),
                               TimeElapsedColumn())
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

