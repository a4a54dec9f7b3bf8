"""``coqat deploy``: the packed model a deployer ships, evaluated, with its size on disk.

The packed file ``model.packed.safetensors`` holds, for every quantized layer, its integer
weight codes packed in their storage width (``coqat.kernels.pack``: int2 four per byte,
3/4-bit two per byte, 5/6/8-bit one int8 per byte) and one float32 step per output
channel; everything else (embeddings, norms, biases, float layers) stays float32. Conv
codes are packed as rows of (Cin * kh * kw) per output channel. The header metadata
(``coqat.packed``) describes every layer (bits, grid, Hadamard block), so the file is
self-describing.

``PackedLinear`` / ``PackedConv2d`` keep only the packed bytes in memory and unpack and
dequantize on the fly in ``forward``; activations are rotated and quantized per token with
coqat's reference quantizer. Their output is bit-identical to the QAT model's, so the
deployed metric equals the one ``coqat train`` reported.

With ``--format onnx`` the run is exported to ONNX and evaluated through onnxruntime
instead (default optimizations, MatMulNBits pinned to fp32 accuracy).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coqat.bitconfig import FLOAT_BITS
from coqat.errors import CoqatError
from coqat.exporters.common import MANIFEST, default_out_dir, staged_dir
from coqat.exporters.loading import LoadedRun, first_problem, fresh_model, load_run
from coqat.exporters.qparams import as_quant_module, dequantize_codes, layer_info, weight_codes
from coqat.kernels.pack import pack_codes, storage_bits, unpack_codes
from coqat.quant.hadamard import hadamard_transform
from coqat.quant.modules import QuantConv2d
from coqat.quant.quantizers import quantize_rows
from coqat.util import atomic_write_json

PACKED_FILE = "model.packed.safetensors"
PACKED_FORMAT = "coqat.packed/v1"
_META_KEY = "coqat.packed"
DEPLOY_FORMATS = ("packed", "onnx")

__all__ = ["PackedLinear", "PackedConv2d", "pack_model_state", "save_packed", "load_packed",
           "DeployReport", "deploy", "DEPLOY_FORMATS", "PACKED_FILE"]


class _PackedLayer(nn.Module):
    """Shared state of the packed layers: packed codes, steps and the quantizer rules."""

    def _setup(self, info: dict[str, Any], rows: int, row_len: int) -> None:
        self.w_bits, self.a_bits = int(info["w_bits"]), int(info["a_bits"])
        self.method, self.block = info["method"], int(info["a_block"])
        self.clip_ratio = float(info.get("clip_ratio", 1.0))
        self.rows, self.row_len = rows, row_len
        if self.w_bits != FLOAT_BITS:
            dtype = torch.int8 if storage_bits(self.w_bits) == 8 else torch.uint8
            per = 8 // storage_bits(self.w_bits)
            self.register_buffer("weight_packed",
                                 torch.zeros(rows, -(-row_len // per), dtype=dtype))
            self.register_buffer("weight_step", torch.zeros(rows))

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.weight_packed, self.w_bits, self.row_len)

    def _float_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward multiplies by, in the rotated basis (float32)."""
        raise NotImplementedError

    def _quantize_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate and (if a_bits < 16) quantize the rows (last dim), as QuantLinear does."""
        r = hadamard_transform(x, self.block) if self.block > 1 else x
        if self.a_bits != FLOAT_BITS:
            r = quantize_rows(r, self.a_bits, self.method, None, self.clip_ratio).values
        return r.to(x.dtype)


class PackedLinear(_PackedLayer):
    """A Linear layer stored as packed integer codes; dequantizes on the fly."""

    def __init__(self, info: dict[str, Any], bias: bool):
        super().__init__()
        self.out_features, self.in_features = (int(d) for d in info["weight_shape"])
        self._setup(info, self.out_features, self.in_features)
        if self.w_bits == FLOAT_BITS:
            self.weight = nn.Parameter(torch.zeros(self.out_features, self.in_features),
                                       requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) \
            if bias else None

    def dequantized_weight(self) -> torch.Tensor:
        if self.w_bits == FLOAT_BITS:
            w = self.weight.to(torch.float32)
            return hadamard_transform(w, self.block) if self.block > 1 else w
        return dequantize_codes(self.codes(), self.weight_step, self.method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_rows(x), self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w{self.w_bits}a{self.a_bits}, "
                f"{self.method}, block={self.block}")


class PackedConv2d(_PackedLayer):
    """A Conv2d stored as packed codes (rows of Cin*kh*kw per output channel)."""

    def __init__(self, info: dict[str, Any], conv: dict[str, Any], bias: bool):
        super().__init__()
        self.weight_shape = tuple(int(d) for d in info["weight_shape"])
        cout, cin, kh, kw = self.weight_shape
        self.stride, self.padding = tuple(conv["stride"]), tuple(conv["padding"])
        self.dilation, self.groups = tuple(conv["dilation"]), int(conv["groups"])
        self._setup(info, cout, cin * kh * kw)
        if self.w_bits == FLOAT_BITS:
            self.weight = nn.Parameter(torch.zeros(self.weight_shape), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(cout), requires_grad=False) if bias else None

    def dequantized_weight(self) -> torch.Tensor:
        if self.w_bits == FLOAT_BITS:
            w = self.weight.to(torch.float32)
            if self.block <= 1:
                return w
            return hadamard_transform(w.permute(0, 2, 3, 1), self.block).permute(0, 3, 1, 2)
        codes = self.codes().reshape(self.weight_shape)
        return dequantize_codes(codes, self.weight_step, self.method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self._quantize_rows(x.movedim(-3, -1)).movedim(-1, -3).contiguous()
        return F.conv2d(xq, self.dequantized_weight().to(x.dtype), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"weight={self.weight_shape}, w{self.w_bits}a{self.a_bits}, {self.method}"


# ------------------------------------------------------------------------- pack / load
def pack_model_state(loaded: LoadedRun) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header) of the packed file for a loaded run."""
    model, cfg = loaded.model, loaded.bitconfig
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    quant = {}
    for fqn, lb in cfg.quantized().items():
        m = as_quant_module(model.get_submodule(fqn), lb)
        info = layer_info(m, fqn)
        if isinstance(m, QuantConv2d):
            info["conv"] = {"stride": list(m.stride), "padding": list(m.padding),
                            "dilation": list(m.dilation), "groups": m.groups}
            if isinstance(m.padding, str) or m.padding_mode != "zeros":
                raise CoqatError(f"{fqn}: only zero padding with explicit sizes can be packed")
        if m.w_bits != FLOAT_BITS:
            lc = weight_codes(m, fqn)
            rows = lc.codes.reshape(lc.codes.shape[0], -1)
            tensors[f"{fqn}.weight_packed"] = pack_codes(rows, m.w_bits)
            tensors[f"{fqn}.weight_step"] = lc.step
            info["storage_bits"] = storage_bits(m.w_bits)
        else:
            tensors[f"{fqn}.weight"] = m.weight.detach().to(torch.float32)
        if m.bias is not None:
            tensors[f"{fqn}.bias"] = m.bias.detach().to(torch.float32)
        info["bias"] = m.bias is not None
        layers[fqn] = info
        quant[fqn] = m
    for k, v in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if owner in quant:
            continue
        tensors[k] = v.detach().to(torch.float32) if v.is_floating_point() else v.detach()
    header = {"format": PACKED_FORMAT, "space": loaded.config.get("space"),
              "workload": loaded.workload_name, "layers": layers}
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, header


def save_packed(loaded: LoadedRun, path: str | Path) -> Path:
    """Write the packed file (atomically); returns its path."""
    from safetensors.torch import save

    from coqat.util import atomic_write_bytes

    tensors, header = pack_model_state(loaded)
    return atomic_write_bytes(path, save(tensors, metadata={_META_KEY: json.dumps(header)}))


def load_packed(path: str | Path, skeleton: nn.Module) -> nn.Module:
    """Build the deploy model: ``skeleton`` (a float model of the right architecture) with
    every quantized layer replaced by its packed version, all tensors loaded strictly."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except (KeyError, json.JSONDecodeError):
        raise CoqatError(f"{p} has no {_META_KEY} header; it was not written by coqat deploy") \
            from None
    except (OSError, SafetensorError) as e:
        raise CoqatError(f"{p} is unreadable ({type(e).__name__}); re-run coqat deploy") from None
    if header.get("format") != PACKED_FORMAT:
        raise CoqatError(f"{p}: format {header.get('format')!r} is not {PACKED_FORMAT!r}")
    for fqn, info in header["layers"].items():
        mod = skeleton.get_submodule(fqn)
        if info["op"] == "Conv2d":
            new: nn.Module = PackedConv2d(info, info["conv"], info["bias"])
        else:
            new = PackedLinear(info, info["bias"])
        if list(mod.weight.shape) != list(info["weight_shape"]):
            raise CoqatError(f"{p}: {fqn} has weight shape {info['weight_shape']}, the model "
                             f"{list(mod.weight.shape)}; the packed file is for another model")
        parent, _, child = fqn.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, child, new)
    try:
        skeleton.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CoqatError(f"{p} does not match the model: {first_problem(str(e))}") from None
    return skeleton.eval()


def fp32_nbytes(model: nn.Module) -> int:
    """Size of the model's state dict as an FP32 safetensors file (the baseline on disk)."""
    from safetensors.torch import save

    sd = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).contiguous()
          for k, v in model.state_dict().items()}
    return len(save(sd))


# ------------------------------------------------------------------------- deploy
@dataclass
class DeployReport:
    """The numbers a deployer needs: metric of the deployed artifact and its size."""

    run_dir: str
    format: str
    file: str
    bytes: int
    fp32_bytes: int
    size_ratio: float
    metric_name: str
    metric: float
    reference_metric: float
    final_metric: float | None
    higher_is_better: bool
    max_batches: int | None
    eval: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _evaluate(workload, model: nn.Module, max_batches: int | None) -> dict[str, Any]:
    with torch.no_grad():
        return workload.evaluate(model, max_batches=max_batches)


def deploy(run_dir: str | Path, fmt: str = "packed", out: str | Path | None = None,
           max_batches: int | None = None, progress: Any = None) -> DeployReport:
    """Build the deployed artifact of a finished run, evaluate it and measure it.

    ``progress`` is an optional callable ``(message) -> None`` for long steps.
    """
    if fmt not in DEPLOY_FORMATS:
        raise CoqatError(f"deploy format {fmt!r} is unknown; use one of "
                         f"{', '.join(DEPLOY_FORMATS)}")
    if max_batches is not None and max_batches < 1:
        raise CoqatError(f"--max-batches {max_batches} must be >= 1 (or omitted: all)")
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    loaded = load_run(run_dir)
    wl = loaded.workload
    out = Path(out) if out else default_out_dir(loaded.path, f"deploy-{fmt}")
    notes = list(loaded.notes)
    if fmt == "packed":
        with staged_dir(out) as tmp:
            save_packed(loaded, tmp / PACKED_FILE)
            atomic_write_json(tmp / MANIFEST, {"format": "deploy-packed",
                                               "run_dir": str(loaded.path),
                                               "file": PACKED_FILE})
        file = out / PACKED_FILE
        model = load_packed(file, fresh_model(wl))
        notes.append("packed: int2 four per byte, 3/4-bit two per byte, 5/6/8-bit as int8; "
                     "float parts FP32; unpacked and dequantized on the fly")
    else:
        from coqat.exporters.onnx_export import OrtModule, export_onnx, ort_session
        from coqat.exporters.source import from_run

        say("exporting ONNX")
        res = export_onnx(from_run(loaded), out, check_batches=0)  # evaluated below
        file = Path(res.out_dir) / res.details["file"]
        model = OrtModule(ort_session(file, optimize=True))
        notes += res.notes + ["evaluated with onnxruntime (CPU, ORT_ENABLE_ALL, "
                              "MatMulNBits accuracy level 1 = fp32)"]
    say("evaluating the deployed model")
    ev = _evaluate(wl, model, max_batches)
    say("evaluating the QAT model for reference")
    ref = _evaluate(wl, loaded.model, max_batches)
    final = (loaded.final or {}).get("metric") if max_batches is None else None
    size = file.stat().st_size
    fp32 = fp32_nbytes(loaded.model)
    layers = {k: v.label + ("" if v.quantizer == "quest" else "-rtn")
              for k, v in loaded.bitconfig.quantized().items()}
    return DeployReport(str(loaded.path), fmt, str(file), size, fp32, size / fp32, wl.metric,
                        float(ev[wl.metric]), float(ref[wl.metric]), final,
                        wl.higher_is_better, max_batches, ev, layers, notes,
                        round(time.perf_counter() - t0, 2))
