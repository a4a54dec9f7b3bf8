"""Bit-width search under a BOPs budget: Gumbel-softmax + Lagrangian, repair, baselines.

    from coqat.bitsearch import run_search
    run, record = run_search(RunConfig.from_options("lm-tiny"), "w4a4", method="gumbel")

Pieces (each usable alone):
    SearchProblem   decisions (weight bits per layer, activation bits per tie group), BOPs
    SearchLinear / SearchConv2d, to_search_model   shared-weight mixing layers
    GumbelSearch, GumbelSearchHooks, derive        the differentiable search
    repair          exact multiple-choice knapsack: best config with BOPs <= budget
    Sensitivity, measure_sensitivity   per-tensor loss change at each width (the diagnostic)
    uniform_at_budget, random_assignment, optuna_search   the baselines
    METHODS, register_method, SearchMethod         the registry every method plugs into
    run_search / plan_search / execute_search      the whole pipeline (CLI: coqat search)
"""

from coqat.config import SearchSettings, parse_search_settings
from coqat.bitsearch.baselines import optuna_search, random_assignment, uniform_at_budget
from coqat.bitsearch.gumbel import GumbelSearch, GumbelSearchHooks, derive, temperature
from coqat.bitsearch.job import Choice, SearchContext, SearchJob
from coqat.bitsearch.knapsack import RepairResult, distance_values, repair
from coqat.bitsearch.methods import METHODS, SearchMethod, get_method, register_method
from coqat.bitsearch.pipeline import execute_search, plan_search, run_search, run_searches
from coqat.bitsearch.problem import Assignment, Decision, SearchProblem, hamming_bits
from coqat.bitsearch.relax import SearchConv2d, SearchLinear, set_assignment, to_search_model
from coqat.bitsearch.sensitivity import DecisionSensitivity, Sensitivity
from coqat.bitsearch.sensitivity import measure as measure_sensitivity

__all__ = [
    "METHODS", "Assignment", "Choice", "Decision", "DecisionSensitivity", "GumbelSearch",
    "GumbelSearchHooks", "Sensitivity", "measure_sensitivity",
    "RepairResult", "SearchContext", "SearchConv2d", "SearchJob", "SearchLinear",
    "SearchMethod", "SearchProblem", "SearchSettings", "derive", "distance_values",
    "execute_search", "get_method", "hamming_bits", "optuna_search",
    "parse_search_settings", "plan_search", "random_assignment", "register_method", "repair",
    "run_search", "run_searches", "set_assignment", "temperature", "to_search_model",
    "uniform_at_budget",
]
