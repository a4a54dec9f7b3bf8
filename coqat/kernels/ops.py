"""The kernels as ``torch.library`` custom ops, so that ``torch.compile`` traces through them.

Each op has a torch implementation (the reference, used on every device), a Triton
implementation registered for CUDA tensors, and a fake implementation that gives output
shapes and dtypes without computing (what Inductor and CUDA-graph capture need). Inside a
compiled graph an op is one opaque node: Inductor fuses the work around it, and identical
calls (the same input quantized the same way, as q/k/v and gate/up do) are merged by the
graph's common-subexpression pass, so a shared input is quantized once.

    coqat::hadamard         (defined in coqat.quant.hadamard)  rotation; CUDA kernel here
    coqat::quantize_rows    K1: codes, steps, packed masks, row sums of one operand
    coqat::lowbit_linear    K2 forward on the codes; differentiable w.r.t. x, weight, bias
                            (registered autograd: the v1 backward below)
    coqat::dequantize_codes codes -> values in the rotated basis (backward)
    coqat::masked_rotate    (M * g) H, the backward of "rotate, then quantize"

Ops take plain values (ints, strings, dtypes), not the dataclasses of ``reference``; the
``*_args`` helpers convert. Triton is imported only when a CUDA implementation first runs,
so CPU-only installs never load it.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from coqat.kernels import reference as ref
from coqat.kernels.reference import LowbitFormat, QuantizedRows, RowQuantizer

__all__ = ["quantize", "lowbit_linear_forward", "dequantize_codes", "masked_rotate"]


@functools.lru_cache(maxsize=1)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=256)
def _row_quantizer(bits: int, method: str, block: int, trust: float | None, clip_ratio: float,
                   storage: str, odd: bool, correction: bool) -> RowQuantizer:
    return RowQuantizer(bits, LowbitFormat(storage, odd, correction), method, block, trust,
                        clip_ratio)


def _fmt_args(fmt: LowbitFormat) -> tuple[str, bool, bool]:
    return fmt.dtype, fmt.odd, fmt.correction


def _no_tensor(device: torch.device, dtype: torch.dtype) -> Tensor:
    """Stands for an absent output (ops cannot return None)."""
    return torch.empty((0,), dtype=dtype, device=device)


# ----- K1 ------------------------------------------------------------------------------
@torch.library.custom_op("coqat::quantize_rows", mutates_args=())
def _quantize_rows(x: Tensor, bits: int, method: str, block: int, trust: Optional[float],
                   clip_ratio: float, storage: str, odd: bool, correction: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q = _row_quantizer(bits, method, block, trust, clip_ratio, storage, odd, correction)
    return _outputs(ref.quantize_ref(x, q), x.device)


@_quantize_rows.register_kernel("cuda")
def _quantize_rows_cuda(x, bits, method, block, trust, clip_ratio, storage, odd, correction):
    q = _row_quantizer(bits, method, block, trust, clip_ratio, storage, odd, correction)
    if not _have_triton():
        return _outputs(ref.quantize_ref(x, q), x.device)
    from coqat.kernels.triton_quant import quantize_rows_triton

    return _outputs(quantize_rows_triton(x.contiguous(), q), x.device)


@_quantize_rows.register_fake
def _quantize_rows_fake(x, bits, method, block, trust, clip_ratio, storage, odd, correction):
    rows, k = x.shape
    fmt = LowbitFormat(storage, odd, correction)
    return (x.new_empty((rows, k), dtype=fmt.torch_dtype),
            x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows, (k + 7) // 8), dtype=torch.uint8),
            x.new_empty((rows,) if correction else (0,), dtype=torch.int32))


def _outputs(q: QuantizedRows, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rowsum = q.rowsum if q.rowsum is not None else _no_tensor(device, torch.int32)
    return q.codes, q.step, q.mask_bits, rowsum


def quantize(x: Tensor, q: RowQuantizer) -> QuantizedRows:
    """K1 on a 2-D tensor of rows (no gradient): the op, on the tensor's device."""
    codes, step, mask, rowsum = _quantize_rows(x, q.bits, q.method, q.block, q.trust,
                                               q.clip_ratio, *_fmt_args(q.fmt))
    return QuantizedRows(codes, step, mask, rowsum if q.fmt.correction else None)


# ----- backward helpers ----------------------------------------------------------------
@torch.library.custom_op("coqat::dequantize_codes", mutates_args=())
def _dequantize_codes(codes: Tensor, step: Tensor, storage: str, odd: bool, correction: bool,
                      method: str, dtype: torch.dtype) -> Tensor:
    fmt = LowbitFormat(storage, odd, correction)
    return ref.dequantize_ref(QuantizedRows(codes, step, None, None), fmt, method, dtype)


@_dequantize_codes.register_kernel("cuda")
def _dequantize_codes_cuda(codes, step, storage, odd, correction, method, dtype):
    fmt = LowbitFormat(storage, odd, correction)
    q = QuantizedRows(codes, step, None, None)
    if not _have_triton():
        return ref.dequantize_ref(q, fmt, method, dtype)
    from coqat.kernels.triton_backward import dequantize_triton

    return dequantize_triton(q, fmt, method, dtype)


@_dequantize_codes.register_fake
def _dequantize_codes_fake(codes, step, storage, odd, correction, method, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


def dequantize_codes(codes: Tensor, step: Tensor, fmt: LowbitFormat, method: str,
                     dtype: torch.dtype) -> Tensor:
    """Values in the rotated basis from stored codes (``reference.dequantize_ref``)."""
    return _dequantize_codes(codes, step, *_fmt_args(fmt), method, dtype)


@torch.library.custom_op("coqat::masked_rotate", mutates_args=())
def _masked_rotate(g: Tensor, mask_bits: Tensor, block: int, out_dtype: torch.dtype) -> Tensor:
    return ref.masked_rotate_ref(g, mask_bits, block, out_dtype)


@_masked_rotate.register_kernel("cuda")
def _masked_rotate_cuda(g, mask_bits, block, out_dtype):
    if not _have_triton():
        return ref.masked_rotate_ref(g, mask_bits, block, out_dtype)
    from coqat.kernels.triton_rotate import masked_rotate_triton

    return masked_rotate_triton(g.contiguous(), mask_bits, block, out_dtype)


@_masked_rotate.register_fake
def _masked_rotate_fake(g, mask_bits, block, out_dtype):
    return g.new_empty(g.shape, dtype=out_dtype)


def masked_rotate(g: Tensor, mask_bits: Tensor, block: int, out_dtype: torch.dtype) -> Tensor:
    """``(M * g) H`` of a 2-D gradient, in ``out_dtype`` (``reference.masked_rotate_ref``)."""
    return _masked_rotate(g, mask_bits, block, out_dtype)


# The rotation op of coqat.quant gets its tensor-core implementation for CUDA tensors.
@torch.library.register_kernel("coqat::hadamard", "cuda")
def _hadamard_cuda(x: Tensor, block: int) -> Tensor:
    if not _have_triton():
        from coqat.quant.hadamard import hadamard_reference

        return hadamard_reference(x, block)
    from coqat.kernels.triton_rotate import hadamard_triton

    return hadamard_triton(x, block)


# ----- K2 and the v1 backward ----------------------------------------------------------
@torch.library.custom_op("coqat::lowbit_linear", mutates_args=())
def _lowbit_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                   a_codes: Tensor, a_step: Tensor, a_mask: Tensor, a_rowsum: Tensor,
                   w_codes: Tensor, w_step: Tensor, w_mask: Tensor, w_rowsum: Tensor,
                   storage: str, odd: bool, correction: bool, method: str, block: int,
                   fast_accum: bool, out_dtype: torch.dtype) -> Tensor:
    # x and weight are not read: they are inputs so that autograd returns their gradients.
    fmt = LowbitFormat(storage, odd, correction)
    qa, qw = _rows(a_codes, a_step, a_rowsum, fmt), _rows(w_codes, w_step, w_rowsum, fmt)
    return ref.lowbit_matmul_ref(qa, qw, fmt, bias, out_dtype)


@_lowbit_linear.register_kernel("cuda")
def _lowbit_linear_cuda(x, weight, bias, a_codes, a_step, a_mask, a_rowsum, w_codes, w_step,
                        w_mask, w_rowsum, storage, odd, correction, method, block, fast_accum,
                        out_dtype):
    fmt = LowbitFormat(storage, odd, correction)
    qa, qw = _rows(a_codes, a_step, a_rowsum, fmt), _rows(w_codes, w_step, w_rowsum, fmt)
    if not _have_triton():
        return ref.lowbit_matmul_ref(qa, qw, fmt, bias, out_dtype)
    from coqat.kernels import gemm

    if gemm.scaled_mm_ok(qa, qw, fmt, out_dtype):
        return gemm.lowbit_matmul_scaled_mm(qa, qw, fmt, bias, fast_accum)
    return gemm.lowbit_matmul_triton(qa, qw, fmt, bias, out_dtype, fast_accum=fast_accum)


@_lowbit_linear.register_fake
def _lowbit_linear_fake(x, weight, bias, a_codes, a_step, a_mask, a_rowsum, w_codes, w_step,
                        w_mask, w_rowsum, storage, odd, correction, method, block, fast_accum,
                        out_dtype):
    return a_codes.new_empty((a_codes.shape[0], w_codes.shape[0]), dtype=out_dtype)


def _rows(codes: Tensor, step: Tensor, rowsum: Tensor, fmt: LowbitFormat) -> QuantizedRows:
    return QuantizedRows(codes, step, None, rowsum if fmt.correction else None)


def _lowbit_linear_setup(ctx, inputs, output) -> None:
    (x, weight, bias, a_codes, a_step, a_mask, _, w_codes, w_step, w_mask, _, storage, odd,
     correction, method, block, _, out_dtype) = inputs
    ctx.save_for_backward(a_codes, a_step, a_mask, w_codes, w_step, w_mask)
    ctx.fmt, ctx.method, ctx.block = LowbitFormat(storage, odd, correction), method, block
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, out_dtype)


def _lowbit_linear_backward(ctx, dy: Tensor):
    """v1: BF16 (the output dtype's) GEMMs on the dequantized codes; M = trust masks.

        dx = (M_x * (g @ Wq)) H      dW = (M_w * (g^T @ Xq)) H      db = sum_rows g
    """
    a_codes, a_step, a_mask, w_codes, w_step, w_mask = ctx.saved_tensors
    x_dtype, w_dtype, b_dtype, out_dtype = ctx.dtypes
    g = dy.to(out_dtype)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        wq = dequantize_codes(w_codes, w_step, ctx.fmt, ctx.method, g.dtype)
        # In the GEMM's dtype, as F.linear's dx under autocast: for a float32 input the cast
        # is fused into the consumer instead of a float32 write here.
        dx = masked_rotate(g @ wq, a_mask, ctx.block, g.dtype).to(x_dtype)
    if ctx.needs_input_grad[1]:
        xq = dequantize_codes(a_codes, a_step, ctx.fmt, ctx.method, g.dtype)
        dw = masked_rotate(g.t() @ xq, w_mask, ctx.block, w_dtype)
    if ctx.needs_input_grad[2]:
        db = g.sum(0, dtype=torch.float32).to(b_dtype)
    return (dx, dw, db) + (None,) * 15


_lowbit_linear.register_autograd(_lowbit_linear_backward, setup_context=_lowbit_linear_setup)


def lowbit_linear_forward(x2: Tensor, weight: Tensor, bias: Tensor | None, qa: QuantizedRows,
                          qw: QuantizedRows, fmt: LowbitFormat, method: str, block: int,
                          fast_accum: bool, out_dtype: torch.dtype) -> Tensor:
    """K2 on K1's codes of ``x2`` (2-D) and ``weight``; gradients flow to x2, weight, bias."""
    none = _no_tensor(qa.codes.device, torch.int32)
    return _lowbit_linear(x2, weight, bias, qa.codes, qa.step, qa.mask_bits,
                          none if qa.rowsum is None else qa.rowsum, qw.codes, qw.step,
                          qw.mask_bits, none if qw.rowsum is None else qw.rowsum,
                          *_fmt_args(fmt), method, block, fast_accum, out_dtype)
