"""``coqat demo``: the embedded default end to end, composed from the public API.

Counts BOPs, searches per-layer bits for a BOPs budget (FP phase, Gumbel search, final
QAT), trains uniform precision at equal BOPs with the identical final QAT, compares both
with the FP phase, and writes the HTML report and the JSON export of the searched config.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table
from rich.text import Text

from coqat import api
from coqat.config import DEFAULT_SPACE
from coqat.cost import format_bops
from coqat.records import RunRecord

DEMO_STEPS = 200   # per phase: FP phase, final QAT (the search runs half of it)

__all__ = ["run_demo", "DEMO_STEPS"]


def run_demo(console, out: str = "runs", steps: int | None = None,
             budget: str = "w4a4") -> dict[str, RunRecord]:
    steps = steps or DEMO_STEPS
    root = Path(out) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    console.rule(Text("coqat demo: lm-tiny on the CPU"))
    rep = api.bops(DEFAULT_SPACE)
    t = rep.totals

    def say(text: str, style: str = "") -> None:
        console.print(Text(text, style=style), highlight=False, soft_wrap=True)

    say(f"model: {len(rep.layers)} quantizable layers + attention, {t['gmacs'] * 1e3:.1f}"
        f" MMACs per sequence; FP32 {t['gbops_fp32']:.1f}, W8A8 {t['gbops_w8a8']:.2f}, W4A4"
        f" {t['gbops_w4a4']:.2f} GBOPs")
    results: dict[str, RunRecord] = {}
    for method in ("gumbel", "uniform"):
        say(f"{method} at budget {budget} ...", style="bold")
        [rec] = api.search(DEFAULT_SPACE, budget, method, steps=steps, out=str(root),
                           fp_steps=steps, search_steps=max(1, steps // 2),
                           say=lambda msg: say(f"  {msg}", style="dim"))
        results[method] = rec
    g = results["gumbel"]
    fp_metric = (g.search.fp_phase or {}).get("metric") if g.search else None
    table = Table(title=Text(f"lm-tiny at the {budget} budget: validation loss vs compute"
                             f" ({steps} steps per phase)"), title_justify="left")
    for col in ("config", "val loss (nats/byte)", "GBOPs", "x budget", "% of FP32"):
        table.add_column(col, justify="left" if col == "config" else "right")
    fp32 = g.fp32_bops
    if fp_metric is not None:
        table.add_row("FP (the search's FP phase)", f"{fp_metric:.4f}", format_bops(fp32),
                      "", "100.00")
    for method, r in results.items():
        name = "searched, mixed" if method == "gumbel" else \
            f"uniform {(r.search.uniform if r.search else '') or ''}"
        table.add_row(name, f"{r.metric:.4f}", format_bops(r.search.achieved_bops),
                      f"{r.search.achieved_over_budget:.4f}",
                      f"{100 * r.search.achieved_bops / fp32:.2f}")
    console.print(table)
    _, files = api.report(root)
    exported = api.export(g.run_dir, "json")
    say(f"report: {files['html']}  (coqat report {root})")
    say(f"per-layer config: {exported.out_dir}  (schema coqat.bitconfig/v1; coqat export"
        f" {g.run_dir} --format onnx for ONNX)")
    say("next: coqat frontier --space lm-tiny --budgets w3a3,w4a4,w6a6,w8a8 --seeds 2")
    return results

