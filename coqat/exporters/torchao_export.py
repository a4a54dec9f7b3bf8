"""torchao export: an ``FqnToConfig`` for the Linear layers, plus coqat's codes and scales.

Files: ``fqn_to_config.json`` (torchao's own ``config_to_dict`` serialization, loadable with
``torchao.core.config.config_from_dict``), ``coqat_weights.safetensors`` (per quantized
layer ``<fqn>.weight_codes`` int8 and ``<fqn>.weight_scale`` float32 (N, 1)),
``fqn_to_config.py`` (a fixed module, the same for every export: it reads the two files
next to it; nothing of the run, not even a path or a layer name, is pasted into its
source), ``bitconfig.json`` and ``export.json``. Every export is checked by running the
shipped ``quantize_exact`` on the float model and evaluating it next to coqat's QAT model
(``details['check']``).

    import fqn_to_config
    model = ...                          # the float model, e.g. with the run's weights
    fqn_to_config.quantize_exact(model)  # coqat's codes and scales in torchao tensors
    # or fqn_to_config.quantize(model)   # torchao's own post-training scales

What torchao reproduces (reference/export_formats.md section 3):

- RTN weights without rotation, float activations (W*A16): exactly, at any width 2..8.
  ``quantize_exact`` sets each layer's weight to ``codes * scale`` and runs torchao's QAT
  prepare (``IntxFakeQuantizeConfig(range_learning=True)``) with coqat's scale and a zero
  zero point, then converts with ``IntxWeightOnlyConfig``: torchao stores coqat's codes
  (``IntxUnpackedToInt8Tensor``) and its output equals coqat's.
- Refused unless ``approx=True``, then listed per layer with the measured metric gap:
  QuEST (and rotated RTN) weights, which torchao cannot rotate, are rotated back and
  re-rounded (``coqat.exporters.regrid``); quantized activations become torchao's int8
  dynamic per-token rule (``Int8DynamicActivationIntxWeightConfig``: asymmetric, the only
  mapping it takes), not coqat's symmetric one; float weights with quantized activations
  stay float.
- Always refused: quantized layers that are not nn.Linear.
"""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS
from coqat.exporters.common import (ExportResult, layer_approximations, layer_problems,
                                 quiet_stderr, refuse, require, staged_dir, write_manifest)
from coqat.exporters.regrid import GridWeight, exact_grid, grid_weight
from coqat.exporters.source import ExportSource, check_in_consumer, check_note

__all__ = ["export_torchao", "torchao_plan", "torchao_problems", "build_fqn_to_config",
           "PYTHON_SOURCE"]

FORMAT = "torchao"
CONFIG_JSON = "fqn_to_config.json"
CONFIG_PY = "fqn_to_config.py"
WEIGHTS = "coqat_weights.safetensors"
CONSUMER = "torchao (fqn_to_config.quantize_exact)"

# The shipped module. A constant: the run's data reaches it only through the JSON and
# safetensors files it reads, so no run path or layer name can inject code.
PYTHON_SOURCE = '''"""torchao quantization config exported by coqat; export.json next to this file
says which run it comes from, which layers are exact and what was approximated.

    import fqn_to_config
    model = ...                           # the float model, with the run's trained weights
    fqn_to_config.quantize_exact(model)   # coqat's codes and scales in torchao tensors
    fqn_to_config.quantize(model)         # or torchao's own post-training scales
"""

import json
from pathlib import Path

import torch
from torchao.core.config import config_from_dict
from torchao.quantization import FqnToConfig, MappingType, quantize_
from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

HERE = Path(__file__).resolve().parent


def build_config() -> FqnToConfig:
    """One entry per layer of the bit configuration; None leaves a layer in float."""
    return config_from_dict(json.loads((HERE / "fqn_to_config.json").read_text()))


def quantize(model: torch.nn.Module) -> torch.nn.Module:
    """Post-training quantization: torchao computes its own scales from the weights."""
    quantize_(model, build_config(), filter_fn=None)
    return model


def quantize_exact(model: torch.nn.Module, weights_path=None) -> torch.nn.Module:
    """Each quantized layer gets coqat's codes and scale through torchao's QAT
    prepare/convert (range learning carries the scale; the zero point is 0)."""
    from safetensors.torch import load_file

    weights = load_file(str(weights_path or HERE / "coqat_weights.safetensors"))
    for fqn, base in build_config().fqn_to_config.items():
        if base is None:
            continue
        codes, scale = weights[fqn + ".weight_codes"], weights[fqn + ".weight_scale"]
        module = model.get_submodule(fqn)
        with torch.no_grad():
            module.weight.copy_(codes.to(torch.float32) * scale)
        fake = IntxFakeQuantizeConfig(base.weight_dtype, granularity="per_channel",
                                      mapping_type=MappingType.SYMMETRIC, is_dynamic=False,
                                      range_learning=True)
        only = lambda m, name, fqn=fqn: name == fqn  # noqa: E731
        quantize_(model, QATConfig(weight_config=fake, step="prepare"), filter_fn=only)
        quantizer = model.get_submodule(fqn).weight_fake_quantizer
        quantizer.scale = torch.nn.Parameter(scale.clone(), requires_grad=False)
        quantizer.zero_point = torch.nn.Parameter(torch.zeros_like(scale, dtype=torch.int32),
                                                  requires_grad=False)
        quantize_(model, QATConfig(base_config=base, step="convert"), filter_fn=only)
    return model
'''


def torchao_plan(source: ExportSource
                 ) -> tuple[dict[str, tuple[str, int] | None], list[str], dict[str, list[str]]]:
    """(FQN -> (kind, weight bits) or None for float, hard problems, per-layer reasons).

    Kinds: ``weight_only`` (IntxWeightOnlyConfig), ``int8_act``
    (Int8DynamicActivationIntxWeightConfig). Hard problems refuse even with ``approx``; a
    layer's reasons are the changes an approximate export makes to it.
    """
    cfg = source.bitconfig
    ops = source.ops()
    hard = [f"layer {fqn} is a {ops.get(fqn, '?')} (torchao's intx configs here cover "
            "Linear layers)" for fqn in cfg.quantized() if ops.get(fqn) != "Linear"]
    if hard:
        return {}, hard, {}
    entries: dict[str, tuple[str, int] | None] = OrderedDict()
    reasons: dict[str, list[str]] = OrderedDict()
    for fqn, lb in cfg.layers.items():
        why = reasons.setdefault(fqn, [])
        if lb.is_float:
            entries[fqn] = None
            continue
        if lb.w_bits == FLOAT_BITS:
            why.append(f"float weights with {lb.a_bits}-bit activations (no torchao config; "
                       "kept float)")
            entries[fqn] = None
            continue
        if not exact_grid(source.model.get_submodule(fqn), lb):
            why.append(f"{lb.quantizer} weights are Hadamard-rotated; torchao has no rotation "
                       "(rotated back, re-rounded)")
        if lb.a_bits != FLOAT_BITS:
            why.append(f"{lb.a_bits}-bit {lb.quantizer} activations become torchao's "
                       "asymmetric int8 per token")
        entries[fqn] = ("int8_act" if lb.a_bits != FLOAT_BITS else "weight_only", lb.w_bits)
    return entries, [], reasons


def torchao_problems(source: ExportSource, approx: bool = False) -> list[str]:
    """Every reason the export is refused (empty: it can be written)."""
    _, hard, reasons = torchao_plan(source)
    return layer_problems(hard, reasons, approx)


def build_fqn_to_config(entries: dict[str, tuple[str, int] | None]):
    """The torchao ``FqnToConfig`` for ``torchao_plan``'s entries (built here, not by
    executing generated source)."""
    from torchao.quantization import (FqnToConfig, Int8DynamicActivationIntxWeightConfig,
                                      IntxWeightOnlyConfig, MappingType, PerAxis)

    def one(entry):
        if entry is None:
            return None
        kind, bits = entry
        dtype = getattr(torch, f"int{bits}")
        if kind == "int8_act":
            return Int8DynamicActivationIntxWeightConfig(
                weight_dtype=dtype, weight_granularity=PerAxis(0),
                weight_mapping_type=MappingType.SYMMETRIC,
                act_mapping_type=MappingType.ASYMMETRIC)
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0),
                                    mapping_type=MappingType.SYMMETRIC)

    return FqnToConfig({fqn: one(e) for fqn, e in entries.items()})


def _load_shipped(tmp: Path):
    """Import the written fqn_to_config.py as a user would (a fixed, coqat-authored file)."""
    spec = importlib.util.spec_from_file_location("coqat_fqn_to_config", tmp / CONFIG_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_torchao(source: ExportSource, out: str | Path | None = None,
                   approx: bool = False, check_batches: int = 2) -> ExportResult:
    """Write the torchao FqnToConfig, coqat's codes and scales, and the loader module."""
    require(FORMAT, "torchao", "safetensors")
    from safetensors.torch import save_file

    entries, hard, reasons = torchao_plan(source)
    refuse(FORMAT, layer_problems(hard, reasons, approx), "train RTN with float activations "
           "(--quantizer rtn), or pass --approx (it measures the metric gap)", source.explain)
    grids: dict[str, GridWeight] = {}
    for fqn, entry in entries.items():
        if entry is not None:
            grids[fqn] = grid_weight(source.model.get_submodule(fqn),
                                     source.bitconfig.layers[fqn], entry[1], fqn)
    approximations = layer_approximations(
        reasons, {f: g.rel_error for f, g in grids.items() if not g.exact})
    with quiet_stderr():  # torchao logs about optional CUDA extensions on import
        from torchao.core.config import config_to_dict

        cfg_json = config_to_dict(build_fqn_to_config(entries))
    weights = {}
    for fqn, g in grids.items():
        weights[f"{fqn}.weight_codes"] = g.codes.contiguous()
        weights[f"{fqn}.weight_scale"] = g.scale.contiguous()
    out = source.out_dir(out, FORMAT)
    exact = not approximations
    notes = ["fqn_to_config.py: quantize_exact(model) loads coqat's codes and scales "
             "(coqat_weights.safetensors) into torchao tensors through QAT prepare/convert; "
             "quantize(model) is torchao PTQ with its own scales"]
    result = ExportResult(FORMAT, str(out), source.label, exact=exact,
                          approximations=approximations, notes=notes,
                          details={"quantized_layers": len(grids),
                                   "exact_layers": sum(g.exact for g in grids.values())})
    with staged_dir(out) as tmp:
        (tmp / CONFIG_JSON).write_text(json.dumps(cfg_json, indent=2) + "\n")
        (tmp / CONFIG_PY).write_text(PYTHON_SOURCE)
        if weights:
            save_file(weights, str(tmp / WEIGHTS))
        (tmp / "bitconfig.json").write_text(source.bitconfig_json())

        def build() -> nn.Module:
            model = source.build_float()
            model.load_state_dict(source.float_state_dict(), strict=True)
            with quiet_stderr():
                return _load_shipped(tmp).quantize_exact(model.eval())

        check = check_in_consumer(source, CONSUMER, build, check_batches, exact)
        result.details["check"] = check
        result.notes.append(check_note(check))
        write_manifest(tmp, result)
    return result
