"""Budget repair: the most valuable configuration whose BOPs fit the budget, exactly.

A search ends with a *value* for every choice of every decision (the Gumbel search's
log-probabilities; minus "layers changed" for the random and Optuna baselines). The repair
picks the assignment of maximum total value subject to

    lo <= BOPs(assignment) <= budget

which is a multiple-choice knapsack (MCKP) once the bilinear cost ``MACs * w * a`` is made
separable: for a *fixed* activation choice of a tie group, each of its members' weight
choices costs ``MACs * w * a`` independently. So every activation decision and the weight
decisions of its layers form one *component*, solved by an inner MCKP per activation choice;
the components are then combined by an outer MCKP. Both are exact dynamic programs over
integer costs.

Costs are counted in units of ``gcd(MACs)`` of the searchable layers (times 1 bit x 1 bit),
which is exact. Only when that makes the table larger than ``MAX_UNITS`` are costs rounded
*up* to a coarser unit, so the result still fits the budget (``RepairResult.exact`` says
which). The value of the chosen assignment is then optimal up to that rounding.

``lo`` lets a repair also *use* the budget: with ``lo = fill * budget`` a search that ended
well under the budget is raised, along its own values, to the budget's neighbourhood. When no
assignment reaches ``lo``, the best one under the budget is taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from coqat.errors import CoqatError
from coqat.bitsearch.problem import Assignment, SearchProblem

#: largest DP table (in cost units) before costs are rounded up to a coarser unit
MAX_UNITS = 1 << 18


@dataclass
class RepairResult:
    assignment: Assignment
    bops: int
    value: float
    exact: bool                  # costs were not rounded (the optimum is exact)
    unit: int                    # BOPs per DP cost unit
    reached_lo: bool             # an assignment with BOPs >= lo existed


def _mckp(groups: Sequence[Sequence[tuple[int, float]]], cap: int):
    """Exact multiple-choice knapsack: pick one option per group, costs summing to exactly c.

    Returns ``(dp, choice)`` where ``dp[c]`` is the best total value at total cost exactly
    ``c`` (-inf when unreachable) and ``choice[g, c]`` the option of group ``g`` on that
    best path (backtrack with ``_backtrack``). Ties keep the earlier option.
    """
    dp = np.full(cap + 1, -np.inf)
    dp[0] = 0.0
    choice = np.full((len(groups), cap + 1), -1, dtype=np.int32)
    for g, options in enumerate(groups):
        new = np.full(cap + 1, -np.inf)
        for k, (cost, value) in enumerate(options):
            if cost > cap or value == -np.inf:
                continue
            cand = dp[: cap + 1 - cost] + value
            seg = new[cost:]
            better = cand > seg
            seg[better] = cand[better]
            choice[g, cost:][better] = k
        dp = new
    return dp, choice


def _backtrack(groups, choice: np.ndarray, c: int) -> list[int]:
    picks = [0] * len(groups)
    for g in range(len(groups) - 1, -1, -1):
        k = int(choice[g, c])
        picks[g] = k
        c -= groups[g][k][0]
    return picks


def _pick_end(dp: np.ndarray, lo: int) -> tuple[int, bool]:
    """The end cost with the best value in [lo, cap] (ties: the larger cost), falling back
    to [0, cap]; (-1, False) when nothing is reachable."""
    for start, reached in ((max(lo, 0), True), (0, False)):
        window = dp[start:]
        if window.size and np.isfinite(window).any():
            best = window.max()
            idx = np.flatnonzero(window == best)[-1]
            return start + int(idx), reached
    return -1, False


def repair(problem: SearchProblem, w_values: Sequence[Sequence[float]],
           a_values: Sequence[Sequence[float]], budget: int, lo: int = 0) -> RepairResult:
    """The assignment maximising ``sum of values`` with ``lo <= BOPs <= budget``.

    ``w_values[i][k]`` is the value of choice ``k`` of ``problem.w_decisions[i]`` (same for
    ``a_values``). Tie groups and pinned layers hold by construction (one decision per
    group, pins are fixed cost). CoqatError if no assignment fits the budget at all.
    """
    searchable = problem.searchable
    free = budget - problem.fixed_bops
    lo_free = lo - problem.fixed_bops
    if free < 0:
        raise CoqatError(f"budget {budget:,} BOPs is below the fixed part {problem.fixed_bops:,}"
                         " (attention and pinned layers); raise the budget")
    unit = math.gcd(*[problem.macs[n] for n in searchable]) or 1
    dearest = problem.bops(problem.extreme(max)) - problem.fixed_bops
    exact = dearest // unit <= MAX_UNITS
    if not exact:
        unit = -(-dearest // MAX_UNITS)
    # rounding each option up adds at most one unit per layer over the true dearest cost
    cap = min(free // unit, dearest // unit + len(searchable))
    lo_units = -(-max(lo_free, 0) // unit)

    def units(bops: int) -> int:
        return bops // unit if exact else -(-bops // unit)

    # components: one activation decision + the weight decisions of its layers
    comp_w: list[list[int]] = [[] for _ in problem.a_decisions]
    for i, d in enumerate(problem.w_decisions):
        owners = {problem.layer_a[n] for n in d.layers}
        if len(owners) != 1:  # pragma: no cover - build() never makes such a decision
            raise ValueError(f"weight decision {d.name} spans several activation decisions")
        comp_w[owners.pop()].append(i)

    outer: list[list[tuple[int, float]]] = []
    payloads: list[list[tuple[int, list[int]]]] = []
    for j, ad in enumerate(problem.a_decisions):
        best: dict[int, tuple[float, int, list[int]]] = {}
        for ka, a in enumerate(ad.choices):
            va = float(a_values[j][ka])
            if va == -np.inf:
                continue
            inner = [[(units(sum(problem.macs[n] for n in problem.w_decisions[i].layers)
                             * w * a), float(w_values[i][kw]))
                      for kw, w in enumerate(problem.w_decisions[i].choices)]
                     for i in comp_w[j]]
            dp, choice = _mckp(inner, cap)
            for c in np.flatnonzero(np.isfinite(dp)):
                v = va + float(dp[c])
                if int(c) not in best or v > best[int(c)][0]:
                    best[int(c)] = (v, ka, _backtrack(inner, choice, int(c)))
        # one option per reachable cost (the best one). Dearer-but-not-better options must
        # stay: the lower end ``lo`` of the window may need them.
        costs = sorted(best)
        outer.append([(c, best[c][0]) for c in costs])
        payloads.append([(best[c][1], best[c][2]) for c in costs])

    dp, choice = _mckp(outer, cap)
    end, reached = _pick_end(dp, lo_units)
    if end < 0 and not exact:
        # rounding every option up can price even the cheapest config out of the table;
        # its true cost fits whenever the budget is feasible at all
        cheapest = problem.extreme(min)
        if problem.bops(cheapest) <= budget:
            return RepairResult(cheapest, problem.bops(cheapest),
                                total_value(problem, cheapest, w_values, a_values), False,
                                int(unit), problem.bops(cheapest) >= lo)
    if end < 0:
        raise CoqatError(f"no configuration fits the budget {budget:,} BOPs; feasible budgets"
                         f" lie in {problem.describe_range()}")
    picks = _backtrack(outer, choice, end)
    w = [0] * len(problem.w_decisions)
    a = [0] * len(problem.a_decisions)
    for j, k in enumerate(picks):
        ka, wpicks = payloads[j][k]
        a[j] = problem.a_decisions[j].choices[ka]
        for i, kw in zip(comp_w[j], wpicks):
            w[i] = problem.w_decisions[i].choices[kw]
    asg = Assignment(tuple(w), tuple(a))
    bops = problem.bops(asg)
    if bops > budget:  # pragma: no cover - guaranteed by construction; a bug if it happens
        raise AssertionError(f"repair exceeded the budget: {bops} > {budget}")
    return RepairResult(asg, bops, total_value(problem, asg, w_values, a_values), exact,
                        int(unit), reached)


def total_value(problem: SearchProblem, asg: Assignment, w_values, a_values) -> float:
    v = 0.0
    for i, d in enumerate(problem.w_decisions):
        v += float(w_values[i][d.choices.index(asg.w[i])])
    for j, d in enumerate(problem.a_decisions):
        v += float(a_values[j][d.choices.index(asg.a[j])])
    return v


def distance_values(problem: SearchProblem, ref: Assignment
                    ) -> tuple[list[list[float]], list[list[float]]]:
    """Values that make the repair change as few layers of ``ref`` as possible: 0 for
    ``ref``'s choice, minus the number of layers the decision covers for any other."""
    wv = [[0.0 if c == ref.w[i] else -float(len(d.layers)) for c in d.choices]
          for i, d in enumerate(problem.w_decisions)]
    av = [[0.0 if c == ref.a[j] else -float(len(d.layers)) for c in d.choices]
          for j, d in enumerate(problem.a_decisions)]
    return wv, av
