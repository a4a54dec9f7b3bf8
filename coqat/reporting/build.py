"""``coqat report``: one run or a frontier, in the terminal (rich), as JSON, and as HTML.

The HTML page is self-contained and offline: plots are PNGs embedded as data URIs (the same
PNG files are written next to it), tables are plain HTML, no script or CDN.

Wherever a cell has several seeds, the report says how sure its comparison with uniform
precision is: the per-seed paired difference to the best uniform config under the same
budget, its standard error, a one-sided paired test and the wins per seed, and in words
whether the difference stands out from seed noise (``coqat.reporting.stats``).

A report can also be rebuilt from the ``report.json`` that ``coqat report --json`` printed
(``build_report("…/report.json")``), e.g. for a committed report whose run directories are
gone: tables, statistics and the frontier plot are redrawn from it; plots that need the runs'
own files are kept from the earlier rendering when they are there.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coqat.reporting import plots
from coqat.reporting import sensitivity
from coqat.rundir import FINAL, RunDir
from coqat.reporting.runs import (FRONTIER_MANIFEST, Group, Point, group_dominated, group_points,
                               load_point, load_points, pareto_front)
from coqat.reporting.stats import (ALPHA, CostPoint, PairedDifference, SeedSummary, best_uniform,
                                hull_value, pair_by_seed, paired_difference, seed_summary,
                                uniform_hull)
from coqat.util import atomic_write_bytes, atomic_write_text, read_json

# where coqat.bitsearch caches a seed's FP phase, below its output folder (the name of
# coqat.bitsearch.pipeline.FP_CACHE, not imported: report/ reads runs and must not need search/)
FP_CACHE = ".fp-cache"


@dataclass
class FpReference:
    """The full-precision reference: one metric per seed, at the FP32 cost.

    Either FP runs among the report's own runs, or the FP phase that each search trained
    (and cached) before quantizing: the same seed's starting point, so per seed it is the
    natural reference for a quantized run of that seed.
    """

    per_seed: dict[int, float]
    bops: int
    steps: int | None
    source: str

    @property
    def summary(self) -> SeedSummary:
        return seed_summary(self.per_seed.values())

    @property
    def gbops(self) -> float:
        return self.bops / 1e9

    @property
    def short(self) -> str:
        """For a table's budget column: ``FP phase`` / ``FP runs``."""
        return self.source.split(" of ")[0]

    @property
    def description(self) -> str:
        steps = f", {self.steps} steps" if self.steps else ""
        return f"{self.source} ({self.summary.n} seed{'s' * (self.summary.n != 1)}{steps})"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "steps": self.steps, "bops": self.bops,
                "gbops": self.gbops, **self.summary.to_dict(),
                "per_seed": {str(k): v for k, v in self.per_seed.items()}}


@dataclass
class Report:
    root: Path
    points: list[Point]
    unfinished: list[Path]
    groups: list[Group]
    front: list[Point]
    manifest: dict[str, Any] = field(default_factory=dict)
    fp: FpReference | None = None
    # the report.json this report was rebuilt from (None: built from run directories)
    saved: dict[str, Any] | None = None
    source: Path | None = None

    @property
    def single(self) -> bool:
        return len(self.points) == 1 and not self.manifest

    @property
    def metric_name(self) -> str:
        return self.points[0].metric_name if self.points else "metric"

    @property
    def higher_is_better(self) -> bool:
        return self.points[0].higher_is_better if self.points else False


def build_report(root: str | Path) -> Report:
    """The report of a run directory, a frontier or a folder of runs; or, given the path of
    a ``report.json``, the report it was printed from."""
    root = Path(root)
    if root.is_file() and root.suffix == ".json":
        return report_from_json(root)
    points, unfinished = load_points(root)
    manifest = {}
    if (root / FRONTIER_MANIFEST).is_file():
        manifest = read_json(root / FRONTIER_MANIFEST, "a sweep manifest",
                             "rerun the coqat frontier command that made the sweep")
    groups = group_points(points)
    return Report(root, points, unfinished, groups, pareto_front(points), manifest,
                  find_fp_reference(points, root))


def report_from_json(path: str | Path) -> Report:
    """A report rebuilt from the JSON ``to_json`` wrote (``coqat report --json``)."""
    path = Path(path)
    doc = read_json(path, "a coqat report", "pass a report.json written by coqat report --json")
    names = {f.name for f in dataclasses.fields(Point)}
    points = [Point(**{k: v for k, v in d.items() if k in names}) for d in doc["points"]]
    fp = doc.get("fp_reference")
    fp = None if not fp else FpReference({int(k): v for k, v in fp["per_seed"].items()},
                                         fp["bops"], fp.get("steps"), fp["source"])
    return Report(Path(doc["root"]), points, [Path(u) for u in doc.get("unfinished", [])],
                  group_points(points), pareto_front(points), doc.get("manifest") or {}, fp,
                  saved=doc, source=path)


def find_fp_reference(points: list[Point], root: Path | None) -> FpReference | None:
    """FP runs among ``points`` if there are any; else the FP phases the searches cached.

    A cache is found where the search's final.json says, or under ``root/.fp-cache`` by its
    name when the sweep has moved. None when two different FP phases claim one seed (runs
    of different spaces or FP lengths in one folder): there is no single reference then.
    """
    fp_runs = [p for p in points if p.method == "fp"]
    if fp_runs:
        steps = {p.steps for p in fp_runs}
        return FpReference({p.seed: p.metric for p in sorted(fp_runs, key=lambda p: p.seed)},
                           fp_runs[0].bops, steps.pop() if len(steps) == 1 else None,
                           "FP runs")
    phases: dict[str, tuple[int, float, int | None, int]] = {}
    for p in points:
        info = p.extra.get("fp_phase")
        if not info:
            continue
        cache = Path(info.get("cache") or "")
        if not (cache / FINAL).is_file() and root is not None:
            cache = root / FP_CACHE / cache.name
        cp = load_point(cache) if info.get("cache") and (cache / FINAL).is_file() else None
        if cp is not None:
            phases[str(cache.resolve())] = (cp.seed, cp.metric, cp.steps, cp.bops)
        elif info.get("metric") is not None:
            phases[f"{p.seed}:{info.get('cache')}"] = (p.seed, float(info["metric"]), None,
                                                      p.fp32_bops)
    per_seed: dict[int, float] = {}
    for seed, metric, _, _ in sorted(phases.values()):
        if per_seed.get(seed, metric) != metric:
            return None
        per_seed[seed] = metric
    if not per_seed:
        return None
    steps = {e[2] for e in phases.values()}
    return FpReference(per_seed, max(e[3] for e in phases.values()),
                       steps.pop() if len(steps) == 1 else None, "FP phase of the searches")


# ----- derived tables ----------------------------------------------------------------------
def _budget_bops(g: Group) -> float:
    """The budget a cell was run for (its runs' largest BOPs when it has none recorded)."""
    budgets = [p.budget_bops for p in g.points if p.budget_bops]
    return max(budgets) if budgets else max(p.bops for p in g.points)


def best_uniform_group(report: Report, g: Group) -> Group | None:
    """The uniform baseline of a cell: the best uniform cell (mean over its seeds) among
    those run for the same budget or fitting under it, over every (w, a) pair the report
    holds (asymmetric ones included). None for uniform and FP cells, or with no uniform
    cell that fits."""
    if g.method in ("uniform", "fp"):
        return None
    budget = _budget_bops(g) * (1 + 1e-9)
    uniform = [u for u in report.groups if u.method == "uniform"]
    # a cell run for the same budget fits by construction, even where the cell itself has
    # no budget recorded and landed below the uniform config's BOPs
    fits = [CostPoint(max(p.bops for p in u.points), u.metric_mean, str(i))
            for i, u in enumerate(uniform)
            if u.budget == g.budget or max(p.bops for p in u.points) <= budget]
    best = best_uniform(fits, math.inf, g.higher_is_better)
    return None if best is None else uniform[int(best.label)]


def uniform_delta(report: Report, g: Group) -> float | None:
    """Metric difference of the means to the best uniform cell under the cell's budget
    (``best_uniform_group``); positive = better than uniform."""
    base = best_uniform_group(report, g)
    if base is None:
        return None
    d = g.metric_mean - base.metric_mean
    return (d if g.higher_is_better else -d) + 0.0  # + 0.0 turns -0.0 into 0.0 (prints "+0")


@dataclass
class UniformComparison:
    """One cell against its uniform baselines: the best uniform cell under its budget,
    paired by seed, and the convex hull of the uniform means at the cell's BOPs."""

    group: Group
    baseline: Group
    paired: PairedDifference
    hull_metric: float | None

    @property
    def vs_hull(self) -> float | None:
        """Mean metric better than the uniform hull at the cell's BOPs (> 0 = better)."""
        if self.hull_metric is None:
            return None
        d = self.group.metric_mean - self.hull_metric
        return (d if self.group.higher_is_better else -d) + 0.0     # -0.0 -> 0.0

    @property
    def baseline_bits(self) -> str:
        return "/".join(sorted({p.bits for p in self.baseline.points}))

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": {"method": self.baseline.method, "budget": self.baseline.budget,
                             "bits": self.baseline_bits,
                             "metric_mean": self.baseline.metric_mean},
                **self.paired.to_dict(), "uniform_hull_metric": self.hull_metric,
                "vs_uniform_hull": self.vs_hull}


def compare_with_uniform(report: Report, g: Group) -> UniformComparison | None:
    base = best_uniform_group(report, g)
    if base is None:
        return None
    mine = {p.seed: p.metric for p in g.points}
    theirs = {p.seed: p.metric for p in base.points}
    _, (a, b) = pair_by_seed(mine, theirs)
    hull = uniform_hull([CostPoint(u.gbops_mean * 1e9, u.metric_mean)
                         for u in report.groups if u.method == "uniform"], g.higher_is_better)
    return UniformComparison(g, base, paired_difference(a, b, g.higher_is_better),
                             hull_value(hull, g.gbops_mean * 1e9))


def comparisons(report: Report) -> list[UniformComparison]:
    return [c for g in report.groups if (c := compare_with_uniform(report, g)) is not None]


def noise_statement(report: Report, cmps: list[UniformComparison] | None = None,
                    alpha: float = ALPHA) -> str:
    """Plain words for the whole report: which cells differ from uniform beyond seed noise
    (``cmps``: the report's ``comparisons``, when already computed)."""
    cmps = comparisons(report) if cmps is None else cmps
    cells = [g for g in report.groups if g.method != "fp"]
    if cells and all(g.n <= 1 for g in cells) and all(c.paired.n <= 1 for c in cmps):
        return ("1 seed: no uncertainty estimate. A difference between configurations from"
                " one seed cannot be told from seed noise; run several seeds.")
    if not cmps:
        return ("No searched configuration to compare with uniform precision: every cell is"
                " uniform or FP.")
    by: dict[str, list[str]] = {}
    for c in cmps:
        verdict = c.paired.verdict(alpha)
        p = {"better": c.paired.p_t, "worse": c.paired.p_t_worse}.get(verdict)
        by.setdefault(verdict, []).append(f"{c.group.method} {c.group.budget}"
                                          + ("" if p is None else f" (p = {p:.2g})"))
    tested = sum(len(by.get(k, [])) for k in ("better", "worse", "noise"))
    parts = []
    if by.get("better"):
        parts.append("Better than the best uniform config beyond seed noise (one-sided paired"
                     f" t-test, p < {alpha:g}): " + ", ".join(by["better"]) + ".")
    if by.get("worse"):
        parts.append(f"Worse than uniform beyond seed noise: {', '.join(by['worse'])}.")
    if by.get("noise"):
        parts.append(f"Not distinguishable from seed noise (p >= {alpha:g}): "
                     + ", ".join(by["noise"]) + ".")
    if by.get("identical"):
        parts.append("Identical to uniform on every seed (the same configuration): "
                     + ", ".join(by["identical"]) + ".")
    if by.get("1 seed"):
        parts.append("1 seed, no uncertainty estimate: " + ", ".join(by["1 seed"]) + ".")
    if by.get("no seeds"):
        parts.append("No seed in common with the uniform baseline, no paired comparison: "
                     + ", ".join(by["no seeds"]) + ".")
    if tested > 1:
        parts.append(f"Each of the {tested} cells tested passes by chance with probability"
                     f" {alpha:g}: expect about {alpha * tested:.2g} chance passes in all.")
    return " ".join(parts)


def layer_table(point: Point) -> list[dict[str, Any]]:
    """Per-layer bits, MACs share and BOPs share of one run (from its bitconfig.json)."""
    cfg = plots._bitconfig(point)
    if cfg is None or not cfg.costs:
        return []
    macs = sum(c.macs for c in cfg.costs.values()) or 1
    bops = sum(c.bops for c in cfg.costs.values()) or 1
    return [{"name": name, "op": cfg.costs[name].op, "w_bits": lb.w_bits, "a_bits": lb.a_bits,
             "macs_share": cfg.costs[name].macs / macs, "bops_share": cfg.costs[name].bops / bops}
            for name, lb in cfg.layers.items()]


def conventions(report: Report) -> dict[str, Any]:
    for p in report.points:
        cfg = plots._bitconfig(p)
        if cfg is not None and cfg.cost_summary:
            return {k: v for k, v in cfg.cost_summary.items()
                    if k not in ("total_bops", "budget_bops", "achieved_over_budget")}
    return {}


def search_summary(point: Point) -> dict[str, Any]:
    """Last values of the search trace (mu, temperature, E[BOPs]/B) and the repair record."""
    out: dict[str, Any] = {}
    for key in plots.SEARCH_KEYS:
        xs, ys = RunDir(point.run_dir).series("search", key, plots.SEARCH_TRACE)
        if ys:
            out[key] = ys[-1]
            out[f"{key}_steps"] = len(ys)
    for key in ("achieved_over_budget", "repair"):
        if key in point.extra:
            out[key] = point.extra[key]
    return out


def _saved(report: Report, key: str, compute):
    """A derived table: from the saved report.json when rebuilt from one, else computed."""
    if report.saved is not None and key in report.saved:
        return report.saved[key]
    return compute()


def _layers(report: Report) -> list[dict[str, Any]]:
    return _saved(report, "layers",
                  lambda: layer_table(report.points[0]) if report.single else [])


def _searches(report: Report) -> dict[str, dict[str, Any]]:
    return _saved(report, "search", lambda: {p.run_dir: s for p in report.points
                                             if (s := search_summary(p))})


def to_json(report: Report) -> dict[str, Any]:
    dominated = group_dominated(report.groups)
    cmps = {id(c.group): c for c in comparisons(report)}
    return {
        "root": str(report.root),
        "metric": report.metric_name,
        "higher_is_better": report.higher_is_better,
        "manifest": report.manifest,
        "points": [p.to_dict() for p in report.points],
        "unfinished": [str(u) for u in report.unfinished],
        "groups": [{**g.to_dict(), "dominated": i in dominated,
                    "vs_uniform": uniform_delta(report, g),
                    "vs_best_uniform": cmps[id(g)].to_dict() if id(g) in cmps else None}
                   for i, g in enumerate(report.groups)],
        "noise_statement": noise_statement(report, list(cmps.values())),
        "fp_reference": report.fp.to_dict() if report.fp else None,
        "pareto_front": [p.run_dir for p in report.front],
        "conventions": _saved(report, "conventions", lambda: conventions(report)),
        "layers": _layers(report),
        "search": _searches(report),
        "sensitivity": [str(p) for p in _sensitivity_files(report)],
    }


def _sensitivity_files(report: Report) -> list[Path]:
    if report.saved is not None:
        return [Path(p) for p in report.saved.get("sensitivity", []) if Path(p).is_file()]
    return sensitivity.find(report.root, [p.run_dir for p in report.points])


# ----- rows shared by the terminal and the HTML ---------------------------------------------------
def _mean_sd(s: SeedSummary) -> str:
    return f"{s.mean:.4f}" + (f" ± {s.sd:.4f}" if s.n > 1 else "")


def _frontier_rows(report: Report, pareto: tuple[str, str]) -> tuple[list[list[str]], list[bool]]:
    """method, budget, seeds, GBOPs, % FP32, metric, vs uniform, Pareto mark; and per row
    whether it is dominated. The FP reference closes the table when it is not a cell."""
    dominated = group_dominated(report.groups)
    fp32 = report.points[0].fp32_bops or 1
    rows, dom = [], []
    for i, g in enumerate(report.groups):
        d = uniform_delta(report, g)
        rows.append([g.method, g.budget, str(g.n), f"{g.gbops_mean:.4f}",
                     f"{100 * g.gbops_mean * 1e9 / fp32:.2f}",
                     _mean_sd(seed_summary(p.metric for p in g.points)),
                     "" if d is None else f"{d:+.4f}", pareto[i in dominated]])
        dom.append(i in dominated)
    fp = report.fp
    if fp is not None and not any(g.method == "fp" for g in report.groups):
        rows.append(["FP", fp.short, str(fp.summary.n),
                     f"{fp.gbops:.4f}", f"{100 * fp.bops / fp32:.2f}", _mean_sd(fp.summary),
                     "", ""])
        dom.append(False)
    return rows, dom


PAIRED_HEADERS = ["method", "budget", "uniform", "n", "Δ", "s.e.",
                  "p (t)", "p (W)", "wins", "vs hull", "verdict"]


def _paired_rows(cmps: list[UniformComparison]) -> list[list[str]]:
    def num(v: float | None, fmt: str) -> str:
        # round first: a difference of -1e-17 between equal runs prints +0.0000, not -0.0000
        return "–" if v is None else format(round(v, 6) + 0.0, fmt)

    rows = []
    for c in cmps:
        pd = c.paired
        rows.append([c.group.method, c.group.budget, c.baseline_bits, str(pd.n),
                     num(pd.mean, "+.4f"), num(pd.se, ".4f"), num(pd.p_t, ".2g"),
                     num(pd.p_wilcoxon, ".2g"),
                     f"{pd.wins}/{pd.n}",
                     num(c.vs_hull, "+.4f"), pd.verdict()])
    return rows


PAIRED_NOTE = (
    "uniform: the best uniform config run for the same budget or fitting under it. n: seeds"
    " both have. Δ: per seed, the cell's metric against that config's (the same seed shares"
    " initialisation and data order), averaged; > 0 = better than uniform. s.e.: standard error of that mean."
    " p (t): one-sided paired t-test that the cell is better; p (W): one-sided Wilcoxon"
    " signed-rank test (it cannot go below 2^-n with n seeds). wins: seeds on which the cell"
    " is better (ties: identical metric). vs hull: the cell's mean against the convex hull of the uniform means at its"
    " BOPs. verdict: better / worse beyond seed noise at p < 0.05, or noise.")


# ----- terminal ---------------------------------------------------------------------------------
def print_terminal(report: Report, console) -> None:
    from rich import box
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    name = report.metric_name
    better = "higher" if report.higher_is_better else "lower"
    spaces = sorted({p.space for p in report.points})
    summary = Text(str(report.root), style="bold") + Text(
        f"\n{len(report.points)} finished run(s)"
        + (f", {len(report.unfinished)} unfinished" if report.unfinished else "")
        + f"; space {', '.join(spaces)}; metric {name} ({better} is better)")
    console.print(Panel(summary, title="coqat report", expand=False))

    t = Table(title="frontier", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, just in (("method", "left"), ("budget", "left"), ("seeds", "right"),
                      ("GBOPs", "right"), ("% FP32", "right"), (name, "right"),
                      ("vs uniform", "right"), ("Pareto", "center")):
        t.add_column(col, justify=just)
    for row in _frontier_rows(report, ("✓", ""))[0]:
        t.add_row(*row)
    console.print(t)

    cmps = comparisons(report)
    if cmps:
        pt = Table(title="paired by seed with the best uniform config under the budget"
                         " (Δ > 0: better than uniform)",
                   title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        # the hull column stays in the HTML and JSON: 100 columns hold the rest unwrapped
        keep = [i for i, col in enumerate(PAIRED_HEADERS) if col != "vs hull"]
        for i in keep:                    # a long budget expression wraps, nothing is cut
            col = PAIRED_HEADERS[i]
            pt.add_column(col, justify="left" if col in ("method", "budget") else "right",
                          overflow="fold", no_wrap=col != "budget")
        for row in _paired_rows(cmps):
            pt.add_row(*[row[i] for i in keep])
        console.print(pt)

    console.print(noise_statement(report, cmps) + "\n", markup=False, highlight=False)

    if report.single:
        p = report.points[0]
        rows = _layers(report)
        if rows:
            lt = Table(title=f"per-layer bits ({p.bits})", title_justify="left",
                       box=box.SIMPLE_HEAD, pad_edge=False)
            for col in ("layer", "op", "bits", "% MACs", "% BOPs"):
                lt.add_column(col, justify="left" if col in ("layer", "op") else "right")
            for r in _layer_rows(rows):
                lt.add_row(*r)
            console.print(lt)
    else:
        _print_layer_grid(report, console)

    searches = _searches(report)
    traces = [(p, searches[p.run_dir]) for p in report.points
              if "mu" in searches.get(p.run_dir, {})]      # points that ran a Gumbel search
    if traces:
        st = Table(title="search trace (last values)", title_justify="left",
                   box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("budget", "seed", "steps", "mu", "temperature", "E[BOPs]/B", "achieved/B"):
            st.add_column(col, justify="right")
        for p, s in sorted(traces, key=lambda t: (t[0].bops, t[0].seed)):
            st.add_row(p.budget_expr or p.bits, str(p.seed), str(s.get("mu_steps", "")),
                       _fmt(s.get("mu")), _fmt(s.get("tau")),
                       _fmt(s.get("e_bops_over_budget")), _fmt(s.get("achieved_over_budget")))
        console.print(st)
    for path in _sensitivity_files(report):
        console.print(Text(sensitivity.short_line(path)), highlight=False)
    conv = _saved(report, "conventions", lambda: conventions(report))
    if conv:
        console.print(Text(f"BOPs = {conv.get('formula', 'MACs*w_bits*a_bits')}, MACs by"
                      f" {conv.get('mac_counter', 'fvcore')}; FP32 reference 32x32; float"
                      f" {conv.get('float_bits', 16)} bits; attention"
                      f" {conv.get('attention_bits', 16)}x{conv.get('attention_bits', 16)}.",
                           style="dim"))


def _layer_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["name"], r["op"], f"w{r['w_bits']}a{r['a_bits']}",
             f"{100 * r['macs_share']:.1f}", f"{100 * r['bops_share']:.1f}"] for r in rows]


def _print_layer_grid(report: Report, console, max_cols: int = 6) -> None:
    """Layers x budgets (first seed of each searched budget), bits as wNaM."""
    from rich import box
    from rich.table import Table

    cols = []
    seen = set()
    for p in sorted(report.points, key=lambda p: (p.bops, p.seed)):
        key = (p.method, p.budget_expr or p.bits)
        if p.method in ("fp",) or key in seen:
            continue
        seen.add(key)
        cols.append(p)
    cols = [p for p in cols if p.method != "uniform"][:max_cols] or cols[:max_cols]
    if not cols:
        return
    tables = [layer_table(p) for p in cols]
    if not tables[0]:
        return
    t = Table(title="bits per layer across budgets", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    t.add_column("layer")
    t.add_column("% MACs", justify="right")
    for p in cols:
        t.add_column(f"{p.method[:6]} {p.budget_expr or p.bits}"[:12], justify="right")
    for i, r in enumerate(tables[0]):
        t.add_row(r["name"], f"{100 * r['macs_share']:.1f}",
                  *[f"w{tb[i]['w_bits']}a{tb[i]['a_bits']}" if i < len(tb) else "" for tb in tables])
    console.print(t)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# ----- HTML -------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem}h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .5rem;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}.dim{color:#666;font-size:.85rem}.dom{color:#999}
code{background:#f4f4f4;padding:0 .2rem}
.noise{font-weight:600;background:#fff8e1;border-left:4px solid #f0b400;padding:.5rem .75rem}
"""


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return f"<p class='dim'>({alt}: no data)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _table(headers: list[str], rows: list[list[Any]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        cls = f" class='{classes[i]}'" if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fp_line(fp: FpReference | None) -> tuple[str, SeedSummary] | None:
    return None if fp is None else (f"{fp.short}, {fp.summary.n} seeds", fp.summary)


def write_html(report: Report, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.html and its PNGs into ``out_dir`` (default: the report's root, or the
    folder of the report.json it was rebuilt from)."""
    out = Path(out_dir) if out_dir else (report.source.parent if report.source else report.root)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{', '.join(sorted({p.space for p in report.points}))}: {report.metric_name} vs compute"
    pngs = {
        "frontier": plots.frontier_plot(report.groups, out / "frontier.png", title,
                                        fp=_fp_line(report.fp)),
        "bits": plots.bits_heatmap(report.points, out / "bits_heatmap.png"),
        "training": plots.training_curves(report.points, out / "training_curves.png"),
        "search": plots.search_curves(report.points, out / "search_curves.png"),
    }
    kept = set()
    if report.saved is not None:
        # rebuilt from report.json: plots drawn from the runs' own files cannot be redrawn;
        # keep the ones the first rendering left here rather than show none
        files = {"bits": "bits_heatmap", "training": "training_curves", "search": "search_curves"}
        for key, stem in files.items():
            if pngs[key] is None and (out / f"{stem}.png").is_file():
                pngs[key] = out / f"{stem}.png"
                kept.add(key)

    def img(key: str, alt: str) -> str:
        note = ("<p class='dim'>(drawn from the run directories when this report was first"
                " made; not redrawn from report.json)</p>") if key in kept else ""
        return _img(pngs[key], alt) + note

    frontier_rows, dominated = _frontier_rows(report, ("Pareto", "dominated"))
    cmps = comparisons(report)
    paired = [f"<p class='noise'>{html.escape(noise_statement(report, cmps))}</p>"]
    if cmps:
        paired += [_table(PAIRED_HEADERS, _paired_rows(cmps)),
                   f"<p class='dim'>{html.escape(PAIRED_NOTE)}</p>"]
    conv = _saved(report, "conventions", lambda: conventions(report))
    conv_rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in conv.items()]
    rebuilt = (f" · rebuilt from {html.escape(report.source.name)}"
               if report.source else "")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>coqat report: {html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>coqat report: {html.escape(title)}</h1>",
        f"<p class='dim'>{html.escape(str(report.root))} · {len(report.points)} finished run(s)"
        + (f", {len(report.unfinished)} unfinished" if report.unfinished else "")
        + f"{rebuilt} · generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        "<h2>Frontier</h2>", _img(pngs["frontier"], "frontier"),
        _table(["method", "budget", "seeds", "GBOPs", "% FP32", report.metric_name,
                "vs uniform", "Pareto"], frontier_rows, ["dom" if d else "" for d in dominated]),
        "<p class='dim'>" + html.escape(
            f"{report.metric_name}: mean ± standard deviation over seeds. vs uniform: the"
            " difference of the means to the best uniform config run for the same budget or"
            " fitting under it; positive = better than uniform."
            + ("" if report.fp is None else
               f" FP: the full-precision reference at FP32 cost, {report.fp.description}."
               + (" The FP phase is an ordinary full-precision training of each seed, cached,"
                  " that the searches start from." if report.fp.short == "FP phase"
                  else ""))) + "</p>",
        "<h2>Seeds and paired differences to uniform precision</h2>", *paired,
        "<h2>Bits per layer</h2>", img("bits", "bits per layer"),
    ]
    if report.single:
        parts.append(_table(["layer", "op", "bits", "% MACs", "% BOPs"],
                            _layer_rows(_layers(report))))
    sens_html, sens_pngs = sensitivity.report_sections(_sensitivity_files(report), out)
    parts += ["<h2>Training</h2>", img("training", "training curves"),
              "<h2>Search</h2>", img("search", "search curves"),
              *(["<h2>Sensitivity</h2>", sens_html] if sens_html else []),
              "<h2>BOPs conventions</h2>",
              "<p>BOPs = MACs × weight bits × activation bits; MACs per layer counted by fvcore on"
              " the float model (one multiply-add = one MAC). The FP32 reference counts 32×32;"
              " layers left unquantized count 16×16 (bf16); attention matmuls (QKᵀ, PV) count"
              " 16×16 over the full L×S; normalisation, pooling and element-wise ops are not"
              " counted.</p>", _table(["field", "value"], conv_rows),
              "<h2>Runs</h2>",
              _table(["run", "method", "budget", "seed", "bits", "GBOPs", report.metric_name,
                      "steps", "wall (s)"],
                     [[Path(p.run_dir).name, p.method, p.budget_expr or "", p.seed, p.bits,
                       f"{p.gbops:.4f}", f"{p.metric:.4f}", p.steps, f"{p.wall_s:.0f}"]
                      for p in sorted(report.points, key=lambda p: (p.bops, p.seed))]),
              "</body></html>"]
    page = out / "report.html"
    atomic_write_text(page, "\n".join(parts))
    pngs.update({f"sensitivity{i or ''}": p for i, p in enumerate(sens_pngs)})
    return {"html": page, **{k: v for k, v in pngs.items() if v is not None}}


def write_json(report: Report, path: Path) -> Path:
    return atomic_write_bytes(path, (json.dumps(to_json(report), indent=2) + "\n").encode())
