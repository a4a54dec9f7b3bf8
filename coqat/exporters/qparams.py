"""Per-layer quantizer state of a trained run: ``qparams.safetensors`` and the weight codes.

coqat's quantizers have no learned scales: QuEST's step is ``2 * ALPHA[b] * rms(row) /
(2^b - 1)`` of the Hadamard-rotated weight row and RTN's is ``absmax(row) / (2^(b-1) - 1)``,
both recomputed from the master weights at every forward. So everything in
``qparams.safetensors`` is *derived*: it can be recomputed from ``model.safetensors`` plus
``bitconfig.json`` with ``coqat.quant``. It exists so that a deployer (or another tool)
gets the numbers and the rules without re-implementing coqat, and so that an export can
check that the weights it reads are the weights the run finished with.

``qparams.safetensors`` holds:

- one tensor per layer with quantized weights: ``<fqn>.weight_step``, float32, shape
  ``[out_features]`` (``[out_channels]`` for convs): the step Δ of each output row, in the
  rotated basis. Redundant: equal to ``quantize_rows(rotated weight rows).scale``.
- header metadata ``coqat.qparams``: a JSON document ``coqat.qparams/v1`` with
  ``model_sha256`` (the ``model.safetensors`` it was computed from) and, per quantized
  layer, everything needed to run it::

      op            "Linear" | "Conv2d"
      w_bits, a_bits, method ("quest" | "rtn"), form ("half": both operands stay rotated)
      w_block, a_block   Hadamard block along the reduction dim (1 = none); for convs the
                         rotation is along input channels at every kernel tap
      clip_ratio    RTN clip (1.0 unless changed)
      weight        grid ("half-integer": value = (code + 1/2) * step, no zero level;
                    "integer": value = code * step), code_min/code_max, alpha (QuEST's
                    ALPHA[b]: step = 2 * (alpha * rms + 1e-8) / (2^b - 1)), rows
      input_act     the dynamic per-token rule for activations (computed at run time,
                    so there is nothing to store): rotation block, grid, alpha or absmax

  All of it is redundant with bitconfig.json + coqat's quantizer definitions; it is
  written out so that the file is self-describing.

The integer codes themselves are not stored here (they would duplicate the weights); the
packed deployment file (``coqat deploy``) and every export carry them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS, BitConfig, LayerBits
from coqat.errors import CoqatError
from coqat.quant.hadamard import hadamard_transform
from coqat.quant.modules import QuantConv2d, QuantLinear
from coqat.quant.quantizers import ALPHA, quantize_rows
from coqat.util import atomic_write_bytes, sha256_file

QPARAMS = "qparams.safetensors"
QPARAMS_FORMAT = "coqat.qparams/v1"
_META_KEY = "coqat.qparams"

__all__ = ["QPARAMS", "QPARAMS_FORMAT", "LayerCodes", "as_quant_module", "weight_codes",
           "dequantize_codes", "layer_info", "qparams_tensors", "write_qparams",
           "read_qparams"]


@dataclass
class LayerCodes:
    """The integer form of one layer's quantized weight, in the module's weight layout.

    ``codes`` int8, shape of the weight ((N, K) or (Cout, Cin, kh, kw)), in the ROTATED
    basis; ``step`` float32 (N,), one per output row; ``method`` the grid: QuEST codes
    dequantize to ``(code + 1) * step - step / 2``, RTN codes to ``code * step``.
    """

    codes: torch.Tensor
    step: torch.Tensor
    method: str
    bits: int


def as_quant_module(module: nn.Module, lb: LayerBits) -> QuantLinear | QuantConv2d:
    """``module`` itself when it is already quantized, else a QuantLinear / QuantConv2d view
    sharing its Parameters (the model is not changed)."""
    if isinstance(module, (QuantLinear, QuantConv2d)):
        return module
    if isinstance(module, nn.Conv2d):
        return QuantConv2d.from_float(module, lb.w_bits, lb.a_bits, lb.quantizer)
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(module, lb.w_bits, lb.a_bits, lb.quantizer)
    raise CoqatError(f"a {type(module).__name__} cannot be quantized; only Linear and Conv2d")


def _check_half(m: QuantLinear | QuantConv2d, fqn: str) -> None:
    if m.form != "half":
        raise CoqatError(f"{fqn} uses form={m.form!r}; export and deploy support the 'half' "
                         "form coqat trains with (both operands stay rotated)")


def weight_codes(m: QuantLinear | QuantConv2d, fqn: str = "layer") -> LayerCodes:
    """Codes and steps of ``m``'s weight, exactly as its forward quantizes it.

    Mirrors ``QuantLinear/QuantConv2d._weight_operand`` (half form): rotate along the
    reduction dim, quantize rows; for convs the rows are (kh, kw, Cin) flattened per output
    channel and the codes are permuted back to (Cout, Cin, kh, kw).
    ``dequantize_codes(weight_codes(m))`` is bit-identical to the forward's weight.

    Computed on the CPU whatever device ``m`` is on: the CPU rotation sums exactly (one
    rounding), the definition every export and ``qparams.safetensors`` share, so a run
    trained on a GPU writes the steps an export on the CPU recomputes. A GPU forward sums in
    float32 and may differ from these codes by one step at rounding ties (the contract in
    ``coqat.quant.hadamard``).
    """
    _check_half(m, fqn)
    if m.w_bits == FLOAT_BITS:
        raise CoqatError(f"{fqn} has float weights; it has no codes")
    with torch.no_grad():
        w = m.weight.detach().to("cpu", torch.float32)
        if isinstance(m, QuantConv2d):
            w = w.permute(0, 2, 3, 1)
        r = hadamard_transform(w, m.w_block) if m.w_block > 1 else w
        res = quantize_rows(r.reshape(r.shape[0], -1), m.w_bits, m.method, m.trust,
                            m.clip_ratio)
        codes = res.codes.reshape(r.shape)
        if isinstance(m, QuantConv2d):
            codes = codes.permute(0, 3, 1, 2)
    return LayerCodes(codes.contiguous(), res.scale.reshape(-1).contiguous(), m.method,
                      m.w_bits)


def dequantize_codes(codes: torch.Tensor, step: torch.Tensor, method: str) -> torch.Tensor:
    """Float32 weight values from codes, bit-identical to the QAT forward.

    QuEST: ``k * step - step / 2`` with ``k = code + 1`` (the quantizer's own formula and
    operation order, so not one ulp differs); RTN: ``code * step``. ``step`` has one entry
    per row (dim 0) of ``codes``.
    """
    s = step.to(torch.float32).reshape(-1, *([1] * (codes.dim() - 1)))
    c = codes.to(torch.float32)
    if method == "quest":
        two = torch.full((), 2.0, dtype=torch.float32, device=c.device)
        return (c + 1.0) * s - s / two
    return c * s


def rotated_float_weight(m: QuantLinear | QuantConv2d) -> torch.Tensor:
    """The float weight in the rotated basis (for a half-form layer with float weights and
    quantized activations); the forward computes the same tensor."""
    with torch.no_grad():
        w = m.weight.detach().to("cpu", torch.float32)      # on the CPU: see weight_codes
        if m.w_block <= 1:
            return w.clone()
        if isinstance(m, QuantConv2d):
            return hadamard_transform(w.permute(0, 2, 3, 1), m.w_block).permute(0, 3, 1, 2) \
                .contiguous()
        return hadamard_transform(w, m.w_block)


def layer_info(m: QuantLinear | QuantConv2d, fqn: str = "layer") -> dict[str, Any]:
    """The self-describing per-layer entry of ``coqat.qparams/v1`` (see the module doc)."""
    _check_half(m, fqn)
    info: dict[str, Any] = {
        "op": "Conv2d" if isinstance(m, QuantConv2d) else "Linear",
        "weight_shape": list(m.weight.shape),
        "w_bits": m.w_bits, "a_bits": m.a_bits, "method": m.method, "form": m.form,
        "w_block": m.w_block, "a_block": m.a_block, "clip_ratio": m.clip_ratio,
        "rotation": ("blockwise Sylvester Hadamard, orthonormal (1/sqrt(block)), along "
                     + ("input channels at every kernel tap" if isinstance(m, QuantConv2d)
                        else "in_features")),
    }
    if m.w_bits != FLOAT_BITS:
        info["weight"] = _grid(m.w_bits, m.method, m.clip_ratio,
                               "output channel: kh*kw*Cin values" if isinstance(m, QuantConv2d)
                               else "output row: in_features values")
    if m.a_bits != FLOAT_BITS:
        info["input_act"] = {**_grid(m.a_bits, m.method, m.clip_ratio,
                                     "one token / pixel: the reduction dim"), "dynamic": True}
    return info


def _grid(bits: int, method: str, clip_ratio: float, rows: str) -> dict[str, Any]:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if method == "quest":
        return {"grid": "half-integer", "value": "(code + 1/2) * step", "code_min": lo,
                "code_max": hi, "alpha": ALPHA[bits],
                "step": "2 * (alpha * rms(row) + 1e-8) / (2^bits - 1)", "rows": rows}
    return {"grid": "integer", "value": "code * step", "code_min": -hi, "code_max": hi,
            "step": f"{clip_ratio} * absmax(row) / {hi} + 1e-12", "rows": rows}


def _quant_layers(model: nn.Module, bitconfig: BitConfig):
    for fqn, lb in bitconfig.layers.items():
        if lb.is_float:
            continue
        try:
            mod = model.get_submodule(fqn)
        except AttributeError:
            raise CoqatError(f"bitconfig layer {fqn!r} is not a module of the model; the "
                             "bitconfig and the checkpoint do not belong together") from None
        yield fqn, as_quant_module(mod, lb)


def qparams_tensors(model: nn.Module, bitconfig: BitConfig
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, per-layer info) of ``qparams.safetensors`` for ``model`` at ``bitconfig``."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for fqn, m in _quant_layers(model, bitconfig):
        layers[fqn] = layer_info(m, fqn)
        if m.w_bits != FLOAT_BITS:
            tensors[f"{fqn}.weight_step"] = weight_codes(m, fqn).step
    return tensors, layers


def write_qparams(run: Any, model: nn.Module, bitconfig: BitConfig | None) -> Path | None:
    """Write ``qparams.safetensors`` into ``run`` (a RunDir or a directory path), atomically.

    Called by ``coqat.training.runner.execute`` after training. Returns the path, or None when
    there is nothing quantized (a float run). Points ``bitconfig.json``'s ``qparams`` field
    at the file.
    """
    from safetensors.torch import save

    if bitconfig is None or not bitconfig.quantized():
        return None
    root = Path(getattr(run, "path", run))
    tensors, layers = qparams_tensors(model, bitconfig)
    weights = root / "model.safetensors"
    doc = {"format": QPARAMS_FORMAT,
           "model_sha256": sha256_file(weights) if weights.is_file() else None,
           "layers": layers}
    path = atomic_write_bytes(root / QPARAMS,
                              save(tensors, metadata={_META_KEY: json.dumps(doc)}))
    _point_bitconfig_at(root / "bitconfig.json")
    return path


def _point_bitconfig_at(path: Path) -> None:
    """Set ``"qparams": "qparams.safetensors"`` in the run's bitconfig.json (validated)."""
    from coqat.bitconfig import validate_document
    from coqat.util import atomic_write_text

    if not path.is_file():
        return
    doc = json.loads(path.read_text())
    if doc.get("qparams") == QPARAMS:
        return
    doc["qparams"] = QPARAMS
    validate_document(doc, source=str(path))
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def read_qparams(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, document) of a ``qparams.safetensors``; one-line errors on a bad file."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise CoqatError(f"{p} does not exist; it is written at the end of every QAT run")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except (OSError, SafetensorError) as e:
        raise CoqatError(f"{p} is unreadable ({type(e).__name__}); delete it and re-export, "
                         "it is recomputed from model.safetensors") from None
    try:
        doc = json.loads(meta[_META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CoqatError(f"{p} has no {_META_KEY} header; it was not written by coqat") from None
    if doc.get("format") != QPARAMS_FORMAT:
        raise CoqatError(f"{p}: format {doc.get('format')!r} is not one this coqat reads "
                         f"({QPARAMS_FORMAT!r}); delete it, it is recomputed from the weights")
    return tensors, doc


def check_qparams(path: str | Path, model: nn.Module, bitconfig: BitConfig) -> None:
    """Raise a one-line CoqatError unless the stored steps equal the recomputed ones."""
    stored, doc = read_qparams(path)
    fresh, layers = qparams_tensors(model, bitconfig)
    if set(stored) != set(fresh) or set(doc.get("layers", {})) != set(layers):
        extra = sorted(set(stored) ^ set(fresh)) or sorted(set(doc.get("layers", {})) ^ set(layers))
        raise CoqatError(f"{path} does not match bitconfig.json (layers differ: "
                         f"{', '.join(extra[:3])}); the files come from different runs")
    for k, v in fresh.items():
        if stored[k].shape != v.shape or not torch.equal(stored[k], v):
            raise CoqatError(f"{path} does not match model.safetensors ({k} differs); the "
                             "weights were changed after training or come from another run")


def stored_layers(doc: Mapping[str, Any]) -> dict[str, Any]:
    return dict(doc.get("layers", {}))
