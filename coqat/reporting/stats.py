"""Seed statistics for comparing quantized configurations: how sure is a difference?

Every comparison coqat reports is between runs that share a seed (same initialisation,
data order and evaluation windows), so the unit of evidence is the per-seed *paired*
difference, not the difference of two means: the seed-to-seed spread, which is usually as
large as the effect, cancels in the pair. This module holds that arithmetic once, for the
reports (``coqat report`` / ``coqat frontier``) and the benchmarks:

- ``seed_summary``: mean, sample sd, standard error, range of one cell's seeds;
- ``paired_difference``: mean paired difference, s.e., t, one-sided paired t-test p,
  one-sided Wilcoxon signed-rank p, wins / ties / losses;
- ``gap_shares`` / ``gap_closed_of_means``: the share of a baseline -> reference gap closed;
- ``config_distance``: how many layers two seeds' chosen configurations differ in;
- ``ordering_inversions``: adjacent cells that break an expected order, with Welch s.e.;
- ``best_uniform``, ``uniform_hull``, ``hull_value``: the uniform-precision baselines a
  mixed configuration must beat at its compute.

Sign convention: a difference is *oriented*, positive = the first argument is better,
whether the metric is a loss (lower is better) or an accuracy (higher is better).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

# Conventional level for "distinguishable from noise". One-sided, because every question
# asked of these numbers has a direction (is the mixed config *better* than uniform?).
ALPHA = 0.05


# ----- one cell's seeds ------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedSummary:
    """The seeds of one cell. ``sd`` is the sample standard deviation (n - 1), 0 for n = 1."""

    n: int
    mean: float | None = None
    sd: float | None = None
    min: float | None = None
    max: float | None = None
    values: tuple[float, ...] = ()

    @property
    def se(self) -> float | None:
        """Standard error of the mean; None below 2 seeds (one seed says nothing about it)."""
        return standard_error(self.sd, self.n) if self.n > 1 else None

    def to_dict(self, with_values: bool = False) -> dict[str, Any]:
        """The record the benchmark reports store: ``{"n": 0}`` when empty, otherwise n,
        mean, std, min, max (and the values, in seed order, when asked)."""
        if not self.n:
            return {"n": 0}
        d = {"n": self.n, "mean": self.mean, "std": self.sd, "min": self.min, "max": self.max}
        if with_values:
            d["values"] = list(self.values)
        return d


def seed_summary(values: Iterable[float | None]) -> SeedSummary:
    """Summary of one cell's per-seed values; ``None`` (a seed without a result) is skipped."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return SeedSummary(0)
    # fmean / stdev sum exactly (fsum / rationals): the result does not depend on seed order
    return SeedSummary(len(xs), statistics.fmean(xs),
                       statistics.stdev(xs) if len(xs) > 1 else 0.0, min(xs), max(xs),
                       tuple(xs))


def standard_error(sd: float, n: int) -> float:
    """sd / sqrt(n); infinite for fewer than 2 values (no estimate of the spread)."""
    return sd / math.sqrt(n) if n > 1 else math.inf


def welch_se(a: SeedSummary, b: SeedSummary) -> float:
    """Standard error of the difference of two independent means (Welch): for cells that do
    not share seeds, or where pairing is not wanted."""
    return math.sqrt(a.sd ** 2 / a.n + b.sd ** 2 / b.n)


# ----- paired differences ------------------------------------------------------------------------
def pair_by_seed(*per_seed: Mapping[Hashable, float | None]
                 ) -> tuple[list[Hashable], list[list[float]]]:
    """The seeds every mapping has a value for, in the first mapping's order, and the aligned
    values of each mapping. Keys match by their string form, so a mapping read back from
    JSON (string keys) pairs with one built in memory (int keys)."""
    first, *rest = per_seed
    norm = [{str(k): v for k, v in m.items()} for m in rest]
    seeds = [k for k, v in first.items()
             if v is not None and all(m.get(str(k)) is not None for m in norm)]
    cols = [[float(first[k]) for k in seeds]]
    cols += [[float(m[str(k)]) for k in seeds] for m in norm]
    return seeds, cols


@dataclass(frozen=True)
class PairedDifference:
    """``a`` against ``b`` seed by seed; every difference is oriented: > 0 = ``a`` better.

    ``p_t`` is the one-sided paired t-test p for "a is better than b" (small = evidence that
    it is); ``p_t_worse`` the same test the other way round. ``p_wilcoxon`` is the one-sided
    Wilcoxon signed-rank p (zero differences dropped), which does not assume normal
    differences; with n non-zero pairs it cannot go below ``wilcoxon_floor`` = 2^-n, so it
    needs 5 seeds to reach 0.05 at all.
    """

    n: int
    mean: float | None
    sd: float | None
    se: float | None
    t: float | None
    p_t: float | None
    p_t_worse: float | None
    p_wilcoxon: float | None
    wins: int
    ties: int
    losses: int
    differences: tuple[float, ...]

    @property
    def wilcoxon_floor(self) -> float | None:
        nonzero = self.wins + self.losses
        return 2.0 ** -nonzero if nonzero else None

    def better(self, alpha: float = ALPHA) -> bool:
        """``a`` is better than ``b`` beyond seed noise (one-sided paired t-test)."""
        return self.p_t is not None and self.p_t < alpha

    def worse(self, alpha: float = ALPHA) -> bool:
        return self.p_t_worse is not None and self.p_t_worse < alpha

    def verdict(self, alpha: float = ALPHA) -> str:
        """One word for a table: better | worse | noise | identical | 1 seed | no seeds."""
        if self.n == 0:
            return "no seeds"
        if self.n == 1:
            return "1 seed"
        if self.ties == self.n:
            return "identical"
        return "better" if self.better(alpha) else "worse" if self.worse(alpha) else "noise"

    def statement(self, a: str = "a", b: str = "b", alpha: float = ALPHA) -> str:
        """A plain sentence on whether the difference is distinguishable from seed noise."""
        v = self.verdict(alpha)
        if v == "no seeds":
            return f"{a} and {b} share no seed: no paired comparison"
        if v == "1 seed":
            return f"1 seed: no uncertainty estimate for {a} vs {b}"
        if v == "identical":
            return f"{a} equals {b} on all {self.n} seeds (the same configuration)"
        head = (f"{a} vs {b}: {self.mean:+.4f} ± {self.se:.4f} s.e. over {self.n} seeds"
                f" (> 0 = {a} better), {self.wins} of {self.n} seeds better,"
                f" one-sided paired t-test p = {self.p_t:.3g}")
        if v == "better":
            return f"{head}: {a} is better beyond seed noise (p < {alpha:g})"
        if v == "worse":
            return f"{head}: {a} is worse beyond seed noise (p < {alpha:g} the other way)"
        return f"{head}: not distinguishable from seed noise"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["differences"] = list(self.differences)
        d["wilcoxon_floor"] = self.wilcoxon_floor
        d["verdict"] = self.verdict()
        return d


def paired_difference(a: Sequence[float], b: Sequence[float],
                      higher_is_better: bool) -> PairedDifference:
    """``a`` minus ``b`` seed by seed (aligned sequences: entry i of both is seed i),
    oriented so that > 0 means ``a`` is better; see ``PairedDifference``."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = tuple((x - y) if higher_is_better else (y - x) for x, y in zip(a, b))
    wins = sum(x > 0 for x in d)
    losses = sum(x < 0 for x in d)
    s = seed_summary(d)
    if s.n < 2:
        return PairedDifference(s.n, s.mean, None, None, None, None, None, None, wins,
                                s.n - wins - losses, losses, d)
    se = standard_error(s.sd, s.n)
    if se == 0.0:
        # every pair differs by the same amount: the t statistic is infinite (or 0/0 when
        # they are all equal); the limit of the test is certainty in the sign
        t = None if s.mean == 0 else math.copysign(math.inf, s.mean)
        p = None if s.mean == 0 else (0.0 if s.mean > 0 else 1.0)
        p_worse = None if p is None else 1.0 - p
    else:
        from scipy import stats as sps

        res = sps.ttest_1samp(d, 0.0, alternative="greater")
        t, p = float(res.statistic), float(res.pvalue)
        p_worse = float(sps.ttest_1samp(d, 0.0, alternative="less").pvalue)
    return PairedDifference(s.n, s.mean, s.sd, se, t, p, p_worse, _wilcoxon_greater(d), wins,
                            s.n - wins - losses, losses, d)


def _wilcoxon_greater(d: Sequence[float]) -> float | None:
    """One-sided signed-rank p for "the differences lean positive"; zeros are dropped
    (Wilcoxon's convention). Exact for small n when the |differences| are distinct; with
    ties scipy permutes (recent versions) or approximates. None with fewer than 2 non-zero
    differences."""
    if sum(x != 0 for x in d) < 2:
        return None
    from scipy import stats as sps

    return float(sps.wilcoxon(d, zero_method="wilcox", alternative="greater").pvalue)


# ----- gaps ----------------------------------------------------------------------------------------
def gap_shares(baseline: Sequence[float], method: Sequence[float], reference: Sequence[float],
               higher_is_better: bool) -> list[float]:
    """Per seed, the share of the baseline -> reference gap (e.g. uniform -> FP) that the
    method closes: (baseline - method) / (baseline - reference). Only seeds where the
    baseline is worse than the reference count: a share of a gap that is not there means
    nothing (compare the length of the result with the number of seeds)."""
    sign = -1.0 if higher_is_better else 1.0
    return [(u - v) / (u - f) for u, v, f in zip(baseline, method, reference)
            if sign * (u - f) > 0]


def gap_closed_of_means(baseline: float | None, method: float | None, reference: float | None,
                        higher_is_better: bool) -> float | None:
    """The same share from the means; None when a mean is missing or the baseline is not
    worse than the reference on average."""
    if None in (baseline, method, reference):
        return None
    sign = -1.0 if higher_is_better else 1.0
    if not sign * (baseline - reference) > 0:
        return None
    return (baseline - method) / (baseline - reference)


# ----- configurations and orderings -----------------------------------------------------------------
def config_distance(configs: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean, over all pairs of seeds, of the number of layers whose bits differ: how stable
    a search's choice is across seeds. None below 2 configurations."""
    pairs = list(itertools.combinations(configs, 2))
    if not pairs:
        return None
    return statistics.fmean(sum(a[n] != b[n] for n in a) for a, b in pairs)


@dataclass(frozen=True)
class Inversion:
    """Two adjacent cells in the wrong order: the one expected to be worse is better by
    ``by`` (> 0), with the Welch standard error of that difference."""

    expected_better: str
    expected_worse: str
    by: float
    se: float

    @property
    def within_2se(self) -> bool:
        return self.by <= 2 * self.se


def ordering_inversions(cells: Sequence[tuple[str, SeedSummary]],
                        higher_is_better: bool) -> list[Inversion]:
    """Adjacent pairs of ``cells`` (listed expected-best first, e.g. FP, w8a8, w6a6, ...)
    whose means break that order, so a reader can tell an inversion from seed noise."""
    out = []
    for (hi_name, hi), (lo_name, lo) in zip(cells, cells[1:]):
        gain = (lo.mean - hi.mean) if higher_is_better else (hi.mean - lo.mean)
        if gain > 0:
            out.append(Inversion(hi_name, lo_name, gain, welch_se(hi, lo)))
    return out


# ----- uniform baselines ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostPoint:
    """A configuration's compute and quality, e.g. the seed mean of one uniform cell."""

    bops: float
    metric: float
    label: str = ""


def _better(x: float, y: float, higher_is_better: bool) -> bool:
    return x > y if higher_is_better else x < y


def best_uniform(points: Sequence[CostPoint], budget_bops: float,
                 higher_is_better: bool) -> CostPoint | None:
    """The best of the uniform points that fit the budget (all (w, a) pairs given,
    asymmetric ones such as w2a4 or w4a2 included): the baseline a mixed configuration at
    that budget must beat. A tie in the metric goes to the cheaper point. None when no
    point fits."""
    fit = [p for p in points if p.bops <= budget_bops]
    if not fit:
        return None
    best = fit[0]
    for p in fit[1:]:
        if _better(p.metric, best.metric, higher_is_better) or (
                p.metric == best.metric and p.bops < best.bops):
            best = p
    return best


def uniform_hull(points: Sequence[CostPoint], higher_is_better: bool) -> list[CostPoint]:
    """Vertices (cheapest first) of the convex envelope of the uniform points in
    (BOPs, metric): the lower envelope for a loss, the upper one for an accuracy.

    Only points that no cheaper point beats take part, so the envelope improves with
    compute: spending fewer BOPs than a budget is always allowed. Between two vertices the
    envelope is what splitting the layers between those two uniform configs would give if
    quality mixed linearly in BOPs, the usual "convex hull of the uniform points" baseline.
    """
    sign = 1.0 if higher_is_better else -1.0          # maximise sign * metric
    efficient: list[CostPoint] = []
    for p in sorted(points, key=lambda p: (p.bops, -sign * p.metric)):
        if not efficient or sign * p.metric > sign * efficient[-1].metric:
            efficient.append(p)
    hull: list[CostPoint] = []
    for p in efficient:                   # monotone chain, upper hull of (bops, sign*metric)
        while len(hull) >= 2:
            o, q = hull[-2], hull[-1]
            cross = (q.bops - o.bops) * sign * (p.metric - o.metric) \
                - sign * (q.metric - o.metric) * (p.bops - o.bops)
            if cross < 0:                 # q lies above the chord o-p: keep it
                break
            hull.pop()
        hull.append(p)
    return hull


def hull_value(hull: Sequence[CostPoint], bops: float) -> float | None:
    """The envelope's metric at ``bops`` (linear between vertices; the best vertex beyond
    the last one). None below the cheapest uniform point: nothing to compare with there."""
    if not hull or bops < hull[0].bops:
        return None
    for lo, hi in zip(hull, hull[1:]):
        if bops <= hi.bops:
            w = (bops - lo.bops) / (hi.bops - lo.bops)
            return lo.metric + w * (hi.metric - lo.metric)
    return hull[-1].metric
