"""Report figures (matplotlib, headless): frontier, per-layer bits heatmap, curves.

Each function writes one PNG and returns its path; the HTML report embeds the same files,
so the PNGs and the page always agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coqat.bitconfig import FLOAT_BITS, BitConfig, LayerBits  # noqa: E402
from coqat.errors import CoqatError  # noqa: E402
from coqat.rundir import RunDir  # noqa: E402
from coqat.reporting.runs import Group, Point, group_dominated  # noqa: E402
from coqat.reporting.stats import CostPoint, SeedSummary, hull_value, uniform_hull  # noqa: E402

_METHOD_STYLE = {
    "gumbel": dict(color="#d62728", marker="o"),
    "uniform": dict(color="#1f77b4", marker="s"),
    "optuna": dict(color="#2ca02c", marker="^"),
    "random": dict(color="#7f7f7f", marker="x"),
    "fp": dict(color="black", marker="*"),
}


def _style(method: str) -> dict:
    return _METHOD_STYLE.get(method, dict(color="#9467bd", marker="D"))


def frontier_plot(groups: Sequence[Group], path: Path, title: str,
                  fp: tuple[str, SeedSummary] | None = None) -> Path:
    """Metric vs GBOPs (log x): one series per method, seed spread as error bars, the convex
    hull of the uniform baselines as a line, dominated cells hollow, FP as a dashed
    reference (``fp``: its label and seeds, e.g. the searches' FP phase; else FP cells)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    dominated = group_dominated(groups)
    by_method: dict[str, list[tuple[int, Group]]] = {}
    for i, g in enumerate(groups):
        by_method.setdefault(g.method, []).append((i, g))
    name = groups[0].points[0].metric_name if groups else "metric"
    hib = groups[0].higher_is_better if groups else False
    refs = [(f"FP32 ({g.metric_mean:.4f})", g.metric_mean, g.metric_std)
            for _, g in by_method.pop("fp", [])]
    if fp is not None:
        refs = [(f"{fp[0]}: {fp[1].mean:.4f}", fp[1].mean, fp[1].sd or 0.0)]
    for label, mean, sd in refs:
        ax.axhline(mean, color="black", ls="--", lw=1, label=label)
        if sd:
            ax.axhspan(mean - sd, mean + sd, color="black", alpha=0.06, lw=0)
    for method, items in sorted(by_method.items()):
        st = _style(method)
        items.sort(key=lambda t: t[1].gbops_mean)
        xs = [g.gbops_mean for _, g in items]
        ys = [g.metric_mean for _, g in items]
        es = [g.metric_std for _, g in items]
        if method == "uniform":
            hull = uniform_hull([CostPoint(x, y) for x, y in zip(xs, ys)], hib)
            # past its best vertex the hull stays flat: spending less than a budget is allowed
            hx = np.geomspace(hull[0].bops, max(xs), 200)
            ax.plot(hx, [hull_value(hull, x) for x in hx], color=st["color"], lw=1.2,
                    alpha=0.8, label="uniform convex hull")
        for (i, g), x, y, e in zip(items, xs, ys, es):
            face = "none" if i in dominated else st["color"]
            ax.errorbar([x], [y], yerr=[e], fmt=st["marker"], color=st["color"],
                        mfc=face, ms=7, capsize=3, lw=1)
        ax.plot([], [], st["marker"], color=st["color"], label=method)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("GBOPs (log scale)")
    ax.set_ylabel(name)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.text(0.99, 0.01, "hollow = dominated; bars = std over seeds"
            + ("; band = FP ± std" if any(sd for _, _, sd in refs) else ""), transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7, color="#555")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plain_log_ticks(axis) -> None:
    """Label a log axis 7, 8, 10 rather than 7x10^0 (a frontier often spans under a decade)."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


def _bitconfig(point: Point) -> BitConfig | None:
    """The run's bitconfig.json, or None when it has none or it is unreadable."""
    f = Path(point.run_dir) / "bitconfig.json"
    if not f.is_file():
        return None
    try:
        return BitConfig.load(f)
    except CoqatError:
        return None


def bits_heatmap(points: Sequence[Point], path: Path) -> Path | None:
    """Per-layer weight bits (colour) and weight/activation bits (text) across runs,
    cheapest left; None when no run has a bitconfig.json."""
    runs = []
    for p in sorted(points, key=lambda p: p.bops):
        cfg = _bitconfig(p)
        if cfg is None or p.method == "fp":
            continue
        runs.append((f"{p.method} {p.budget_expr or p.bits} s{p.seed}", cfg.layers))
    if not runs:
        return None
    fig = heatmap_figure(runs)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap_figure(runs: Sequence[tuple[str, dict]]):
    """The heatmap of ``runs`` (label, {layer: LayerBits}). Layers left in float (pinned,
    e.g. lm_head) are grey and outside the colour scale, so that their 16 bits do not
    squeeze the searched 2-8-bit range into a few shades; each weight width present gets
    its own colour."""
    import textwrap

    from matplotlib.colors import ListedColormap

    names = list(runs[0][1])

    def bits(layer: LayerBits | None, key: str) -> int | None:
        b = None if layer is None else getattr(layer, key)
        return None if b is None or b == FLOAT_BITS else b

    w = [[bits(layers.get(n), "w_bits") for _, layers in runs] for n in names]
    a = [[bits(layers.get(n), "a_bits") for _, layers in runs] for n in names]
    levels = sorted({b for row in w for b in row if b is not None}) or [16]
    idx = np.ma.masked_invalid(np.array([[np.nan if b is None else levels.index(b) for b in row]
                                         for row in w], dtype=float))
    cmap = ListedColormap(plt.get_cmap("viridis")(np.linspace(0, 1, len(levels)))
                          ).with_extremes(bad="#d0d0d0")
    labels = [label for label, _ in runs]
    label_h = 0.06 * max(len(t) for t in labels)      # inches under the grid for vertical labels
    width = max(5.5, 0.45 * len(runs) + 3)
    fig, ax = plt.subplots(figsize=(width, max(3, 0.22 * len(names) + 1.6 + label_h)))
    im = ax.imshow(idx, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(levels) - 0.5,
                   interpolation="nearest")
    with_text = len(names) * len(runs) <= 2500          # beyond that the cells are too small
    if with_text:
        for i in range(len(names)):
            for j in range(len(runs)):
                if w[i][j] is None:
                    text, color = "fp" if a[i][j] is None else f"fp/{a[i][j]}", "#444"
                else:
                    text = f"{w[i][j]}/{a[i][j] if a[i][j] is not None else 'fp'}"
                    r, g, b, _ = cmap(levels.index(w[i][j]))
                    color = "black" if 0.3 * r + 0.6 * g + 0.1 * b > 0.5 else "white"
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color=color)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    cbar = fig.colorbar(im, ax=ax, fraction=0.03, ticks=range(len(levels)))
    cbar.ax.set_yticklabels([str(b) for b in levels], fontsize=7)
    cbar.set_label("weight bits", fontsize=8)
    # the title is centred on the figure and wrapped to its width, so it is never clipped
    chars = max(20, int(width * 72 / (0.6 * 9)))
    note = ("colour: weight bits" + ("; text: weight/activation bits" if with_text else "")
            + "; grey: left in float (not quantized)")
    fig.suptitle("bits per layer, cheapest run left\n" + textwrap.fill(note, chars),
                 fontsize=9)
    fig.tight_layout()
    return fig


def training_curves(points: Sequence[Point], path: Path, max_runs: int = 12) -> Path | None:
    """Training loss and validation metric against steps."""
    chosen = sorted(points, key=lambda p: p.bops)[:max_runs]
    curves = [(p, RunDir(p.run_dir).series("train", "loss"),
               RunDir(p.run_dir).series("eval", p.metric_name))
              for p in chosen]
    if not any(train[0] or val[0] for _, train, val in curves):
        return None                    # no metrics.jsonl to read (e.g. runs moved away)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for p, (xs, ys), (vx, vy) in curves:
        label = f"{p.method} {p.budget_expr or p.bits} s{p.seed}"
        if xs:
            a1.plot(xs, ys, lw=1, label=label)
        if vx:
            a2.plot(vx, vy, marker=".", lw=1, label=label)
    a1.set_title("training loss")
    a2.set_title(f"validation {chosen[0].metric_name}")
    for a in (a1, a2):
        a.set_xlabel("step")
        a.grid(True, alpha=0.3)
    a2.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# the Gumbel search's trace (coqat.bitsearch.pipeline writes it): one record per architecture step
SEARCH_TRACE = "search/trace.jsonl"
SEARCH_KEYS = ("mu", "tau", "e_bops_over_budget")


def search_curves(points: Sequence[Point], path: Path, max_runs: int = 12) -> Path | None:
    """The search's multiplier mu, Gumbel temperature and E[BOPs]/B against steps."""
    with_trace = []
    for p in points:
        series = {k: RunDir(p.run_dir).series("search", k, SEARCH_TRACE) for k in SEARCH_KEYS}
        if any(xs for xs, _ in series.values()):
            with_trace.append((p, series))
    if not with_trace:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for p, series in with_trace[:max_runs]:
        label = f"{p.budget_expr or p.bits} s{p.seed}"
        for ax, key in zip(axes, SEARCH_KEYS):
            xs, ys = series[key]
            if xs:
                ax.plot(xs, ys, lw=1, label=label)
    for ax, key, title in zip(axes, SEARCH_KEYS, ("Lagrange multiplier mu", "temperature",
                                                  "E[BOPs] / budget")):
        ax.set_title(title)
        ax.set_xlabel("search step")
        ax.grid(True, alpha=0.3)
    axes[2].axhline(1.0, color="black", lw=0.8, ls="--")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
