"""MACs (fvcore, on the float model) and BOPs of bit configurations; budget expressions.

    cost = CostModel.from_model(model, example_inputs)
    cost.bops(bitconfig)                       # int, MACs * w_bits * a_bits + attention
    parse_budget("w4a4", cost, pinned)         # int BOPs
    Budget.parse("w4a4", cost, pinned)         # expr, bops, slug: parsed once
"""

from coqat.cost.bops import ATTENTION_BITS, FP32_BITS, CostModel, LayerCost
from coqat.cost.budget import (Budget, budget_slug, describe_budget, format_bops, mean_wa,
                               parse_budget)
from coqat.cost.macs import MacCount, count_macs, find_tie_groups, is_layer

__all__ = [
    "ATTENTION_BITS",
    "Budget",
    "FP32_BITS",
    "CostModel",
    "LayerCost",
    "MacCount",
    "budget_slug",
    "count_macs",
    "describe_budget",
    "mean_wa",
    "find_tie_groups",
    "format_bops",
    "is_layer",
    "parse_budget",
]
