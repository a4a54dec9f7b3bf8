"""Triton helpers of the backward pass (K3 v1): dequantize the codes the forward saved.

The v1 backward runs the two gradient GEMMs in BF16 on cuBLAS, on operands rebuilt from
the codes the forward saved. ``dequantize_triton`` rebuilds them: codes -> values in the
rotated basis, ``(c + 1/2) * step`` (QuEST) or ``c * step`` (RTN), one pass (reads 1 byte,
writes 2 or 4 bytes an element). The other memory-bound step, the masked back-rotation
``(M * g) H``, is ``triton_rotate.masked_rotate_triton`` (one pass on tensor cores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from coqat.kernels.reference import LowbitFormat, QuantizedRows

__all__ = ["dequantize_triton"]


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
