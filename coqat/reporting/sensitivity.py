"""The sensitivity table (``sensitivity.json``) as a terminal table, a heatmap and HTML.

Reads the JSON document that ``coqat sensitivity`` (or ``--method sensitivity``, under
``search/``) wrote; like the rest of ``coqat.reporting`` it only reads. A cell is the loss
change when that one tensor is quantized to that width and everything else stays in float;
its noise is the standard error over the holdout batches, which are the same for every cell.
"""

from __future__ import annotations

import html
import textwrap
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from coqat.errors import CoqatError  # noqa: E402
from coqat.util import atomic_write_text, read_json  # noqa: E402

SCHEMA = "coqat.sensitivity/v1"    # coqat.bitsearch.sensitivity.SCHEMA (not imported: reports
FILE = "sensitivity.json"          # read files and must not need the search package)
HTML = "sensitivity.html"
PNG = "sensitivity.png"
#: a cell counts as distinguishable from float when its change exceeds this many s.e.
Z = 2.0
#: below this p-value the decisions of a width differ beyond noise
ALPHA = 0.05

KINDS = {"w": "weights", "a": "input activations"}

NOTE = (f"Δ loss: the mean change of the loss over the holdout batches when only that tensor"
        f" is quantized to that width and every other layer stays in float (the same batches"
        f" for every cell, so differences between cells are paired). s.e.: the standard error"
        f" of that mean. Cells within {Z:g} s.e. of zero are dimmed: these batches cannot tell"
        f" them from float. p (alike): the p-value of 'every decision changes the loss"
        f" equally at this width' (Cochran's Q over the cells, weighted by 1/s.e.²); at"
        f" p >= {ALPHA:g} the layers cannot be told apart at that width, so choosing bits per"
        f" layer has nothing to gain there.")


def read(path: str | Path) -> dict[str, Any]:
    """A ``sensitivity.json`` as a dict, checked for the fields the rendering uses."""
    doc = read_json(path, "a sensitivity table", "measure it again with coqat sensitivity")
    if not isinstance(doc, Mapping) or doc.get("schema") != SCHEMA or \
            not isinstance(doc.get("decisions"), list):
        raise CoqatError(f"{path} is not a coqat sensitivity table (schema {SCHEMA}); measure"
                         " it again with coqat sensitivity")
    return dict(doc)


def widths(doc: Mapping[str, Any]) -> list[int]:
    return sorted({int(b) for d in doc["decisions"] for b in d["widths"]})


def _cell(d: Mapping[str, Any], bits: int) -> tuple[float | None, float | None] | None:
    """(delta, se) of decision ``d`` at ``bits``; None when not measured; delta None when
    the loss was not finite."""
    if bits not in d["widths"]:
        return None
    i = d["widths"].index(bits)
    return d["delta"][i], d["se"][i]


def _fmt(delta: float | None) -> str:
    if delta is None:
        return "inf"
    return f"{delta:+.4f}" if abs(delta) >= 1e-4 or delta == 0 else f"{delta:+.1e}"


def _beyond_noise(delta: float | None, se: float | None) -> bool:
    return delta is None or se is None or abs(delta) > Z * se


def summary(doc: Mapping[str, Any]) -> str:
    """Where the numbers come from and how noisy they are, in one sentence."""
    base = f"{doc['baseline_loss']:.4f}"
    if doc.get("baseline_se") is not None:
        base += f" ± {doc['baseline_se']:.4f}"
    noise = doc.get("noise")
    notes = "".join(f" {n}" for n in doc.get("notes", []))
    return (f"{doc.get('source') or 'model'}: weights from {doc.get('weights') or '?'};"
            f" quantizer {doc.get('quantizer')}; float loss {base} (s.e. over"
            f" {doc['batches']} {doc.get('split', 'holdout')} batch(es) of"
            f" {doc['batch_size']})"
            + (f"; median cell s.e. {noise:.2g}" if noise is not None else "")
            + f"; {doc.get('forward_passes')} forward passes in {doc.get('wall_s')} s.{notes}")


def spread_rows(doc: Mapping[str, Any], strip: str = "") -> list[list[str]]:
    """kind, bits, least sensitive (Δ), most sensitive (Δ), p (alike): per width and kind."""
    def name(n: str) -> str:
        return n.replace(strip, "", 1) if strip else n

    return [[KINDS.get(s["kind"], s["kind"]), str(s["bits"]),
             f"{_fmt(s['min'])} {name(s['min_decision'])}",
             f"{_fmt(s['max'])} {name(s['max_decision'])}",
             _p(s.get("p_alike"))] for s in doc.get("spread", [])]


def _p(p: float | None) -> str:
    return "" if p is None else f"{p:.2g}"


SPREAD_HEADERS = ["kind", "bits", "least sensitive: Δ", "most sensitive: Δ", "p (alike)"]


def common_prefix(doc: Mapping[str, Any]) -> str:
    """The dotted prefix every layer name shares ("model.layers."), dropped in the terminal."""
    names = [n for d in doc["decisions"] for n in d["layers"]]
    if not names:
        return ""
    parts = [n.split(".") for n in names]
    keep = []
    for seg in zip(*[p[:-1] for p in parts]):
        if len(set(seg)) != 1:
            break
        keep.append(seg[0])
    return ".".join(keep) + "." if keep else ""


def rows(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per decision: name, kind, MACs share, and (delta, se) per width (None: not a
    candidate of that decision)."""
    total = {k: sum(d["macs"] for d in doc["decisions"] if d["kind"] == k) or 1
             for k in KINDS}
    return [{"name": d["name"], "kind": d["kind"], "layers": d["layers"],
             "macs_share": d["macs"] / total.get(d["kind"], 1),
             "cells": [_cell(d, b) for b in widths(doc)]} for d in doc["decisions"]]


# ----- terminal ----------------------------------------------------------------------------------
def print_table(doc: Mapping[str, Any], console) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    ws = widths(doc)
    prefix = common_prefix(doc)
    title = "Δ loss when one tensor is quantized, everything else float" + \
        (f" (layers under {prefix.rstrip('.')})" if prefix else "")
    t = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD,
              header_style="bold", pad_edge=False)
    t.add_column("decision", no_wrap=True)
    t.add_column("%MACs", justify="right")
    for b in ws:
        t.add_column(f"{b} bits", justify="right", no_wrap=True)
    for r in rows(doc):
        cells = []
        for c in r["cells"]:
            if c is None:
                cells.append(Text("-", style="dim"))
            else:
                cells.append(Text(_fmt(c[0]), style="" if _beyond_noise(*c) else "dim"))
        name = r["name"][:2] + r["name"][2:].replace(prefix, "", 1)
        t.add_row(Text(name), f"{100 * r['macs_share']:.1f}", *cells)
    console.print(t)
    console.print(Text(summary(doc)), highlight=False)
    st = Table(title=Text("spread over the decisions (p (alike): are they all equally"
                          " sensitive?)"),
               title_justify="left", box=box.SIMPLE_HEAD, header_style="bold",
               pad_edge=False)
    for col in SPREAD_HEADERS:
        st.add_column(col, overflow="fold", justify="right" if col in ("bits", "p (alike)") else
                      "left")
    for row in spread_rows(doc, prefix):
        st.add_row(*(Text(c) for c in row))
    console.print(st)
    console.print(Text(f"w: a layer's weight; a: the input of a tie group (+N: N more layers"
                       f" read it). dim: within {Z:g} s.e. of zero; -: not a candidate;"
                       f" %MACs: share of the MACs of its kind. p (alike) >= {ALPHA:g}: the"
                       " layers cannot be told apart at that width, so per-layer bits have"
                       " nothing to gain there (below it they differ, which can still be too"
                       " little to matter: compare Δ with the float loss).",
                       style="dim"), highlight=False)


# ----- heatmap -----------------------------------------------------------------------------------
def heatmap(doc: Mapping[str, Any], path: str | Path) -> Path:
    """Decisions x widths, one panel per kind, coloured by Δ loss on a symmetric log scale
    that is linear within the noise (so noise does not look like signal) and logarithmic
    beyond it (2-bit changes can be 1000x the 8-bit ones)."""
    from matplotlib.colors import SymLogNorm

    ws = widths(doc)
    table = rows(doc)
    panels = [(k, [r for r in table if r["kind"] == k]) for k in KINDS]
    panels = [(k, rs) for k, rs in panels if rs]
    finite = [abs(c[0]) for r in table for c in r["cells"] if c is not None and c[0] is not None]
    top = max(finite, default=1.0) or 1.0
    noise = doc.get("noise") or top * 1e-3
    norm = SymLogNorm(linthresh=max(noise, top * 1e-6), vmin=-top, vmax=top, base=10)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#d0d0d0", over="#400000")
    heights = [max(1, len(rs)) for _, rs in panels]
    names = [r["name"] for r in table]
    label_w = 0.055 * max((len(n) for n in names), default=10)
    fig_h = 0.2 * sum(heights) + 1.2 * len(panels) + 1.0
    fig, axes = plt.subplots(len(panels), 1, figsize=(label_w + 0.8 * len(ws) + 2.2, fig_h),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    im = None
    for ax, (kind, rs) in zip(axes[:, 0], panels):
        vals = np.array([[np.nan if c is None else (np.inf if c[0] is None else c[0])
                          for c in r["cells"]] for r in rs], dtype=float)
        shown = np.ma.masked_invalid(np.where(np.isposinf(vals), top * 10, vals))
        im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        for i, r in enumerate(rs):
            for j, c in enumerate(r["cells"]):
                if c is None:
                    continue
                strong = _beyond_noise(*c)
                level = 0.0 if c[0] is None else abs(norm(c[0]) - 0.5) * 2
                dark = level > 0.6
                color = ("white" if dark else "black") if strong else \
                    ("#dddddd" if dark else "#777777")
                ax.text(j, i, _fmt(c[0]), ha="center", va="center", fontsize=5.5,
                        color=color, fontstyle="normal" if strong else "italic")
        ax.set_yticks(range(len(rs)))
        ax.set_yticklabels([r["name"] for r in rs], fontsize=6)
        ax.set_xticks(range(len(ws)))
        ax.set_xticklabels([f"{b} bits" for b in ws], fontsize=7)
        ax.set_title(KINDS[kind], fontsize=8, loc="left")
    cbar = fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.04, pad=0.02)
    cbar.set_label("Δ loss (symmetric log scale)", fontsize=7)
    cbar.ax.tick_params(labelsize=6)
    title = (f"{doc.get('source') or 'model'}: Δ loss when one tensor is quantized, the rest"
             f" float (float loss {doc['baseline_loss']:.4f})")
    fig.suptitle(textwrap.fill(title, 70) + "\ngrey italic: within noise; grey cell: not a"
                 " candidate", fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----- HTML --------------------------------------------------------------------------------------
def html_section(doc: Mapping[str, Any], png: Path | None, where: str = "") -> str:
    """The heatmap, the summary and the table, for a page or a report section."""
    from coqat.reporting.build import _img, _table   # build imports this module at its top

    ws = widths(doc)
    body = []
    for r in rows(doc):
        cells = []
        for c in r["cells"]:
            if c is None:
                cells.append("–")
            else:
                se = "" if c[1] is None else f" ± {c[1]:.1g}"
                cells.append(_fmt(c[0]) + se + ("" if _beyond_noise(*c) else " (noise)"))
        body.append([r["name"], f"{100 * r['macs_share']:.1f}", *cells])
    return "\n".join([
        f"<p class='dim'>{html.escape(where)}</p>" if where else "",
        f"<p class='noise'>{html.escape(summary(doc))}</p>",
        _img(png, "sensitivity heatmap"),
        _table(SPREAD_HEADERS, spread_rows(doc)),
        _table(["decision", "% MACs of its kind", *[f"{b} bits: Δ ± s.e." for b in ws]], body),
        f"<p class='dim'>{html.escape(NOTE)}</p>"])


def write_page(doc: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``sensitivity.html`` and ``sensitivity.png`` in ``out_dir``."""
    from coqat.reporting.build import _CSS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = heatmap(doc, out / PNG)
    title = f"coqat sensitivity: {doc.get('source') or 'model'}"
    page = "\n".join([
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>", html_section(doc, png), "</body></html>"])
    return {"html": atomic_write_text(out / HTML, page), "png": png}


# ----- in coqat report -------------------------------------------------------------------------
def find(root: Path, run_dirs: list[str]) -> list[Path]:
    """The sensitivity tables in a report's folder and its runs (``sensitivity.json`` or
    ``search/sensitivity.json``), each table once even where several runs recorded the
    same one (searches of one FP phase at several budgets)."""
    seen_paths, seen_tables, found = set(), set(), []
    for d in [root, *map(Path, run_dirs)]:
        for p in (d / FILE, d / "search" / FILE):
            if not p.is_file() or p.resolve() in seen_paths:
                continue
            seen_paths.add(p.resolve())
            key = p.read_bytes()
            try:
                doc = read(p)
                key = repr((doc.get("weights"), doc["decisions"])).encode()
            except CoqatError:
                pass                       # shown as unreadable by the report
            if key not in seen_tables:
                seen_tables.add(key)
                found.append(p)
    return found


def report_sections(paths: list[Path], out: Path, limit: int = 4) -> tuple[str, list[Path]]:
    """The report's "Sensitivity" section for ``paths`` (at most ``limit`` heatmaps) and
    the PNGs written."""
    parts, pngs = [], []
    for i, p in enumerate(paths):
        if i >= limit:
            parts.append(f"<p class='dim'>{len(paths) - limit} more table(s) not drawn:"
                         f" {html.escape(', '.join(map(str, paths[limit:])))}</p>")
            break
        try:
            doc = read(p)
        except CoqatError as e:
            parts.append(f"<p class='dim'>{html.escape(str(e))}</p>")
            continue
        png = heatmap(doc, out / (PNG if i == 0 else f"sensitivity_{i + 1}.png"))
        pngs.append(png)
        parts.append(html_section(doc, png, where=str(p)))
    return "\n".join(parts), pngs


def short_line(path: Path) -> str:
    """One line for the terminal report."""
    try:
        doc = read(path)
    except CoqatError as e:
        return str(e)
    lowest = [s for s in doc.get("spread", []) if s["bits"] == min(widths(doc), default=0)]
    extra = "".join(f"; {KINDS[s['kind']]} at {s['bits']} bits: {_fmt(s['min'])} ..."
                    f" {_fmt(s['max'])}" + ("" if s.get("p_alike") is None else
                                            f" (p alike {_p(s['p_alike'])})")
                    for s in lowest)
    return f"sensitivity {path}: float loss {doc['baseline_loss']:.4f}{extra}"
