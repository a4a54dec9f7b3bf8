"""From a run configuration to a finished run directory (``coqat train``).

``prepare`` does everything that can fail on bad input (space, bits, data, model, device)
*before* any run directory exists, so a bad command leaves nothing half-written. ``execute``
then creates the run directory, writes the resolved configuration, trains, and writes the
final record. ``resume`` rebuilds the same job from a run directory's ``config.json``::

    cfg = RunConfig.from_options("lm-tiny", steps=100, seed=1)
    run, record = run_train(cfg, bits="w4a4")          # record: coqat.records.RunRecord
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS, BitConfig, LayerBits
from coqat.config import ResolvedSpace, RunConfig, Runtime, SearchSpace, TrainSettings, \
    bits_from_cli, run_config_from_json
from coqat.cost import CostModel
from coqat.errors import CoqatError
from coqat.exporters.qparams import write_qparams
from coqat.kernels.dispatch import check_kernels
from coqat.optim.planner import plan as plan_qat
from coqat.optim.schedules import Schedule
from coqat.optim.cage import grid_step_factor
from coqat.records import (METHOD_FP, METHOD_TRAIN, METHOD_UNIFORM, CageRecord, RunRecord,
                           SearchRecord)
from coqat.rundir import BITCONFIG, CONFIG, ENV, RunDir
from coqat.training.branch import BranchPoint, branch_config, branch_point, cage_hooks
from coqat.training.cage import CageHooks
from coqat.training.distributed import DistEnv
from coqat.training.hooks import TrainHooks
from coqat.training.loop import train
from coqat.training.warmstart import load_initial_weights
from coqat.util import environment_info
from coqat.workloads import Workload, get_workload

__all__ = ["Prepared", "prepare", "execute", "run_train", "resume", "bits_for",
           "build_schedule", "make_hooks", "write_run_header", "final_record", "branch_config"]

@dataclass
class Prepared:
    """Everything a run needs, built and validated, before anything is written."""

    config: RunConfig
    resolved: ResolvedSpace
    workload: Workload
    model: nn.Module
    cost: CostModel
    bitconfig: BitConfig | None
    schedule: Schedule
    device: torch.device
    method: str                           # fp | uniform | train (a search sets its own)
    qat_plan: dict[str, Any] | None = None
    data_info: dict[str, Any] = field(default_factory=dict)
    extra_config: dict[str, Any] = field(default_factory=dict)
    cage: CageHooks | None = None         # CAGE's hooks when the optimizer is cage-*
    branch: BranchPoint | None = None     # where a branch starts (Runtime.branch_from)
    init: dict[str, Any] | None = None    # where the weights came from (Runtime.init_from)

    @property
    def space(self) -> SearchSpace:
        return self.config.space

    @property
    def settings(self) -> TrainSettings:
        return self.config.train

    @property
    def runtime(self) -> Runtime:
        return self.config.runtime

    @property
    def bits_label(self) -> str:
        return "fp" if self.bitconfig is None else self.bitconfig.summary()


def build_model(workload: Workload, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    try:
        return workload.build_model()
    except MemoryError:
        raise CoqatError(f"the {workload.name} model of this space does not fit in memory;"
                         " make it smaller in the space's [workload] table") from None
    except RuntimeError as e:  # torch's allocator reports an impossible size this way
        if "alloc" not in str(e).lower() and "memory" not in str(e).lower():
            raise
        raise CoqatError(f"the {workload.name} model of this space does not fit in memory"
                         f" ({str(e).splitlines()[0][:120]}); make it smaller in the space's"
                         " [workload] table") from None


def prepare(config: RunConfig, bits: Any = "fp", init_sha256: str | None = None) -> Prepared:
    """Validate everything and build model, cost model, bits and schedule (no files written).

    ``bits``: a BitConfig (the search passes its chosen config), ``"fp"``/None (a float
    run), ``"wNaM"`` (uniform under the space's pinned layers) or a bitconfig.json path.
    ``init_sha256``: the SHA-256 the ``init_from`` weights must have (a resumed run's).
    """
    space, settings, rt = config.space, config.train, config.runtime
    workload = get_workload(space.workload_name,
                            {k: v for k, v in space.workload.items() if k != "name"},
                            data_dir=rt.data_dir, seed=rt.seed)
    data_info = workload.data_info()  # loads the data now: a missing dataset fails here,
    model = build_model(workload, rt.seed)  # before any run directory exists
    init = (load_initial_weights(rt.init_from, model, init_sha256)
            if rt.init_from else None)
    cost = CostModel.from_model(model, workload.example_inputs())
    resolved = space.resolve(list(cost.layers), cost.tie_groups)
    bitconfig, method = bits_for(bits, resolved, settings.quantizer)
    if bitconfig is not None:
        cost.bops(bitconfig)  # validates layer names against the model
        bad = bitconfig.violations_of_ties()
        if bad:
            raise CoqatError(f"the bit configuration breaks activation ties: {bad[0]};"
                             " give tied layers one a_bits")
        if not bitconfig.tie_groups:
            bitconfig.tie_groups = list(resolved.tie_groups)
    check_kernels(settings.kernels)  # kernels = triton without a GPU fails before any file
    schedule, qat_plan = build_schedule(settings, bitconfig, cost, workload,
                                        trained=init is not None)
    if rt.stop_at is not None and rt.stop_at >= schedule.total_steps:
        raise CoqatError(f"--stop-at {rt.stop_at} must be below the run's {schedule.total_steps}"
                         " steps (the schedules span all of them)")
    cage = cage_hooks(settings, schedule, bitconfig)
    if cage is not None and cage.scale != "none":   # the scale exists for every layer
        for lb in bitconfig.layers.values():
            if lb.w_bits != FLOAT_BITS:
                grid_step_factor(lb.w_bits, lb.quantizer)
    branch = branch_point(config, bitconfig, schedule) if rt.branch_from else None
    dist_env = DistEnv.from_env()
    device = dist_env.device(rt.device)
    check_device(device)
    dist_env.init(device)  # before anything broadcasts (the run directory's name)
    if settings.batch_size % dist_env.world_size:
        raise CoqatError(f"batch_size {settings.batch_size} is not divisible by the"
                         f" {dist_env.world_size} processes; pick a multiple")
    return Prepared(config, resolved, workload, model, cost, bitconfig, schedule, device,
                    method, qat_plan, data_info=data_info, cage=cage, branch=branch,
                    init=init)


def check_device(device: torch.device) -> None:
    """A CUDA device must exist here (checked before any run directory is made)."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise CoqatError(f"device {device} was asked for, but no CUDA GPU is visible to torch"
                         " here; use --device cpu (or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CoqatError(f"device {device} does not exist: this machine has"
                         f" {torch.cuda.device_count()} GPU(s); use cuda:0 ..")


def bits_for(bits: Any, resolved: ResolvedSpace,
             quantizer: str) -> tuple[BitConfig | None, str]:
    """(BitConfig or None for a float run, the run's method) for any accepted ``bits``."""
    if isinstance(bits, BitConfig):
        return bits, METHOD_TRAIN
    if bits is None:
        return None, METHOD_FP
    lb = bits_from_cli(str(bits), quantizer)
    if lb is None:
        return BitConfig.load(bits), METHOD_TRAIN
    if lb.is_float:
        return None, METHOD_FP
    return resolved.uniform(lb), METHOD_UNIFORM


def build_schedule(settings: TrainSettings, bitconfig: BitConfig | None, cost: CostModel,
                   workload: Workload, trained: bool = False
                   ) -> tuple[Schedule, dict[str, Any] | None]:
    """The run's LR and phase schedule and, for ``qat_fraction = "auto"``, the planner's
    record. ``trained``: the model starts from trained float weights (``init_from``), so
    ``auto`` means QAT for every step: the FP phase the planner would split off is done."""
    T = settings.steps
    if bitconfig is None or not bitconfig.quantized():
        return Schedule(T, settings.warmup_steps, settings.decay_frac,
                        settings.min_lr_ratio), None
    params = {n: cost.layers[n].params for n in bitconfig.quantized()}
    mean_bits = bitconfig.mean_weight_bits(params)
    qat_plan = None
    if settings.qat_fraction == "auto" and trained:
        frac = 1.0
        qat_plan = {"qat_fraction": 1.0, "note": "warm start from trained float weights"
                    " (init_from): every step is QAT"}
    elif settings.qat_fraction == "auto":
        tokens = T * settings.batch_size * workload.tokens_per_sample()
        p = plan_qat(tokens, sum(params.values()), mean_bits)
        frac = p.qat_fraction
        qat_plan = p.to_dict()
    else:
        frac = float(settings.qat_fraction)
    qat_start = T - int(round(frac * T))
    if qat_start >= T:
        # A quantized config is always evaluated quantized: at least one QAT step, so the
        # reported metric belongs to the model whose BOPs are reported.
        qat_start = T - 1
        if qat_plan is not None:
            qat_plan["note"] = (qat_plan.get("note") or "") + \
                " predicted QAT fraction rounds to 0 steps; 1 QAT step is run"
    fused = settings.fuse_cooldown if settings.fuse_cooldown is not None else mean_bits >= 4
    return Schedule(T, settings.warmup_steps, settings.decay_frac, settings.min_lr_ratio,
                    qat_start=qat_start, fused=fused), qat_plan


def make_hooks(prep: Prepared) -> list[TrainHooks]:
    """Hooks the settings ask for (CAGE's error feedback when optimizer = cage-*)."""
    return [] if prep.cage is None else [prep.cage]


def model_info(prep: Prepared) -> dict[str, Any]:
    env = environment_info()
    return {"workload": prep.space.workload_name, "space": prep.space.name,
            "space_sha256": prep.space.fingerprint(),
            "input_shapes": prep.cost.input_shapes, "torch": env["torch"],
            "coqat": env["coqat"]}


def execute(prep: Prepared, run: RunDir | None = None, resume: bool = False,
            hooks: Sequence[TrainHooks] | None = None, command: str = "train",
            search: SearchRecord | None = None) -> tuple[RunDir, RunRecord]:
    """Create (or continue) the run directory, train, write ``final.json``.

    ``search``: the record of the search that chose ``prep.bitconfig`` (a search's final
    QAT); it becomes part of the run's record. A branch (``prep.branch``) starts from its
    parent's checkpoint, copied into the new directory with the header.
    """
    rt = prep.runtime
    env = DistEnv.from_env()
    created = run is None
    if run is None:
        name = rt.name or f"{prep.space.name}-{prep.bits_label}-s{rt.seed}"
        run = RunDir.create(rt.out, name) if env.is_main else None
        if env.enabled:
            path = env.broadcast_object(str(run.path) if run else None)
            run = RunDir(path)
    with run.lock() if env.is_main else contextlib.nullcontext():
        if env.is_main and not resume:
            try:
                write_run_header(run, prep, command)
                if prep.branch is not None:
                    run.save_checkpoint(prep.branch.start_state())
            except BaseException:
                if created:  # nothing half-written: a run that could not start leaves no dir
                    shutil.rmtree(run.path, ignore_errors=True)
                raise
        if env.is_main and resume:
            run.remove_stale_temp_files()
        hooks = make_hooks(prep) if hooks is None else list(hooks)
        env.barrier()  # rank 0 has written the header before anyone trains
        t0 = time.perf_counter()
        final = train(model=prep.model, workload=prep.workload, settings=prep.settings,
                      schedule=prep.schedule, bitconfig=prep.bitconfig, device=prep.device,
                      run=run, hooks=hooks, resume=resume or prep.branch is not None,
                      progress=rt.progress, label=f"{prep.space.name} {prep.bits_label}",
                      stop_at=rt.stop_at)
        wall = time.perf_counter() - t0
        record = final_record(prep, final, wall, search)
        record.resumed = resume
        record.run_dir = str(run.path)
        if env.is_main:
            write_qparams(run, prep.model, prep.bitconfig)  # quantizer state for deployers
            record.write(run)
    return run, record


def write_run_header(run: RunDir, prep: Prepared, command: str) -> None:
    cfg = {
        "command": command,
        "method": prep.method,
        "space_name": prep.space.name,
        "space_path": str(prep.space.path) if prep.space.path else None,
        "space": prep.space.raw,
        "space_sha256": prep.space.fingerprint(),
        **prep.config.to_dict(),
        "schedule": prep.schedule.describe(),
        "qat_plan": prep.qat_plan,
        "bits": prep.bits_label,
        "data": prep.data_info,
        "device": str(prep.device),
        **({"cage": prep.cage.config()} if prep.cage is not None else {}),
        **({"branch": prep.branch.to_dict()} if prep.branch is not None else {}),
        **({"init": prep.init} if prep.init is not None else {}),
        **prep.extra_config,
    }
    run.write_json(CONFIG, cfg)
    run.write_json(ENV, environment_info())
    cfg_bits = prep.bitconfig or prep.resolved.uniform(LayerBits(16, 16, prep.settings.quantizer))
    meta = dict(cfg_bits.meta)
    if prep.bitconfig is None:
        meta["precision"] = "fp32"
    BitConfig(cfg_bits.layers, cfg_bits.tie_groups, meta).save(
        run.file(BITCONFIG), prep.cost, model_info(prep))


def final_record(prep: Prepared, final: dict[str, Any], wall: float,
                 search: SearchRecord | None = None) -> RunRecord:
    wl = prep.workload
    fp32 = prep.cost.fp32_bops()
    bops = fp32 if prep.bitconfig is None else prep.cost.bops(prep.bitconfig)
    budget = None
    if prep.bitconfig is not None and "budget_bops" in prep.bitconfig.meta:
        budget = int(prep.bitconfig.meta["budget_bops"])
    return RunRecord(
        metric_name=wl.metric, metric=final.get(wl.metric),
        higher_is_better=wl.higher_is_better, bits=prep.bits_label, bops=int(bops),
        space=prep.space.name, seed=prep.runtime.seed,
        method=search.method if search else prep.method,
        fp32_bops=int(fp32), bops_fraction_of_fp32=bops / fp32,
        steps=prep.schedule.total_steps, qat_steps=prep.schedule.qat_steps,
        workload=prep.space.workload_name, schedule=prep.schedule.describe()["shape"],
        wall_s=round(wall, 2), eval=final, budget_bops=budget, search=search,
        stopped_at=prep.runtime.stop_at,
        branch_of=str(prep.branch.parent) if prep.branch is not None else None,
        branch_step=prep.branch.step if prep.branch is not None else None,
        cage=CageRecord.from_dict(prep.cage.config()) if prep.cage is not None else None)


def run_train(config: RunConfig, bits: Any = "fp") -> tuple[RunDir, RunRecord]:
    return execute(prepare(config, bits))


def resume(path: str | Path, progress: bool = True) -> tuple[RunDir, RunRecord]:
    """Continue an interrupted run from its last checkpoint (or say it already finished)."""
    run = RunDir.open(path)
    if run.finished:
        raise CoqatError(f"run {run.path} already finished; its results are in"
                         f" {run.file('final.json')}")
    cfg = run.read_json(CONFIG)
    config = run_config_from_json(cfg, str(run.file(CONFIG)))
    config = config.with_runtime(progress=progress)
    bitconfig = None if cfg.get("bits") == "fp" else BitConfig.load(run.file(BITCONFIG))
    init = cfg.get("init") if isinstance(cfg.get("init"), dict) else {}
    prep = prepare(config, bits=bitconfig, init_sha256=init.get("weights_sha256"))
    if cfg.get("method"):
        prep.method = str(cfg["method"])
    # a search's final QAT keeps its search record when resumed
    search = SearchRecord.from_dict(cfg["search"]) if isinstance(cfg.get("search"), dict) \
        else None
    if search is not None:
        prep.extra_config = {"search": cfg["search"]}
    fresh = run.load_checkpoint() is None  # killed before the first checkpoint: start over
    return execute(prep, run=run, resume=not fresh, command=str(cfg.get("command", "train")),
                   search=search)

