"""K3: the quantized linear layer as one autograd Function on the low-bit kernels.

Forward (``y = Q(x H) Q(W H)^T + b``, QuEST's half-Hadamard form):

    K1(x) -> codes, steps, packed masks        one pass over the activations
    K1(W) -> codes, steps, packed masks        the master weight, every step (it changes)
    K2    -> y                                 FP8 / INT8 GEMM, scales in the epilogue

Backward v1 (BF16 GEMMs on the dequantized operands; ``M`` = trust masks, ``g = dL/dy``)::

    dx = (M_x * (g  @ Wq)) H       Wq = dequantized weight codes (rotated basis)
    dW = (M_w * (g^T @ Xq)) H      Xq = dequantized activation codes
    db = sum of g over the rows

This is exactly the gradient of the fake-quant module (``coqat.quant.QuantLinear``): the
straight-through estimator masked by the trust mask, rotated back by H. For the "full"
form (quantized operands rotated back before the product) the product and both gradients
are the same mathematical expressions, since H H^T = I; only float rounding differs.

What autograd keeps for the backward: 1 byte per activation (the codes) plus 1 bit (the
mask), instead of the fake-quant path's float activations and a byte-per-element mask.

``backend="reference"`` runs the same algorithm with the torch reference (any device);
``backend="triton"`` runs K1-K3 on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coqat.bitconfig import FLOAT_BITS
from coqat.errors import CoqatError
from coqat.kernels import reference as ref
from coqat.kernels.reference import LowbitFormat, QuantizedRows, RowQuantizer

__all__ = ["LinearSpec", "linear_spec", "lowbit_linear"]

BACKENDS = ("triton", "reference")


@dataclass(frozen=True)
class LinearSpec:
    """How one quantized linear layer runs on the kernels (see ``linear_spec``)."""

    weight: RowQuantizer
    act: RowQuantizer
    fmt: LowbitFormat
    backend: str = "triton"
    fast_accum: bool = False

    @property
    def method(self) -> str:
        return self.weight.method

    @property
    def block(self) -> int:
        return self.weight.block


def linear_spec(w_bits: int, a_bits: int, block: int, method: str = "quest",
                trust: float | None = None, clip_ratio: float = 1.0,
                backend: str = "triton", fast_accum: bool = False) -> LinearSpec:
    """A LinearSpec for weights and inputs quantized to ``w_bits`` / ``a_bits``.

    ``block`` is the Hadamard block applied to both operands along the reduction dim (1 = no
    rotation); ``fast_accum`` lets FP8 GEMMs accumulate inside the tensor cores (faster,
    not exact).
    """
    if backend not in BACKENDS:
        raise CoqatError(f"kernel backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if FLOAT_BITS in (w_bits, a_bits):
        raise CoqatError(f"the low-bit linear needs weight and input quantized, got "
                         f"w{w_bits}a{a_bits}; run such a layer on the reference path "
                         "(--kernels auto)")
    fmt = ref.lowbit_format(w_bits, a_bits, method)
    return LinearSpec(RowQuantizer(w_bits, fmt, method, block, trust, clip_ratio),
                      RowQuantizer(a_bits, fmt, method, block, trust, clip_ratio),
                      fmt, backend, fast_accum)


def _quantize(t: torch.Tensor, q: RowQuantizer, backend: str) -> QuantizedRows:
    if backend == "triton":
        from coqat.kernels.triton_quant import quantize_rows_triton
        return quantize_rows_triton(t, q)
    return ref.quantize_ref(t, q)


def _matmul(a: QuantizedRows, w: QuantizedRows, spec: LinearSpec, bias: torch.Tensor | None,
            out_dtype: torch.dtype) -> torch.Tensor:
    if spec.backend == "triton":
        from coqat.kernels import gemm
        if gemm.scaled_mm_ok(a, w, spec.fmt, out_dtype):
            return gemm.lowbit_matmul_scaled_mm(a, w, spec.fmt, bias, spec.fast_accum)
        return gemm.lowbit_matmul_triton(a, w, spec.fmt, bias, out_dtype,
                                         fast_accum=spec.fast_accum)
    return ref.lowbit_matmul_ref(a, w, spec.fmt, bias, out_dtype)


def _dequantize(q: QuantizedRows, spec: LinearSpec, dtype: torch.dtype) -> torch.Tensor:
    if spec.backend == "triton":
        from coqat.kernels.triton_backward import dequantize_triton
        return dequantize_triton(q, spec.fmt, spec.method, dtype)
    return ref.dequantize_ref(q, spec.fmt, spec.method, dtype)


def _masked_rotate(g: torch.Tensor, mask_bits: torch.Tensor, spec: LinearSpec,
                   dtype: torch.dtype) -> torch.Tensor:
    if spec.backend == "triton":
        from coqat.kernels.triton_backward import masked_rotate_triton
        return masked_rotate_triton(g.contiguous(), mask_bits, spec.block, dtype)
    return ref.masked_rotate_ref(g, mask_bits, spec.block, dtype)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``F.linear`` would return: the autocast dtype inside autocast, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _LowbitLinearFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, spec: LinearSpec):
        k = weight.shape[1]
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out_dtype = _output_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            qa = _quantize(x2.detach(), spec.act, spec.backend)
            qw = _quantize(weight.detach(), spec.weight, spec.backend)
            y = _matmul(qa, qw, spec, None if bias is None else bias.detach(), out_dtype)
        ctx.spec = spec
        ctx.shapes = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.out_dtype = out_dtype
        ctx.save_for_backward(qa.codes, qa.step, qa.mask_bits, qw.codes, qw.step, qw.mask_bits)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        a_codes, a_step, a_mask, w_codes, w_step, w_mask = ctx.saved_tensors
        spec: LinearSpec = ctx.spec
        x_shape, x_dtype, w_dtype, b_dtype = ctx.shapes
        n = w_codes.shape[0]
        g = dy.reshape(-1, n).to(ctx.out_dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            wq = _dequantize(QuantizedRows(w_codes, w_step, None, None), spec, g.dtype)
            dx = _masked_rotate(g @ wq, a_mask, spec, x_dtype).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            xq = _dequantize(QuantizedRows(a_codes, a_step, None, None), spec, g.dtype)
            dw = _masked_rotate(g.t() @ xq, w_mask, spec, w_dtype)
        if ctx.needs_input_grad[2]:
            db = g.sum(0, dtype=torch.float32).to(b_dtype)
        return dx, dw, db, None


def lowbit_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  spec: LinearSpec) -> torch.Tensor:
    """``F.linear`` on quantized operands, through the kernels (differentiable).

    ``x`` (..., K) and ``weight`` (N, K) are the float input and master weight; both are
    quantized on every call. Inside autocast the output has the autocast dtype (like
    ``F.linear``), otherwise x's dtype. Gradients flow to x, weight and bias.
    """
    if x.shape[-1] != weight.shape[1]:
        raise CoqatError(f"lowbit_linear: input has {x.shape[-1]} features, the weight "
                         f"{weight.shape[1]}")
    if weight.shape[1] % spec.block:
        raise CoqatError(f"Hadamard block {spec.block} does not divide in_features "
                         f"{weight.shape[1]}")
    return _LowbitLinearFn.apply(x, weight, bias, spec)
