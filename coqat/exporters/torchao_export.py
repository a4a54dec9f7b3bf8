"""torchao export: an ``FqnToConfig`` for the Linear layers, as JSON and as Python.

Files: ``fqn_to_config.json`` (torchao's own ``config_to_dict`` serialization, loadable
with ``torchao.core.config.config_from_dict``), ``fqn_to_config.py`` (a standalone module:
``build_config()``, ``quantize(model)`` and ``quantize_exact(model)``),
``coqat_scales.safetensors`` (coqat's per-channel steps of the RTN layers),
``bitconfig.json`` and ``export.json``.

What torchao reproduces (reference/export_formats.md section 3):

- RTN weights, activations in float (W*A16): exactly. ``quantize_exact`` runs torchao's
  QAT prepare with ``IntxFakeQuantizeConfig(range_learning=True)`` per layer, sets the
  learned scale to coqat's step (zero point 0), and converts with ``IntxWeightOnlyConfig``:
  torchao then stores coqat's codes (``IntxUnpackedToInt8Tensor``) and its output equals
  coqat's. Plain ``quantize(model)`` is post-training quantization: torchao recomputes its
  own scales (absmax / (2^(b-1) - 1/2) for SYMMETRIC), so its grid differs from coqat's.
- QuEST layers: torchao's intx configs have no Hadamard rotation and only integer zero
  points, so the rotated half-integer grid cannot be expressed. Refused, or with
  ``approx=True`` exported as torchao's own symmetric per-channel weight quantization of
  the master weights (stated per layer).
- 8-bit activations: ``Int8DynamicActivationIntxWeightConfig`` quantizes activations per
  token with torchao's rule, not coqat's. Refused, or an approximation with ``approx=True``.

Conv2d layers and activations below 8 bits are outside torchao's configs (the ``torchao``
target) and always refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


from coqat.bitconfig import FLOAT_BITS
from coqat.exporters.common import (ExportResult, default_out_dir, quiet_stderr, refuse, staged_dir,
                                 write_manifest)
from coqat.exporters.loading import LoadedRun
from coqat.exporters.qparams import as_quant_module, weight_codes
from coqat.targets import get_target

__all__ = ["export_torchao", "torchao_problems", "layer_configs", "python_source"]

CONFIG_JSON = "fqn_to_config.json"
CONFIG_PY = "fqn_to_config.py"
SCALES = "coqat_scales.safetensors"


def torchao_problems(loaded: LoadedRun, approx: bool) -> tuple[list[str], list[str], list[str]]:
    """(problems, approximations, exact RTN layers) of exporting the run to torchao."""
    cfg = loaded.bitconfig
    problems = get_target("torchao").violations(cfg, loaded.ops())
    approximations: list[str] = []
    exact: list[str] = []
    for fqn, lb in cfg.quantized().items():
        mod = as_quant_module(loaded.model.get_submodule(fqn), lb)
        layer_exact = True
        if lb.quantizer == "quest" and lb.w_bits != FLOAT_BITS:
            msg = (f"{fqn}: QuEST w{lb.w_bits} (Hadamard-rotated, half-integer grid) becomes "
                   "torchao's symmetric int grid of the un-rotated master weights")
            (approximations if approx else problems).append(msg)
            layer_exact = False
        elif lb.w_bits != FLOAT_BITS and (mod.w_block > 1 or mod.clip_ratio != 1.0):
            msg = f"{fqn}: RTN with a Hadamard rotation or clip_ratio is not a torchao config"
            (approximations if approx else problems).append(msg)
            layer_exact = False
        if lb.w_bits == FLOAT_BITS and lb.a_bits != FLOAT_BITS:
            problems.append(f"{fqn}: quantized activations with float weights (no torchao "
                            "config for that)")
            layer_exact = False
        if lb.a_bits == 8:
            msg = (f"{fqn}: 8-bit activations become torchao's dynamic per-token int8 rule "
                   f"(coqat: {lb.quantizer})")
            (approximations if approx else problems).append(msg)
            layer_exact = False
        if layer_exact and lb.w_bits != FLOAT_BITS:
            exact.append(fqn)
    return problems, approximations, exact


def layer_configs(loaded: LoadedRun) -> dict[str, tuple[str, int] | None]:
    """FQN -> (config kind, weight bits), None for layers left in float. Kinds:
    ``weight_only`` (IntxWeightOnlyConfig) and ``int8_act`` (Int8DynamicActivationIntx...)."""
    out: dict[str, tuple[str, int] | None] = {}
    for fqn, lb in loaded.bitconfig.layers.items():
        if lb.is_float or lb.w_bits == FLOAT_BITS:
            out[fqn] = None
        else:
            out[fqn] = ("int8_act" if lb.a_bits == 8 else "weight_only", lb.w_bits)
    return out


def _config_expr(entry: tuple[str, int] | None) -> str:
    if entry is None:
        return "None"
    kind, bits = entry
    if kind == "int8_act":
        return (f"Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int{bits}, "
                "weight_granularity=PerAxis(0), weight_mapping_type=MappingType.SYMMETRIC, "
                "act_mapping_type=MappingType.SYMMETRIC)")
    return (f"IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, granularity=PerAxis(0), "
            "mapping_type=MappingType.SYMMETRIC)")


_TEMPLATE = '''"""torchao quantization config exported by coqat.

Run: {run}
Exact (coqat's RTN grid, reproduced by quantize_exact): {n_exact} layer(s)
Approximations: {approx}

    import fqn_to_config
    model = ...  # the float model, with the run's trained weights loaded
    fqn_to_config.quantize_exact(model)   # or fqn_to_config.quantize(model): torchao's own scales
"""

from pathlib import Path

import torch
from torchao.quantization import (FqnToConfig, Int8DynamicActivationIntxWeightConfig,
                                  IntxWeightOnlyConfig, MappingType, PerAxis, quantize_)
from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

# layers whose coqat scales are in coqat_scales.safetensors: quantize_exact reproduces them
EXACT_LAYERS = {exact!r}


def build_config() -> FqnToConfig:
    """One entry per layer of the bit configuration; None leaves a layer in float."""
    return FqnToConfig({{
{entries}
    }})


def quantize(model: torch.nn.Module) -> torch.nn.Module:
    """Post-training quantization: torchao computes its own scales from the weights."""
    quantize_(model, build_config(), filter_fn=None)
    return model


def quantize_exact(model: torch.nn.Module, scales_path=None) -> torch.nn.Module:
    """coqat's RTN codes and scales through torchao's QAT prepare/convert, layer by layer;
    the other layers as in quantize()."""
    from safetensors.torch import load_file

    configs = build_config().fqn_to_config
    if EXACT_LAYERS:
        path = scales_path or Path(__file__).with_name("coqat_scales.safetensors")
        scales = load_file(str(path))
    for fqn in EXACT_LAYERS:
        base = configs[fqn]
        bits = int(str(base.weight_dtype).removeprefix("torch.int"))
        qmax = 2 ** (bits - 1) - 1
        step = scales[fqn + ".weight_scale"]
        module = model.get_submodule(fqn)
        with torch.no_grad():  # coqat's RTN values: round(w / step) in [-qmax, qmax], times step
            module.weight.copy_(torch.clamp(torch.round(module.weight / step), -qmax, qmax) * step)
        fake = IntxFakeQuantizeConfig(base.weight_dtype, granularity="per_channel",
                                      mapping_type=MappingType.SYMMETRIC, is_dynamic=False,
                                      range_learning=True)
        quantize_(model, QATConfig(weight_config=fake, step="prepare"),
                  filter_fn=lambda m, name, fqn=fqn: name == fqn)
        quantizer = model.get_submodule(fqn).weight_fake_quantizer
        quantizer.scale = torch.nn.Parameter(step.clone(), requires_grad=False)
        quantizer.zero_point = torch.nn.Parameter(
            torch.zeros_like(step, dtype=torch.int32), requires_grad=False)
        quantize_(model, QATConfig(base_config=base, step="convert"),
                  filter_fn=lambda m, name, fqn=fqn: name == fqn)
    rest = {{k: v for k, v in configs.items() if k not in EXACT_LAYERS}}
    if any(v is not None for v in rest.values()):
        quantize_(model, FqnToConfig(rest), filter_fn=None)
    return model
'''


def python_source(loaded: LoadedRun, exact: list[str], approximations: list[str]) -> str:
    """The standalone ``fqn_to_config.py`` (see the module docstring)."""
    entries = "\n".join(f"        {fqn!r}: {_config_expr(e)},"
                        for fqn, e in layer_configs(loaded).items())
    return _TEMPLATE.format(run=loaded.path, n_exact=len(exact),
                            approx="; ".join(approximations) or "none",
                            exact=exact, entries=entries)


def export_torchao(loaded: LoadedRun, out: str | Path | None = None,
                   approx: bool = False) -> ExportResult:
    """Write the torchao FqnToConfig (JSON + Python) and coqat's RTN scales."""
    from safetensors.torch import save_file

    problems, approximations, exact = torchao_problems(loaded, approx)
    refuse("torchao", problems, "train RTN layers with activations at 8 or 16 bits "
           "(--quantizer rtn), or pass --approx where torchao's own numerics may be used")
    source = python_source(loaded, exact, approximations)
    namespace: dict[str, Any] = {"__file__": "fqn_to_config.py", "__name__": "coqat_torchao"}
    with quiet_stderr():  # torchao logs about optional CUDA extensions on import
        exec(compile(source, CONFIG_PY, "exec"), namespace)  # the file we ship must build
        from torchao.core.config import config_to_dict

        cfg_json = config_to_dict(namespace["build_config"]())
    scales = {}
    for fqn in exact:
        m = as_quant_module(loaded.model.get_submodule(fqn), loaded.bitconfig.layers[fqn])
        scales[f"{fqn}.weight_scale"] = weight_codes(m, fqn).step.reshape(-1, 1).contiguous()
    out = Path(out) if out else default_out_dir(loaded.path, "torchao")
    notes = ["fqn_to_config.py: quantize_exact(model) reproduces coqat's RTN layers through "
             "torchao QAT prepare/convert with coqat's scales; quantize(model) is torchao PTQ "
             "(its own scales)"]
    result = ExportResult("torchao", str(out), str(loaded.path), exact=not approximations,
                          approximations=approximations, notes=notes,
                          details={"exact_layers": len(exact),
                                   "layers": len(loaded.bitconfig.quantized())})
    with staged_dir(out) as tmp:
        (tmp / CONFIG_JSON).write_text(json.dumps(cfg_json, indent=2) + "\n")
        (tmp / CONFIG_PY).write_text(source)
        if scales:
            save_file(scales, str(tmp / SCALES))
        shutil.copyfile(loaded.run.file("bitconfig.json"), tmp / "bitconfig.json")
        write_manifest(tmp, result)
    return result
