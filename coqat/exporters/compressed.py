"""compressed-tensors export (vLLM / LLM Compressor) for Llama-style runs.

Writes a Hugging Face style directory: ``config.json`` (LlamaConfig fields plus
``quantization_config``), ``model.safetensors`` (packed with the compressed-tensors
library itself: ``weight_packed`` int32, ``weight_scale``, ``weight_shape`` per layer),
``bitconfig.json`` and ``export.json``. One config group per distinct scheme, targets by
exact module name, float layers in ``ignore``. Facts: reference/export_formats.md section 2.

What vLLM cannot serve is refused, listing every violation (the ``vllm`` target of
``coqat.targets``): weights other than 4 or 8 bits, activations other than 8 or 16,
q/k/v or gate/up with different schemes (weights, activations or quantizer), Conv layers,
non-Llama workloads.

How coqat's quantizers map (``exact`` unless stated):

- RTN weights: symmetric int, per channel, ``code * scale``: exactly coqat's grid.
- RTN 8-bit activations: int8, dynamic, per token, symmetric (absmax / 127): coqat's rule,
  up to its 1e-12 scale epsilon.
- QuEST's Hadamard rotation: a ``transform_config`` (compressed-tensors 0.20 "hadamard"
  transform, block = ``head_dim``): weights are stored already rotated (``weight_input``,
  offline) and vLLM rotates the input online (``input``). Mathematically exact; vLLM runs
  the online rotation in float32, not coqat's float64 reference.
- QuEST's half-integer weight grid ``(code + 1/2) * step`` has no integer zero point, so
  an integer scheme cannot hold it at b bits. Default (exact): odd codes ``2*code + 1`` at
  scale ``step / 2``, which needs b + 1 bits and is stored at the next width vLLM serves
  (4-bit QuEST -> 8-bit storage; 8-bit QuEST would need 9 bits and is refused). With
  ``approx=True``: kept at b bits by re-rounding the QuEST values onto the symmetric
  integer grid (absmax / (2^(b-1) - 1)); the relative weight error is reported per layer.
- QuEST 8-bit activations (RMS clip, half-integer grid): vLLM quantizes per token with
  absmax / 127 instead. Refused unless ``approx=True``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS, LayerBits
from coqat.exporters.common import (ExportResult, default_out_dir, quiet_stderr, refuse, staged_dir,
                                 write_manifest)
from coqat.exporters.loading import LoadedRun, fresh_model
from coqat.exporters.qparams import as_quant_module, weight_codes
from coqat.quant.hadamard import sylvester_matrix
from coqat.quant.quantizers import dequantize
from coqat.targets import get_target

__all__ = ["export_compressed_tensors", "compressed_problems", "plan_layers", "hf_config",
           "decompress_checkpoint"]

VLLM_WIDTHS = (4, 8)
_TRANSFORM_KEY = re.compile(r"\.hadamard_\d+_input\.weight$")


def _scheme_key(lb: LayerBits) -> tuple:
    return (lb.w_bits, lb.a_bits, lb.quantizer)


def compressed_problems(loaded: LoadedRun, approx: bool) -> tuple[list[str], list[str]]:
    """(problems that refuse the export, approximations it would make)."""
    cfg = loaded.bitconfig
    problems: list[str] = []
    approximations: list[str] = []
    if loaded.workload_name != "lm":
        problems.append(f"the run's workload is {loaded.workload_name!r}, and this format is for "
                        "Llama-style language models (workload 'lm'); use --format onnx")
    problems += get_target("vllm").violations(cfg, loaded.ops())
    for group in cfg.tie_groups:
        present = [n for n in group if n in cfg.layers]
        if len({cfg.layers[n].quantizer for n in present
                if not cfg.layers[n].is_float}) > 1:
            problems.append(f"tie group ({', '.join(present)}) mixes quantizers; vLLM fuses "
                            "these layers and needs one scheme")
    for fqn, lb in cfg.quantized().items():
        if lb.quantizer != "quest":
            continue
        mod = loaded.model.get_submodule(fqn)
        if getattr(mod, "bias", None) is not None:
            problems.append(f"{fqn}: a bias with an online Hadamard transform (vLLM asserts "
                            "no bias)")
        if lb.w_bits in VLLM_WIDTHS and lb.w_bits + 1 > max(VLLM_WIDTHS):
            msg = (f"{fqn}: QuEST {lb.w_bits}-bit weights need {lb.w_bits + 1}-bit odd codes "
                   "to be exact (vLLM serves 4 and 8)")
            (approximations if approx else problems).append(msg)
        if lb.a_bits == 8:
            msg = (f"{fqn}: QuEST 8-bit activations (RMS clip, half-integer grid) become "
                   "vLLM's int8 absmax/127 per-token grid")
            (approximations if approx else problems).append(msg)
    return problems, approximations


def plan_layers(loaded: LoadedRun, approx: bool) -> dict[str, dict[str, Any]]:
    """Per quantized layer: stored bits, codes, scale (N, 1), the values they decode to.

    ``exact``: decode equals coqat's ``dequantize(codes, step)`` bit for bit.
    """
    plans: dict[str, dict[str, Any]] = {}
    for fqn, lb in loaded.bitconfig.quantized().items():
        m = as_quant_module(loaded.model.get_submodule(fqn), lb)
        lc = weight_codes(m, fqn)
        # coqat's integer-kernel form of the weights, (c + 1/2) * step or c * step
        reference = dequantize(lc.codes, lc.step.reshape(-1, 1), lc.method)
        plan: dict[str, Any] = {"bits": lb.w_bits, "a_bits": lb.a_bits, "method": lc.method,
                                "block": m.w_block, "reference": reference}
        if lc.method == "rtn":
            plan.update(store_bits=lb.w_bits, codes=lc.codes, scale=lc.step.reshape(-1, 1),
                        exact=True)
        elif not approx:  # exact: odd codes 2c+1 at step/2 need one more bit
            # (compressed_problems refused the widths with no room for it)
            store = min(w for w in VLLM_WIDTHS if w >= lb.w_bits + 1)
            plan.update(store_bits=store, codes=(2 * lc.codes.to(torch.int16) + 1).to(torch.int8),
                        scale=(lc.step / 2.0).reshape(-1, 1), exact=True)
        else:  # approx: QuEST values re-rounded onto the b-bit symmetric integer grid
            qmax = 2 ** (lb.w_bits - 1) - 1
            scale = reference.abs().amax(dim=1, keepdim=True) / qmax
            codes = torch.clamp(torch.round(reference / scale), -qmax, qmax)
            err = float(torch.linalg.vector_norm(codes * scale - reference)
                        / torch.linalg.vector_norm(reference).clamp_min(1e-30))
            plan.update(store_bits=lb.w_bits, codes=codes.to(torch.int8), scale=scale,
                        exact=False, rel_error=err)
        plans[fqn] = plan
    return plans


def hf_config(loaded: LoadedRun) -> dict[str, Any]:
    """LlamaForCausalLM config fields for coqat's byte-level Llama (no tokenizer: ids are
    raw bytes 0..255)."""
    c = loaded.workload.config
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "intermediate_size": c.ffn_hidden, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": None,
    }


def _configs(loaded: LoadedRun, plans: dict[str, dict[str, Any]]):
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme)
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    groups: "OrderedDict[tuple, list[str]]" = OrderedDict()
    for fqn, p in plans.items():
        groups.setdefault((p["store_bits"], p["a_bits"]), []).append(fqn)
    config_groups = {}
    formats = set()
    for i, ((bits, a_bits), targets) in enumerate(groups.items()):
        act = None if a_bits == FLOAT_BITS else QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        fmt = "int-quantized" if (act is not None and bits == 8) else "pack-quantized"
        formats.add(fmt)
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, format=fmt, input_activations=act,
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                                     strategy="channel"))
    ignore = [n for n, lb in loaded.bitconfig.layers.items() if lb.is_float]
    qcfg = QuantizationConfig(config_groups=config_groups, ignore=ignore,
                              format=formats.pop() if len(formats) == 1 else "mixed-precision",
                              quantization_status="compressed")
    blocks: "OrderedDict[int, list[str]]" = OrderedDict()
    for fqn, p in plans.items():
        if p["block"] > 1:
            blocks.setdefault(p["block"], []).append(fqn)
    tcfg = None
    if blocks:
        tcfg = TransformConfig(config_groups={
            f"hadamard_{b}": TransformScheme(type="hadamard", head_dim=b, apply=[
                TransformArgs(targets=t, location="input"),
                TransformArgs(targets=t, location="weight_input", inverse=True)])
            for b, t in blocks.items()})
    return qcfg, tcfg


def _compress(loaded: LoadedRun, plans, qcfg, tcfg) -> dict[str, torch.Tensor]:
    """Pack with compressed-tensors: each layer's weight set to its decoded values and its
    scale to ours, so the library's own quantize() lands on our codes."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    model = fresh_model(loaded.workload)
    model.load_state_dict(loaded.float_state_dict(), strict=True)
    with quiet_stderr():
        apply_quantization_config(model, qcfg, show_progress=False)
        for fqn, p in plans.items():
            mod = model.get_submodule(fqn)
            with torch.no_grad():
                mod.weight.copy_(p["codes"].to(torch.float32) * p["scale"])
                mod.weight_scale.copy_(p["scale"])
        ModelCompressor(quantization_config=qcfg, transform_config=tcfg).compress_model(model)
    if hasattr(model, "ct_decompress_hook"):
        model.ct_decompress_hook.remove()
        delattr(model, "ct_decompress_hook")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update(transform_tensors(plans))
    return tensors


def transform_tensors(plans: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The online-rotation weights vLLM loads from the checkpoint, named like the modules
    compressed-tensors / vLLM register (``<layer>.hadamard_<B>_input.weight``): the
    unnormalized +-1 Sylvester matrix (the runtime divides by sqrt(B)); bfloat16 holds
    +-1 exactly at half the bytes of float32."""
    out = {}
    for fqn, p in plans.items():
        if p["block"] > 1:
            out[f"{fqn}.hadamard_{p['block']}_input.weight"] = \
                sylvester_matrix(p["block"]).to(torch.bfloat16)
    return out


def decompress_checkpoint(out_dir: str | Path, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """Load an exported directory with compressed-tensors and decompress it (weights in the
    stored, rotated basis). Used by the export's self-check and by tests."""
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
        state = load_file(str(out_dir / "model.safetensors"))
        state = {k: v for k, v in state.items() if not _TRANSFORM_KEY.search(k)}
        skeleton.load_state_dict(state, strict=True)
        mc.decompress_model(skeleton)
    return {k: v.detach() for k, v in skeleton.state_dict().items()}


def export_compressed_tensors(loaded: LoadedRun, out: str | Path | None = None,
                              approx: bool = False) -> ExportResult:
    """Write the compressed-tensors checkpoint of a Llama-style run (see module doc)."""
    from safetensors.torch import save_file

    problems, approximations = compressed_problems(loaded, approx)
    refuse("compressed-tensors", problems,
           "search with --target vllm, or pass --approx where coqat's numerics may change")
    with quiet_stderr():  # importing it pulls in transformers / torchao, which log
        import compressed_tensors
    plans = plan_layers(loaded, approx)
    for fqn, p in plans.items():
        if not p["exact"]:
            approximations.append(f"{fqn}: QuEST w{p['bits']} re-rounded to the {p['bits']}-bit "
                                  f"integer grid (relative weight error {p['rel_error']:.3f})")
    qcfg, tcfg = _configs(loaded, plans)
    tensors = _compress(loaded, plans, qcfg, tcfg)
    cfg = hf_config(loaded)
    cfg["quantization_config"] = {
        "version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
        "sparsity_config": {}, "transform_config": tcfg.model_dump(mode="json") if tcfg else {},
        **qcfg.model_dump(mode="json", exclude={"quant_method"})}
    out = Path(out) if out else default_out_dir(loaded.path, "compressed-tensors")
    widened = [f for f, p in plans.items() if p["exact"] and p["store_bits"] != p["bits"]]
    notes = ["vocabulary = raw bytes 0..255 (no tokenizer files)",
             "weights per channel, symmetric; float layers in 'ignore'"]
    if tcfg:
        notes.append("Hadamard rotation as transform_config: weights stored rotated, input "
                     "rotated online by runtimes that apply compressed-tensors transforms "
                     "(vLLM; compressed_tensors.transform.apply_transform_config); "
                     "transformers 5.23's loader ignores transform_config")
    if widened:
        notes.append(f"{len(widened)} QuEST layer(s) stored exactly as odd codes 2c+1 at scale "
                     f"step/2 in {plans[widened[0]]['store_bits']} bits (one more bit than "
                     "trained, rounded up to a width vLLM serves)")
    result = ExportResult("compressed-tensors", str(out), str(loaded.path),
                          exact=not approximations, approximations=approximations, notes=notes,
                          details={"format": qcfg.format, "groups": len(qcfg.config_groups),
                                   "store_bits": {f: p["store_bits"] for f, p in plans.items()}})
    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copyfile(loaded.run.file("bitconfig.json"), tmp / "bitconfig.json")
        _self_check(loaded, tmp, plans)
        write_manifest(tmp, result)
    return result


def _self_check(loaded: LoadedRun, tmp: Path, plans: dict[str, dict[str, Any]]) -> None:
    """Decompress what was written and compare with what was meant: a failure is a bug."""
    got = decompress_checkpoint(tmp, fresh_model(loaded.workload))
    for fqn, p in plans.items():
        want = p["codes"].to(torch.float32) * p["scale"]
        if not torch.equal(got[f"{fqn}.weight"], want):
            raise RuntimeError(f"compressed-tensors round trip changed {fqn}")
    from safetensors.torch import load_file

    stored = {k: v for k, v in load_file(str(tmp / "model.safetensors")).items()
              if _TRANSFORM_KEY.search(k)}
    for k, v in transform_tensors(plans).items():
        if k not in stored or not torch.equal(stored[k], v):
            raise RuntimeError(f"transform weight {k} was not written as meant")
