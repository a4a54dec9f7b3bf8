"""``coqat demo``: the embedded default end to end, composed from the public API.

Counts BOPs, searches per-layer bits for a BOPs budget (FP phase, Gumbel search, final QAT)
restricted to what a deployment target serves (ONNX by default), trains uniform precision at
equal BOPs with the identical final QAT, compares both with the FP phase, says how much one
seed can tell, and writes the HTML report, the JSON config and the ONNX export.

Progress: a line per phase with the time elapsed and an estimate of what is left, measured
from the steps done so far (the training bars show each phase's own steps and its final
evaluation).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table
from rich.text import Text

from coqat import api
from coqat.config import DEFAULT_SPACE, spaces_dir
from coqat.cost import format_bops
from coqat.errors import CoqatError
from coqat.records import RunRecord
from coqat.reporting.build import build_report, noise_statement
from coqat.util import read_json

DEMO_STEPS = 200   # per phase: FP phase, final QAT (the search runs half of it)
#: relative cost of one step of each phase (a search step ~ 1.4 QAT steps, measured in
#: reports/search_vs_uniform; an FP step ~ 0.8)
_PHASE_COST = {"fp": 0.8, "search": 1.4, "qat": 1.0}
#: the committed paired grids at the demo's own setting (benchmarks/mixed_vs_uniform.py
#: --preset cpu-lm-tiny, seeds 0-7, and its replication cpu-lm-tiny-rep, seeds 8-23), for
#: the paired figures printed beside the demo's single seed
REFERENCES = tuple(Path("reports") / "mixed_vs_uniform" / name / "results.json"
                   for name in ("lm-tiny", "lm-tiny-rep"))

__all__ = ["run_demo", "DEMO_STEPS", "reference_figure", "reference_figures"]


class _Clock:
    """Elapsed time and an estimate of what is left, from the work units done so far."""

    def __init__(self, total_units: float):
        self.t0, self.total, self.done = time.monotonic(), total_units, 0.0

    def advance(self, units: float) -> None:
        self.done = min(self.total, self.done + units)

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        fmt = lambda s: f"{int(s) // 60}:{int(s) % 60:02d}"  # noqa: E731
        return f"{fmt(elapsed)} elapsed" + (f", about {fmt(left)} left" if left is not None
                                            else "")


def run_demo(console, out: str = "runs", steps: int | None = None, budget: str = "w4a4",
             target: str | None = "onnx") -> dict[str, RunRecord]:
    steps = steps or DEMO_STEPS
    if steps < 1:
        raise CoqatError(f"steps must be >= 1 (got {steps})")
    root = Path(out) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"

    def say(text: str, style: str = "") -> None:
        console.print(Text(text, style=style), highlight=False)

    console.rule(Text("coqat demo: lm-tiny on the CPU"))
    rep = api.bops(DEFAULT_SPACE)
    t = rep.totals
    say(f"model: {len(rep.layers)} quantizable layers + attention, {t['gmacs'] * 1e3:.1f}"
        f" MMACs per sequence; FP32 {t['gbops_fp32']:.1f}, W8A8 {t['gbops_w8a8']:.2f}, W4A4"
        f" {t['gbops_w4a4']:.2f} GBOPs")
    search_steps = max(1, steps // 2)
    qat = _PHASE_COST["qat"] * steps
    clock = _Clock(_PHASE_COST["fp"] * steps + _PHASE_COST["search"] * search_steps + 2 * qat)
    phase_units = {"FP phase": _PHASE_COST["fp"] * steps,
                   "search:": _PHASE_COST["search"] * search_steps, "final QAT": qat}
    pending: list[float] = []

    def note(msg: str) -> None:
        """A pipeline phase note: the previous phase is done, a new one starts."""
        if pending:
            clock.advance(pending.pop())
        units = next((u for key, u in phase_units.items() if msg.startswith(key)), None)
        if units is not None and "reusing" not in msg:
            pending.append(units)
        say(f"  [{clock.line()}] {msg}", style="dim")

    results: dict[str, RunRecord] = {}
    for method in ("gumbel", "uniform"):
        say(f"{method} at budget {budget}" + (f" (what {target} serves)" if target else ""),
            style="bold")
        [rec] = api.search(DEFAULT_SPACE, budget, method, target=target, steps=steps,
                           out=str(root), fp_steps=steps, search_steps=search_steps, say=note)
        if pending:
            clock.advance(pending.pop())
        results[method] = rec
    _print_table(console, results, budget, steps)
    report = build_report(root)
    say(noise_statement(report))
    for ref in reference_figures(budget, steps=steps, target=target):
        say(ref)
    _, files = api.report(root)
    exported = api.export(results["gumbel"].run_dir, "json")
    say(f"report: {files['html']}  (coqat report {root})")
    say(f"per-layer config: {exported.out_dir}/bitconfig.json (schema coqat.bitconfig/v1)")
    if target:
        say(f"deploy it: coqat export {results['gumbel'].run_dir} --format {target}")
    say(f"done in {clock.line().split(' elapsed')[0]}. Next: coqat frontier --space lm-tiny"
        " --budgets w3a3,w4a4 --seeds 3 (prints its time estimate before it starts)")
    return results


def _print_table(console, results: dict[str, RunRecord], budget: str, steps: int) -> None:
    g = results["gumbel"]
    fp_metric = (g.search.fp_phase or {}).get("metric") if g.search else None
    table = Table(title=Text(f"lm-tiny at the {budget} budget: validation loss vs compute"
                             f" ({steps} steps per phase, 1 seed)"), title_justify="left")
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


def reference_figures(budget: str, steps: int = DEMO_STEPS,
                      target: str | None = "onnx") -> list[str]:
    """The paired figure of every committed grid at the demo's setting that ran ``budget``
    (``REFERENCES`` next to the package; none in an installed package without reports)."""
    root = spaces_dir().parent
    return [f for f in (reference_figure(budget, root / p, steps, target, label=p.parent)
                        for p in REFERENCES) if f]


def reference_figure(budget: str, path: Path, steps: int = DEMO_STEPS,
                     target: str | None = "onnx", label: Path | None = None) -> str | None:
    """One committed grid's paired figure for the demo's search (gumbel) vs the best uniform
    config at ``budget`` (``path``: a benchmarks/mixed_vs_uniform.py results.json), as one
    sentence; None when that file or that budget is not there. A run at other steps or
    another target is told that the figure is not its own setting. ``label`` names the
    grid in the sentence (default: the file's folder)."""
    try:
        res = read_json(path, "a committed lm-tiny grid", "")
        preset, cell = res["preset"], res["analysis"][budget]
        d = cell["comparisons"]["gumbel"]["vs_best_uniform"]
        n, mean, se, p, wins = d["n"], d["mean"], d["se"], d["p_t"], d["wins"]
        seeds = sorted(cell["comparisons"]["gumbel"]["seeds"])
        n_mixed = len(preset.get("mixed", ()))
        holm = cell["holm"].get("gumbel") if n_mixed > 1 else None
        name = next(r["metric_name"] for r in res["rows"])
        grid_steps = preset["options"]["steps"]
    except (CoqatError, KeyError, TypeError, StopIteration):    # unreadable or another shape
        return None
    if n < 2 or se is None or p is None:
        return None
    same = steps == grid_steps and target == preset.get("target")
    setting = "this demo's setting" if same else \
        f"{grid_steps} steps a phase, target {preset.get('target')}, not this run's setting"
    return (f"The committed paired grid {label or path.parent} ({n} seeds,"
            f" {seeds[0]}-{seeds[-1]}; {setting}) measured the searched config against the"
            f" best uniform ({cell['best_uniform']}) at {budget}: its {name} better by"
            f" {mean:+.4f} ± {se:.4f} (s.e.; < 0 = worse),"
            f" one-sided p = {p:.2g}"
            + (f" (Holm over its {n_mixed} mixed arms {holm:.2g})" if holm is not None else "")
            + f", better on {wins} of {n} seeds: the paired figures, not this single seed,"
            " are the evidence.")
