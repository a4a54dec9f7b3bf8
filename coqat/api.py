"""High-level library functions behind the CLI commands (the CLI only parses and prints).

Everything here is also usable from Python::

    from coqat.api import bops_report
    rep = bops_report(space="lm-tiny", bits="w4a4")
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from coqat.bitconfig import BitConfig, LayerBits
from coqat.config import DEFAULT_SPACE, bits_from_cli, load_space
from coqat.cost import CostModel
from coqat.errors import CoqatError
from coqat.workloads import get_workload, load_object


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise CoqatError(f"--input-shape {text!r} is not a shape; write e.g. 1,3,224,224")
    return shape


def model_and_inputs(space: str | None = None, model: str | None = None,
                     input_shape: str | None = None, data_dir: str | None = None):
    """(model, example inputs, pinned bits, resolved space or None, label)."""
    if space and model:
        raise CoqatError("give either --space or --model, not both")
    if model:
        factory = load_object(model)
        try:
            m = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        except Exception as e:
            raise CoqatError(f"calling {model} failed: {type(e).__name__}: {e}") from None
        if not isinstance(m, nn.Module):
            raise CoqatError(f"{model} did not return a torch.nn.Module")
        if not input_shape:
            raise CoqatError("--model needs --input-shape (e.g. --input-shape 1,3,224,224)")
        return m, (torch.randn(parse_shape(input_shape)),), None, model
    sp = load_space(space or DEFAULT_SPACE)
    wl = get_workload(sp.workload_name, {k: v for k, v in sp.workload.items() if k != "name"},
                      data_dir=data_dir)
    torch.manual_seed(0)
    return wl.build_model(), wl.example_inputs(), sp, sp.name


def bops_report(space: str | None = None, model: str | None = None,
                input_shape: str | None = None, bits: str | None = None,
                data_dir: str | None = None) -> dict[str, Any]:
    """Per-layer MACs / BOPs for a space's model or a user model, as a JSON-able dict."""
    m, inputs, sp, label = model_and_inputs(space, model, input_shape, data_dir)
    cost = CostModel.from_model(m, inputs)
    pinned: dict[str, LayerBits] = {}
    if sp is not None:
        resolved = sp.resolve(list(cost.layers), cost.tie_groups)
        pinned = resolved.pinned
    cfg: BitConfig | None = None
    if bits:
        lb = bits_from_cli(bits, "quest")
        cfg = BitConfig.load(bits) if lb is None else cost.uniform_config(lb, pinned)
    totals = {
        "macs": cost.total_macs,
        "gmacs": cost.total_macs / 1e9,
        "gbops_fp32": cost.fp32_bops() / 1e9,
        "gbops_w8a8": cost.uniform_bops(LayerBits(8, 8), pinned) / 1e9,
        "gbops_w4a4": cost.uniform_bops(LayerBits(4, 4), pinned) / 1e9,
    }
    if cfg is not None:
        totals["gbops_bits"] = cost.bops(cfg) / 1e9
    return {
        "source": label,
        "bits": bits,
        "input_shapes": cost.input_shapes,
        "layers": cost.rows(cfg),
        "totals": totals,
        "pinned": {k: v.label for k, v in pinned.items()},
        "tie_groups": [list(g) for g in cost.tie_groups],
        "conventions": cost.summary(None),
    }


DEMO_STEPS = 200   # per phase: FP phase, final QAT (the search runs half of it)


def run_demo(console, out: str = "runs", steps: int | None = None,
             budget: str = "w4a4") -> dict[str, Any]:
    """The embedded default end to end on the CPU: count BOPs; search per-layer bits for a
    BOPs budget (FP phase, Gumbel search, final QAT); train uniform precision at equal BOPs
    with the identical final QAT; compare against the FP phase; write the HTML report and
    the JSON export of the searched configuration."""
    import time
    from pathlib import Path

    from rich.table import Table

    from coqat.cost import format_bops
    from coqat.export import export_run
    from coqat.report.build import build_report, write_html
    from coqat.search import run_search
    from coqat.train.runner import TrainOptions

    steps = steps or DEMO_STEPS
    root = Path(out) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    console.rule("[bold]coqat demo[/bold]: lm-tiny on the CPU")
    rep = bops_report(space=DEFAULT_SPACE)
    t = rep["totals"]
    console.print(f"model: {len(rep['layers'])} quantizable layers + attention,"
                  f" {t['gmacs'] * 1e3:.1f} MMACs per sequence; FP32 {t['gbops_fp32']:.1f},"
                  f" W8A8 {t['gbops_w8a8']:.2f}, W4A4 {t['gbops_w4a4']:.2f} GBOPs")
    opts = TrainOptions(steps=steps, out=str(root))
    overrides = {"fp_steps": steps, "search_steps": max(1, steps // 2)}
    results = {}
    for method in ("gumbel", "uniform"):
        console.print(f"[bold]{method}[/bold] at budget {budget} ...")
        run, res = run_search(DEFAULT_SPACE, budget, method, opts, overrides=overrides,
                              say=lambda msg: console.print(f"  [dim]{msg}[/dim]"))
        results[method] = {**res, "run_dir": str(run.path)}
    g = results["gumbel"]
    fp_metric = (g.get("fp_phase") or {}).get("metric")
    table = Table(title=f"lm-tiny at the {budget} budget: validation loss vs compute"
                        f" ({steps} steps per phase)", title_justify="left")
    for col in ("config", "val loss (nats/byte)", "GBOPs", "x budget", "% of FP32"):
        table.add_column(col, justify="left" if col == "config" else "right")
    fp32 = g["fp32_bops"]
    if fp_metric is not None:
        table.add_row("FP (the search's FP phase)", f"{fp_metric:.4f}", format_bops(fp32),
                      "", "100.00")
    for method, r in results.items():
        name = "searched, mixed" if method == "gumbel" else f"uniform {r.get('uniform', '')}"
        table.add_row(name, f"{r['metric']:.4f}", format_bops(r["achieved_bops"]),
                      f"{r['achieved_over_budget']:.4f}",
                      f"{100 * r['achieved_bops'] / fp32:.2f}")
    console.print(table)
    report = write_html(build_report(root))
    exported = export_run(g["run_dir"], "json", None)
    console.print(f"report: [bold]{report['html']}[/bold]  (coqat report {root})")
    console.print(f"per-layer config: [bold]{exported.out_dir}[/bold]  (schema"
                  f" coqat.bitconfig/v1; coqat export {g['run_dir']} --format onnx for ONNX)")
    console.print("next: coqat frontier --space lm-tiny --budgets w3a3,w4a4,w6a6,w8a8 --seeds 2")
    return results
