"""The ``coqat`` command line: parse options, call the library, print with rich.

Every command is one function. Errors in what the user gave us are one line on stderr and
exit code 2 (``coqat.errors.CoqatError``); ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from coqat.errors import CoqatError

app = typer.Typer(
    help="Mixed-precision QAT under a BOPs budget: count, search, train, report, export.",
    add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]})
console = Console(width=100)
err_console = Console(stderr=True, width=100)

SPACE_HELP = "search space: a TOML file or a shipped name (lm-tiny, fashion-resnet, lm-30m)"


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context) -> None:
    """With no command, run the demo (coqat demo)."""
    if ctx.invoked_subcommand is None:
        console.print("[dim]no command given: running the demo (coqat --help lists the"
                      " commands)[/dim]")
        demo()


# ----------------------------------------------------------------------------------- bops
@app.command()
def bops(
    space: Optional[str] = typer.Option(None, "--space", "-s", help=SPACE_HELP),
    model: Optional[str] = typer.Option(
        None, "--model", help="your own model: path/to/file.py:factory (or package.module:factory)"),
    input_shape: Optional[str] = typer.Option(
        None, "--input-shape", help="input shape for --model, e.g. 1,3,224,224"),
    bits: Optional[str] = typer.Option(
        None, "--bits", help="also show per-layer BOPs at these bits (wNaM or bitconfig.json)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Per-layer MACs and BOPs (fvcore MACs x weight bits x activation bits)."""
    from coqat.api import bops_report

    rep = bops_report(space=space, model=model, input_shape=input_shape, bits=bits)
    if json_out:
        _emit_json(rep)
        return
    _print_bops(rep)


def _print_bops(rep: dict) -> None:
    from coqat.cost import format_bops

    title = f"{rep['source']}: per-layer MACs" + (f" and BOPs at {rep['bits']}" if rep.get(
        "bits") else "")
    from rich import box

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, header_style="bold",
              pad_edge=False)
    t.add_column("layer", overflow="fold", no_wrap=True)
    t.add_column("op")
    t.add_column("params", justify="right")
    t.add_column("MACs", justify="right")
    t.add_column("%MACs", justify="right")
    with_bits = rep.get("bits") is not None
    if with_bits:
        t.add_column("bits", justify="right")
        t.add_column("BOPs", justify="right")
        t.add_column("%BOPs", justify="right")
    for r in rep["layers"]:
        row = [r["name"], r["op"], f"{r['params']:,}" if r["params"] else "-",
               format_bops(r["macs"]), f"{100 * r['macs_share']:.1f}"]
        if with_bits:
            row += [f"w{r['w_bits']}a{r['a_bits']}", format_bops(r["bops"]),
                    f"{100 * r['bops_share']:.1f}"]
        t.add_row(*row)
    console.print(t)
    tot = rep["totals"]
    console.print(f"[bold]total[/bold] {tot['gmacs']:.4f} GMACs  |  GBOPs: FP32 "
                  f"{tot['gbops_fp32']:.1f}, W8A8 {tot['gbops_w8a8']:.2f}, "
                  f"W4A4 {tot['gbops_w4a4']:.2f}"
                  + (f", {rep['bits']} {tot['gbops_bits']:.2f}" if with_bits else ""))
    if rep.get("pinned"):
        console.print("pinned: " + ", ".join(f"{k}={v}" for k, v in rep["pinned"].items()))
    conv = rep["conventions"]
    excluded = ", ".join(f"{k} ({v:,})" for k, v in conv.get("excluded_ops", {}).items())
    console.print(f"[dim]BOPs = MACs x w_bits x a_bits, MACs by {conv['mac_counter']}; FP32 ="
                  f" 32x32; unquantized = {conv['float_bits']} bits; attention matmuls"
                  f" {conv['attention_bits']}x{conv['attention_bits']}, full LxS."
                  + (f" Not in BOPs: {excluded}." if excluded else "") + "[/dim]")


# ---------------------------------------------------------------------------------- train
@app.command()
def train(
    space: str = typer.Option("lm-tiny", "--space", "-s", help=SPACE_HELP),
    bits: str = typer.Option("fp", "--bits", "-b",
                             help="fp, uniform wNaM (e.g. w4a4) or a bitconfig.json"),
    quantizer: Optional[str] = typer.Option(None, "--quantizer", help="quest | rtn"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps (default: space)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    qat_fraction: Optional[str] = typer.Option(
        None, "--qat-fraction", help="'auto' (compute-optimal) or a share of the steps in [0, 1]"),
    fuse_cooldown: Optional[bool] = typer.Option(
        None, "--fuse-cooldown/--no-fuse-cooldown",
        help="QAT during the LR decay (default: fused at >= 4 bits)"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw | cage-d | cage-c"),
    cage_lambda: Optional[float] = typer.Option(None, "--cage-lambda", help="CAGE lambda"),
    cage_silence: Optional[float] = typer.Option(
        None, "--cage-silence", help="share of the QAT phase before CAGE starts"),
    cage_schedule: Optional[str] = typer.Option(
        None, "--cage-schedule", help="linear (ramp to lambda) | constant"),
    kernels: Optional[str] = typer.Option(
        None, "--kernels", help="auto (Triton on CUDA) | triton | reference (torch)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="where the dataset lives"),
    out: str = typer.Option("runs", "--out", help="root directory for run directories"),
    name: Optional[str] = typer.Option(None, "--name", help="run name (default: derived)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue this run directory"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    json_out: bool = typer.Option(False, "--json", help="print the final record as JSON"),
) -> None:
    """Train full precision, or uniform / mixed QAT, and write a run directory."""
    from coqat.train import runner

    progress = not (quiet or json_out)
    if resume is not None:
        run, result = runner.resume(resume, progress=progress)
    else:
        if qat_fraction is not None and qat_fraction != "auto":
            qat_fraction = _float_opt(qat_fraction, "--qat-fraction")
        opts = runner.TrainOptions(
            bits=bits, quantizer=quantizer, steps=steps, lr=lr, batch_size=batch_size,
            qat_fraction=qat_fraction, fuse_cooldown=fuse_cooldown, optimizer=optimizer,
            cage_lambda=cage_lambda, cage_silence=cage_silence, cage_schedule=cage_schedule,
            kernels=kernels, seed=seed,
            device=device,
            data_dir=data_dir, out=out, name=name, progress=progress)
        run, result = runner.run_train(space, opts)
    from coqat.train.distributed import DistEnv

    if not DistEnv.from_env().is_main:  # under torchrun only rank 0 reports
        return
    if json_out:
        _emit_json({**result, "run_dir": str(run.path)})
        return
    _print_result(result)
    console.print(f"run written to [bold]{run.path}[/bold]")


def _float_opt(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise CoqatError(f"{flag} {text!r} is not a number; give 'auto' or a value in [0, 1]") \
            from None


def _print_result(result: dict) -> None:
    from coqat.cost import format_bops

    m = result["metric"]
    extra = ""
    if result["metric_name"] == "val_loss" and "val_bpb" in result["eval"]:
        extra = f" ({result['eval']['val_bpb']:.4f} bits/byte)"
    console.print(
        f"[bold]{result['space']}[/bold] {result['bits']}: {result['metric_name']} = "
        f"[bold]{m:.4f}[/bold]{extra}; {format_bops(result['bops'])}BOPs"
        f" ({100 * result['bops_fraction_of_fp32']:.2f}% of FP32); {result['steps']} steps"
        f" ({result['qat_steps']} QAT, {result['schedule']}) in {result['wall_s']:.0f} s")


# ------------------------------------------------------------- search (coqat.search)
# (search commands go here)
@app.command()
def search(
    space: str = typer.Option("lm-tiny", "--space", "-s", help=SPACE_HELP),
    budget: str = typer.Option(
        ..., "--budget", "-B",
        help="BOPs budget: w4a4, 0.5*w8a8, w4a4+0.5*(w8a8-w4a4), 34.7G, 0.02 (share of FP32)"),
    method: str = typer.Option("gumbel", "--method", "-m",
                               help="gumbel | optuna | random | uniform"),
    baselines: str = typer.Option(
        "uniform", "--baselines",
        help="also run these at the same budget (comma list of uniform, random, optuna; none)"),
    target: Optional[str] = typer.Option(
        None, "--target", help="only bits this deployment target serves: vllm | onnx | torchao"),
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = typer.Option(None, "--steps",
                                        help="final QAT steps (default: the space's)"),
    fp_steps: Optional[int] = typer.Option(
        None, "--fp-steps",
        help="FP phase steps (default: search.fp_steps of the space, else its steps)"),
    search_steps: Optional[int] = typer.Option(
        None, "--search-steps",
        help="search phase steps (default: search.search_steps, else half the steps)"),
    no_train: bool = typer.Option(False, "--no-train",
                                  help="stop after the search: write the config, skip the QAT"),
    quantizer: Optional[str] = typer.Option(None, "--quantizer", help="quest | rtn"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    qat_fraction: Optional[str] = typer.Option(
        None, "--qat-fraction", help="final QAT: 'auto' or a share of the steps in [0, 1]"),
    fuse_cooldown: Optional[bool] = typer.Option(
        None, "--fuse-cooldown/--no-fuse-cooldown", help="final QAT during the LR decay"),
    optimizer: Optional[str] = typer.Option(
        None, "--optimizer", help="final QAT optimizer: adamw | cage-d | cage-c"),
    cage_lambda: Optional[float] = typer.Option(None, "--cage-lambda", help="CAGE lambda"),
    cage_silence: Optional[float] = typer.Option(None, "--cage-silence",
                                                 help="share of QAT before CAGE starts"),
    kernels: Optional[str] = typer.Option(None, "--kernels",
                                          help="auto | triton | reference (final QAT)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="where the dataset lives"),
    out: str = typer.Option("runs", "--out", help="root directory for run directories"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Search per-layer bits under a BOPs budget, then QAT-train and evaluate the result."""
    from coqat.search import METHODS, plan_search, execute_search
    from coqat.train.runner import TrainOptions

    others = [] if baselines.strip().lower() in ("", "none") else \
        [b.strip().lower() for b in baselines.split(",") if b.strip()]
    for name in [method, *others]:
        if name not in METHODS:
            raise CoqatError(f"unknown search method {name!r}; use one of {', '.join(METHODS)}")
    others = [b for b in dict.fromkeys(others) if b != method]
    if qat_fraction is not None and qat_fraction != "auto":
        qat_fraction = _float_opt(qat_fraction, "--qat-fraction")
    progress = not (quiet or json_out)
    opts = TrainOptions(
        steps=steps, lr=lr, batch_size=batch_size, quantizer=quantizer,
        qat_fraction=qat_fraction, fuse_cooldown=fuse_cooldown, optimizer=optimizer,
        cage_lambda=cage_lambda, cage_silence=cage_silence, kernels=kernels, seed=seed,
        device=device, data_dir=data_dir, out=out, progress=progress)
    overrides = {"fp_steps": fp_steps, "search_steps": search_steps}
    # every job is validated before the first one writes anything
    jobs = [plan_search(space, budget, m, opts, target, overrides) for m in [method, *others]]
    say = (lambda msg: console.print(f"[dim]{msg}[/dim]")) if progress else None
    results = []
    optuna_seconds = None
    for job in jobs:
        if progress:
            console.rule(f"[bold]{job.method}[/bold] at {job.budget_expr}")
        _, res = execute_search(job, final_qat=not no_train, optuna_seconds=optuna_seconds,
                                say=say)
        if job.method == "gumbel":   # Optuna gets the Gumbel search's wall-clock
            optuna_seconds = res.get("search_phase_wall_s")
        results.append(res)
    if json_out:
        _emit_json({**results[0], "baselines": {r["method"]: r for r in results[1:]}})
        return
    _print_search(results)


def _print_search(results: list[dict]) -> None:
    from rich import box

    first = results[0]
    t = Table(title=f"{first['space']}: budget {first['budget_expr']} = "
                    f"{first['budget_bops'] / 1e9:.4g} GBOPs, seed {first['seed']}",
              title_justify="left", box=box.SIMPLE_HEAD, header_style="bold")
    for col in ("method", "GBOPs", "of budget", "searchable", first["metric_name"], "bits",
                "run"):
        t.add_column(col, overflow="fold")
    for r in results:
        metric = "-" if r.get("metric") is None else f"{r['metric']:.4f}"
        hist = ", ".join(f"{k}x{v}" for k, v in sorted(r["bits_histogram"].items(),
                                                         key=lambda kv: -kv[1])[:4])
        t.add_row(r["method"], f"{r['achieved_bops'] / 1e9:.4g}",
                  f"{r['achieved_over_budget']:.3f}", f"{r['searchable_over_budget']:.3f}",
                  metric, hist, r["run_dir"])
    console.print(t)
    rep = first.get("repair")
    if rep:
        lost = f", log-prob lost {rep['logprob_lost']:.3f}" if "logprob_lost" in rep else ""
        console.print(f"[dim]repair: {rep['from_bops'] / 1e9:.4g} -> {rep['to_bops'] / 1e9:.4g}"
                      f" GBOPs, {rep['layers_changed']} layer(s) changed{lost}; 'searchable' ="
                      " share of the budget left after attention and pinned layers[/dim]")


# ---------------------------------------------------- frontier / report (coqat.report)
# (frontier, worker and report commands go here)


@app.command()
def frontier(
    space: str = typer.Option("lm-tiny", "--space", "-s", help=SPACE_HELP),
    budgets: str = typer.Option(..., "--budgets", help="comma-separated budget expressions,"
                                " e.g. w3a3,w4a4,w6a6,w8a8 (each checked before any point"
                                " runs)"),
    seeds: int = typer.Option(3, "--seeds", help="seeds 0..N-1 per budget and method"),
    methods: str = typer.Option("gumbel,uniform", "--methods",
                                help="comma-separated: gumbel, uniform, optuna, random"),
    storage: Optional[str] = typer.Option(
        None, "--storage", help="Optuna storage: a journal file path (default: next to the"
        " sweep) or an RDB URL such as postgresql://user:pw@host/db"),
    workers: int = typer.Option(1, "--workers", help="local worker processes"),
    name: Optional[str] = typer.Option(None, "--name", help="study name (default: frontier-SPACE)"),
    out: str = typer.Option("runs", "--out", help="root directory for sweeps"),
    steps: Optional[float] = typer.Option(
        None, "--steps-scale", help="scale every phase's steps (e.g. 0.25 for a quick sweep)"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer",
                                            help="final QAT optimizer: adamw | cage-d | cage-c"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    no_run: bool = typer.Option(False, "--no-run", help="create/extend the study, run nothing"),
    json_out: bool = typer.Option(False, "--json", help="print the sweep's report as JSON"),
) -> None:
    """Accuracy-vs-compute frontier: a search per budget x seed x method, as an Optuna study."""
    from coqat.report import frontier as fr
    from coqat.report.build import build_report, print_terminal, to_json, write_html

    options = {k: v for k, v in {"steps_scale": steps, "optimizer": optimizer,
                                 "device": device}.items() if v is not None}
    study, manifest, sweep_dir = fr.create_or_resume(
        space, budgets.split(","), list(range(seeds)), methods.split(","), storage, out, name,
        options)
    prog = fr.progress(study, manifest)
    if not json_out:
        console.print(f"study [bold]{manifest.study}[/bold] in {fr._redact(manifest.storage)}:"
                      f" {prog['total']} points, {prog['complete']} done; other machines can"
                      f" join with: coqat worker --storage {fr._redact(manifest.storage)}"
                      f" --study {manifest.study}")
    if no_run:
        return
    if prog["complete"] < prog["total"]:
        if workers <= 1:
            fr.work(study, manifest, sweep_dir)
        else:
            fr.run_workers(manifest, sweep_dir, workers, None if json_out else console)
    rep = build_report(sweep_dir)
    files = write_html(rep)
    if json_out:
        _emit_json({**to_json(rep), "files": {k: str(v) for k, v in files.items()}})
        return
    print_terminal(rep, console)
    console.print(f"report written to [bold]{files['html']}[/bold]")


@app.command()
def worker(
    storage: str = typer.Option(..., "--storage", help="the sweep's Optuna storage URL or journal"),
    study: str = typer.Option(..., "--study", help="the study name printed by coqat frontier"),
    out: str = typer.Option("runs", "--out", help="root directory for this machine's runs"),
    max_points: Optional[int] = typer.Option(None, "--max-points",
                                             help="stop after running this many points"),
) -> None:
    """Join a frontier sweep from another process or machine and work until it is done."""
    from coqat.report import frontier as fr

    st, manifest = fr.load_study(storage, study)
    n = fr.work(st, manifest, Path(out) / manifest.study, max_points=max_points)
    console.print(f"worker finished: ran {n} point(s) of {manifest.study}")


@app.command()
def report(
    path: Path = typer.Argument(..., help="a run directory, a frontier, or a folder of runs"),
    out: Optional[Path] = typer.Option(None, "--out", help="where report.html and PNGs go"
                                       " (default: PATH itself)"),
    html: bool = typer.Option(True, "--html/--no-html", help="write report.html and PNGs"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Summary, frontier, per-layer bits and search trace: terminal, HTML and PNG."""
    from coqat.report.build import build_report, print_terminal, to_json, write_html

    rep = build_report(path)
    files = write_html(rep, out) if html else {}
    if json_out:
        _emit_json({**to_json(rep), "files": {k: str(v) for k, v in files.items()}})
        return
    print_terminal(rep, console)
    if files:
        console.print(f"report written to [bold]{files['html']}[/bold]")


# ------------------------------------------------------ export / deploy (coqat.export)
@app.command()
def export(
    run: Path = typer.Argument(..., help="a finished run directory (runs/<name>)"),
    fmt: str = typer.Option("onnx", "--format", "-f",
                            help="onnx | compressed-tensors | torchao | json"),
    out: Optional[Path] = typer.Option(
        None, "--out", help="output directory (default: RUN/exports/FORMAT)"),
    approx: bool = typer.Option(
        False, "--approx", help="allow the documented approximations a format needs for "
        "coqat's QuEST numerics (listed in the output) instead of refusing"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Export a run's per-layer bit configuration and weights to a deployment format."""
    from coqat.export import export_run

    with console.status(f"exporting {run} to {fmt} ...", spinner="dots") if not json_out \
            else _no_status():
        result = export_run(run, fmt, out, approx=approx)
    if json_out:
        _emit_json(result.to_dict())
        return
    kind = "[green]exact[/green]" if result.exact else "[yellow]approximate[/yellow]"
    console.print(f"[bold]{result.format}[/bold] export of {result.run_dir} ({kind}) written to "
                  f"[bold]{result.out_dir}[/bold]")
    t = Table(box=None, pad_edge=False, show_header=False)
    t.add_column("file")
    t.add_column("bytes", justify="right")
    for name, size in result.files.items():
        t.add_row(name, f"{size:,}")
    console.print(t)
    for note in result.notes:
        console.print(f"[dim]- {note}[/dim]")
    for a in result.approximations:
        console.print(f"[yellow]approximation:[/yellow] {a}")


@app.command()
def deploy(
    run: Path = typer.Argument(..., help="a finished run directory (runs/<name>)"),
    fmt: str = typer.Option("packed", "--format", "-f",
                            help="packed (int codes in safetensors, torch) | onnx (onnxruntime)"),
    out: Optional[Path] = typer.Option(
        None, "--out", help="output directory (default: RUN/exports/deploy-FORMAT)"),
    max_batches: Optional[int] = typer.Option(
        None, "--max-batches", help="evaluate on this many batches (default: the whole split)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Build the packed model, evaluate it and report its metric and size against FP32."""
    from coqat.export.deploy import deploy as run_deploy

    if json_out:
        rep = run_deploy(run, fmt, out, max_batches)
        _emit_json(rep.to_dict())
        return
    with console.status("building the deployed model ...", spinner="dots") as status:
        rep = run_deploy(run, fmt, out, max_batches,
                         progress=lambda msg: status.update(f"{msg} ..."))
    _print_deploy(rep)


def _no_status():
    import contextlib

    return contextlib.nullcontext()


def _print_deploy(rep) -> None:
    def size(n: int) -> str:
        return f"{n / 1024:,.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):,.2f} MiB"

    t = Table(title=f"deploy ({rep.format}): {rep.run_dir}", title_justify="left")
    for col in ("model", rep.metric_name, "size on disk", "x FP32"):
        t.add_column(col, justify="left" if col == "model" else "right")
    t.add_row("FP32 state dict", "-", size(rep.fp32_bytes), "1.000")
    t.add_row("QAT model (coqat)", f"{rep.reference_metric:.4f}", "-", "-")
    t.add_row(f"deployed ({rep.format})", f"[bold]{rep.metric:.4f}[/bold]", size(rep.bytes),
              f"[bold]{rep.size_ratio:.3f}[/bold]")
    console.print(t)
    where = "whole split" if rep.max_batches is None else f"{rep.max_batches} batches"
    extra = f"; train reported {rep.final_metric:.4f}" if rep.final_metric is not None else ""
    console.print(f"[dim]{rep.metric_name} on {where}{extra}; file {rep.file}[/dim]")
    for note in rep.notes:
        console.print(f"[dim]- {note}[/dim]")


# ----------------------------------------------------------------------------------- plan
@app.command()
def plan(
    params: float = typer.Option(..., "--params", help="quantized parameter count N, e.g. 30e6"),
    tokens: float = typer.Option(..., "--tokens", help="total training tokens D, e.g. 3e9"),
    bits: float = typer.Option(..., "--bits", help="weight bits B (mean for mixed configs)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Compute-optimal split of a token budget between FP training and QAT."""
    from coqat.optim.planner import plan as make_plan

    if params <= 0 or tokens <= 0 or bits <= 0:
        raise CoqatError("--params, --tokens and --bits must be positive numbers")
    p = make_plan(tokens, params, bits)
    if json_out:
        _emit_json(p.to_dict())
        return
    t = Table(title="compute-optimal QAT split (Dremov et al. 2025)", title_justify="left")
    for col in ("S = D/(N*B/8)", "QAT fraction", "FP tokens", "QAT tokens"):
        t.add_column(col, justify="right")
    t.add_row(f"{p.tokens_per_param_byte:,.1f}", f"{p.qat_fraction:.3f}",
              f"{p.fp_tokens:.4g}", f"{p.qat_tokens:.4g}")
    console.print(t)
    console.print("[dim]f = exp(-6.7297 / ln S), clipped to [0, 1]."
                  + ("" if p.in_fitted_range else
                     " S is outside the fitted range (10..1e5): an extrapolation.") + "[/dim]")


# ----------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: str = typer.Option("runs", "--out", help="root directory for run directories"),
    steps: Optional[int] = typer.Option(None, "--steps",
                                        help="steps per phase (default 200)"),
    budget: str = typer.Option("w4a4", "--budget", help="BOPs budget of the search"),
) -> None:
    """The embedded default end to end on the CPU: count BOPs, search per-layer bits for a
    budget, train uniform precision at equal BOPs, compare, write the report and the config."""
    from coqat.api import run_demo

    run_demo(console, out=out, steps=steps, budget=budget)


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


def main() -> None:
    """Console-script entry point: one-line errors, exit code 2, no traceback."""
    try:
        app(standalone_mode=False)
    except CoqatError as e:
        err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except _usage_error_types() as e:
        msg = e.format_message().replace("\n", " ")
        err_console.print(f"[bold red]error:[/bold red] {msg} (see coqat --help)",
                          highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
