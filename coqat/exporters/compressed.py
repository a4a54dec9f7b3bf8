"""compressed-tensors export (vLLM, LLM Compressor, transformers) of causal LMs.

Writes a Hugging Face model folder that ``AutoModelForCausalLM.from_pretrained(dir)`` loads
with transformers' compressed-tensors integration: ``config.json`` (the model's config, or
LlamaForCausalLM fields for coqat's built-in ``lm``, plus ``quantization_config``),
``model.safetensors`` (packed by the compressed-tensors library itself: ``weight_packed`` /
``weight`` int codes, ``weight_scale`` per output channel), the tokenizer files of an HF
source folder, ``bitconfig.json`` and ``export.json``. One config group per distinct scheme,
targets by exact module name, float layers in ``ignore``. Every export is loaded back with
transformers and evaluated next to coqat's QAT model (``details['check']``).

What the loader runs (transformers 5.25 + compressed-tensors 0.20, read and run here):
weights are decompressed to ``code * scale``; int8 input activations are fake-quantized per
token with scale absmax / 127.5 on [-128, 127]; a ``transform_config`` (Hadamard
rotations) is ignored. So coqat's layers map as follows:

- RTN weights without rotation, 4 or 8 bits: coqat's codes and steps, exact.
- RTN 8-bit activations: int8, dynamic, per token, symmetric. The format holds coqat's
  scheme; vLLM's kernel uses absmax / 127 like coqat (its source; vLLM is not installable
  here, so not run), transformers absmax / 127.5. The export is then marked inexact and
  the measured transformers gap is in the notes.
- Everything else changes the model and is refused unless ``approx=True``, then listed
  per layer: QuEST (rotation + half-integer grid) and rotated RTN weights are rotated back
  and re-rounded onto the integer grid (``coqat.exporters.regrid``); 2/3/5/6-bit weights are
  stored at the next width vLLM serves (RTN codes unchanged); fused shards (q/k/v,
  gate/up) with different widths are stored at the widest; 4/6-bit activations become
  int8; float weights with quantized activations stay float.

Always refused: a model that is not a Hugging Face style causal LM, quantized layers that
are not nn.Linear, a quantized lm_head tied to the embedding.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS, LayerBits
from coqat.exporters.common import (ExportResult, layer_approximations, layer_problems,
                                 quiet_stderr, refuse, require, staged_dir, write_manifest)
from coqat.exporters.regrid import GridWeight, exact_grid, grid_weight
from coqat.exporters.source import HF_SIDE_FILES, ExportSource, check_in_consumer, check_note

__all__ = ["export_compressed_tensors", "compressed_plan", "compressed_problems",
           "decompress_checkpoint", "load_with_transformers", "VLLM_WIDTHS"]

FORMAT = "compressed-tensors"
VLLM_WIDTHS = (4, 8)   # vLLM's integer weight kernels
CONSUMER = "transformers (AutoModelForCausalLM) + compressed-tensors"


@dataclass
class LayerPlan:
    """How one bitconfig layer is stored: ``store_bits`` None = float weights (ignored)."""

    fqn: str
    lb: LayerBits
    store_bits: int | None
    int8_act: bool
    grid: GridWeight | None = None


def _store_width(bits: int) -> int:
    return min(w for w in VLLM_WIDTHS if w >= bits)


def compressed_plan(source: ExportSource
                    ) -> tuple[list[LayerPlan], list[str], dict[str, list[str]]]:
    """(plans, hard problems, per-layer reasons): hard problems refuse the export even with
    ``approx``; a layer's reasons are the changes an approximate export makes to it."""
    cfg = source.bitconfig
    hard: list[str] = []
    if source.hf_config is None:
        hard.append(f"the model (workload {source.workload_name}) is not a Hugging Face "
                    "style causal LM (built-in 'lm' or an HF model)")
    ops = source.ops()
    for fqn, lb in cfg.quantized().items():
        if ops.get(fqn) != "Linear":
            hard.append(f"layer {fqn} is a {ops.get(fqn, '?')} (only Linear layers are "
                        "quantized in this format)")
    tied = (source.hf_config or {}).get("tie_word_embeddings")
    head = cfg.layers.get("lm_head")
    if tied and head is not None and not head.is_float:
        hard.append("lm_head is tied to the embedding and cannot be quantized on its own; "
                    "keep it in float")
    if hard:
        return [], hard, {}
    plans: dict[str, LayerPlan] = OrderedDict()
    reasons: dict[str, list[str]] = OrderedDict()
    for fqn, lb in cfg.layers.items():
        why = reasons.setdefault(fqn, [])
        if lb.is_float:
            plans[fqn] = LayerPlan(fqn, lb, None, False)
            continue
        if lb.w_bits == FLOAT_BITS:
            why.append(f"float weights with {lb.a_bits}-bit activations (no such scheme; "
                       "kept float)")
            plans[fqn] = LayerPlan(fqn, lb, None, False)
            continue
        store = _store_width(lb.w_bits)
        if not exact_grid(source.model.get_submodule(fqn), lb):
            why.append(f"{lb.quantizer} weights are Hadamard-rotated; transformers' loader "
                       "ignores rotations (rotated back, re-rounded)")
        elif store != lb.w_bits:
            why.append(f"{lb.w_bits}-bit weights (vLLM serves 4, 8; stored as int{store}, "
                       "codes unchanged)")
        if lb.a_bits not in (8, FLOAT_BITS):
            why.append(f"{lb.a_bits}-bit activations (vLLM serves 8, 16; stored as int8)")
        elif lb.a_bits == 8 and lb.quantizer != "rtn":
            why.append("QuEST 8-bit activations (RMS clip, rotation) become int8 absmax per "
                       "token")
        plans[fqn] = LayerPlan(fqn, lb, store, lb.a_bits != FLOAT_BITS)
    for group in cfg.tie_groups:
        members = [plans[n] for n in group if n in plans and plans[n].store_bits is not None]
        widest = max((p.store_bits for p in members), default=None)
        for p in members:
            if p.store_bits != widest:
                others = ", ".join(q.fqn.rsplit(".", 1)[-1] for q in members if q is not p)
                reasons[p.fqn].append(f"fused with {others} at int{widest} (vLLM fuses "
                                      "these shards; stored wider)")
                p.store_bits = widest
    return list(plans.values()), [], reasons


def compressed_problems(source: ExportSource, approx: bool = False) -> list[str]:
    """Every reason the export is refused (empty: it can be written)."""
    _, hard, reasons = compressed_plan(source)
    return layer_problems(hard, reasons, approx)


def _configs(plans: list[LayerPlan]):
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme)

    groups: "OrderedDict[tuple, list[str]]" = OrderedDict()
    for p in plans:
        if p.store_bits is not None:
            groups.setdefault((p.store_bits, p.int8_act), []).append(p.fqn)
    config_groups = {}
    formats = set()
    for i, ((bits, int8_act), targets) in enumerate(groups.items()):
        act = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                               dynamic=True) if int8_act else None
        fmt = "int-quantized" if (int8_act and bits == 8) else "pack-quantized"
        formats.add(fmt)
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, format=fmt, input_activations=act,
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                                     strategy="channel"))
    ignore = [p.fqn for p in plans if p.store_bits is None]
    return QuantizationConfig(config_groups=config_groups, ignore=ignore,
                              format=formats.pop() if len(formats) == 1 else "mixed-precision",
                              quantization_status="compressed")


def _compress(source: ExportSource, plans: list[LayerPlan], qcfg) -> dict[str, torch.Tensor]:
    """Pack with compressed-tensors: each layer's weight set to its grid values and its
    scale to ours, so the library's own quantize() lands on our codes."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    model = source.build_float()
    model.load_state_dict(source.float_state_dict(), strict=True)
    with quiet_stderr():
        apply_quantization_config(model, qcfg, show_progress=False)
        for p in plans:
            if p.grid is None:
                continue
            mod = model.get_submodule(p.fqn)
            with torch.no_grad():
                mod.weight.copy_(p.grid.values())
                mod.weight_scale.copy_(p.grid.scale)
        ModelCompressor(quantization_config=qcfg).compress_model(model)
    if hasattr(model, "ct_decompress_hook"):
        model.ct_decompress_hook.remove()
        delattr(model, "ct_decompress_hook")
    state = model.state_dict()
    tied = _tied_keys(state)
    return {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in tied}


def _tied_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensor shares storage with an earlier key (an HF lm_head tied to the
    embedding): stored once, as save_pretrained does; the loader ties them again."""
    seen: set[int] = set()
    tied = set()
    for k, v in state.items():
        if v.numel() and v.data_ptr() in seen:
            tied.add(k)
        seen.add(v.data_ptr())
    return tied


def decompress_checkpoint(out_dir: str | Path, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """Load an exported folder with compressed-tensors and decompress it into ``skeleton``
    (a float model of the architecture). Used by the export's self-check and by tests."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    doc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    qdoc = {k: v for k, v in doc.items()
            if k not in ("version", "quant_method", "sparsity_config", "transform_config")}
    qcfg = QuantizationConfig.model_validate(qdoc)
    with quiet_stderr():
        apply_quantization_config(skeleton, qcfg, show_progress=False)
        mc = ModelCompressor(quantization_config=qcfg)
        mc.compress_model(skeleton)
        tied = _tied_keys(skeleton.state_dict())
        missing, unexpected = skeleton.load_state_dict(
            load_file(str(out_dir / "model.safetensors")), strict=False)
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"{out_dir} does not fit the model: missing "
                               f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
        mc.decompress_model(skeleton)
    return {k: v.detach() for k, v in skeleton.state_dict().items()}


def load_with_transformers(out_dir: str | Path) -> nn.Module:
    """The export as a user loads it: ``AutoModelForCausalLM.from_pretrained`` (float32)."""
    from transformers import AutoModelForCausalLM

    with quiet_stderr():
        return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()


def export_compressed_tensors(source: ExportSource, out: str | Path | None = None,
                              approx: bool = False, check_batches: int = 2) -> ExportResult:
    """Write the compressed-tensors folder of a causal LM (see the module docstring)."""
    require(FORMAT, "compressed_tensors", "transformers", "safetensors")
    from safetensors.torch import save_file

    plans, hard, reasons = compressed_plan(source)
    fix = "use --quantizer rtn --target vllm, or pass --approx (it measures the metric gap)"
    if source.hf_config is None:
        fix = "use --format onnx, or export a Hugging Face style causal LM"
    refuse(FORMAT, layer_problems(hard, reasons, approx), fix, source.explain)
    with quiet_stderr():  # importing it pulls in transformers / torchao, which log
        import compressed_tensors
    for p in plans:
        if p.store_bits is not None:
            p.grid = grid_weight(source.model.get_submodule(p.fqn), p.lb, p.store_bits, p.fqn)
    approximations = layer_approximations(
        reasons, {p.fqn: p.grid.rel_error for p in plans if p.grid and not p.grid.exact})
    qcfg = _configs(plans)
    tensors = _compress(source, plans, qcfg)
    cfg = dict(source.hf_config or {})
    cfg["quantization_config"] = {
        "version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
        **qcfg.model_dump(mode="json", exclude={"quant_method"})}
    out = source.out_dir(out, FORMAT)
    int8 = [p.fqn for p in plans if p.int8_act]
    notes = ["weights per output channel, symmetric int (code * scale); float layers in "
             "'ignore'"]
    if source.hf_dir is None and source.workload_name == "lm":
        notes.append("vocabulary = raw bytes 0..255 (no tokenizer files)")
    if int8:
        notes.append(f"{len(int8)} layer(s) with int8 activations, dynamic per token: vLLM "
                     "scales by absmax/127 as coqat (its kernel source; not run here), "
                     "transformers by absmax/127.5, so the transformers check is not exact")
    result = ExportResult(FORMAT, str(out), source.label,
                          exact=not approximations and not int8,
                          approximations=approximations, notes=notes,
                          details={"format": qcfg.format, "groups": len(qcfg.config_groups),
                                   "store_bits": {p.fqn: p.store_bits for p in plans
                                                  if p.store_bits is not None}})
    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "bitconfig.json").write_text(source.bitconfig_json())
        for name in HF_SIDE_FILES:
            if source.hf_dir is not None and (source.hf_dir / name).is_file():
                shutil.copyfile(source.hf_dir / name, tmp / name)
        _self_check(source, tmp, plans)
        check = check_in_consumer(source, CONSUMER, lambda: load_with_transformers(tmp),
                                  check_batches, result.exact)
        result.details["check"] = check
        result.notes.append(check_note(check))
        write_manifest(tmp, result)
    return result


def _self_check(source: ExportSource, tmp: Path, plans: list[LayerPlan]) -> None:
    """Decompress what was written and compare with what was meant: a failure is a bug."""
    got = decompress_checkpoint(tmp, source.build_float())
    for p in plans:
        if p.grid is not None and not torch.equal(got[f"{p.fqn}.weight"], p.grid.values()):
            raise RuntimeError(f"compressed-tensors round trip changed {p.fqn}")
