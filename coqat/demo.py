"""``coqat demo``: the embedded default end to end, composed from the public API.

Counts BOPs, picks per-layer bits for a BOPs budget, trains uniform precision at equal BOPs
with the identical final QAT, compares both with the float model, says how much one seed
can tell (and quotes the committed paired grid of its setting), and writes the HTML report
and the JSON config. Two settings (``SETTINGS``): ``lm-tiny`` on the CPU (FP phase, Gumbel
search restricted to what ONNX serves, final QAT, all from scratch) and ``lm-2m-ft`` on a
GPU (a float model, then the sensitivity config and the best uniform one fine-tuned from
it: where the grids show mixed precision winning).

Progress: a line per phase with the time elapsed and an estimate of what is left, measured
from the steps done so far (the training bars show each phase's own steps and its final
evaluation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
_GRIDS = Path("reports") / "mixed_vs_uniform"
#: the committed paired grids at the demo's own setting (benchmarks/mixed_vs_uniform.py
#: --preset cpu-lm-tiny, seeds 0-7, and its replication cpu-lm-tiny-rep, seeds 8-23), for
#: the paired figures printed beside the demo's single seed
REFERENCES = tuple(_GRIDS / name / "results.json" for name in ("lm-tiny", "lm-tiny-rep"))

__all__ = ["run_demo", "DEMO_STEPS", "SETTINGS", "Setting", "default_setting",
           "reference_figure", "reference_figures"]


@dataclass(frozen=True)
class Setting:
    """One setting the demo runs: a space, a budget and a method, with the committed grid
    that measured that method against the best uniform config there over paired seeds."""
    name: str
    space: str
    budget: str
    method: str
    steps: int                   # final QAT steps (lm-tiny: every phase's)
    references: tuple[Path, ...]
    target: str | None
    title: str
    trunk: bool = False          # every arm fine-tunes one trained float model
    options: dict[str, Any] = field(default_factory=dict)


#: ``lm-tiny``: the CPU default, from scratch (the grids there show no gain: the demo shows
#: the pipeline). ``lm-2m-ft``: where the report shows mixed precision winning (lm-2m, 2.1M
#: parameters, fine-tuned from a trained float model; mean w*a 9): a GPU setting (~2 min
#: end to end on one H100, reports/demo.md), the settings of benchmarks/mixed_vs_uniform.py
#: --preset gpu-lm2m-ft (a test pins them equal): the trunk is the space's own float run, then the
#: sensitivity arm (the table read raw, as the grid's arm) and uniform w2a4 train 500 QAT
#: steps from it on the same batches.
SETTINGS = {
    "lm-tiny": Setting("lm-tiny", DEFAULT_SPACE, "w4a4", "gumbel", DEMO_STEPS, REFERENCES,
                       "onnx", "lm-tiny on the CPU"),
    "lm-2m-ft": Setting(
        "lm-2m-ft", "lm-2m", "wa9", "sensitivity", 500,
        (_GRIDS / "lm-2m-ft" / "results.json",), None,
        "lm-2m fine-tuned from a trained float model", trunk=True,
        options={"lr": 1e-3, "qat_fraction": 1.0, "proxy_batches": 4, "compile": False,
                 "sensitivity_clean": "none"}),
}


def schedule_options(steps: int) -> dict[str, int]:
    """A fine-tune of ``steps`` QAT steps: warm-up a tenth, evaluated and checkpointed at
    half and at the end (at 500 steps: gpu-lm2m-ft's 50, 250, 250)."""
    half = max(1, steps // 2)
    return {"steps": steps, "warmup_steps": steps // 10, "eval_every": half,
            "checkpoint_every": half}


def trunk_options(steps: int) -> dict[str, int]:
    """The float model under a fine-tune of ``steps``: three times as many steps, warm-up a
    tenth, evaluated and checkpointed every ``steps`` (at 500: lm-2m's own 1500, 150, 500)."""
    return {"steps": 3 * steps, "warmup_steps": max(1, 3 * steps // 10),
            "eval_every": steps, "checkpoint_every": steps}


def default_setting() -> str:
    """``lm-2m-ft`` where a CUDA GPU is visible, else ``lm-tiny``."""
    import torch
    return "lm-2m-ft" if torch.cuda.is_available() else "lm-tiny"


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


def run_demo(console, out: str = "runs", steps: int | None = None, budget: str | None = None,
             target: str | None = None, setting: str | Setting | None = None,
             options: dict[str, Any] | None = None) -> dict[str, RunRecord]:
    """Run a setting (a name in ``SETTINGS``, default ``default_setting()``, or a Setting)
    end to end; returns the records by method (the setting's and ``uniform``). ``steps``,
    ``budget`` and ``target`` default to the setting's (``target="json"``: no runtime
    restriction); ``options`` (training options, e.g. a smaller ``batch_size``) apply to
    every run."""
    st = setting if isinstance(setting, Setting) else SETTINGS.get(setting or default_setting())
    if st is None:
        raise CoqatError(f"unknown demo setting {setting!r}; choose one of"
                         f" {', '.join(SETTINGS)}")
    steps = st.steps if steps is None else steps
    if steps < 1:
        raise CoqatError(f"steps must be >= 1 (got {steps})")
    budget = budget or st.budget
    target = st.target if target is None else (None if target == "json" else target)
    root = Path(out) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"

    def say(text: str, style: str = "") -> None:
        console.print(Text(text, style=style), highlight=False)

    console.rule(Text(f"coqat demo: {st.title}"))
    rep = api.bops(st.space)
    t = rep.totals
    say(f"model: {len(rep.layers)} quantizable layers + attention, {t['gmacs'] * 1e3:.1f}"
        f" MMACs per sequence; FP32 {t['gbops_fp32']:.1f}, W8A8 {t['gbops_w8a8']:.2f}, W4A4"
        f" {t['gbops_w4a4']:.2f} GBOPs")
    run = _run_trunk_and_arms if st.trunk else _run_from_scratch
    results, clock = run(st, say, root, steps, budget, target, dict(options or {}))
    _print_table(console, st, results, budget, steps)
    report = build_report(root)
    say(noise_statement(report))
    figures = reference_figures(budget, steps=steps, target=target, setting=st)
    for ref in figures:
        say(ref)
    if not st.trunk:   # where the grids show a gain, and how to run it
        win = SETTINGS["lm-2m-ft"]
        for ref in reference_figures(win.budget, None, win.target, setting=win):
            say(f"Where mixed precision is shown to win: {ref} That setting needs a GPU:"
                f" coqat demo --setting {win.name}.")
    _, files = api.report(root)
    mixed = results[st.method]
    exported = api.export(mixed.run_dir, "json")
    say(f"report: {files['html']}  (coqat report {root})")
    say(f"per-layer config: {exported.out_dir}/bitconfig.json (schema coqat.bitconfig/v1)")
    if target:
        say(f"deploy it: coqat export {mixed.run_dir} --format {target}")
    else:
        say(f"which runtimes serve it: coqat export {mixed.run_dir} --format onnx --explain")
    nxt = ("coqat frontier --space lm-tiny --budgets w3a3,w4a4 --seeds 3 (prints its time"
           " estimate before it starts)") if not st.trunk else \
        (f"coqat search --space {st.space} --budget {budget} --method {st.method} --baselines"
         " uniform --init-from <a finished float run> (the same from your own trained model)")
    say(f"done in {clock.line().split(' elapsed')[0]}. Next: {nxt}")
    return results


def _phase_notes(say, phase_units: dict[str, float], total: float):
    """A progress clock over ``total`` units and the ``say`` callback of the pipeline: each
    phase note closes the previous phase and starts a new one (``phase_units``: its cost by
    note prefix)."""
    clock = _Clock(total)
    pending: list[float] = []

    def note(msg: str) -> None:
        if pending:
            clock.advance(pending.pop())
        units = next((u for key, u in phase_units.items() if msg.startswith(key)), None)
        if units is not None and "reusing" not in msg:
            pending.append(units)
        say(f"  [{clock.line()}] {msg}", style="dim")

    def close() -> None:
        if pending:
            clock.advance(pending.pop())
    return clock, note, close


def _run_from_scratch(st: Setting, say, root: Path, steps: int, budget: str,
                      target: str | None, options: dict[str, Any]):
    """lm-tiny: the search (FP phase, search, final QAT) and uniform precision, each
    trained from scratch; the FP phase is shared through its cache."""
    search_steps = max(1, steps // 2)
    units = {"FP phase": _PHASE_COST["fp"] * steps,
             "search:": _PHASE_COST["search"] * search_steps,
             "final QAT": _PHASE_COST["qat"] * steps}
    # two final QATs: the search's and the uniform baseline's
    clock, note, close = _phase_notes(say, units, sum(units.values()) + units["final QAT"])
    results: dict[str, RunRecord] = {}
    for method in (st.method, "uniform"):
        say(f"{method} at budget {budget}" + (f" (what {target} serves)" if target else ""),
            style="bold")
        [rec] = api.search(st.space, budget, method, target=target, steps=steps,
                           out=str(root), fp_steps=steps, search_steps=search_steps, say=note,
                           **{**st.options, **options})
        close()
        results[method] = rec
    return results, clock


def _run_trunk_and_arms(st: Setting, say, root: Path, steps: int, budget: str,
                        target: str | None, options: dict[str, Any]):
    """lm-2m-ft: one float model (the space's own training at three times the QAT steps),
    then the setting's method and the best uniform config each QAT-fine-tune it for
    ``steps`` on the same batches (``init_from``)."""
    trunk_opts, arm_opts = trunk_options(steps), {**st.options, **schedule_options(steps)}
    trunk_steps = trunk_opts["steps"]
    # on one H100 (reports/demo.md) a float step of lm-2m took 0.3 of an eager QAT step and
    # the sensitivity table 4 s against 22 s for a 500-step fine-tune
    units = {"float trunk": 0.3 * trunk_steps, "sensitivity:": 0.1 * steps,
             "final QAT": _PHASE_COST["qat"] * steps}
    clock, note, close = _phase_notes(say, units, sum(units.values()) + units["final QAT"])
    say("the float model every arm starts from", style="bold")
    note(f"float trunk: training {trunk_steps} steps")
    shared = {"compile": st.options["compile"]} if "compile" in st.options else {}
    trunk = api.train(st.space, "fp", out=str(root), **{**shared, **trunk_opts, **options})
    close()
    say(f"{st.method} and the best uniform config at budget {budget}, each fine-tuned"
        f" {steps} steps from it" + (f" (what {target} serves)" if target else ""),
        style="bold")
    mixed, uniform = api.search(st.space, budget, st.method, baselines=["uniform"],
                                target=target, out=str(root), say=note,
                                init_from=trunk.run_dir, **{**arm_opts, **options})
    close()
    return {st.method: mixed, "uniform": uniform}, clock


def _print_table(console, st: Setting, results: dict[str, RunRecord], budget: str,
                 steps: int) -> None:
    g = results[st.method]
    fp_metric = (g.search.fp_phase or {}).get("metric") if g.search else None
    what = f"{steps} QAT steps" if st.trunk else f"{steps} steps per phase"
    table = Table(title=Text(f"{Path(st.space).stem} at the {budget} budget: validation loss"
                             f" vs compute ({what}, 1 seed)"), title_justify="left")
    for col in ("config", "val loss (nats/byte)", "GBOPs", "x budget", "% of FP32"):
        table.add_column(col, justify="left" if col == "config" else "right")
    fp32 = g.fp32_bops
    if fp_metric is not None:
        table.add_row("FP (the trained float model)" if st.trunk else
                      "FP (the search's FP phase)", f"{fp_metric:.4f}", format_bops(fp32),
                      "", "100.00")
    for method, r in results.items():
        name = f"mixed, {method}" if method != "uniform" else \
            f"uniform {(r.search.uniform if r.search else '') or ''}"
        table.add_row(name, f"{r.metric:.4f}", format_bops(r.search.achieved_bops),
                      f"{r.search.achieved_over_budget:.4f}",
                      f"{100 * r.search.achieved_bops / fp32:.2f}")
    console.print(table)


def reference_figures(budget: str, steps: int | None = DEMO_STEPS,
                      target: str | None = "onnx", setting: Setting | None = None) -> list[str]:
    """The paired figure of every committed grid of ``setting`` (default lm-tiny) that ran
    ``budget`` (none in an installed package without reports; ``steps`` None: quoted from
    another setting's run)."""
    st = setting or SETTINGS["lm-tiny"]
    root = spaces_dir().parent
    return [f for f in (reference_figure(budget, root / p, steps, target, label=p.parent,
                                         arm=st.method)
                        for p in st.references) if f]


def reference_figure(budget: str, path: Path, steps: int | None = DEMO_STEPS,
                     target: str | None = "onnx", label: Path | None = None,
                     arm: str = "gumbel") -> str | None:
    """One committed grid's paired figure for the demo's method (``arm``) vs the best
    uniform config at ``budget`` (``path``: a benchmarks/mixed_vs_uniform.py results.json),
    as one sentence; None when that file or that budget is not there. A run at other steps or
    another target is told that the figure is not its own setting. ``label`` names the
    grid in the sentence (default: the file's folder)."""
    try:
        res = read_json(path, "a committed paired grid", "")
        preset, cell = res["preset"], res["analysis"][budget]
        d = cell["comparisons"][arm]["vs_best_uniform"]
        n, mean, se, p, wins = d["n"], d["mean"], d["se"], d["p_t"], d["wins"]
        seeds = sorted(cell["comparisons"][arm]["seeds"])
        n_mixed = len(preset.get("mixed", ()))
        holm = cell["holm"].get(arm) if n_mixed > 1 else None
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
            f" {seeds[0]}-{seeds[-1]}; {setting}) measured the {arm} config against the"
            f" best uniform ({cell['best_uniform']}) at {budget}: its {name} better by"
            f" {mean:+.4f} ± {se:.4f} (s.e.; < 0 = worse),"
            f" one-sided p = {p:.2g}"
            + (f" (Holm over its {n_mixed} mixed arms {holm:.2g})" if holm is not None else "")
            + f", better on {wins} of {n} seeds: the paired figures, not this single seed,"
            " are the evidence.")
