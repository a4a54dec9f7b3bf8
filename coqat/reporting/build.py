"""``coqat report``: one run or a frontier, in the terminal (rich), as JSON, and as HTML.

The HTML page is self-contained and offline: plots are PNGs embedded as data URIs (the same
PNG files are written next to it), tables are plain HTML, no script or CDN.
"""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coqat.reporting import plots
from coqat.reporting.runs import (FRONTIER_MANIFEST, Group, Point, group_dominated, group_points,
                               load_points, pareto_front)
from coqat.util import atomic_write_bytes, atomic_write_text


@dataclass
class Report:
    root: Path
    points: list[Point]
    unfinished: list[Path]
    groups: list[Group]
    front: list[Point]
    manifest: dict[str, Any] = field(default_factory=dict)

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
    root = Path(root)
    points, unfinished = load_points(root)
    manifest = {}
    if (root / FRONTIER_MANIFEST).is_file():
        manifest = json.loads((root / FRONTIER_MANIFEST).read_text())
    groups = group_points(points)
    return Report(root, points, unfinished, groups, pareto_front(points), manifest)


# ----- derived tables ----------------------------------------------------------------------
def uniform_delta(report: Report, g: Group) -> float | None:
    """Metric difference to uniform precision (positive = better than uniform).

    The baseline is the uniform cell searched for the same budget (both meet it; the search
    may land a little below it, the uniform config usually further below). A cell with no
    uniform run at its budget is compared with the best uniform cell at no more BOPs.
    """
    if g.method == "uniform":
        return None
    base = [u for u in report.groups if u.method == "uniform" and u.budget == g.budget]
    if not base:
        base = [u for u in report.groups
                if u.method == "uniform" and u.gbops_mean <= g.gbops_mean * (1 + 1e-9)]
    if not base:
        return None
    best = (max if g.higher_is_better else min)(base, key=lambda u: u.metric_mean)
    d = g.metric_mean - best.metric_mean
    return (d if g.higher_is_better else -d) + 0.0  # + 0.0 turns -0.0 into 0.0 (prints "+0")


def layer_table(point: Point) -> list[dict[str, Any]]:
    """Per-layer bits, MACs share and BOPs share of one run (from its bitconfig.json)."""
    f = Path(point.run_dir) / "bitconfig.json"
    if not f.is_file():
        return []
    doc = json.loads(f.read_text())
    layers = doc.get("layers", {})
    macs = sum(e.get("macs", 0) for e in layers.values()) or 1
    bops = sum(e.get("bops", 0) for e in layers.values()) or 1
    rows = []
    for name, e in layers.items():
        rows.append({"name": name, "op": e.get("op", ""),
                     "w_bits": (e.get("weight") or {}).get("bits", 16),
                     "a_bits": (e.get("input_act") or {}).get("bits", 16),
                     "macs_share": e.get("macs", 0) / macs, "bops_share": e.get("bops", 0) / bops})
    return rows


def conventions(report: Report) -> dict[str, Any]:
    for p in report.points:
        f = Path(p.run_dir) / "bitconfig.json"
        if f.is_file():
            cost = json.loads(f.read_text()).get("cost", {})
            if cost:
                return {k: v for k, v in cost.items()
                        if k not in ("total_bops", "budget_bops", "achieved_over_budget")}
    return {}


def search_summary(point: Point) -> dict[str, Any]:
    """Last values of the search trace (mu, temperature, E[BOPs]/B) and the repair record."""
    out: dict[str, Any] = {}
    for key in plots.SEARCH_KEYS:
        xs, ys = plots._series(point.run_dir, "search", key, plots.SEARCH_TRACE)
        if ys:
            out[key] = ys[-1]
            out[f"{key}_steps"] = len(ys)
    for key in ("achieved_over_budget", "repair"):
        if key in point.extra:
            out[key] = point.extra[key]
    return out


def to_json(report: Report) -> dict[str, Any]:
    dominated = group_dominated(report.groups)
    return {
        "root": str(report.root),
        "metric": report.metric_name,
        "higher_is_better": report.higher_is_better,
        "manifest": report.manifest,
        "points": [p.to_dict() for p in report.points],
        "unfinished": [str(u) for u in report.unfinished],
        "groups": [{**g.to_dict(), "dominated": i in dominated,
                    "vs_uniform": uniform_delta(report, g)}
                   for i, g in enumerate(report.groups)],
        "pareto_front": [p.run_dir for p in report.front],
        "conventions": conventions(report),
        "layers": layer_table(report.points[0]) if report.single else [],
        "search": {p.run_dir: s for p in report.points if (s := search_summary(p))},
    }


# ----- terminal ---------------------------------------------------------------------------------
def print_terminal(report: Report, console) -> None:
    from rich import box
    from rich.panel import Panel
    from rich.table import Table

    name = report.metric_name
    better = "higher" if report.higher_is_better else "lower"
    spaces = sorted({p.space for p in report.points})
    summary = (f"[bold]{report.root}[/bold]\n{len(report.points)} finished run(s)"
               + (f", {len(report.unfinished)} unfinished" if report.unfinished else "")
               + f"; space {', '.join(spaces)}; metric {name} ({better} is better)")
    console.print(Panel(summary, title="coqat report", expand=False))

    dominated = group_dominated(report.groups)
    t = Table(title="frontier", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, just in (("method", "left"), ("budget", "left"), ("seeds", "right"),
                      ("GBOPs", "right"), ("% FP32", "right"), (name, "right"),
                      ("vs uniform", "right"), ("Pareto", "center")):
        t.add_column(col, justify=just)
    fp32 = report.points[0].fp32_bops or 1
    for i, g in enumerate(report.groups):
        spread = f" ± {g.metric_std:.4f}" if g.n > 1 else ""
        d = uniform_delta(report, g)
        t.add_row(g.method, g.budget, str(g.n), f"{g.gbops_mean:.3f}",
                  f"{100 * g.gbops_mean * 1e9 / fp32:.2f}", f"{g.metric_mean:.4f}{spread}",
                  "" if d is None else f"{d:+.4f}", "" if i in dominated else "✓")
    console.print(t)

    if report.single:
        p = report.points[0]
        rows = layer_table(p)
        if rows:
            lt = Table(title=f"per-layer bits ({p.bits})", title_justify="left",
                       box=box.SIMPLE_HEAD, pad_edge=False)
            for col in ("layer", "op", "bits", "% MACs", "% BOPs"):
                lt.add_column(col, justify="left" if col in ("layer", "op") else "right")
            for r in rows:
                lt.add_row(r["name"], r["op"], f"w{r['w_bits']}a{r['a_bits']}",
                           f"{100 * r['macs_share']:.1f}", f"{100 * r['bops_share']:.1f}")
            console.print(lt)
    else:
        _print_layer_grid(report, console)

    traces = [(p, search_summary(p)) for p in report.points]
    traces = [(p, s) for p, s in traces if "mu" in s]   # points that ran a Gumbel search
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
    conv = conventions(report)
    if conv:
        console.print(f"[dim]BOPs = {conv.get('formula', 'MACs*w_bits*a_bits')}, MACs by"
                      f" {conv.get('mac_counter', 'fvcore')}; FP32 reference 32x32; float"
                      f" {conv.get('float_bits', 16)} bits; attention"
                      f" {conv.get('attention_bits', 16)}x{conv.get('attention_bits', 16)}.[/dim]")


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


def write_html(report: Report, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.html and its PNGs into ``out_dir`` (default: the report's root)."""
    out = Path(out_dir) if out_dir else report.root
    out.mkdir(parents=True, exist_ok=True)
    title = f"{', '.join(sorted({p.space for p in report.points}))}: {report.metric_name} vs compute"
    pngs = {
        "frontier": plots.frontier_plot(report.groups, out / "frontier.png", title),
        "bits": plots.bits_heatmap(report.points, out / "bits_heatmap.png"),
        "training": plots.training_curves(report.points, out / "training_curves.png"),
        "search": plots.search_curves(report.points, out / "search_curves.png"),
    }
    dominated = group_dominated(report.groups)
    fp32 = report.points[0].fp32_bops or 1
    frontier_rows, classes = [], []
    for i, g in enumerate(report.groups):
        d = uniform_delta(report, g)
        frontier_rows.append([g.method, g.budget, g.n, f"{g.gbops_mean:.4f}",
                              f"{100 * g.gbops_mean * 1e9 / fp32:.2f}",
                              f"{g.metric_mean:.4f}" + (f" ± {g.metric_std:.4f}" if g.n > 1 else ""),
                              "" if d is None else f"{d:+.4f}", "dominated" if i in dominated else "Pareto"])
        classes.append("dom" if i in dominated else "")
    conv = conventions(report)
    conv_rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in conv.items()]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>coqat report: {html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>coqat report: {html.escape(title)}</h1>",
        f"<p class='dim'>{html.escape(str(report.root))} · {len(report.points)} finished run(s)"
        + (f", {len(report.unfinished)} unfinished" if report.unfinished else "")
        + f" · generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        "<h2>Frontier</h2>", _img(pngs["frontier"], "frontier"),
        _table(["method", "budget", "seeds", "GBOPs", "% FP32", report.metric_name,
                "vs uniform", "Pareto"], frontier_rows, classes),
        "<p class='dim'>vs uniform: metric difference to the uniform-precision runs of the same"
        " budget (else the best uniform at no more BOPs); positive = better than uniform.</p>",
        "<h2>Bits per layer</h2>", _img(pngs["bits"], "bits per layer"),
    ]
    if report.single:
        rows = [[r["name"], r["op"], f"w{r['w_bits']}a{r['a_bits']}",
                 f"{100 * r['macs_share']:.1f}", f"{100 * r['bops_share']:.1f}"]
                for r in layer_table(report.points[0])]
        parts.append(_table(["layer", "op", "bits", "% MACs", "% BOPs"], rows))
    parts += ["<h2>Training</h2>", _img(pngs["training"], "training curves"),
              "<h2>Search</h2>", _img(pngs["search"], "search curves"),
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
    return {"html": page, **{k: v for k, v in pngs.items() if v is not None}}


def write_json(report: Report, path: Path) -> Path:
    return atomic_write_bytes(path, (json.dumps(to_json(report), indent=2) + "\n").encode())
