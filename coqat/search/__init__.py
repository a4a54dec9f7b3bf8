"""Bit-width search under a BOPs budget: Gumbel-softmax + Lagrangian, repair, baselines.

    from coqat.search import run_search
    run, result = run_search("lm-tiny", "w4a4", method="gumbel")

Pieces (each usable alone):
    SearchProblem   decisions (weight bits per layer, activation bits per tie group), BOPs
    SearchLinear / SearchConv2d, to_search_model   shared-weight mixing layers
    GumbelSearch, GumbelSearchHooks, derive        the differentiable search
    repair          exact multiple-choice knapsack: best config with BOPs <= budget
    uniform_at_budget, random_assignment, optuna_search   the baselines
    run_search / plan_search / execute_search      the whole pipeline (CLI: coqat search)
"""

from coqat.search.baselines import optuna_search, random_assignment, uniform_at_budget
from coqat.search.gumbel import GumbelSearch, GumbelSearchHooks, derive, temperature
from coqat.search.knapsack import RepairResult, distance_values, repair
from coqat.search.pipeline import METHODS, execute_search, plan_search, run_search
from coqat.search.problem import Assignment, Decision, SearchProblem, hamming_bits
from coqat.search.relax import SearchConv2d, SearchLinear, set_assignment, to_search_model
from coqat.search.settings import SearchSettings, parse_search_settings

__all__ = [
    "METHODS", "Assignment", "Decision", "GumbelSearch", "GumbelSearchHooks", "RepairResult",
    "SearchConv2d", "SearchLinear", "SearchProblem", "SearchSettings", "derive",
    "distance_values", "execute_search", "hamming_bits", "optuna_search",
    "parse_search_settings", "plan_search", "random_assignment", "repair", "run_search",
    "set_assignment", "temperature", "to_search_model", "uniform_at_budget",
]
