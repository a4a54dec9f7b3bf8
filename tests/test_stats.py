"""coqat.reporting.stats on inputs whose answers are known from a hand computation or an
independent formula (closed-form t tails, an exhaustive Wilcoxon enumeration)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from coqat.reporting.stats import (CostPoint, SeedSummary, best_uniform, config_distance,
                                gap_closed_of_means, gap_shares, hull_value,
                                ordering_inversions, pair_by_seed, paired_difference,
                                seed_summary, uniform_hull, welch_se)


def t_tail(t: float, df: int) -> float:
    """P(T > t) for Student's t with 1 or 2 degrees of freedom, in closed form."""
    if df == 1:
        return 0.5 - math.atan(t) / math.pi
    if df == 2:
        return 0.5 - t / (2 * math.sqrt(2 + t * t))
    raise ValueError(df)


def wilcoxon_greater_by_enumeration(d: list[float]) -> float:
    """Exact one-sided signed-rank p: every assignment of signs to the ranks of |d|
    (distinct, non-zero) is equally likely under the null; count those with W+ >= observed."""
    d = [x for x in d if x != 0]
    order = sorted(range(len(d)), key=lambda i: abs(d[i]))
    rank = {i: r + 1 for r, i in enumerate(order)}
    w_obs = sum(rank[i] for i in range(len(d)) if d[i] > 0)
    hits = sum(sum(r for r, s in zip(range(1, len(d) + 1), signs) if s) >= w_obs
               for signs in itertools.product((0, 1), repeat=len(d)))
    return hits / 2 ** len(d)


def test_seed_summary_mean_sd_se_and_the_stored_record():
    s = seed_summary([1.0, None, 2.0, 3.0, 4.0])             # a seed without a result
    assert (s.n, s.mean, s.min, s.max) == (4, 2.5, 1.0, 4.0)
    assert s.sd == pytest.approx(math.sqrt(5 / 3))           # sum of squares 5, n - 1 = 3
    assert s.se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert s.to_dict() == {"n": 4, "mean": 2.5, "std": s.sd, "min": 1.0, "max": 4.0}
    assert s.to_dict(with_values=True)["values"] == [1.0, 2.0, 3.0, 4.0]
    one = seed_summary([7.0])
    assert one.sd == 0.0 and one.se is None
    assert seed_summary([]).to_dict() == {"n": 0}


def test_pair_by_seed_matches_int_and_string_keys_and_skips_missing_seeds():
    seeds, (a, b, c) = pair_by_seed({0: 1.0, 1: 2.0, 2: None, 3: 4.0},
                                    {"0": 10.0, "1": 20.0, "2": 30.0, "3": 40.0},
                                    {0: 0.5, 3: 0.25})
    assert seeds == [0, 3] and a == [1.0, 4.0] and b == [10.0, 40.0] and c == [0.5, 0.25]


def test_paired_t_matches_numpy_by_hand_and_the_closed_form_tail():
    a = [1.00, 2.00, 3.50]          # a loss: lower is better
    b = [1.50, 2.10, 3.30]
    pd = paired_difference(a, b, higher_is_better=False)
    d = np.array(b) - np.array(a)   # oriented: > 0 = a better
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert pd.differences == pytest.approx(tuple(d))
    assert pd.mean == pytest.approx(d.mean()) and pd.se == pytest.approx(d.std(ddof=1) / 3 ** .5)
    assert pd.t == pytest.approx(t)
    assert pd.p_t == pytest.approx(t_tail(t, 2))
    assert pd.p_t_worse == pytest.approx(1 - t_tail(t, 2))
    assert (pd.wins, pd.ties, pd.losses, pd.n) == (2, 0, 1, 3)
    # an accuracy: the same numbers, the other orientation
    acc = paired_difference(a, b, higher_is_better=True)
    assert acc.mean == pytest.approx(-pd.mean) and acc.p_t == pytest.approx(pd.p_t_worse)
    assert (acc.wins, acc.losses) == (1, 2)


def test_two_seeds_use_one_degree_of_freedom():
    pd = paired_difference([0.0, 0.0], [0.3, 0.1], higher_is_better=False)
    t = 0.2 / (math.sqrt(0.02) / math.sqrt(2))              # mean 0.2, sd sqrt(0.02)
    assert pd.t == pytest.approx(t) and pd.p_t == pytest.approx(t_tail(t, 1))


@pytest.mark.parametrize("d", [[0.3, -0.1, 0.5, 0.2, -0.05, 0.4],
                               [0.1, 0.2, 0.3, 0.4, 0.5],
                               [-0.3, 0.1, -0.2, 0.0, 0.25]])     # a zero pair is dropped
def test_wilcoxon_p_equals_an_exhaustive_enumeration(d):
    pd = paired_difference(d, [0.0] * len(d), higher_is_better=True)
    assert pd.p_wilcoxon == pytest.approx(wilcoxon_greater_by_enumeration(d))


def test_wilcoxon_cannot_go_below_two_to_the_minus_n():
    pd = paired_difference([0.1, 0.2, 0.3, 0.4], [0.0] * 4, higher_is_better=True)
    assert pd.p_wilcoxon == pytest.approx(1 / 16) == pd.wilcoxon_floor
    assert paired_difference([0.1], [0.0], True).p_wilcoxon is None


def test_verdicts_say_how_sure_the_difference_is():
    clear = paired_difference([1.0, 1.1, 0.9, 1.05, 0.95, 1.02], [1.3, 1.4, 1.2, 1.33, 1.27, 1.3],
                              higher_is_better=False)
    assert clear.verdict() == "better" and clear.p_t < 0.001 and clear.wins == 6
    assert "better beyond seed noise" in clear.statement("gumbel", "uniform")
    noisy = paired_difference([1.0, 1.2, 0.9], [1.05, 1.0, 1.0], higher_is_better=False)
    assert noisy.verdict() == "noise"
    assert "not distinguishable from seed noise" in noisy.statement("gumbel", "uniform")
    worse = paired_difference([1.3, 1.4, 1.2, 1.33], [1.0, 1.1, 0.9, 1.05], False)
    assert worse.verdict() == "worse" and worse.p_t > 0.99
    one = paired_difference([1.0], [1.1], higher_is_better=False)
    assert one.verdict() == "1 seed" and one.p_t is None and one.se is None
    assert one.statement("gumbel", "uniform").startswith("1 seed: no uncertainty estimate")
    same = paired_difference([1.0, 2.0], [1.0, 2.0], higher_is_better=False)
    assert same.verdict() == "identical" and same.p_t is None and same.ties == 2
    # every pair differs by the same amount: no spread, the sign is certain
    shift = paired_difference([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], higher_is_better=False)
    assert shift.p_t == 0.0 and shift.t == math.inf and shift.verdict() == "better"
    assert paired_difference([], [], False).verdict() == "no seeds"
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0], False)


def test_gap_shares_count_only_seeds_with_a_gap():
    uniform, method, fp = [2.0, 1.5, 3.0], [1.9, 1.6, 2.5], [1.8, 1.6, 2.0]
    # seed 1: uniform (1.5) is already better than FP (1.6): no gap to close
    assert gap_shares(uniform, method, fp, higher_is_better=False) == \
        pytest.approx([0.1 / 0.2, 0.5 / 1.0])
    assert gap_shares([0.8], [0.85], [0.9], higher_is_better=True) == pytest.approx([0.5])
    assert gap_closed_of_means(2.0, 1.9, 1.8, False) == pytest.approx(0.5)
    assert gap_closed_of_means(1.7, 1.6, 1.8, False) is None       # uniform beats FP
    assert gap_closed_of_means(None, 1.6, 1.8, False) is None


def test_config_distance_is_the_mean_pairwise_count_of_differing_layers():
    a = {"l1": "w4a4", "l2": "w4a4", "l3": "w8a8"}
    b = {"l1": "w4a4", "l2": "w2a4", "l3": "w8a8"}       # 1 from a
    c = {"l1": "w2a4", "l2": "w2a4", "l3": "w4a4"}       # 3 from a, 2 from b
    assert config_distance([a, b, c]) == pytest.approx(2.0)
    assert config_distance([a]) is None


def test_ordering_inversions_with_welch_standard_errors():
    cells = [("fp", SeedSummary(3, 1.80, 0.01)), ("w8a8", SeedSummary(3, 1.85, 0.02)),
             ("w6a6", SeedSummary(2, 1.84, 0.03)), ("w4a4", SeedSummary(3, 1.95, 0.02))]
    inv = ordering_inversions(cells, higher_is_better=False)
    assert len(inv) == 1 and (inv[0].expected_better, inv[0].expected_worse) == ("w8a8", "w6a6")
    assert inv[0].by == pytest.approx(0.01)
    assert inv[0].se == pytest.approx(math.sqrt(0.02 ** 2 / 3 + 0.03 ** 2 / 2))
    assert inv[0].within_2se
    assert welch_se(cells[0][1], cells[1][1]) == pytest.approx(math.sqrt((1e-4 + 4e-4) / 3))


UNIFORM = [CostPoint(4, 2.00, "w2a2"), CostPoint(8, 1.90, "w2a4"), CostPoint(8, 1.95, "w4a2"),
           CostPoint(16, 1.80, "w4a4"), CostPoint(24, 1.79, "w4a6"),
           CostPoint(36, 1.76, "w6a6"), CostPoint(64, 1.77, "w8a8")]


def test_best_uniform_under_a_budget_includes_asymmetric_configs():
    assert best_uniform(UNIFORM, 12, higher_is_better=False).label == "w2a4"
    assert best_uniform(UNIFORM, 16, False).label == "w4a4"
    assert best_uniform(UNIFORM, 100, False).label == "w6a6"  # w8a8 fits but is worse
    assert best_uniform(UNIFORM, 3, False) is None
    tie = [CostPoint(10, 0.9, "a"), CostPoint(5, 0.9, "b")]
    assert best_uniform(tie, 10, higher_is_better=True).label == "b"   # the cheaper one


def test_uniform_hull_is_the_convex_envelope_and_interpolates_in_bops():
    hull = uniform_hull(UNIFORM, higher_is_better=False)
    # w4a2 is dominated by w2a4 (same BOPs, worse); w4a6 lies above the chord w4a4-w6a6;
    # w8a8 costs more than w6a6 for a worse loss
    assert [p.label for p in hull] == ["w2a2", "w2a4", "w4a4", "w6a6"]
    assert hull_value(hull, 12) == pytest.approx(1.85)        # halfway from w2a4 to w4a4
    assert hull_value(hull, 26) == pytest.approx(1.80 - 0.04 * 10 / 20)
    assert hull_value(hull, 64) == pytest.approx(1.76)        # past the best vertex
    assert hull_value(hull, 2) is None                        # cheaper than any uniform
    # a non-convex point between two others is dropped: 2.0 @4, 1.99 @8, 1.8 @16
    kinked = uniform_hull([CostPoint(4, 2.0), CostPoint(8, 1.99), CostPoint(16, 1.8)], False)
    assert [p.bops for p in kinked] == [4, 16]
    acc = uniform_hull([CostPoint(p.bops, -p.metric, p.label) for p in UNIFORM], True)
    assert [p.label for p in acc] == [p.label for p in hull]
