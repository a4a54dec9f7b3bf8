"""Baselines the Gumbel search must beat: uniform precision, random configs, Optuna.

- **uniform**: the uniform (w, a) that every searchable decision allows, at the largest
  BOPs not above the budget (``ResolvedSpace.uniform_candidates``, restricted to the
  target). Among equal-BOPs pairs (w4a8 and w8a4) the balanced one, then the one with more
  activation bits, wins.
- **random**: one configuration drawn uniformly per decision (seeded), then the same
  knapsack repair as the search, valued by "layers unchanged", into the same fill window.
- **optuna**: multi-objective TPE (Optuna) over every decision, objectives (proxy loss,
  BOPs / budget), the budget as a constraint (``constraints_func``), the uniform config
  enqueued as the first trial, and the Gumbel search's wall-clock as its time limit. The
  proxy is calibration-free: the holdout loss of the FP-phase weights fake-quantized at the
  config (the mixing layers at a hard choice are exactly QuantLinear), over
  ``proxy_batches`` fixed holdout batches. The best feasible trial by proxy loss is then
  repaired like the random one.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from coqat.errors import CoqatError
from coqat.bitsearch.knapsack import RepairResult, distance_values, repair
from coqat.bitsearch.problem import Assignment, SearchProblem
from coqat.training.loop import autocast
from coqat.workloads.base import to_device


def uniform_at_budget(problem: SearchProblem, pairs: list[tuple[int, int]],
                      budget: int) -> tuple[tuple[int, int], Assignment]:
    """The uniform (w, a) with the most BOPs not above ``budget`` (see module doc)."""
    best = None
    for w, a in pairs:
        asg = problem.uniform(w, a)
        if asg is None:
            continue
        bops = problem.bops(asg)
        if bops > budget:
            continue
        key = (bops, min(w, a), a)
        if best is None or key > best[0]:
            best = (key, (w, a), asg)
    if best is None:
        legal = ", ".join(f"w{w}a{a}" for w, a in pairs if problem.uniform(w, a)) or "none"
        raise CoqatError(f"no uniform configuration fits the budget {budget / 1e9:.4g} GBOPs"
                         f" (uniform candidates of this space: {legal}); raise the budget")
    return best[1], best[2]


def fill_floor(problem: SearchProblem, budget: int, fill: float) -> int:
    """The lower end of the repair window: F + fill * (B - F)."""
    return problem.fixed_bops + math.ceil(fill * (budget - problem.fixed_bops))


def random_assignment(problem: SearchProblem, seed: int) -> Assignment:
    rng = np.random.default_rng(seed)
    return Assignment(tuple(int(rng.choice(d.choices)) for d in problem.w_decisions),
                      tuple(int(rng.choice(d.choices)) for d in problem.a_decisions))


def repair_towards(problem: SearchProblem, ref: Assignment, budget: int,
                   fill: float) -> RepairResult:
    """The config closest to ``ref`` (fewest layers changed) within the fill window."""
    wv, av = distance_values(problem, ref)
    return repair(problem, wv, av, budget, lo=fill_floor(problem, budget, fill))


def proxy_loss_fn(model: nn.Module, apply: Callable[[Assignment], None], workload,
                  batches: int, batch_size: int, device: torch.device
                  ) -> Callable[[Assignment], float]:
    """Calibration-free proxy: mean loss of ``model`` at a hard config over fixed holdout
    batches (no gradient, no weight change)."""
    data = [to_device(workload.get_batch("holdout", i, batch_size), device)
            for i in range(batches)]

    def proxy(asg: Assignment) -> float:
        apply(asg)
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast(device):
                return float(sum(float(workload.loss(model, b)) for b in data) / len(data))
        finally:
            model.train(was)

    return proxy


def optuna_search(problem: SearchProblem, proxy: Callable[[Assignment], float], budget: int,
                  seed: int, seconds: float, max_trials: int = 0,
                  start: Assignment | None = None,
                  on_trial: Callable[[dict[str, Any]], None] | None = None
                  ) -> tuple[Assignment, dict[str, Any]]:
    """Multi-objective TPE under the BOPs constraint; returns the best feasible config by
    proxy loss (or the least infeasible when no trial was feasible) and a summary."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    free = budget - problem.fixed_bops

    # optuna >= 5 takes constraints from the trial; 4.x from the sampler's constraints_func
    per_trial = hasattr(optuna.trial.Trial, "set_constraint")
    extra = {} if per_trial else {"constraints_func": lambda t: [t.user_attrs["excess"]]}
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, **extra)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    w_names = [f"w{i}" for i in range(len(problem.w_decisions))]
    a_names = [f"a{j}" for j in range(len(problem.a_decisions))]
    if start is not None:
        study.enqueue_trial({**dict(zip(w_names, start.w)), **dict(zip(a_names, start.a))})

    def objective(trial) -> tuple[float, float]:
        asg = Assignment(
            tuple(trial.suggest_categorical(n, list(d.choices))
                  for n, d in zip(w_names, problem.w_decisions)),
            tuple(trial.suggest_categorical(n, list(d.choices))
                  for n, d in zip(a_names, problem.a_decisions)))
        bops = problem.bops(asg)
        trial.set_user_attr("excess", (bops - budget) / free)
        if per_trial:
            trial.set_constraint("bops", (bops - budget) / free)
        loss = proxy(asg)
        if on_trial is not None:
            on_trial({"trial": trial.number, "proxy_loss": loss, "bops_over_budget":
                      bops / budget, "feasible": bops <= budget})
        return loss, bops / budget

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=max_trials or None, timeout=max(seconds, 1e-3),
                   gc_after_trial=False)
    done = [t for t in study.trials if t.values is not None]
    if not done:
        raise CoqatError("Optuna finished no trial in its time limit; give it more time"
                         " ([search] optuna_seconds)")
    feasible = [t for t in done if t.user_attrs["excess"] <= 0]
    best = min(feasible, key=lambda t: t.values[0]) if feasible else \
        min(done, key=lambda t: t.user_attrs["excess"])
    asg = Assignment(tuple(best.params[n] for n in w_names),
                     tuple(best.params[n] for n in a_names))
    return asg, {"trials": len(done), "feasible_trials": len(feasible),
                 "best_trial": best.number, "best_proxy_loss": best.values[0],
                 "seconds": round(time.perf_counter() - t0, 2), "time_limit_s": seconds}
