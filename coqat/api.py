"""The public Python API: everything the CLI does, as functions returning typed records.

The ``coqat`` command line is a thin layer over these functions (it parses options, calls
one of them and prints what it returns)::

    import coqat

    coqat.bops("lm-tiny", bits="w4a4").totals["gbops_bits"]
    rec = coqat.train("lm-tiny", bits="w4a4", steps=100, seed=1)      # RunRecord
    recs = coqat.search("lm-tiny", "w4a4", baselines=["uniform"])    # [RunRecord, ...]
    rep = coqat.frontier("lm-tiny", ["w3a3", "w4a4"], seeds=2)       # Report
    coqat.export(rec.run_dir, "onnx")                                # ExportResult
    coqat.quantize_(model, coqat.BitConfig.load("bitconfig.json"))   # in place
    table = coqat.sensitivity("lm-tiny", fp_steps=200)               # Sensitivity

Options are the fields of ``TrainSettings`` (steps, lr, batch_size, optimizer, ...),
``SearchSettings`` (fp_steps, search_steps, ...) and ``Runtime`` (seed, device, out,
progress, ...), given as keyword arguments; None keeps the space's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from coqat.bitconfig import BitConfig, LayerBits
from coqat.config import (DEFAULT_SPACE, RunConfig, SearchSpace, bits_from_cli, load_space,
                          run_config_from_json, space_for_workload)
from coqat.cost import CostModel
from coqat.errors import CoqatError
from coqat.util import read_json
from coqat.exporters import explain_export as explain_run
from coqat.exporters import export_run
from coqat.exporters.common import ExportResult
from coqat.exporters.deploy import DeployReport
from coqat.exporters.deploy import deploy as deploy_run
from coqat.optim.planner import QatPlan
from coqat.optim.planner import plan as make_plan
from coqat.quant import quantize_model
from coqat.kernels import use_kernels
from coqat.records import RunRecord
from coqat.rundir import CONFIG, FRONTIER_MANIFEST, RunDir
from coqat.reporting.build import Report, build_report, write_html
from coqat.bitsearch import run_searches
from coqat.bitsearch.sensitivity import Sensitivity
from coqat.sweep import frontier as sweep
from coqat.training import runner
from coqat.workloads import (UserModel, get_workload, load_object, load_user_model,
                             use_user_model)
from coqat.workloads.hf import HF_PREFIX, hf_user_model

__all__ = ["BopsReport", "UserModel", "bops", "quantize_", "train", "resume", "search",
           "frontier", "work_on", "export", "explain_export", "deploy", "report", "plan",
           "model_and_inputs", "parse_shape", "resolve_model", "use_model", "sensitivity"]


# ----- the user's own model ------------------------------------------------------------------------
def resolve_model(model: Any, data: Any = None, batch_size: int | None = None) -> UserModel:
    """A ``UserModel`` from ``model``: the object itself, ``file.py:factory`` (imported:
    the caller named it in this invocation), or ``hf:PATH``, a local Hugging Face model
    trained on the text files ``data`` in batches of ``batch_size`` (see
    ``coqat.workloads.hf``)."""
    if isinstance(model, str) and model.startswith(HF_PREFIX):
        return hf_user_model(model[len(HF_PREFIX):], data, batch_size=batch_size)
    if data is not None:
        raise CoqatError("data (--data) goes with an hf:PATH model; a UserModel or a"
                         " file.py:factory brings its own data")
    if isinstance(model, UserModel):
        return model
    if isinstance(model, str):
        return load_user_model(model)
    raise CoqatError(f"model must be a coqat.UserModel, 'file.py:factory' or 'hf:PATH' (got"
                     f" {type(model).__name__})")


def use_model(model: Any, data: Any = None, batch_size: int | None = None) -> UserModel:
    """Resolve ``model`` and make it available to this process's runs."""
    user = resolve_model(model, data, batch_size)
    use_user_model(user)
    return user


def _hf_batch(model: Any, space: Any, batch_size: int | None) -> int | None:
    """The batch size of an hf: model's batches: the run's (the option, else the space's
    [train] batch_size), so that config.json records the batches the run saw."""
    if batch_size is not None or not (isinstance(model, str) and model.startswith(HF_PREFIX)):
        return batch_size
    return space_for_workload({"name": "user:hf"}, "hf", space).train.batch_size


def _user_space(user: UserModel, space: Any) -> SearchSpace:
    workload = {"name": user.workload_name}
    if user.source:
        workload.update(source=user.source, sha256=user.sha256)
    return space_for_workload(workload, user.name, space)


# ----- compute -----------------------------------------------------------------------------------
@dataclass
class BopsReport:
    """Per-layer MACs and BOPs of one model (``coqat bops``)."""

    source: str                         # the space's name or the user model reference
    bits: str | None                    # the bits the BOPs column is for (None: MACs only)
    input_shapes: list[list[int]]
    layers: list[dict[str, Any]]        # CostModel.rows: name, op, params, macs, bops, ...
    totals: dict[str, float]
    pinned: dict[str, str]
    tie_groups: list[list[str]]
    conventions: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise CoqatError(f"input shape {text!r} is not a shape; write e.g. 1,3,224,224")
    return shape


def model_and_inputs(space: str | Path | None = None, model: Any = None,
                     input_shape: str | Sequence[int] | None = None,
                     data_dir: str | None = None, data: Any = None):
    """(model, example inputs, space or None, label) of a space's model or a user model.

    ``model``: a UserModel (or ``file.py:factory`` returning one): the example inputs are its
    first training batch's; or ``hf:PATH`` with its text ``data``; or an ``nn.Module`` (or a
    factory returning one) with ``input_shape`` for random float inputs (vision models)."""
    if data is not None or (isinstance(model, str) and model.startswith(HF_PREFIX)):
        model = resolve_model(model, data)
    if model is not None:
        label = model if isinstance(model, str) else type(model).__name__
        m = model
        if isinstance(model, str):
            factory = load_object(model)
            try:
                m = factory() if callable(factory) and not isinstance(factory, nn.Module) \
                    else factory
            except CoqatError:
                raise
            except Exception as e:
                raise CoqatError(f"calling {model} failed: {type(e).__name__}: {e}") from None
        if isinstance(m, UserModel):
            if isinstance(model, str):
                m.source = model
            use_user_model(m)
            sp = _user_space(m, space)
            wl = get_workload(sp.workload_name, {k: v for k, v in sp.workload.items()
                                                 if k != "name"})
            torch.manual_seed(0)
            return wl.build_model(), wl.example_inputs(), sp, label
        if space:
            raise CoqatError("a bare nn.Module has no search space; give either a space or a"
                             " model (or return a coqat.UserModel)")
        if not isinstance(m, nn.Module):
            raise CoqatError(f"{label} returned {type(m).__name__}; return a torch.nn.Module"
                             " (with an input shape) or a coqat.UserModel")
        if not input_shape:
            raise CoqatError("a bare nn.Module needs an input shape (e.g. 1,3,224,224); for a"
                             " language model return a coqat.UserModel, whose data gives the"
                             " inputs")
        shape = parse_shape(input_shape) if isinstance(input_shape, str) else \
            tuple(int(d) for d in input_shape)
        return m, (torch.randn(shape),), None, label
    sp = load_space(space or DEFAULT_SPACE)
    wl = get_workload(sp.workload_name, {k: v for k, v in sp.workload.items() if k != "name"},
                      data_dir=data_dir)
    torch.manual_seed(0)
    return wl.build_model(), wl.example_inputs(), sp, sp.name


def bops(space: str | Path | None = None, model: Any = None,
         input_shape: str | Sequence[int] | None = None, bits: str | None = None,
         data_dir: str | None = None, data: Any = None) -> BopsReport:
    """Per-layer MACs / BOPs for a space's model or a user model (``coqat bops``)."""
    m, inputs, sp, label = model_and_inputs(space, model, input_shape, data_dir, data)
    cost = CostModel.from_model(m, inputs)
    pinned: dict[str, LayerBits] = {}
    if sp is not None:
        pinned = sp.resolve(list(cost.layers), cost.tie_groups).pinned
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
    return BopsReport(source=label, bits=bits, input_shapes=cost.input_shapes,
                      layers=cost.rows(cfg), totals=totals,
                      pinned={k: v.label for k, v in pinned.items()},
                      tie_groups=[list(g) for g in cost.tie_groups],
                      conventions=cost.summary(None))


def quantize_(model: nn.Module, config: BitConfig | str | Path,
              kernels: str = "reference") -> nn.Module:
    """Quantize ``model`` in place by module name (a BitConfig or a bitconfig.json path);
    the returned model is the same object, its Linear/Conv2d layers now quantized.
    ``kernels`` ("reference", "auto" or "triton") picks the matmul backend of the quantized
    Linear layers (``coqat.kernels.use_kernels``)."""
    cfg = config if isinstance(config, BitConfig) else BitConfig.load(config)
    quantize_model(model, cfg)
    return use_kernels(model, kernels)


# ----- training and search ------------------------------------------------------------------------
def _config(space: Any, options: dict[str, Any], model: Any = None,
            data: Any = None) -> RunConfig:
    if isinstance(space, RunConfig):
        if options or model is not None:
            raise CoqatError("give options either in the RunConfig or as keywords, not both")
        return space
    if model is not None or data is not None:
        # an hf: model is batched here, so the batch size option applies to its batches
        batch = _hf_batch(model, space, options.get("batch_size"))
        space = _user_space(use_model(model, data, batch), space)
    elif space is None:
        space = DEFAULT_SPACE
    return RunConfig.from_options(space, **options)


def train(space: str | Path | SearchSpace | RunConfig | None = None, bits: Any = None,
          model: Any = None, data: Any = None, *, stop_at: int | None = None,
          branch_from: str | Path | None = None, **options: Any) -> RunRecord:
    """Train full precision (``bits="fp"``, the default), uniform (``"w4a4"``) or a given
    configuration (a BitConfig or a bitconfig.json path); writes a run directory (``coqat
    train``).

    ``model``: your own model (a UserModel, ``file.py:factory`` or ``hf:PATH`` with its
    text files in ``data``); ``space`` is then an optional space file with [train] and
    [search] tables and no [workload].

    ``stop_at``: stop after that many steps, the schedules still spanning ``steps`` (a
    trunk to branch from). ``branch_from``: a run directory to branch from
    (``coqat.training.branch``): the run starts from its checkpoint with its settings, and
    ``options`` may change only the optimizer (``optimizer``, ``cage_lambda`` or
    ``cage_pull``, ``cage_silence``, ``cage_schedule``, ``cage_scale``); ``space`` and
    ``bits``, if given, must be the parent's. ``init_from`` (an option): a finished float
    run whose trained weights the model starts from (``coqat.training.warmstart``)."""
    if branch_from is None:
        if stop_at is not None:
            options = {**options, "stop_at": stop_at}
        config = _config(space, options, model, data)
        _, rec = runner.run_train(config, "fp" if bits is None else bits)
        return rec
    if model is not None or data is not None:
        raise CoqatError("branching a run of your own model is not supported; branch runs"
                         " of a search space")
    if options.get("init_from") is not None:
        raise CoqatError("a branch starts from its parent's checkpoint; give branch_from or"
                         " init_from, not both")
    if isinstance(space, RunConfig):
        raise CoqatError("a branch takes its configuration from the parent run; give options"
                         " as keywords, not a RunConfig")
    config, parent_bits = runner.branch_config(branch_from, {**options, "stop_at": stop_at})
    if space is not None:    # a space given must be the parent's (checked with the rest)
        config = RunConfig(load_space(space) if not isinstance(space, SearchSpace) else space,
                           config.train, config.search, config.runtime)
    _, rec = runner.run_train(config, parent_bits if bits is None else bits)
    return rec


def resume(run_dir: str | Path, progress: bool = True, model: Any = None,
           data: Any = None) -> RunRecord:
    """Continue an interrupted run where it stopped, bit for bit (``coqat train --resume``).
    A run of your own model needs the same ``model`` (and ``data``) again."""
    if model is not None:
        run = RunDir.open(run_dir)  # an hf: model is batched as the run recorded it
        recorded = run_config_from_json(run.read_json(CONFIG), str(run.file(CONFIG)))
        use_model(model, data, recorded.train.batch_size)
    _, rec = runner.resume(run_dir, progress=progress)
    return rec


def _train_only(options: dict[str, Any]) -> None:
    """stop_at and branch_from belong to ``train``: a search has phases of its own."""
    given = [k for k in ("stop_at", "branch_from") if options.get(k) is not None]
    if given:
        raise CoqatError(f"{' and '.join(given)} are options of train (coqat train), not of a"
                         " search")


def search(space: str | Path | SearchSpace | RunConfig | None = None, budget: str = "w4a4",
           method: str = "gumbel", baselines: Sequence[str] = (), target: str | None = None,
           final_qat: bool = True, say: Callable[[str], None] | None = None,
           model: Any = None, data: Any = None, **options: Any) -> list[RunRecord]:
    """Search per-layer bits under ``budget`` with ``method``, then QAT-train and evaluate
    the result; each of ``baselines`` runs at the same budget with the identical final QAT
    (``coqat search``). Returns the method's record first, then the baselines'."""
    _train_only(options)
    return run_searches(_config(space, options, model, data), budget, [method, *baselines],
                        target=target, final_qat=final_qat, say=say)


def frontier(space: str | Path | SearchSpace | None = None, budgets: Sequence[str] = ("w4a4",),
             seeds: int = 3, methods: Sequence[str] = ("gumbel", "uniform"),
             storage: str | None = None, workers: int = 1, name: str | None = None,
             out: str | Path = "runs", steps_scale: float = 1.0, target: str | None = None,
             device: str = "auto", run: bool = True, model: Any = None, data: Any = None,
             on_progress: Callable[[dict[str, int], float], None] | None = None,
             **train_options: Any) -> Report:
    """The accuracy-vs-compute frontier: one search per budget x seed x method, as a shared
    Optuna study (``coqat frontier``). Rerunning resumes; new budgets/seeds extend it.
    ``train_options`` override the final QAT's settings (e.g. optimizer="cage-d").
    With ``model`` and several ``workers``, the model must be a ``file.py:factory`` (each
    worker process imports it; an object cannot be sent to them)."""
    _train_only(train_options)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise CoqatError(f"seeds must be an integer >= 1 (got {seeds!r})")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CoqatError(f"workers must be an integer >= 1 (got {workers!r})")
    model_ref = None
    if model is not None or data is not None:
        if workers > 1 and not isinstance(model, str):
            raise CoqatError("several workers need the model as 'file.py:factory' (each worker"
                             " imports it); a model object works with workers=1")
        if workers > 1 and isinstance(model, str) and model.startswith(HF_PREFIX):
            raise CoqatError("several workers cannot share an hf: model yet; use workers=1,"
                             " or a file.py:factory that returns coqat.workloads.hf."
                             "hf_user_model(...)")
        model_ref = model if isinstance(model, str) else None
        batch = _hf_batch(model, space, train_options.get("batch_size"))
        space = _user_space(use_model(model, data, batch), space)
    elif space is None:
        space = DEFAULT_SPACE
    study, manifest, sweep_dir = sweep.create_or_resume(
        space, budgets, list(range(seeds)), methods, storage, out, name,
        steps_scale=steps_scale, train=train_options, device=device, target=target)
    if run and sweep.progress(study, manifest)["complete"] < len(manifest.points()):
        if workers <= 1:
            sweep.work(study, manifest, sweep_dir)
        else:
            sweep.run_workers(manifest, sweep_dir, workers, on_progress, model_ref=model_ref)
    if not run and sweep.progress(study, manifest)["complete"] == 0:
        # a study just created for other workers: nothing to report yet, only the manifest
        doc = read_json(sweep_dir / FRONTIER_MANIFEST, "a sweep manifest",
                        "rerun the coqat frontier command that made the sweep")
        return Report(sweep_dir, [], [], [], [], doc)
    return build_report(sweep_dir)


def work_on(storage: str, study: str, out: str | Path = "runs",
            max_points: int | None = None, model: Any = None, data: Any = None) -> int:
    """Join a frontier sweep from another process or machine (``coqat worker``); returns
    the number of points this worker ran. A sweep of your own model needs ``model`` (and
    ``data``) again."""
    st, manifest = sweep.load_study(storage, study)
    if model is not None:
        batch = manifest.train.get("batch_size") or \
            (manifest.space.get("train") or {}).get("batch_size")
        use_model(model, data, batch)
    return sweep.work(st, manifest, Path(out) / manifest.study, max_points=max_points)


# ----- sensitivity -------------------------------------------------------------------------------
#: options that may accompany ``run=``: where and how to compute, not what to measure
_RUN_OPTIONS = ("device", "data_dir", "progress")


def sensitivity(space: str | Path | SearchSpace | RunConfig | None = None, model: Any = None,
                data: Any = None, run: str | Path | None = None, bits: str | Sequence[int] | None = None,
                batches: int = 8, batch_size: int | None = None, weights: str = "auto",
                estimate: str = "measured", save: str | Path | None = None,
                on_cell: Callable[[int, int], None] | None = None,
                say: Callable[[str], None] | None = None, **options: Any) -> Sensitivity:
    """Per decision (each layer's weight, each tie group's input) and width, the change of
    the loss on ``batches`` fixed holdout batches when only that tensor is quantized and
    everything else stays in float (``coqat sensitivity``; see
    ``coqat.bitsearch.sensitivity``). Cost: one forward pass over the batches per cell.

    Weights: ``run`` (a finished run directory: its trained weights, space and seed); else
    ``weights="fp-phase"`` (the FP phase ``coqat search`` trains and caches under
    ``out``, so a later search reuses it; the default for a space) or ``"given"`` (the
    model as built: a user's pretrained model, the default with ``model``).
    ``bits``: widths to measure ("2,4,8" or a list; default every candidate of the space).
    ``estimate="fisher"``: the second-order estimate from one forward and backward pass per
    batch instead of one forward pass per cell (``coqat.bitsearch.sensitivity.estimate``).
    ``save``: a directory to write sensitivity.json, sensitivity.html and sensitivity.png
    into (a run directory is fine: ``coqat report`` then shows the heatmap).
    ``options``: RunConfig fields (seed, fp_steps, device, out, ...); with ``run`` only
    device and data_dir."""
    from coqat.bitsearch.pipeline import load_or_train_fp
    from coqat.bitsearch.problem import SearchProblem
    from coqat.bitsearch.sensitivity import ESTIMATES, check_widths, fp_job
    from coqat.bitsearch.sensitivity import table as sensitivity_table
    from coqat.config import run_config_from_json
    from coqat.exporters.loading import first_problem
    from coqat.rundir import CONFIG, RunDir

    say = say or (lambda _msg: None)
    widths = _parse_widths(bits)
    if estimate not in ESTIMATES:
        raise CoqatError(f"estimate {estimate!r} is not a way to get the table; use"
                         f" {' or '.join(ESTIMATES)}")
    if weights not in ("auto", "fp-phase", "given"):
        raise CoqatError(f"weights {weights!r} is not a source of weights; use auto, fp-phase"
                         " or given")
    notes: list[str] = []
    if run is not None:
        if space is not None or weights != "auto":
            raise CoqatError("a run directory brings its own space and weights; give either a"
                             " run or a space / weights source, not both")
        extra = sorted(k for k, v in options.items() if v is not None and k not in _RUN_OPTIONS)
        if extra:
            raise CoqatError(f"a run is measured with its own settings; leave out"
                             f" {', '.join(extra)}")
        if model is not None:
            use_model(model, data)
        rd = RunDir.open(run)
        if not rd.finished or not rd.has("model.safetensors"):
            raise CoqatError(f"{rd.path} has no final weights (the run has not finished);"
                             f" finish it with coqat train --resume {rd.path}")
        config = run_config_from_json(rd.read_json(CONFIG), str(rd.file(CONFIG)))
        config = config.with_runtime(**{k: v for k, v in options.items() if v is not None})
        prep = runner.prepare(config, bits="fp")
        try:
            prep.model.load_state_dict(rd.load_weights(), strict=True)
        except RuntimeError as e:
            raise CoqatError(f"{rd.path / 'model.safetensors'} does not match the model of"
                             f" {rd.path / CONFIG}: {first_problem(str(e))}") from None
        problem = SearchProblem.build(prep.resolved, prep.cost, config.train.quantizer)
        source, label = config.space.name, f"run {rd.path}"
        if RunRecord.read(rd).bits != "fp":   # an FP run has a bitconfig.json too
            notes.append("the run was trained quantized; its weights are measured here with"
                         " every other layer in float")
    else:
        config = _config(space, options, model, data)
        if weights == "auto":
            weights = "given" if model is not None else "fp-phase"
        if weights == "fp-phase":
            job = fp_job(config)
            check_widths(job.problem, widths)       # bad input fails before any training
            info = load_or_train_fp(job, say)
            prep, problem = job.fp_prep, job.problem
            label = (f"FP phase ({job.fp_steps} steps, seed {job.seed}), cached in"
                     f" {info['cache']}")
        else:
            prep = runner.prepare(config, bits="fp")
            problem = SearchProblem.build(prep.resolved, prep.cost, config.train.quantizer)
            label = ("the model as given" if model is not None else
                     "the pretrained model as built (no fine-tune)" if prep.workload.pretrained
                     else "the model as initialised (untrained)")
        source = config.space.name
    table = sensitivity_table(estimate, prep.model, problem, prep.workload, on_cell=on_cell,
                              bits=widths, batches=batches,
                              batch_size=batch_size or prep.settings.eval_batch_size,
                              device=prep.device, source=source, weights=label)
    table.notes.extend(notes)
    if save is not None:
        from coqat.reporting.sensitivity import FILE, write_page

        table.save(Path(save) / FILE)
        write_page(table.to_dict(), save)
    return table


def _parse_widths(bits: str | Sequence[int] | None) -> list[int] | None:
    if bits is None:
        return None
    items = bits.replace(" ", "").split(",") if isinstance(bits, str) else list(bits)
    try:
        out = [int(b) for b in items if b != ""]
    except (TypeError, ValueError):
        out = []
    if not out:
        raise CoqatError(f"bits {bits!r} is not a list of widths; write e.g. 2,4,8")
    return out


# ----- results ---------------------------------------------------------------------------------------
def report(path: str | Path, out: str | Path | None = None, html: bool = True
           ) -> tuple[Report, dict[str, Path]]:
    """Summary, frontier, per-layer bits and search trace of a run, a sweep or a folder of
    runs; with ``html`` also report.html and PNGs (``coqat report``)."""
    rep = build_report(path)
    return rep, (write_html(rep, out) if html else {})


def export(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None,
           approx: bool = False, model: Any = None, data: Any = None,
           check_batches: int = 2) -> ExportResult:
    """Export a finished run to onnx | compressed-tensors | torchao | json (``coqat export``),
    then load the files in their real consumer (onnxruntime, transformers, torchao) and
    compare the metric on ``check_batches`` batches (0: no check). A run of your own model
    needs the same ``model`` (and ``data``) again."""
    if model is not None:
        use_model(model, data)
    return export_run(run_dir, format, out, approx=approx, check_batches=check_batches)


def explain_export(run_dir: str | Path, format: str = "onnx", approx: bool = False,
                   model: Any = None, data: Any = None) -> list[str]:
    """Every reason an export of the run to ``format`` would be refused (empty: it would
    be written), the decisive one first; nothing is written."""
    if model is not None:
        use_model(model, data)
    return explain_run(run_dir, format, approx)


def deploy(run_dir: str | Path, format: str = "packed", out: str | Path | None = None,
           max_batches: int | None = None, progress: Callable[[str], None] | None = None,
           model: Any = None, data: Any = None) -> DeployReport:
    """Pack the codes, evaluate the packed model, compare its size with FP32 (``coqat
    deploy``). A run of your own model needs the same ``model`` (and ``data``) again."""
    if model is not None:
        use_model(model, data)
    return deploy_run(run_dir, format, out, max_batches, progress=progress)


def plan(params: float, tokens: float, bits: float) -> QatPlan:
    """The compute-optimal split of a token budget between FP training and QAT."""
    if min(params, tokens, bits) <= 0:
        raise CoqatError("params, tokens and bits must be positive numbers")
    return make_plan(tokens, params, bits)

