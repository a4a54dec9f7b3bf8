"""Reading run directories back: one run, a frontier, or any folder of runs.

A *point* is one finished run summarised for reports: where it sits in compute (BOPs) and
quality (the workload's metric), how it got there (method, budget, seed) and where its
files are. Everything here reads the files the runs wrote; costs are never recomputed, so
a report shows exactly the numbers the budget used.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from coqat.bitconfig import BitConfig
from coqat.errors import CoqatError
from coqat.records import RunRecord
from coqat.rundir import BITCONFIG, CONFIG, FRONTIER_MANIFEST, RunDir

__all__ = ["Point", "Group", "FRONTIER_MANIFEST", "load_point", "load_points", "find_run_dirs",
           "pareto_front", "group_points", "group_dominated", "dominates", "is_run_dir"]


@dataclass
class Point:
    run_dir: str
    space: str
    method: str                 # fp | uniform | gumbel | optuna | random | train
    bits: str                   # w4a4 | mixed | fp
    seed: int
    bops: int
    fp32_bops: int
    metric_name: str
    metric: float
    higher_is_better: bool
    budget_expr: str | None = None
    budget_bops: int | None = None
    steps: int = 0
    wall_s: float = 0.0
    finished: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gbops(self) -> float:
        return self.bops / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gbops"] = self.gbops
        return d


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG).is_file()


def find_run_dirs(root: Path, max_depth: int = 3) -> list[Path]:
    """Run directories at or below ``root`` (not descending into a run's own folders)."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    if max_depth <= 0 or not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found += find_run_dirs(child, max_depth - 1)
    return found


def load_point(path: Path) -> Point | None:
    """The finished run at ``path`` as a Point (None when it has not finished)."""
    run = RunDir(path)
    if not run.finished:
        return None
    rec = RunRecord.read(run)
    if rec.metric is None:
        return None
    meta: dict[str, Any] = {}
    if run.has(BITCONFIG):
        try:  # a run trained from another run's searched config carries its budget here
            meta = BitConfig.load(run.file(BITCONFIG)).meta
        except CoqatError:
            meta = {}
    search = rec.search
    extra = {}
    if search is not None:
        extra = {"achieved_over_budget": search.achieved_over_budget, "target": search.target}
        if search.repair is not None:
            extra["repair"] = search.repair
        if search.fp_phase is not None:   # where the FP reference of this seed is cached
            extra["fp_phase"] = search.fp_phase
    return Point(
        run_dir=str(path), space=rec.space, method=rec.method, bits=rec.bits, seed=rec.seed,
        bops=rec.bops, fp32_bops=rec.fp32_bops, metric_name=rec.metric_name,
        metric=float(rec.metric), higher_is_better=rec.higher_is_better,
        budget_expr=rec.budget_expr or meta.get("budget_expr"),
        budget_bops=rec.budget_bops or meta.get("budget_bops"),
        steps=rec.steps, wall_s=rec.wall_s, extra=extra)


def load_points(root: str | Path) -> tuple[list[Point], list[Path]]:
    """All finished runs under ``root`` and the run directories that have not finished."""
    root = Path(root)
    if not root.exists():
        raise CoqatError(f"{root} does not exist; pass a run directory or a folder of runs")
    dirs = find_run_dirs(root)
    if not dirs:
        raise CoqatError(f"no coqat runs under {root}; pass a directory made by coqat train,"
                         " search or frontier")
    points, unfinished = [], []
    for d in dirs:
        p = load_point(d)
        (points.append(p) if p is not None else unfinished.append(d))
    return points, unfinished


# ----- Pareto fronts ---------------------------------------------------------------------------
def dominates(a: Point, b: Point) -> bool:
    """``a`` is no worse than ``b`` in both compute and quality, and better in one."""
    better_q = (a.metric >= b.metric) if a.higher_is_better else (a.metric <= b.metric)
    strictly = (a.bops < b.bops) or ((a.metric > b.metric) if a.higher_is_better
                                     else (a.metric < b.metric))
    return a.bops <= b.bops and better_q and strictly


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Non-dominated points, cheapest first."""
    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: (p.bops, p.metric))


@dataclass
class Group:
    """Seeds of one (method, budget) cell: mean and spread of metric and BOPs."""

    method: str
    budget: str
    points: list[Point]

    @property
    def n(self) -> int:
        return len(self.points)

    @property
    def metric_mean(self) -> float:
        return statistics.fmean(p.metric for p in self.points)

    @property
    def metric_std(self) -> float:
        return statistics.stdev([p.metric for p in self.points]) if self.n > 1 else 0.0

    @property
    def gbops_mean(self) -> float:
        return statistics.fmean(p.gbops for p in self.points)

    @property
    def higher_is_better(self) -> bool:
        return self.points[0].higher_is_better

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "budget": self.budget, "n": self.n,
                "gbops_mean": self.gbops_mean, "metric_mean": self.metric_mean,
                "metric_std": self.metric_std, "seeds": sorted(p.seed for p in self.points),
                "bits": sorted({p.bits for p in self.points})}


def group_points(points: Iterable[Point]) -> list[Group]:
    """Group seeds of one (method, budget or bits) cell, cheapest cells first."""
    cells: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        budget = p.budget_expr or p.bits
        cells.setdefault((p.method, budget), []).append(p)
    groups = [Group(m, b, ps) for (m, b), ps in cells.items()]
    return sorted(groups, key=lambda g: (g.gbops_mean, g.method))


def group_dominated(groups: Sequence[Group]) -> set[int]:
    """Indices of groups whose mean point is dominated by another group's mean point."""
    means = [Point("", "", g.method, "", 0, int(g.gbops_mean * 1e9), 0, "", g.metric_mean,
                   g.higher_is_better) for g in groups]
    return {i for i, p in enumerate(means)
            if any(dominates(q, p) for j, q in enumerate(means) if j != i)}
