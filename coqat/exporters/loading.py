"""Open a finished run directory for export / deploy, checking every file it needs.

A run is rebuilt from its own files only: ``config.json`` (the search space as parsed, so
the model is rebuilt with the same workload and sizes), ``bitconfig.json`` (validated
against the shipped schema), ``model.safetensors`` (loaded strictly) and, when present,
``qparams.safetensors`` (checked against the weights). Any mismatch is a one-line
CoqatError naming the file and the fix; nothing is written here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS, BitConfig
from coqat.config import run_config_from_json
from coqat.errors import CoqatError
from coqat.quant import quantize_model
from coqat.records import RunRecord
from coqat.exporters.qparams import QPARAMS, check_qparams
from coqat.rundir import BITCONFIG, CONFIG, FINAL, WEIGHTS, RunDir
from coqat.workloads import Workload, get_workload

__all__ = ["LoadedRun", "load_run", "layer_ops", "fresh_model"]


@dataclass
class LoadedRun:
    """A run rebuilt in memory: the QAT model (quantized layers, trained weights, eval mode)."""

    run: RunDir
    config: dict[str, Any]
    bitconfig: BitConfig
    workload: Workload
    model: nn.Module
    final: dict[str, Any] | None
    qparams_checked: bool
    notes: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def workload_name(self) -> str:
        return str(self.config.get("space", {}).get("workload", {}).get("name", "?"))

    def ops(self) -> dict[str, str]:
        return layer_ops(self.model, self.bitconfig)

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}


def fresh_model(workload: Workload) -> nn.Module:
    """A float model of the workload's architecture. Its initial values are overwritten by
    whatever is loaded next; the caller's RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return workload.build_model()


def layer_ops(model: nn.Module, bitconfig: BitConfig) -> dict[str, str]:
    """FQN -> "Linear" / "Conv2d" (or the module's class name) for every bitconfig layer."""
    ops = {}
    for name in bitconfig.layers:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        ops[name] = ("Conv2d" if isinstance(mod, nn.Conv2d) else
                     "Linear" if isinstance(mod, nn.Linear) else type(mod).__name__)
    return ops


def load_run(path: str | Path, check_qparams_file: bool = True) -> LoadedRun:
    """Rebuild a finished run's QAT model from its directory (see the module docstring)."""
    run = RunDir.open(path)
    for name, what in ((BITCONFIG, "the per-layer bits"), (WEIGHTS, "the trained weights")):
        if not run.has(name):
            raise CoqatError(f"{run.path / name} is missing ({what}); export needs a finished "
                             f"run: finish it with coqat train --resume {run.path}")
    cfg = run.read_json(CONFIG)
    config = run_config_from_json(cfg, str(run.file(CONFIG)))
    bitconfig = BitConfig.load(run.file(BITCONFIG))
    space, rt = config.space, config.runtime
    workload = get_workload(space.workload_name,
                            {k: v for k, v in space.workload.items() if k != "name"},
                            data_dir=rt.data_dir, seed=rt.seed)
    model = fresh_model(workload)
    _check_shapes(run, model, bitconfig)
    model = quantize_model(model, bitconfig, form="half", kernels="reference")
    state = run.load_weights()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CoqatError(f"{run.path / WEIGHTS} does not match the model of "
                         f"{run.path / CONFIG}: {first_problem(str(e))}; the checkpoint "
                         "comes from another model or space") from None
    model.eval()
    checked = False
    notes: list[str] = []
    if run.has(QPARAMS) and check_qparams_file:
        check_qparams(run.file(QPARAMS), model, bitconfig)
        checked = True
    elif bitconfig.quantized():
        notes.append(f"{QPARAMS} not found (older run): steps recomputed from the weights")
    final = RunRecord.read(run).to_dict() if run.has(FINAL) else None
    return LoadedRun(run, cfg, bitconfig, workload, model, final, checked, notes)


def _check_shapes(run: RunDir, model: nn.Module, bitconfig: BitConfig) -> None:
    """bitconfig.json's recorded weight shapes must be the model's (else: wrong pairing)."""
    costs = bitconfig.costs or {}
    for name, lb in bitconfig.layers.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CoqatError(f"{run.path / BITCONFIG} names layer {name!r}, which the run's "
                             "model does not have; the bitconfig belongs to another model") \
                from None
        shape = costs[name].weight_shape if name in costs else None
        w = getattr(mod, "weight", None)
        if shape and w is not None and tuple(w.shape) != tuple(shape):
            raise CoqatError(f"{run.path / BITCONFIG}: {name} has weight shape {list(shape)} but"
                             f" the model's is {list(w.shape)}; the bitconfig belongs to another"
                             " model")
        if lb.w_bits != FLOAT_BITS and w is None:
            raise CoqatError(f"{name} has no weight to quantize")


def first_problem(msg: str) -> str:
    """The first useful line of a load_state_dict error, shortened."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    body = [ln for ln in lines if not ln.startswith("Error(s) in loading")]
    text = body[0] if body else lines[0] if lines else msg
    return text[:300]
