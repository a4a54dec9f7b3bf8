"""Triton helpers of the backward pass (K3 v1): dequantize codes, mask and rotate gradients.

The v1 backward runs the two gradient GEMMs in BF16 on cuBLAS, on operands rebuilt from
the codes the forward saved; these two kernels are the memory-bound steps around them:

- ``dequantize_triton``: codes -> values in the rotated basis, ``(c + 1/2) * step`` (QuEST)
  or ``c * step`` (RTN), one pass (reads 1 byte, writes 2 or 4 bytes an element).
- ``masked_rotate_triton``: the backward of "rotate, then quantize": ``(M * g) H``. It
  reads the gradient and the packed mask once, zeroes the elements whose trust mask is 0,
  and applies the block Hadamard with float32 butterflies held in registers (the same
  thread layout as K1), scaled by 2^-(log2 b)/2, rounded once to the output dtype.

Gradients are not part of the bit-exact contract; these match the float32 reference
(``coqat.kernels.reference.masked_rotate_ref``) to float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from coqat.errors import CoqatError
from coqat.kernels.reference import LowbitFormat, QuantizedRows
from coqat.kernels.triton_quant import (
    _butterfly_dim0,
    _butterfly_dim2,
    _group,
    _next_pow2,
)
from coqat.quant.hadamard import hadamard_scale

__all__ = ["dequantize_triton", "masked_rotate_triton"]


@triton.jit
def _dequantize_kernel(codes_ptr, step_ptr, out_ptr, M, K, stride_cm, stride_om,
                       BM: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
                       ODD: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    c = tl.load(codes_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :],
                mask=ok).to(tl.float32)
    s = tl.load(step_ptr + rows, mask=rows < M, other=0.0)
    if ODD:
        s = s * 0.5
    if HALF:
        c = c + 0.5
    v = c * s[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
             v.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_triton(q: QuantizedRows, fmt: LowbitFormat, method: str = "quest",
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``dequantize_ref`` in one Triton pass (the same float32 values before the cast)."""
    m, k = q.codes.shape
    out = torch.empty((m, k), dtype=dtype, device=q.codes.device)
    if m and k:
        bm, bk = 8, 512
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
        codes = q.codes.view(torch.int8) if fmt.dtype == "int8" else q.codes
        _dequantize_kernel[grid](codes, q.step, out, m, k, q.codes.stride(0), out.stride(0),
                                 BM=bm, BK=bk, HALF=(method == "quest" and not fmt.odd),
                                 ODD=fmt.odd, num_warps=4, enable_fp_fusion=False)
    return out


@triton.jit
def _masked_gradient(g_ptr, mask_ptr, rows, row_ok, col0, stride_gm, stride_mm, K,
                     HAS_MASK: tl.constexpr, V: tl.constexpr):
    """g[rows, col0 + v] as float32 [Q, J, V], zeroed where the packed mask bit is 0.

    ``col0`` [Q, J, 1] are the first columns of 8-column runs: one mask byte each.
    """
    v = tl.arange(0, V)[None, None, :]
    col = col0 + v
    ok = row_ok[None, :, None] & (col < K)
    rptr = rows.to(tl.int64)[None, :, None]
    g = tl.load(g_ptr + rptr * stride_gm + col, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        byte = tl.load(mask_ptr + rptr * stride_mm + col0 // V,
                       mask=row_ok[None, :, None] & (col0 < K), other=0).to(tl.int32)
        g = tl.where(((byte >> v) & 1) != 0, g, 0.0)
    return g


@triton.jit
def _masked_rotate_kernel(g_ptr, mask_ptr, out_ptr, M, K, stride_gm, stride_mm, stride_om,
                          BM: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
                          Q: tl.constexpr, H: tl.constexpr, LOG_B: tl.constexpr,
                          HSCALE: tl.constexpr, HAS_MASK: tl.constexpr):
    V: tl.constexpr = 8
    J: tl.constexpr = BM * NG * H
    j = tl.arange(0, J)
    rows = tl.program_id(0) * BM + j // (NG * H)
    grp = tl.program_id(1) * NG + (j // H) % NG
    h = j % H
    row_ok = rows < M
    col0 = (grp * G)[None, :, None] + (tl.arange(0, Q) * V)[:, None, None]
    if H == 2:
        lo = _masked_gradient(g_ptr, mask_ptr, rows, row_ok, col0, stride_gm, stride_mm, K,
                              HAS_MASK, V)
        hi = _masked_gradient(g_ptr, mask_ptr, rows, row_ok, col0 + G // 2, stride_gm,
                              stride_mm, K, HAS_MASK, V)
        sign = (1 - 2 * h).to(tl.float32)[None, :, None]
        x = lo + hi * sign
    else:
        x = _masked_gradient(g_ptr, mask_ptr, rows, row_ok, col0, stride_gm, stride_mm, K,
                             HAS_MASK, V)
    if LOG_B > 0:
        LOG_V: tl.constexpr = LOG_B if LOG_B < 3 else 3
        x = _butterfly_dim2(x, Q, J, V, LOG_V)
        x = _butterfly_dim0(x, Q, J, V, LOG_B - LOG_V - (H - 1))
        x = x * HSCALE
    col = col0 + (h * (G // H))[None, :, None] + tl.arange(0, V)[None, None, :]
    tl.store(out_ptr + rows.to(tl.int64)[None, :, None] * stride_om + col,
             x.to(out_ptr.dtype.element_ty), mask=row_ok[None, :, None] & (col < K))


def masked_rotate_triton(g: torch.Tensor, mask_bits: torch.Tensor | None, block: int,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """``(M * g) H`` for a 2-D gradient ``g`` (unit column stride), per ``masked_rotate_ref``."""
    if g.dim() != 2 or g.stride(1) != 1:
        raise CoqatError(f"masked_rotate needs a 2-D tensor with contiguous rows, got shape "
                         f"{tuple(g.shape)}; pass g.contiguous()")
    m, k = g.shape
    if k % block:
        raise CoqatError(f"Hadamard block {block} does not divide the row length {k}")
    out = torch.empty((m, k), dtype=out_dtype, device=g.device)
    if m == 0 or k == 0:
        return out
    grp, q, h = _group(block)
    ng = max(1, min(_next_pow2(triton.cdiv(k, grp)), 128 // h))
    bm = max(1, min(_next_pow2(m), 128 // (ng * h)))
    grid = (triton.cdiv(m, bm), triton.cdiv(k, ng * grp))
    _masked_rotate_kernel[grid](
        g, mask_bits if mask_bits is not None else g, out, m, k, g.stride(0),
        mask_bits.stride(0) if mask_bits is not None else 0, out.stride(0),
        BM=bm, NG=ng, G=grp, Q=q, H=h, LOG_B=block.bit_length() - 1,
        HSCALE=hadamard_scale(block),  # a float constexpr: rounded once to float32 in the kernel
        HAS_MASK=mask_bits is not None, num_warps=max(1, min(4, bm * ng * h // 32)),
        enable_fp_fusion=False)
    return out

