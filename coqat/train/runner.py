"""From a search space and options to a finished run directory (``coqat train``).

``prepare`` does everything that can fail on bad input (space, bits, data, model) *before*
any run directory exists, so a bad command leaves nothing half-written. ``execute`` then
creates the run directory, writes the resolved configuration, trains, and writes the final
metrics. ``resume`` rebuilds the same job from a run directory's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from coqat.bitconfig import BitConfig, LayerBits
from coqat.config import ResolvedSpace, SearchSpace, TrainSettings, bits_from_cli, load_space, \
    parse_space
from coqat.cost import CostModel
from coqat.errors import CoqatError
from coqat.optim.planner import plan as plan_qat
from coqat.optim.schedules import Schedule
from coqat.report.rundir import BITCONFIG, CONFIG, ENV, FINAL, RunDir
from coqat.train.distributed import DistEnv
from coqat.train.loop import TrainHooks, train
from coqat.util import environment_info
from coqat.workloads import Workload, get_workload


@dataclass
class TrainOptions:
    """Command-line level choices; ``None`` means "as the space says"."""

    bits: str = "fp"                      # wNaM | fp | path/to/bitconfig.json
    quantizer: str | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    qat_fraction: str | float | None = None
    fuse_cooldown: bool | None = None
    optimizer: str | None = None
    cage_lambda: float | None = None
    cage_silence: float | None = None
    cage_schedule: str | None = None
    kernels: str | None = None
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    out: str = "runs"
    name: str | None = None
    progress: bool = True

    def settings_overrides(self) -> dict[str, Any]:
        o = {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size,
             "quantizer": self.quantizer, "optimizer": self.optimizer,
             "cage_lambda": self.cage_lambda, "cage_silence": self.cage_silence,
             "cage_schedule": self.cage_schedule,
             "fuse_cooldown": self.fuse_cooldown, "kernels": self.kernels}
        if self.qat_fraction is not None:
            q = self.qat_fraction
            o["qat_fraction"] = q if q == "auto" else float(q)
        return o


@dataclass
class Prepared:
    space: SearchSpace
    resolved: ResolvedSpace
    workload: Workload
    model: nn.Module
    cost: CostModel
    settings: TrainSettings
    bitconfig: BitConfig | None
    schedule: Schedule
    device: torch.device
    options: TrainOptions
    qat_plan: dict[str, Any] | None = None
    data_info: dict[str, Any] = field(default_factory=dict)
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def bits_label(self) -> str:
        return "fp" if self.bitconfig is None else self.bitconfig.summary()


def build_model(workload: Workload, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return workload.build_model()


def prepare(space_ref: str | Path | SearchSpace, options: TrainOptions,
            bitconfig: BitConfig | None = None) -> Prepared:
    """Validate everything and build model, cost model, bits and schedule (no files written).

    ``bitconfig`` overrides ``options.bits`` (the search passes its chosen config this way).
    """
    space = space_ref if isinstance(space_ref, SearchSpace) else load_space(space_ref)
    settings = space.train.replace(**options.settings_overrides())
    workload = get_workload(space.workload_name,
                            {k: v for k, v in space.workload.items() if k != "name"},
                            data_dir=options.data_dir, seed=options.seed)
    data_info = workload.data_info()  # loads the data now: a missing dataset fails here,
    model = build_model(workload, options.seed)  # before any run directory exists
    cost = CostModel.from_model(model, workload.example_inputs())
    resolved = space.resolve(list(cost.layers), cost.tie_groups)
    if bitconfig is None:
        bitconfig = bits_for(options.bits, resolved, settings.quantizer, cost)
    if bitconfig is not None:
        cost.bops(bitconfig)  # validates layer names against the model
        bad = bitconfig.violations_of_ties()
        if bad:
            raise CoqatError(f"the bit configuration breaks activation ties: {bad[0]};"
                             " give tied layers one a_bits")
        if not bitconfig.tie_groups:
            bitconfig.tie_groups = list(resolved.tie_groups)
    from coqat.kernels.dispatch import check_kernels

    check_kernels(settings.kernels)  # --kernels triton without a GPU fails before any file
    schedule, qat_plan = build_schedule(settings, bitconfig, cost, workload)
    dist_env = DistEnv.from_env()
    device = dist_env.device(options.device)
    dist_env.init(device)  # before anything broadcasts (the run directory's name)
    if settings.batch_size % dist_env.world_size:
        raise CoqatError(f"batch_size {settings.batch_size} is not divisible by the"
                         f" {dist_env.world_size} processes; pick a multiple")
    return Prepared(space, resolved, workload, model, cost, settings, bitconfig, schedule,
                    device, options, qat_plan, data_info=data_info)


def bits_for(bits: str, resolved: ResolvedSpace, quantizer: str,
             cost: CostModel) -> BitConfig | None:
    """``--bits``: 'fp' -> None (a float run), 'wNaM' -> uniform under the space's pinned
    layers, a path -> that bitconfig.json."""
    lb = bits_from_cli(bits, quantizer)
    if lb is None:
        return BitConfig.load(bits)
    if lb.is_float:
        return None
    return resolved.uniform(lb)


def build_schedule(settings: TrainSettings, bitconfig: BitConfig | None, cost: CostModel,
                   workload: Workload) -> tuple[Schedule, dict[str, Any] | None]:
    T = settings.steps
    if bitconfig is None or not bitconfig.quantized():
        return Schedule(T, settings.warmup_steps, settings.decay_frac,
                        settings.min_lr_ratio), None
    params = {n: cost.layers[n].params for n in bitconfig.quantized()}
    mean_bits = bitconfig.mean_weight_bits(params)
    qat_plan = None
    if settings.qat_fraction == "auto":
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
    """Hooks the settings ask for (CAGE's error feedback when --optimizer cage-*)."""
    if prep.settings.optimizer == "adamw" or prep.bitconfig is None:
        return []
    from coqat.optim.cage import CageHooks

    return [CageHooks.from_settings(prep.settings, prep.schedule)]


def model_info(prep: Prepared) -> dict[str, Any]:
    env = environment_info()
    return {"workload": prep.space.workload_name, "space": prep.space.name,
            "space_sha256": prep.space.fingerprint(),
            "input_shapes": prep.cost.input_shapes, "torch": env["torch"],
            "coqat": env["coqat"]}


def execute(prep: Prepared, run: RunDir | None = None, resume: bool = False,
            hooks: Sequence[TrainHooks] | None = None, command: str = "train") -> tuple[RunDir, dict]:
    """Create (or continue) the run directory and train."""
    opts = prep.options
    env = DistEnv.from_env()
    if run is None:
        name = opts.name or f"{prep.space.name}-{prep.bits_label}-s{opts.seed}"
        run = RunDir.create(opts.out, name) if env.is_main else None
        if env.enabled:
            path = env.broadcast_object(str(run.path) if run else None)
            run = RunDir(path)
    if env.is_main and not resume:
        write_run_header(run, prep, command)
    hooks = make_hooks(prep) if hooks is None else list(hooks)
    env.barrier()  # rank 0 has written the header before anyone trains
    t0 = time.perf_counter()
    final = train(model=prep.model, workload=prep.workload, settings=prep.settings,
                  schedule=prep.schedule, bitconfig=prep.bitconfig, device=prep.device,
                  run=run, hooks=hooks, resume=resume, progress=opts.progress,
                  label=f"{prep.space.name} {prep.bits_label}")
    wall = time.perf_counter() - t0
    result = final_record(prep, final, wall)
    if env.is_main:
        from coqat.export.qparams import write_qparams

        write_qparams(run, prep.model, prep.bitconfig)  # derived quantizer state for deployers
        result["resumed"] = resume
        run.write_json(FINAL, result)
    return run, result


def write_run_header(run: RunDir, prep: Prepared, command: str) -> None:
    cfg = {
        "command": command,
        "space_name": prep.space.name,
        "space_path": str(prep.space.path) if prep.space.path else None,
        "space": prep.space.raw,
        "space_sha256": prep.space.fingerprint(),
        "options": dataclasses.asdict(prep.options),
        "settings": dataclasses.asdict(prep.settings),
        "schedule": prep.schedule.describe(),
        "qat_plan": prep.qat_plan,
        "bits": prep.bits_label,
        "data": prep.data_info,
        "device": str(prep.device),
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


def final_record(prep: Prepared, final: dict[str, Any], wall: float) -> dict[str, Any]:
    wl = prep.workload
    fp32 = prep.cost.fp32_bops()
    bops = fp32 if prep.bitconfig is None else prep.cost.bops(prep.bitconfig)
    rec = {
        "metric_name": wl.metric,
        "metric": final.get(wl.metric),
        "higher_is_better": wl.higher_is_better,
        "bits": prep.bits_label,
        "bops": int(bops),
        "fp32_bops": int(fp32),
        "bops_fraction_of_fp32": bops / fp32,
        "steps": prep.schedule.total_steps,
        "seed": prep.options.seed,
        "space": prep.space.name,
        "workload": prep.space.workload_name,
        "schedule": prep.schedule.describe()["shape"],
        "qat_steps": prep.schedule.qat_steps,
        "wall_s": round(wall, 2),
        "eval": final,
    }
    if prep.bitconfig is not None and "budget_bops" in prep.bitconfig.meta:
        rec["budget_bops"] = int(prep.bitconfig.meta["budget_bops"])
    return rec


def run_train(space_ref: str | Path, options: TrainOptions) -> tuple[RunDir, dict]:
    return execute(prepare(space_ref, options))


def resume(path: str | Path, progress: bool = True) -> tuple[RunDir, dict]:
    """Continue an interrupted run from its last checkpoint (or say it already finished)."""
    run = RunDir.open(path)
    if run.finished:
        raise CoqatError(f"run {run.path} already finished; its results are in"
                         f" {run.file(FINAL)}")
    cfg = run.read_json(CONFIG)
    space = parse_space(cfg["space"], Path(cfg["space_path"]) if cfg.get("space_path") else None)
    opts = TrainOptions(**{**cfg["options"], "progress": progress})
    settings = TrainSettings(**cfg["settings"]).validate("config.json")
    space.train = settings
    opts.steps = opts.lr = opts.batch_size = opts.qat_fraction = None
    bitconfig = None if cfg["bits"] == "fp" else BitConfig.load(run.file(BITCONFIG))
    prep = prepare(space, opts, bitconfig=bitconfig)
    if run.load_checkpoint() is None:
        # killed before the first checkpoint: start over in the same directory
        return execute(prep, run=run, resume=False)
    return execute(prep, run=run, resume=True)
