"""The ``coqat`` command line: parse options, call ``coqat.api``, print with rich.

Every command is one function that maps its options onto one API call and prints what it
returns. Every expected failure (bad input, a missing optional dependency, an OS error on
the output, a damaged run file) is one line on stderr and exit code 2 (``main``);
``--json`` prints machine-readable output.
"""

from __future__ import annotations

import atexit
import errno
import math
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

import coqat
from coqat.errors import CoqatError

app = typer.Typer(
    help="Mixed-precision QAT under a BOPs budget: count, search, train, report, export."
         " Start with `coqat demo` (about 5 minutes on 2 CPU cores).",
    add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]})
# No markup: every string is printed literally, so user text ('[train]', a path with
# '[/x]') can never be taken for a style tag; styles come from rich.text.Text objects.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

# ----- options shared by several commands (one definition, one help text) -------------------
SpaceOpt = Annotated[Optional[str], typer.Option(
    "--space", "-s", help="search space: a TOML file or a shipped name (lm-tiny,"
    " fashion-resnet, lm-30m, minilm-topics, smollm2-wiki); with --model, a TOML of"
    " [train]/[search] tables (default:"
    " lm-tiny, or every layer searchable for --model)")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="your own model: path/to/file.py:factory, where factory() returns a"
    " coqat.UserModel (model, data, loss, metric), or hf:PATH, a local Hugging Face model"
    " folder (with --data); see README 'Your own model'")]
DataOpt = Annotated[Optional[list[str]], typer.Option(
    "--data", help="text for an hf:PATH model: a .txt (paragraphs) or .jsonl (\"text\", and"
    " \"label\" for a classifier) file or a folder of them; repeat for several")]
StepsOpt = Annotated[Optional[int], typer.Option(
    "--steps", help="optimizer steps of the (final) training (default: the space's)")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="peak learning rate")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="global batch size")]
QuantizerOpt = Annotated[Optional[str], typer.Option("--quantizer", help="quest | rtn")]
QatFractionOpt = Annotated[Optional[str], typer.Option(
    "--qat-fraction", help="'auto' (compute-optimal) or a share of the steps in [0, 1]")]
FuseOpt = Annotated[Optional[bool], typer.Option(
    "--fuse-cooldown/--no-fuse-cooldown",
    help="QAT during the LR decay (default: fused at >= 4 bits)")]
OptimizerOpt = Annotated[Optional[str], typer.Option(
    "--optimizer", help="adamw | cage-d | cage-c")]
CageLambdaOpt = Annotated[Optional[float], typer.Option("--cage-lambda", help="CAGE lambda")]
CageSilenceOpt = Annotated[Optional[float], typer.Option(
    "--cage-silence", help="share of the QAT phase before CAGE starts")]
CageScheduleOpt = Annotated[Optional[str], typer.Option(
    "--cage-schedule", help="linear (ramp to lambda) | constant")]
CagePullOpt = Annotated[Optional[float], typer.Option(
    "--cage-pull", help="CAGE strength as the pull integral sum_t lr_t*lambda_t (lambda is"
    " derived from the LR schedule; exclusive with --cage-lambda)")]
CageScaleOpt = Annotated[Optional[str], typer.Option(
    "--cage-scale", help="none | step: measure each layer's CAGE term in its own grid steps")]
KernelsOpt = Annotated[Optional[str], typer.Option(
    "--kernels", help="auto (Triton on CUDA) | triton | reference (torch)")]
CompileOpt = Annotated[Optional[str], typer.Option(
    "--compile", help="torch.compile the training step: auto (on CUDA only) | on | off")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed of init, data order and search")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
DataDirOpt = Annotated[Optional[str], typer.Option(
    "--data-dir", help="where the dataset lives (Fashion-MNIST)")]
OutOpt = Annotated[str, typer.Option("--out", help="root directory for run directories")]
InitFromOpt = Annotated[Optional[Path], typer.Option(
    "--init-from", help="start from this finished float run's trained weights (coqat train"
    " --bits fp); QAT for all steps unless --qat-fraction says otherwise; in a search it is"
    " the FP phase")]
TargetOpt = Annotated[Optional[str], typer.Option(
    "--target", help="only bits this deployment target serves: onnx | vllm | torchao")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _qat_fraction(text: str | None) -> float | str | None:
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise CoqatError(f"--qat-fraction {text!r} is not a number; give 'auto' or a value in"
                         " [0, 1]") from None


def _version(value: bool) -> None:
    if value:
        console.print(f"coqat {coqat.__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context,
         version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print the version and exit")] = False
         ) -> None:
    """With no command: print this help (coqat demo runs the embedded default)."""
    if ctx.invoked_subcommand is None:
        console.print(ctx.get_help(), markup=False, highlight=False)
        console.print("\nnew here? run: coqat demo", markup=False, highlight=False)
        raise typer.Exit()


# ----------------------------------------------------------------------------------- bops
@app.command()
def bops(
    space: Annotated[Optional[str], typer.Option(
        "--space", "-s", help="search space: a TOML file or a shipped name")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="your own model: path/to/file.py:factory returning a coqat.UserModel"
        " (or an nn.Module, with --input-shape), or hf:PATH (a local Hugging Face model, with"
        " --data)")] = None,
    input_shape: Annotated[Optional[str], typer.Option(
        "--input-shape", help="input shape for --model, e.g. 1,3,224,224")] = None,
    data: DataOpt = None,
    bits: Annotated[Optional[str], typer.Option(
        "--bits", help="also show per-layer BOPs at these bits (wNaM or bitconfig.json)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Per-layer MACs and BOPs (fvcore MACs x weight bits x activation bits)."""
    rep = coqat.bops(space=space, model=model, input_shape=input_shape, bits=bits, data=data)
    if json_out:
        _emit_json(rep.to_dict())
        return
    _print_bops(rep)


def _print_bops(rep) -> None:
    from rich import box

    from coqat.cost import format_bops

    title = f"{rep.source}: per-layer MACs" + (f" and BOPs at {rep.bits}" if rep.bits else "")
    t = Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD,
              header_style="bold", pad_edge=False)
    t.add_column("layer", overflow="fold", no_wrap=True)
    for col in ("op", "params", "MACs", "%MACs") + (("bits", "BOPs", "%BOPs") if rep.bits
                                                   else ()):
        t.add_column(col, justify="left" if col == "op" else "right")
    for r in rep.layers:
        row = [r["name"], r["op"], f"{r['params']:,}" if r["params"] else "-",
               format_bops(r["macs"]), f"{100 * r['macs_share']:.1f}"]
        if rep.bits:
            row += [f"w{r['w_bits']}a{r['a_bits']}", format_bops(r["bops"]),
                    f"{100 * r['bops_share']:.1f}"]
        t.add_row(*(Text(str(c)) for c in row))
    console.print(t)
    tot = rep.totals
    _say(f"total {tot['gmacs']:.4f} GMACs  |  GBOPs: FP32 {tot['gbops_fp32']:.1f}, W8A8"
         f" {tot['gbops_w8a8']:.2f}, W4A4 {tot['gbops_w4a4']:.2f}"
         + (f", {rep.bits} {tot['gbops_bits']:.2f}" if rep.bits else ""))
    if rep.pinned:
        _say("pinned: " + ", ".join(f"{k}={v}" for k, v in rep.pinned.items()))
    conv = rep.conventions
    excluded = ", ".join(f"{k} ({v:,})" for k, v in conv.get("excluded_ops", {}).items())
    _say(f"BOPs = MACs x w_bits x a_bits, MACs by {conv['mac_counter']}; FP32 = 32x32;"
         f" unquantized = {conv['float_bits']} bits; attention matmuls"
         f" {conv['attention_bits']}x{conv['attention_bits']}, full LxS."
         + (f" Not in BOPs: {excluded}." if excluded else ""), style="dim")


def _say(text: str, style: str | None = None) -> None:
    """Print user-derived text literally (no rich markup: '[train]' stays '[train]')."""
    console.print(Text(text, style=style or ""), highlight=False)


# ---------------------------------------------------------------------------------- train
@app.command()
def train(
    space: SpaceOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    bits: Annotated[Optional[str], typer.Option(
        "--bits", "-b", help="fp (default), uniform wNaM (e.g. w4a4) or a bitconfig.json")
    ] = None,
    quantizer: QuantizerOpt = None, steps: StepsOpt = None, lr: LrOpt = None,
    batch_size: BatchOpt = None, qat_fraction: QatFractionOpt = None,
    fuse_cooldown: FuseOpt = None, optimizer: OptimizerOpt = None,
    cage_lambda: CageLambdaOpt = None, cage_pull: CagePullOpt = None,
    cage_silence: CageSilenceOpt = None, cage_schedule: CageScheduleOpt = None,
    cage_scale: CageScaleOpt = None, kernels: KernelsOpt = None,
    compile: CompileOpt = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="seed of init and data order (default 0; a branch: its parent's)")]
    = None,
    device: DeviceOpt = "auto", data_dir: DataDirOpt = None, out: OutOpt = "runs",
    name: Annotated[Optional[str], typer.Option("--name", help="run name (default:"
                                                " derived)")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="continue this run directory (other options must be left out)")] = None,
    stop_at: Annotated[Optional[int], typer.Option(
        "--stop-at", help="stop after N steps, the schedules still spanning --steps; the"
        " run keeps its checkpoint there to branch from")] = None,
    branch_from: Annotated[Optional[Path], typer.Option(
        "--branch-from", help="a new run starting from this run's checkpoint with its"
        " settings; only --optimizer and the --cage-* options may differ")] = None,
    init_from: InitFromOpt = None,
    quiet: QuietOpt = False, json_out: JsonOpt = False,
) -> None:
    """Train full precision, or uniform / mixed QAT, and write a run directory."""
    from coqat.training.distributed import DistEnv

    progress = not (quiet or json_out)
    if resume is not None:
        given = _non_defaults(locals(), {"device": "auto", "out": "runs"},
                              skip=("resume", "quiet", "json_out", "progress", "DistEnv",
                                    "model", "data"))
        if given:
            raise CoqatError(f"--resume continues a run with its own settings; leave out"
                             f" {', '.join('--' + g.replace('_', '-') for g in given)}")
        rec = coqat.resume(resume, progress=progress, model=model, data=data)
    else:
        if branch_from is None and seed is None:
            seed = 0
        rec = coqat.train(space, bits, model=model, data=data, quantizer=quantizer,
                          steps=steps, lr=lr, batch_size=batch_size,
                          qat_fraction=_qat_fraction(qat_fraction),
                          fuse_cooldown=fuse_cooldown, optimizer=optimizer,
                          cage_lambda=cage_lambda, cage_pull=cage_pull,
                          cage_silence=cage_silence, cage_schedule=cage_schedule,
                          cage_scale=cage_scale, kernels=kernels,
                          compile=_compile_flag(compile), seed=seed,
                          device=device, data_dir=data_dir, out=out, name=name,
                          progress=progress, stop_at=stop_at, branch_from=branch_from,
                          init_from=None if init_from is None else str(init_from))
    if not DistEnv.from_env().is_main:  # under torchrun only rank 0 reports
        return
    if json_out:
        _emit_json(rec.to_dict())
        return
    _print_record(rec)
    _say(f"run written to {rec.run_dir}")


def _non_defaults(values: dict[str, Any], defaults: dict[str, Any], skip: tuple) -> list[str]:
    """Options given on the command line (values other than their defaults)."""
    return [k for k, v in values.items()
            if k not in skip and v != defaults.get(k) and v is not None]


def _print_record(rec) -> None:
    from coqat.cost import format_bops

    extra = ""
    if rec.metric_name == "val_loss" and "val_bpb" in rec.eval:
        extra = f" ({rec.eval['val_bpb']:.4f} bits/byte)"
    _say(f"{rec.space} {rec.bits}: {rec.metric_name} = {rec.metric:.4f}{extra};"
         f" {format_bops(rec.bops)}BOPs ({100 * rec.bops_fraction_of_fp32:.2f}% of FP32);"
         f" {rec.steps} steps ({rec.qat_steps} QAT, {rec.schedule}) in {rec.wall_s:.0f} s")
    if rec.stopped_at is not None:
        _say(f"stopped at step {rec.stopped_at} of {rec.steps}; branch from it with"
             f" coqat train --branch-from {rec.run_dir}", style="dim")
    if rec.branch_of is not None:
        _say(f"branched from {rec.branch_of} at step {rec.branch_step}", style="dim")
    if rec.cage is not None:
        c = rec.cage
        pull = f" (from pull {c.pull:g})" if c.pull is not None else ""
        _say(f"CAGE {c.mode}: lambda {c.lam:.6g}{pull}, silence {c.silence:g},"
             f" {c.schedule}, scale {c.scale}", style="dim")


# ---------------------------------------------------------------------------------- search
@app.command()
def search(
    budget: Annotated[str, typer.Option(
        "--budget", "-B", help="BOPs budget: w4a4, 0.5*w8a8, w4a4+0.5*(w8a8-w4a4), 34.7G,"
        " 0.02 (share of FP32)")],
    space: SpaceOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    method: Annotated[str, typer.Option("--method", "-m", help="gumbel | optuna | random |"
                                        " uniform | sensitivity")] = "gumbel",
    baselines: Annotated[str, typer.Option(
        "--baselines", help="also run these at the same budget (comma list of uniform,"
        " random, optuna; none)")] = "uniform",
    target: TargetOpt = None, seed: SeedOpt = 0, steps: StepsOpt = None,
    fp_steps: Annotated[Optional[int], typer.Option(
        "--fp-steps", help="FP phase steps (default: search.fp_steps of the space, else its"
        " steps)")] = None,
    search_steps: Annotated[Optional[int], typer.Option(
        "--search-steps", help="search phase steps (default: search.search_steps, else half"
        " the steps)")] = None,
    no_train: Annotated[bool, typer.Option(
        "--no-train", help="stop after the search: write the config, skip the QAT")] = False,
    init_from: InitFromOpt = None,
    quantizer: QuantizerOpt = None, lr: LrOpt = None, batch_size: BatchOpt = None,
    qat_fraction: QatFractionOpt = None, fuse_cooldown: FuseOpt = None,
    optimizer: OptimizerOpt = None, cage_lambda: CageLambdaOpt = None,
    cage_silence: CageSilenceOpt = None, kernels: KernelsOpt = None,
    compile: CompileOpt = None,
    device: DeviceOpt = "auto", data_dir: DataDirOpt = None, out: OutOpt = "runs",
    quiet: QuietOpt = False, json_out: JsonOpt = False,
) -> None:
    """Search per-layer bits under a BOPs budget, then QAT-train and evaluate the result."""
    others = [] if baselines.strip().lower() in ("", "none") else \
        [b.strip().lower() for b in baselines.split(",") if b.strip()]
    progress = not (quiet or json_out)
    say = (lambda msg: _say(msg, style="dim")) if progress else None
    records = coqat.search(
        space, budget, method, baselines=[b for b in others if b != method], target=target,
        final_qat=not no_train, say=say, model=model, data=data, steps=steps, lr=lr,
        batch_size=batch_size, quantizer=quantizer, qat_fraction=_qat_fraction(qat_fraction),
        fuse_cooldown=fuse_cooldown, optimizer=optimizer, cage_lambda=cage_lambda,
        cage_silence=cage_silence, kernels=kernels, compile=_compile_flag(compile),
        seed=seed, device=device,
        data_dir=data_dir, out=out, progress=progress, fp_steps=fp_steps,
        search_steps=search_steps, init_from=None if init_from is None else str(init_from))
    if json_out:
        first = records[0].to_dict()
        _emit_json({**first, "baselines": {r.method: r.to_dict() for r in records[1:]}})
        return
    _print_search(records)


def _print_search(records) -> None:
    from rich import box

    first = records[0]
    s = first.search
    mean = (f" (searchable layers: mean w*a <= {s.budget_mean_wa:.3g})"
            if s.budget_mean_wa is not None else "")
    t = Table(title=Text(f"{first.space}: budget {s.budget_expr} = {s.budget_bops / 1e9:.4g}"
                         f" GBOPs{mean}, seed {first.seed}"),
              title_justify="left", box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("method", "GBOPs", "of budget", "searchable", "mean w*a", first.metric_name,
                "bits", "run"):
        t.add_column(col, overflow="fold")
    for r in records:
        metric = "-" if r.metric is None else f"{r.metric:.4f}"
        hist = ", ".join(f"{k}x{v}" for k, v in sorted(r.search.bits_histogram.items(),
                                                         key=lambda kv: -kv[1])[:4])
        t.add_row(*(Text(c) for c in (
            r.method, f"{r.search.achieved_bops / 1e9:.4g}",
            f"{r.search.achieved_over_budget:.3f}", f"{r.search.searchable_over_budget:.3f}",
            "-" if r.search.mean_wa is None else f"{r.search.mean_wa:.3g}",
            metric, hist, str(r.run_dir))))
    console.print(t)
    rep = s.repair
    if rep:
        lost = f", log-prob lost {rep['logprob_lost']:.3f}" if "logprob_lost" in rep else ""
        _say(f"repair: {rep['from_bops'] / 1e9:.4g} -> {rep['to_bops'] / 1e9:.4g} GBOPs,"
             f" {rep['layers_changed']} layer(s) changed{lost}; 'searchable' = share of the"
             " budget left after attention and pinned layers", style="dim")


def _compile_flag(value: str | None) -> bool | str | None:
    """--compile auto | on | off as TrainSettings.compile ("auto", True, False)."""
    if value is None:
        return None
    from coqat.config import COMPILE_FLAGS

    if value not in COMPILE_FLAGS:
        raise CoqatError(f"--compile {value!r} is not a choice; use auto, on or off")
    return COMPILE_FLAGS[value]


# ----------------------------------------------------------------------------- sensitivity
def _model_label(model: str) -> str:
    """A short name for --model: the folder of hf:PATH, the file stem of file.py:factory."""
    if model.startswith("hf:"):
        return Path(model[3:].rstrip("/")).name or "hf"
    return Path(model.split(":")[0]).stem
@app.command()
def sensitivity(
    space: SpaceOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    run: Annotated[Optional[Path], typer.Option(
        "--run", help="measure a finished run's weights (runs/<name>); its space and seed"
        " come with it")] = None,
    bits: Annotated[Optional[str], typer.Option(
        "--bits", help="widths to measure, e.g. 2,4,8 (default: every candidate of the"
        " space)")] = None,
    batches: Annotated[int, typer.Option(
        "--batches", help="holdout batches per cell (the same batches for every cell)")] = 8,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="rows per holdout batch (default: the space's"
        " eval_batch_size)")] = None,
    weights: Annotated[str, typer.Option(
        "--weights", help="without --run: fp-phase (train, or reuse, the FP phase coqat"
        " search caches) | given (the model as built: a pretrained --model) | auto"
        " (fp-phase for a space, given for --model)")] = "auto",
    fp_steps: Annotated[Optional[int], typer.Option(
        "--fp-steps", help="FP phase steps (default: search.fp_steps of the space, else its"
        " steps)")] = None,
    estimate: Annotated[str, typer.Option(
        "--estimate", help="measured (one forward pass per cell) | fisher (1/2 N sum g^2"
        " e^2 from one forward and backward pass per batch: cheaper, an estimate)")]
    = "measured",
    quantizer: QuantizerOpt = None, seed: SeedOpt = 0, device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None, out: OutOpt = "runs",
    to: Annotated[Optional[Path], typer.Option(
        "--to", help="where sensitivity.json, .html and .png go (default: the --run"
        " directory, else OUT/sensitivity-SPACE-sSEED)")] = None,
    quiet: QuietOpt = False, json_out: JsonOpt = False,
) -> None:
    """Loss change per layer and width when only that tensor is quantized: can a per-layer
    bit choice win anything on this model? (table, heatmap, sensitivity.json)"""
    if run is not None:
        given = _non_defaults({"fp_steps": fp_steps, "quantizer": quantizer, "seed": seed,
                               "out": out}, {"seed": 0, "out": "runs"}, skip=())
        if given:
            raise CoqatError(f"--run measures a run with its own settings; leave out"
                             f" {', '.join('--' + g.replace('_', '-') for g in given)}")
        options: dict[str, Any] = {"device": device, "data_dir": data_dir}
    else:
        options = {"fp_steps": fp_steps, "quantizer": quantizer, "seed": seed,
                   "device": device, "data_dir": data_dir, "out": out,
                   "progress": not (quiet or json_out)}
    progress = not (quiet or json_out)
    # the spinner starts with the first measured cell: an FP phase trained before it shows
    # its own progress bar, and rich runs one live display at a time
    spinner: list[Any] = []

    def show(done: int, total: int) -> None:
        if not spinner:
            spinner.append(console.status("", spinner="dots"))
            spinner[0].start()
        spinner[0].update(f"sensitivity: {done}/{total} forward passes ...")

    if to is None and run is None:
        label = (Path(space).stem if space else _model_label(model) if model else "lm-tiny")
        to = Path(out) / f"sensitivity-{label}-s{seed}"
    dest = to if to is not None else run
    try:
        table = coqat.sensitivity(space, model=model, data=data, run=run, bits=bits,
                                  batches=batches, batch_size=batch_size, weights=weights,
                                  estimate=estimate, save=dest,
                                  on_cell=show if progress else None,
                                  say=(lambda msg: _say(msg, style="dim")) if progress
                                  else None, **options)
    finally:
        for sp in spinner:
            sp.stop()
    from coqat.reporting import sensitivity as view

    files = {"json": Path(dest) / view.FILE, "html": Path(dest) / view.HTML,
             "png": Path(dest) / view.PNG}
    if json_out:
        _emit_json({**table.to_dict(), "files": {k: str(v) for k, v in files.items()}})
        return
    view.print_table(table.to_dict(), console)
    _say(f"written: {files['json']}, {files['html']}")


# ---------------------------------------------------------------------- frontier / report
@app.command()
def frontier(
    budgets: Annotated[str, typer.Option(
        "--budgets", help="comma-separated budget expressions, e.g. w3a3,w4a4,w6a6,w8a8"
        " (each checked before any point runs)")],
    space: SpaceOpt = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    seeds: Annotated[int, typer.Option("--seeds", help="seeds 0..N-1 per budget and"
                                       " method")] = 3,
    methods: Annotated[str, typer.Option(
        "--methods", help="comma-separated: gumbel, uniform, optuna, random,"
        " sensitivity")] = "gumbel,uniform",
    storage: Annotated[Optional[str], typer.Option(
        "--storage", help="Optuna storage: a journal file path (default: next to the sweep)"
        " or an RDB URL such as postgresql://user:pw@host/db")] = None,
    workers: Annotated[int, typer.Option("--workers", help="local worker processes")] = 1,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="study name (default: frontier-SPACE)")] = None,
    out: OutOpt = "runs",
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="final training steps of every point, as on train and search (the"
        " FP and search phases scale with it)")] = None,
    steps_scale: Annotated[Optional[float], typer.Option(
        "--steps-scale", help="or: scale every phase's steps (e.g. 0.25 for a quick"
        " sweep)")] = None,
    optimizer: OptimizerOpt = None, target: TargetOpt = None, device: DeviceOpt = "auto",
    no_run: Annotated[bool, typer.Option("--no-run", help="create/extend the study, run"
                                         " nothing")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Accuracy-vs-compute frontier: a search per budget x seed x method, as an Optuna study."""
    from coqat.reporting.build import print_terminal, to_json, write_html
    from coqat.sweep import queue

    if steps_scale is not None and not (math.isfinite(steps_scale) and steps_scale > 0):
        raise CoqatError(f"--steps-scale {steps_scale} must be a number > 0 (e.g. 0.25 for a"
                         " quick sweep)")
    if steps is not None:
        steps_scale = _steps_as_scale(steps, steps_scale, space, model)
    grid = len([b for b in budgets.split(",") if b.strip()]) * seeds * \
        len([m for m in methods.split(",") if m.strip()])
    show = _progress_printer() if not json_out else None
    if not json_out and not no_run:
        eta = _sweep_estimate(space, model, out, grid, workers, steps_scale)
        _say(f"frontier: {grid} points; {eta}; the same command"
             f" resumes the sweep if it stops, and other machines can join with coqat"
             f" worker (see --storage)", style="dim")
    rep = coqat.frontier(space, budgets.split(","), seeds=seeds, methods=methods.split(","),
                         storage=storage, workers=workers, name=name, out=out,
                         steps_scale=steps_scale if steps_scale is not None else 1.0,
                         target=target, device=device, run=not no_run, on_progress=show,
                         model=model, data=data, optimizer=optimizer)
    if no_run:
        m = rep.manifest
        _say(f"study {m.get('study')} in {queue.redact(str(m.get('storage')))}:"
             f" {len(rep.points)} of the grid's points finished; join with: coqat worker"
             f" --storage {queue.redact(str(m.get('storage')))} --study {m.get('study')}")
        return
    files = write_html(rep)
    if json_out:
        _emit_json({**to_json(rep), "files": {k: str(v) for k, v in files.items()}})
        return
    print_terminal(rep, console)
    _say(f"report written to {files['html']}")


def _steps_as_scale(steps: int, steps_scale: Optional[float], space: Optional[str],
                    model: Optional[str]) -> float:
    """frontier --steps N as the sweep's step scale: N over the space's steps."""
    from coqat.config import DEFAULT_SPACE, load_space

    if steps_scale is not None:
        raise CoqatError("give --steps or --steps-scale, not both")
    if steps < 1:
        raise CoqatError(f"--steps {steps} must be a positive integer")
    if model is not None and space is None:
        raise CoqatError("--steps needs the space whose steps it replaces; with --model"
                         " and no --space use --steps-scale")
    return steps / load_space(space or DEFAULT_SPACE).train.steps


def _sweep_estimate(space: Optional[str], model: Optional[str], out: str, points: int,
                    workers: int, steps_scale: Optional[float]) -> str:
    """'about T with W workers (from N earlier runs ...)', or why there is no figure yet."""
    from coqat.config import DEFAULT_SPACE, load_space
    from coqat.sweep.frontier import estimate

    if model is not None:
        return "time: an estimate follows the first finished points"
    try:
        sp = load_space(space or DEFAULT_SPACE)
    except CoqatError:
        return "time: an estimate follows the first finished points"  # reported below
    est = estimate(out, sp, points, steps_scale or 1.0)
    if est is None:
        return (f"time: no finished {sp.name} run under {out} to estimate from yet (run"
                f" coqat search once); an estimate follows the first finished points")
    total = _duration(est.total_s(1))
    par = "" if workers <= 1 else (f", at best {_duration(est.total_s(workers))} with"
                                   f" {workers} workers if they do not share cores")
    return (f"about {_duration(est.point_s)} a point, {total} with one worker{par} (from"
            f" {est.runs_seen} earlier {sp.name} run(s) under {out}; points already finished"
            f" are skipped)")


def _duration(seconds: float) -> str:
    mins = int(round(seconds / 60))
    if mins < 1:
        return f"{int(seconds)} s"
    if mins < 60:
        return f"{mins} min"
    return f"{mins // 60} h {mins % 60:02d} min"


def _progress_printer():
    """Progress of a sweep's workers: a bar on a terminal, one line per finished point in
    logs and pipes, with an estimate of the time left from the points finished so far."""
    state: dict[str, Any] = {"last": -1, "first": None}

    def show(prog: dict[str, int], elapsed: float) -> None:
        if prog["complete"] == state["last"]:
            return
        if state["first"] is None:
            state["first"] = prog["complete"]  # finished before this command: not timed
        state["last"] = prog["complete"]
        mins, secs = divmod(int(elapsed), 60)
        done_here = prog["complete"] - state["first"]
        left = ""
        if done_here > 0 and prog["total"] > prog["complete"]:
            rest = elapsed / done_here * (prog["total"] - prog["complete"])
            left = f", about {_duration(rest)} left"
        _say(f"frontier: {prog['complete']}/{prog['total']} points done, {prog['running']}"
             f" running, {mins}:{secs:02d} elapsed{left}")

    return show


@app.command()
def worker(
    storage: Annotated[str, typer.Option("--storage", help="the sweep's Optuna storage URL or"
                                         " journal")],
    study: Annotated[str, typer.Option("--study", help="the study name printed by coqat"
                                       " frontier")],
    out: Annotated[str, typer.Option("--out", help="root directory for this machine's"
                                     " runs")] = "runs",
    max_points: Annotated[Optional[int], typer.Option(
        "--max-points", help="stop after running this many points")] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
) -> None:
    """Join a frontier sweep from another process or machine and work until it is done."""
    n = coqat.work_on(storage, study, out, max_points, model=model, data=data)
    _say(f"worker finished: ran {n} point(s) of {study}")


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="a run directory, a frontier, or a folder of"
                                         " runs")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="where report.html and PNGs go (default: PATH itself)")] = None,
    html: Annotated[bool, typer.Option("--html/--no-html", help="write report.html and"
                                       " PNGs")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Summary, frontier, per-layer bits and search trace: terminal, HTML and PNG."""
    from coqat.reporting.build import print_terminal, to_json

    rep, files = coqat.report(path, out, html)
    if json_out:
        _emit_json({**to_json(rep), "files": {k: str(v) for k, v in files.items()}})
        return
    print_terminal(rep, console)
    if files:
        _say(f"report written to {files['html']}")


# ------------------------------------------------------------------------- export / deploy
@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="a finished run directory (runs/<name>)")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx | compressed-tensors |"
                                     " torchao | json")] = "onnx",
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="output directory (default: RUN/exports/FORMAT)")] = None,
    approx: Annotated[bool, typer.Option(
        "--approx", help="allow the documented approximations a format needs for coqat's"
        " QuEST numerics (listed in the output) instead of refusing")] = False,
    check_batches: Annotated[int, typer.Option(
        "--check-batches", help="after writing, load the export in its real consumer and"
        " compare the metric on this many batches (0: no check)")] = 2,
    explain: Annotated[bool, typer.Option(
        "--explain", help="list every reason the export would be refused; write nothing")]
    = False,
    model: ModelOpt = None,
    data: DataOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export a run's per-layer bit configuration and weights to a deployment format."""
    from coqat.api import explain_export

    if explain:
        problems = explain_export(run, fmt, approx, model=model, data=data)
        if json_out:
            _emit_json({"format": fmt, "problems": problems})
            return
        _say(f"{fmt}: " + ("nothing stops this export" if not problems else
                           f"{len(problems)} problem(s)"))
        for p in problems:
            _say(f"- {p}")
        return
    if check_batches < 0:
        raise CoqatError(f"--check-batches {check_batches} must be >= 0")
    if json_out:
        _emit_json(coqat.export(run, fmt, out, approx, model=model, data=data,
                                check_batches=check_batches).to_dict())
        return
    with console.status(f"exporting to {fmt} ...", spinner="dots"):
        result = coqat.export(run, fmt, out, approx, model=model, data=data,
                              check_batches=check_batches)
    kind = "exact" if result.exact else "approximate"
    _say(f"{result.format} export of {result.run_dir} ({kind}) written to {result.out_dir}")
    t = Table(box=None, pad_edge=False, show_header=False)
    t.add_column("file")
    t.add_column("bytes", justify="right")
    for fname, size in result.files.items():
        t.add_row(Text(fname), f"{size:,}")
    console.print(t)
    for note in result.notes:
        _say(f"- {note}", style="dim")
    for a in result.approximations:
        _say(f"approximation: {a}", style="yellow")


@app.command()
def deploy(
    run: Annotated[Path, typer.Argument(help="a finished run directory (runs/<name>)")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="packed (int codes in"
                                     " safetensors, torch) | onnx (onnxruntime)")] = "packed",
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="output directory (default: RUN/exports/deploy-FORMAT)")] = None,
    max_batches: Annotated[Optional[int], typer.Option(
        "--max-batches", help="evaluate on this many batches (default: the whole split)")] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Build the packed model, evaluate it and report its metric and size against FP32."""
    if json_out:
        _emit_json(coqat.deploy(run, fmt, out, max_batches, model=model, data=data).to_dict())
        return
    with console.status("building the deployed model ...", spinner="dots") as status:
        rep = coqat.deploy(run, fmt, out, max_batches, model=model, data=data,
                           progress=lambda msg: status.update(f"{msg} ..."))
    _print_deploy(rep)


def _print_deploy(rep) -> None:
    def size(n: int) -> str:
        return f"{n / 1024:,.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):,.2f} MiB"

    t = Table(title=Text(f"deploy ({rep.format}): {rep.run_dir}"), title_justify="left")
    for col in ("model", rep.metric_name, "size on disk", "x FP32"):
        t.add_column(col, justify="left" if col == "model" else "right")
    t.add_row("FP32 state dict", "-", size(rep.fp32_bytes), "1.000")
    t.add_row("QAT model (coqat)", f"{rep.reference_metric:.4f}", "-", "-")
    t.add_row(f"deployed ({rep.format})", f"{rep.metric:.4f}", size(rep.bytes),
              f"{rep.size_ratio:.3f}")
    console.print(t)
    where = "whole split" if rep.max_batches is None else f"{rep.max_batches} batches"
    extra = f"; train reported {rep.final_metric:.4f}" if rep.final_metric is not None else ""
    _say(f"{rep.metric_name} on {where}{extra}; file {rep.file}", style="dim")
    for note in rep.notes:
        _say(f"- {note}", style="dim")


# ----------------------------------------------------------------------------------- plan
@app.command()
def plan(
    params: Annotated[float, typer.Option("--params", help="quantized parameter count N,"
                                          " e.g. 30e6")],
    tokens: Annotated[float, typer.Option("--tokens", help="total training tokens D, e.g."
                                          " 3e9")],
    bits: Annotated[float, typer.Option("--bits", help="weight bits B (mean for mixed"
                                        " configs)")],
    json_out: JsonOpt = False,
) -> None:
    """Compute-optimal split of a token budget between FP training and QAT."""
    p = coqat.plan(params, tokens, bits)
    if json_out:
        _emit_json(p.to_dict())
        return
    t = Table(title="compute-optimal QAT split (Dremov et al. 2025)", title_justify="left")
    for col in ("S = D/(N*B/8)", "QAT fraction", "FP tokens", "QAT tokens"):
        t.add_column(col, justify="right")
    t.add_row(f"{p.tokens_per_param_byte:,.1f}", f"{p.qat_fraction:.3f}",
              f"{p.fp_tokens:.4g}", f"{p.qat_tokens:.4g}")
    console.print(t)
    _say("f = exp(-6.7297 / ln S), clipped to [0, 1]."
         + ("" if p.in_fitted_range else
            " S is outside the fitted range (10..1e5): an extrapolation."), style="dim")


# ----------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: OutOpt = "runs",
    setting: Annotated[Optional[str], typer.Option(
        "--setting", help="lm-tiny (the CPU default: the pipeline, where no gain is shown) |"
        " lm-2m-ft (where mixed precision is shown to win; a GPU, ~2 min on an H100;"
        " the default where CUDA is visible)")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="QAT steps (default: lm-tiny 200 per phase, lm-2m-ft 500 after a"
        " float model of 3x as many)")] = None,
    budget: Annotated[Optional[str], typer.Option(
        "--budget", help="BOPs budget of the search (default: lm-tiny w4a4, lm-2m-ft"
        " wa9)")] = None,
    target: Annotated[Optional[str], typer.Option(
        "--target", help="search only what this runtime serves: onnx | vllm | torchao | json"
        " (json: anything coqat trains; default: lm-tiny onnx, lm-2m-ft json)")] = None,
) -> None:
    """The embedded default end to end: count BOPs, search per-layer bits for a budget,
    train uniform precision at equal BOPs, compare, write the report and the config."""
    from coqat.demo import run_demo

    run_demo(console, out=out, steps=steps, budget=budget, target=target, setting=setting)


# ------------------------------------------------------------------------------ the errors
#: optional dependencies by top-level module -> the extra that installs them
_EXTRAS = {"onnx": "export", "onnxruntime": "export", "onnxscript": "export",
           "onnx_ir": "export", "compressed_tensors": "export", "torchao": "export",
           "transformers": "export", "triton": "kernels", "psycopg": "postgres",
           "psycopg2": "postgres", "optuna_dashboard": "dashboard", "sklearn": "data"}


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """Typer >= 0.2x vendors click as ``typer._click``; older versions use click itself."""
    types: list[type[BaseException]] = []
    try:
        from typer._click.exceptions import UsageError as VendoredUsageError

        types.append(VendoredUsageError)
    except ImportError:  # pragma: no cover - depends on the installed typer
        pass
    try:
        from click.exceptions import UsageError

        types.append(UsageError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(Text("error: ", style="bold red") + Text(" ".join(message.split())),
                      highlight=False, soft_wrap=True)
    sys.exit(code)


def _os_error_message(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    fix = {errno.ENOSPC: "free some space or choose another --out",
           errno.EDQUOT: "free some space or choose another --out",
           errno.EROFS: "the file system is read-only: choose another --out",
           errno.EACCES: "check the permissions or choose another --out",
           errno.EPERM: "check the permissions or choose another --out",
           errno.ENOENT: "check the path",
           errno.EISDIR: "a directory stands where a file should be: remove or rename it",
           errno.ENOTDIR: "a file stands where a directory should be: check the path"}
    return (f"{e.strerror or type(e).__name__}{where}; "
            f"{fix.get(e.errno, 'check the path and the disk')}")


def main() -> None:
    """Console-script entry point: one-line errors, exit code 2, no traceback, except for
    bugs (unexpected exceptions), which show a one-line summary and then the traceback.

    Under torchrun the process ends with ``os._exit`` once its output is flushed and the
    atexit handlers (the process group's teardown among them) have run: C++ static
    destructors of gloo at interpreter exit aborted a finished rank now and then (SIGABRT,
    "terminate called without an active exception"), failing a run whose work had all
    succeeded."""
    from coqat.training.distributed import DistEnv

    if not DistEnv.from_env().enabled:
        _main()
        return
    code = 0
    try:
        _main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main() -> None:
    try:
        app(standalone_mode=False)
    except CoqatError as e:
        _fail(str(e), e.exit_code)
    except _usage_error_types() as e:
        _fail(f"{e.format_message()} (see coqat --help)")
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted", highlight=False)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in _EXTRAS:
            _fail(f"this needs the optional package {top!r}; install it with pip install"
                  f" 'coqat[{_EXTRAS[top]}]'")
        _bug(e)
    except OSError as e:
        _fail(_os_error_message(e))
    except Exception as e:  # a bug: say so in one line, then show where
        _bug(e)


def _bug(e: BaseException) -> None:
    err_console.print(Text(f"error: internal error ({type(e).__name__}: {e}); this is a bug"
                           " in coqat, please report it with the traceback below",
                           style="bold red"), highlight=False, soft_wrap=True)
    traceback.print_exc()
    sys.exit(1)


if __name__ == "__main__":
    main()
