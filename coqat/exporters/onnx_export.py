"""ONNX QDQ export of a trained run, reproducing coqat's quantized forward exactly.

Route (reference/export_formats.md section 1.4: torch.onnx cannot export sub-8-bit fake
quant): every quantized layer is swapped for a placeholder that the dynamo exporter emits
as one custom node ``coqat::QuantLayer(x)``; the rest of the model (attention, norms,
residuals, BatchNorm, the float layers) is exported by torch as usual. Each placeholder is
then replaced by a hand-built subgraph with standard ONNX operators only:

Weights (static, stored as integer initializers)
    ``codes`` INT8 / INT4 / INT2 (sub-byte types are stored packed, in the layout of
    ``coqat.kernels.pack``), one float32 step per output channel, ``DequantizeLinear``
    per axis. Linear weights are stored transposed, (K, N), so that DQ feeds MatMul
    directly. QuEST weights are stored in the Hadamard-rotated basis.

    QuEST's grid is half-integer: value = (code + 1/2) * step, no zero level. Standard
    DequantizeLinear computes (q - zero_point) * scale with an *integer* zero point, so
    it cannot add the half step by itself. Two ways were considered:
      (a) odd codes 2c+1 at scale step/2: standard DQ alone, but 2c+1 needs one more bit
          (int4 -> int8 storage, twice the file; 8-bit would need int9, impossible);
      (b) zero_point = -1, so DQ gives (code + 1) * step = k * step, then one ``Sub`` of
          step/2 per output channel: the quantizer's own ``k * step - step / 2``.
    coqat uses (b): b-bit storage, and bit-identical to the QAT forward. The price is one
    float vector of N values per layer (the half steps) and an elementwise Sub, which keeps
    onnxruntime from fusing these DQ+MatMul pairs into MatMulNBits. RTN's grid is integer
    (has zero), so RTN layers are plain DQ -> MatMul (fusable).

Activations (dynamic per token: the scale is computed in the graph)
    The Hadamard rotation is explicit: Cast(double) -> Reshape(-1, B) -> MatMul(+-1
    Sylvester matrix) -> Reshape -> Cast(float) -> Mul(fl32(1/sqrt(B))): the exactly rounded
    sums of coqat's CPU path (coqat.quant.hadamard), so the codes are coqat's. A float32
    MatMul would sum in the runtime's order and move a code by one step wherever a value
    sits at a quantizer tie (measured: 1.4e-4 nats on a 2-bit tiny Llama).
    QuEST: rms over the row in float64, step = 2 (alpha*rms + 1e-8) / (2^b - 1), clamp to
    +-(alpha*rms + 1e-8), then ``QuantizeLinear(x/step + 1/2, scale 1, zero_point -1)`` to
    INTb codes and the matching ``DequantizeLinear`` (the activation Q/DQ pair on the
    consumer's input, with the integer type visible to tools), then ``k * step - step/2``.
    RTN: absmax per row, ``QuantizeLinear(x/scale)`` -> DQ -> ``* scale``.
    Conv inputs are quantized per pixel over channels (Transpose to NHWC and back).

Opset 21 (int4/int8), 25 when a 2-bit tensor is present. Each new node carries
``coqat.layer`` in its metadata; the model carries the bit configuration.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS
from coqat.errors import CoqatError
from coqat.exporters.common import (ExportResult, quiet_stderr, refuse, require, staged_dir,
                                 write_manifest)
from coqat.exporters.source import ExportSource, LogitsOf, check_in_consumer, check_note, is_hf
from coqat.exporters.qparams import as_quant_module, rotated_float_weight, weight_codes
from coqat.targets import get_target
from coqat.kernels.pack import pack_codes
from coqat.quant.hadamard import hadamard_scale, sylvester_matrix
from coqat.quant.modules import QuantConv2d, QuantLinear
from coqat.quant.quantizers import ALPHA

__all__ = ["export_onnx", "onnx_problems", "ort_session", "OrtModule", "build_onnx_model"]

ONNX_FILE = "model.onnx"
_DOMAIN = "coqat"
_OP = "QuantLayer"


# ----------------------------------------------------------------- placeholder for export
class _Placeholder(nn.Module):
    """Stands in for a quantized layer while torch exports the rest of the model."""

    def __init__(self, fqn: str, module: nn.Module):
        super().__init__()
        self.fqn = fqn
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv:
            self.out_ch = module.out_channels
            self.k, self.s = module.kernel_size, module.stride
            self.p, self.d = module.padding, module.dilation
        else:
            self.out_features = module.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            hw = [(x.shape[2 + i] + 2 * self.p[i] - self.d[i] * (self.k[i] - 1) - 1)
                  // self.s[i] + 1 for i in range(2)]
            shape = [x.shape[0], self.out_ch, *hw]
        else:
            shape = [*x.shape[:-1], self.out_features]
        return torch.onnx.ops.symbolic(f"{_DOMAIN}::{_OP}", (x,), {"fqn": self.fqn},
                                       dtype=x.dtype, shape=shape, version=1)


# ------------------------------------------------------------------------- problems
def onnx_problems(source: ExportSource, approx: bool = False) -> list[str]:
    """Every reason the configuration cannot be written as ONNX QDQ (``approx`` changes
    nothing: the export is exact or refused)."""
    cfg = source.bitconfig
    problems = get_target("onnx").violations(cfg, source.ops())
    for fqn, lb in cfg.quantized().items():
        mod = source.model.get_submodule(fqn)
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros":
                problems.append(f"{fqn}: padding_mode {mod.padding_mode!r} (only zeros)")
            if isinstance(mod.padding, str):
                problems.append(f"{fqn}: padding={mod.padding!r} (give explicit ints)")
        q = as_quant_module(mod, lb)
        if q.form != "half":
            problems.append(f"{fqn}: form {q.form!r} (only 'half')")
    return problems


# ------------------------------------------------------------------------- graph building
_ONNX_INT = {8: "INT8", 4: "INT4", 2: "INT2"}


class _Builder:
    """Accumulates nodes and initializers; shares constants by value."""

    def __init__(self):
        import onnx

        self.onnx = onnx
        self.nodes: list = []
        self.inits: dict[str, Any] = {}
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"coqat/{hint}_{self._n}"

    def node(self, op: str, inputs: list[str], layer: str, out: str | None = None,
             **attrs) -> str:
        out = out or self.name(op.lower())
        n = self.onnx.helper.make_node(op, inputs, [out], name=self.name(op), **attrs)
        n.metadata_props.add(key="coqat.layer", value=layer)
        self.nodes.append(n)
        return out

    def const(self, value, dtype: str, shape: tuple[int, ...] = ()) -> str:
        """A shared scalar / small constant initializer."""
        arr = np.asarray(value, dtype={"FLOAT": np.float32, "DOUBLE": np.float64,
                                       "INT64": np.int64}[dtype]).reshape(shape)
        key = f"coqat/const_{dtype.lower()}_{'x'.join(map(str, shape)) or 's'}_" \
              f"{arr.tobytes().hex()}"
        if key not in self.inits:
            self.inits[key] = self.onnx.numpy_helper.from_array(arr, key)
        return key

    def int_const(self, value: int, bits: int) -> str:
        """A scalar INTb zero point."""
        key = f"coqat/zp_int{bits}_{value}"
        if key not in self.inits:
            self.inits[key] = self._int_tensor(key, torch.tensor([value], dtype=torch.int8),
                                               bits, dims=[])
        return key

    def _int_tensor(self, name: str, codes: torch.Tensor, bits: int, dims: list[int]):
        dt = getattr(self.onnx.TensorProto, _ONNX_INT[bits])
        flat = codes.reshape(-1).contiguous()
        raw = pack_codes(flat, bits).numpy().tobytes()
        return self.onnx.helper.make_tensor(name, dt, dims, raw, raw=True)

    def int_init(self, name: str, codes: torch.Tensor, bits: int) -> str:
        self.inits[name] = self._int_tensor(name, codes, bits, list(codes.shape))
        return name

    def float_init(self, name: str, t: torch.Tensor) -> str:
        self.inits[name] = self.onnx.numpy_helper.from_array(
            t.detach().to(torch.float32).contiguous().numpy(), name)
        return name

    def hadamard(self, block: int, layer: str) -> str:
        """The +-1 Sylvester matrix as double: stored as INT8 (exact, 1/8 of the bytes)."""
        key = f"coqat/hadamard_pm1_{block}"
        if key not in self.inits:
            self.inits[key] = self.onnx.numpy_helper.from_array(
                sylvester_matrix(block).numpy().astype(np.int8), key)
        return self.node("Cast", [key], layer, to=self.onnx.TensorProto.DOUBLE)


def _rotate(b: _Builder, x: str, block: int, layer: str) -> str:
    """coqat's Hadamard numerics as its CPU path computes them (coqat.quant.hadamard): the
    +-1 sums in double, rounded once to float, then one float multiply by fl32(1/sqrt(B))."""
    xd = b.node("Cast", [x], layer, to=b.onnx.TensorProto.DOUBLE)
    rows = b.node("Reshape", [xd, b.const([-1, block], "INT64", (2,))], layer)
    summed = b.node("MatMul", [rows, b.hadamard(block, layer)], layer)
    back = b.node("Reshape", [summed, b.node("Shape", [x], layer)], layer)
    sums = b.node("Cast", [back], layer, to=b.onnx.TensorProto.FLOAT)
    return b.node("Mul", [sums, b.const(float(np.float32(hadamard_scale(block))), "FLOAT")],
                  layer)


def _act_quant(b: _Builder, x: str, bits: int, method: str, clip_ratio: float, n: int,
               layer: str) -> str:
    """Dynamic per-row (token / pixel) quantization of the last dim, as quantize_rows."""
    axes = b.const([-1], "INT64", (1,))
    one = b.const(1.0, "FLOAT")
    if method == "quest":
        zp = b.int_const(-1, bits)
        xd = b.node("Cast", [x], layer, to=b.onnx.TensorProto.DOUBLE)
        sumsq = b.node("ReduceSumSquare", [xd, axes], layer, keepdims=1)
        mean = b.node("Div", [sumsq, b.const(float(n), "DOUBLE")], layer)
        rms = b.node("Cast", [b.node("Sqrt", [mean], layer)], layer, to=b.onnx.TensorProto.FLOAT)
        scale = b.node("Add", [b.node("Mul", [rms, b.const(ALPHA[bits], "FLOAT")], layer),
                               b.const(1e-8, "FLOAT")], layer)
        step = b.node("Div", [b.node("Mul", [scale, b.const(2.0, "FLOAT")], layer),
                              b.const(float(2 ** bits - 1), "FLOAT")], layer)
        clipped = b.node("Min", [b.node("Max", [x, b.node("Neg", [scale], layer)], layer),
                                 scale], layer)
        y = b.node("Add", [b.node("Div", [clipped, step], layer), b.const(0.5, "FLOAT")], layer)
        q = b.node("QuantizeLinear", [y, one, zp], layer)
        k = b.node("DequantizeLinear", [q, one, zp], layer)
        half = b.node("Div", [step, b.const(2.0, "FLOAT")], layer)
        return b.node("Sub", [b.node("Mul", [k, step], layer), half], layer)
    qmax = 2 ** (bits - 1) - 1
    zp = b.int_const(0, bits)
    absmax = b.node("ReduceMax", [b.node("Abs", [x], layer), axes], layer, keepdims=1)
    clip = b.node("Mul", [b.const(clip_ratio, "FLOAT"), absmax], layer)
    scale = b.node("Add", [b.node("Div", [clip, b.const(float(qmax), "FLOAT")], layer),
                           b.const(1e-12, "FLOAT")], layer)
    y = b.node("Clip", [b.node("Div", [x, scale], layer), b.const(float(-qmax), "FLOAT"),
                        b.const(float(qmax), "FLOAT")], layer)
    q = b.node("QuantizeLinear", [y, one, zp], layer)
    k = b.node("DequantizeLinear", [q, one, zp], layer)
    return b.node("Mul", [k, scale], layer)


def _weight(b: _Builder, fqn: str, m: QuantLinear | QuantConv2d) -> str:
    """The float weight tensor the matmul / conv consumes, through DQ when quantized."""
    is_conv = isinstance(m, QuantConv2d)
    if m.w_bits == FLOAT_BITS:
        w = rotated_float_weight(m) if m.is_quantized else m.weight.detach()
        return b.float_init(f"{fqn}.weight", w if is_conv else w.t())
    lc = weight_codes(m, fqn)
    codes = lc.codes if is_conv else lc.codes.t()
    axis = 0 if is_conv else 1
    q = b.int_init(f"{fqn}.weight_codes", codes, m.w_bits)
    step = b.float_init(f"{fqn}.weight_step", lc.step)
    if m.method != "quest":
        return b.node("DequantizeLinear", [q, step], fqn, axis=axis)
    zp = b.int_init(f"{fqn}.weight_zero_point", torch.full_like(lc.step, -1, dtype=torch.int8),
                    m.w_bits)
    k_step = b.node("DequantizeLinear", [q, step, zp], fqn, axis=axis)
    half = lc.step / 2.0  # exact: a power-of-two division
    half = b.float_init(f"{fqn}.weight_half_step", half.reshape(-1, 1, 1, 1) if is_conv else half)
    return b.node("Sub", [k_step, half], fqn)


def _layer(b: _Builder, fqn: str, m: QuantLinear | QuantConv2d, x: str, y: str) -> None:
    is_conv = isinstance(m, QuantConv2d)
    block = m.a_block
    rows = x
    touched = block > 1 or m.a_bits != FLOAT_BITS
    if is_conv and touched:
        rows = b.node("Transpose", [x], fqn, perm=[0, 2, 3, 1])
    if block > 1:
        rows = _rotate(b, rows, block, fqn)
    if m.a_bits != FLOAT_BITS:
        n = m.in_channels if is_conv else m.in_features
        rows = _act_quant(b, rows, m.a_bits, m.method, m.clip_ratio, n, fqn)
    if is_conv and touched:
        rows = b.node("Transpose", [rows], fqn, perm=[0, 3, 1, 2])
    w = _weight(b, fqn, m)
    bias = b.float_init(f"{fqn}.bias", m.bias) if m.bias is not None else None
    if is_conv:
        ph, pw = m.padding
        b.node("Conv", [rows, w] + ([bias] if bias else []), fqn, out=y,
               kernel_shape=list(m.kernel_size), strides=list(m.stride),
               pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups)
    elif bias:
        b.node("Add", [b.node("MatMul", [rows, w], fqn), bias], fqn, out=y)
    else:
        b.node("MatMul", [rows, w], fqn, out=y)


# ------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    """torch.onnx logs optional-dependency warnings (torchvision) on every export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy",
                   "pkg.torch.onnx.fx_node")


def _strip_stack_traces(proto) -> None:
    """Drop the exporter's per-node debugging metadata (Python stack traces, FX node text):
    it is most of a small model's file and describes the export session, not the model.
    ``pkg.torch.onnx.name_scopes`` (the module path of each node) is kept."""
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key not in _DEBUG_METADATA]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def _dynamic_batch(inputs: tuple[torch.Tensor, ...]):
    """(inputs, dynamic_shapes) with a dynamic batch dim. An example batch of 1 is doubled:
    torch.export specializes a dimension whose example size is 1 (an HF Llama exported from
    a batch-1 example kept a static batch of 1)."""
    batch = torch.export.Dim("batch")
    inputs = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in inputs)
    return inputs, tuple({0: batch} for _ in inputs)


def build_onnx_model(source: ExportSource):
    """The checked ``onnx.ModelProto`` of the model (no files written)."""
    import onnx

    cfg = source.bitconfig
    quant = {fqn: as_quant_module(source.model.get_submodule(fqn), lb)
             for fqn, lb in cfg.quantized().items()}
    shell = copy.deepcopy(source.model).eval()
    for fqn, module in quant.items():
        parent, _, child = fqn.rpartition(".")
        setattr(shell.get_submodule(parent) if parent else shell, child,
                _Placeholder(fqn, module))
    inputs, dynamic = _dynamic_batch(source.example_inputs)
    with quiet_stderr(), _quiet_torch_onnx(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # an HF model returns a ModelOutput (and a KV cache): export its logits only
            root = LogitsOf(shell) if is_hf(shell) else shell
            prog = torch.onnx.export(root, inputs, dynamo=True, opset_version=21,
                                     dynamic_shapes=dynamic, verbose=False,
                                     report=False)
        except Exception as e:  # the user's model may not be exportable
            raise CoqatError(f"torch.onnx could not export the model "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             "export the float model first to find the unsupported op") from None
    proto = prog.model_proto
    _strip_stack_traces(proto)
    b = _Builder()
    nodes = []
    seen = set()
    for node in proto.graph.node:
        if node.domain == _DOMAIN and node.op_type == _OP:
            fqn = next(a.s.decode() for a in node.attribute if a.name == "fqn")
            start = len(b.nodes)
            _layer(b, fqn, quant[fqn], node.input[0], node.output[0])
            nodes.extend(b.nodes[start:])
            seen.add(fqn)
        else:
            nodes.append(node)
    missing = sorted(set(quant) - seen)
    if missing:  # a layer the forward never called: nothing to export for it
        raise CoqatError(f"the model's forward never calls {', '.join(missing)}; drop them "
                         "from the bitconfig or set them to w16a16")
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(b.inits.values())
    two_bit = any(lb.w_bits == 2 or lb.a_bits == 2 for lb in cfg.quantized().values())
    opset = 25 if two_bit else 21
    keep = [o for o in proto.opset_import if o.domain not in (_DOMAIN,)]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    proto.ir_version = max(proto.ir_version, onnx.helper.find_min_ir_version_for(
        list(proto.opset_import)))
    meta = {"coqat.format": "coqat ONNX QDQ v1", "coqat.run": source.label,
            "coqat.workload": source.workload_name,
            "coqat.bits": json.dumps({k: v.label + ("" if v.quantizer == "quest" else "-rtn")
                                      for k, v in cfg.layers.items()}),
            "coqat.quest_grid": "weights: DQ(codes, step, zero_point=-1) - step/2; "
                                "activations: Q/DQ(x/step + 1/2, 1, -1) * step - step/2"}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # a bug in this module, not in the user's input
        raise RuntimeError(f"coqat built an invalid ONNX graph: {e}") from e
    return proto, opset


def export_onnx(source: ExportSource, out: str | Path | None = None,
                check_batches: int = 2) -> ExportResult:
    """Write ``model.onnx`` (+ ``bitconfig.json``, ``export.json``); evaluate it with
    onnxruntime next to coqat's QAT model (``details['check']``)."""
    require("onnx", "onnx", "onnxscript", "onnxruntime")
    import onnx

    refuse("onnx", onnx_problems(source), "search or train with --target onnx (weights and "
           "activations at 2, 4, 8 or 16 bits)", source.explain)
    proto, opset = build_onnx_model(source)
    out = source.out_dir(out, "onnx")
    quest = [f for f, lb in source.bitconfig.quantized().items() if lb.quantizer == "quest"]
    notes = [f"opset {opset}" + (" (2-bit tensors present)" if opset == 25 else ""),
             _batch_note(proto)]
    if quest:
        notes.append(f"{len(quest)} QuEST layer(s): Hadamard rotation as explicit float64 "
                     "MatMul nodes; half-integer weight grid as DequantizeLinear(zero_point=-1)"
                     " minus step/2 (b-bit storage; not fused into MatMulNBits by ORT)")
    result = ExportResult("onnx", str(out), source.label, exact=True, notes=notes,
                          details={"opset": opset, "ir_version": proto.ir_version,
                                   "file": ONNX_FILE, "inputs": _input_dims(proto)})
    with staged_dir(out) as tmp:
        onnx.save(proto, str(tmp / ONNX_FILE))
        (tmp / "bitconfig.json").write_text(source.bitconfig_json())
        check = check_in_consumer(source, "onnxruntime (CPU, ORT_DISABLE_ALL)",
                                  lambda: OrtModule(ort_session(tmp / ONNX_FILE)),
                                  check_batches, True)
        result.details["check"] = check
        result.notes.append(check_note(check))
        write_manifest(tmp, result)
    return result


def _input_dims(proto) -> dict[str, list]:
    """Graph input name -> dims (a name for a dynamic dim, an int for a static one)."""
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in proto.graph.input}


def _batch_note(proto) -> str:
    """What the file really has, read back from the graph (not what was asked for)."""
    dims = list(_input_dims(proto).values())
    if dims and all(d and isinstance(d[0], str) for d in dims):
        return "inputs have a dynamic batch dim; other dims as the example input"
    return ("inputs have a static batch of " + ", ".join(str(d[0]) for d in dims if d)
            + " (torch.export specialized it); other dims as the example input")


# ------------------------------------------------------------------------- runtime
def ort_session(path: str | Path, optimize: bool = False, threads: int | None = None):
    """An onnxruntime CPU session with explicit settings.

    ``optimize=False``: ORT_DISABLE_ALL (the graph exactly as written). ``optimize=True``:
    ORT_ENABLE_ALL with MatMulNBits' accuracy level pinned to fp32 (level 1), so a fused
    DQ+MatMul does not quantize activations to int8 behind the scenes.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimize:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An onnxruntime session behind the nn.Module interface the workloads evaluate."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])
