"""K2: the low-bit forward GEMM on FP8 or INT8 tensor cores, scales applied in the epilogue.

``out = A W^T`` for K1's codes of the activations (A, one row per token) and of the weight
(W, one row per output channel), with the contract of ``coqat.kernels.reference``::

    C   = sum_k A[m, k] * W[n, k]                       exact integer
    acc = float32(C)  (+ (float32(Ra[m] + Rw[n]) * 0.5 + float32(K) * 0.25) with correction)
    out = (acc * sa[m]) * sw[n]  (+ bias[n])            cast to the output dtype

Two implementations:

- ``lowbit_matmul_triton``: a Triton kernel for both dtypes. INT8 dots accumulate in int32
  (always exact). FP8 dots on Hopper accumulate with ~14 bits inside the tensor core, so
  the exact mode promotes into a float32 accumulator after every 32-deep instruction
  (``max_num_imprecise_acc=32``); within one instruction the integer products of <= 5-bit
  codes stay below 2^13 and are summed exactly.
- ``torch._scaled_mm`` (cuBLASLt / CUTLASS, rowwise scales): the faster FP8 path on the GPU
  (1.6-1.7x BF16 at 8192^3, against 0.9x for the exact Triton FP8 kernel), used when no
  correction is needed and the output is bf16. With ``use_fast_accum=False`` it was exact
  on random codes up to K = 16384 on an H100, but not on the worst case (every product
  15 * 15, same sign): up to 1.1e-3 relative there, as it promotes to float32 only every
  ~128 K (reports/kernels.md). The fast mode is an option (6-21 % on that worst case).

``lowbit_matmul`` picks one. The Triton kernel runs under ``TRITON_INTERPRET=1`` on the
CPU (with a fixed tile; no autotuning there), which is how CI tests it.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from coqat.errors import CoqatError
from coqat.kernels.reference import LowbitFormat, QuantizedRows, gemm_scale

__all__ = ["GemmConfig", "lowbit_matmul_triton", "lowbit_matmul_scaled_mm", "scaled_mm_ok"]


@triton.jit
def _lowbit_gemm_kernel(
        a_ptr, w_ptr, out_ptr, sa_ptr, sw_ptr, ra_ptr, rw_ptr, bias_ptr,
        M, N, K, stride_am, stride_wn, stride_om,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        INT8: tl.constexpr, ODD: tl.constexpr, CORRECTION: tl.constexpr,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IMPRECISE: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    # Grouped order: GROUP_M row tiles share the same weight tiles while they sit in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]
    m_ok = rm < M
    n_ok = rn < N
    if INT8:
        acc = tl.zeros([BM, BN], dtype=tl.int32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    # The fill value has the operand's type (the interpreter cannot cast an int to FP8).
    if INT8:
        zero = 0
    else:
        zero = 0.0
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=zero)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=zero)
        else:
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=zero)
            w = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=zero)
        if INT8:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, w, acc, out_dtype=tl.float32, max_num_imprecise_acc=IMPRECISE)
        a_ptrs += BK
        w_ptrs += BK

    sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    if ODD:
        sa = sa * 0.5
        sw = sw * 0.5
    out = acc.to(tl.float32)
    if CORRECTION:
        ra = tl.load(ra_ptr + rm, mask=m_ok, other=0)
        rw = tl.load(rw_ptr + rn, mask=n_ok, other=0)
        corr = (ra[:, None] + rw[None, :]).to(tl.float32) * 0.5 + K.to(tl.float32) * 0.25
        out = out + corr
    out = (out * sa[:, None]) * sw[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


class GemmConfig(NamedTuple):
    bm: int
    bn: int
    bk: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Tiles for the H100 (8-bit operands, 128-deep K steps), tried by triton.autotune on the GPU.
# The exact FP8 mode keeps a second accumulator for the promotion, so its tiles are smaller
# (128x256 spills registers there).
_GPU_CONFIGS = {
    "fp8_exact": (GemmConfig(128, 128, 128, 8, 8, 4), GemmConfig(128, 128, 64, 8, 4, 5)),
    "wide": (GemmConfig(128, 256, 128, 8, 8, 3), GemmConfig(128, 128, 128, 8, 8, 4)),
}
# One fixed tile under the CPU interpreter (no autotuning there).
_INTERPRETER_CONFIG = GemmConfig(32, 32, 32, 4, 4, 1)


@functools.lru_cache(maxsize=2)
def _autotuned_kernel(kind: str):
    """The kernel wrapped in triton.autotune; built on first GPU use (it needs a driver)."""
    configs = [triton.Config({"BM": c.bm, "BN": c.bn, "BK": c.bk, "GROUP_M": c.group_m},
                             num_warps=c.num_warps, num_stages=c.num_stages)
               for c in _GPU_CONFIGS[kind]]
    return triton.autotune(configs, key=["M", "N", "K", "INT8", "CORRECTION", "HAS_BIAS"])(
        _lowbit_gemm_kernel)


def lowbit_matmul_triton(a: QuantizedRows, w: QuantizedRows, fmt: LowbitFormat,
                         bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype = torch.bfloat16,
                         config: GemmConfig | None = None, fast_accum: bool = False
                         ) -> torch.Tensor:
    """K2 as a Triton kernel: ``lowbit_matmul_ref`` computed on tensor cores.

    ``config`` fixes the tile (required under the interpreter, where a small default is
    used); without it the GPU autotunes over a few H100 tiles. ``fast_accum`` lets FP8 dots
    accumulate inside the tensor core (faster, not exact).
    """
    m, k = a.codes.shape
    n = w.codes.shape[0]
    if w.codes.shape[1] != k or a.codes.dtype != w.codes.dtype:
        raise CoqatError(f"lowbit_matmul: operands do not match ({tuple(a.codes.shape)} "
                         f"{a.codes.dtype} vs {tuple(w.codes.shape)} {w.codes.dtype})")
    if fmt.correction and (a.rowsum is None or w.rowsum is None):
        raise CoqatError("lowbit_matmul: this format needs the row sums of both operands")
    out = torch.empty((m, n), dtype=out_dtype, device=a.codes.device)
    if m == 0 or n == 0:
        return out
    dummy = a.step
    args = (a.codes, w.codes, out, a.step, w.step,
            a.rowsum if fmt.correction else dummy, w.rowsum if fmt.correction else dummy,
            bias if bias is not None else dummy, m, n, k,
            a.codes.stride(0), w.codes.stride(0), out.stride(0))
    flags = dict(INT8=fmt.dtype == "int8", ODD=fmt.odd, CORRECTION=fmt.correction,
                 HAS_BIAS=bias is not None, IMPRECISE=(None if fast_accum else 32))
    if config is None and _interpreting():
        config = _INTERPRETER_CONFIG
    if config is None:
        # The autotuned kernel needs EVEN_K fixed per shape; the K tile is 64 or 128.
        flags["EVEN_K"] = k % 128 == 0

        def grid(meta):
            return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

        kind = "fp8_exact" if (fmt.dtype == "fp8" and not fast_accum) else "wide"
        _autotuned_kernel(kind)[grid](*args, **flags, enable_fp_fusion=False)
    else:
        grid = (triton.cdiv(m, config.bm) * triton.cdiv(n, config.bn),)
        _lowbit_gemm_kernel[grid](*args, BM=config.bm, BN=config.bn, BK=config.bk,
                                  GROUP_M=config.group_m, EVEN_K=k % config.bk == 0, **flags,
                                  num_warps=config.num_warps, num_stages=config.num_stages,
                                  enable_fp_fusion=False)
    return out


def scaled_mm_ok(a: QuantizedRows, w: QuantizedRows, fmt: LowbitFormat,
                 out_dtype: torch.dtype) -> bool:
    """Whether cuBLAS's rowwise-scaled FP8 GEMM can compute this product exactly as asked."""
    m, k = a.codes.shape
    n = w.codes.shape[0]
    return (fmt.dtype == "fp8" and not fmt.correction and out_dtype == torch.bfloat16
            and a.codes.is_cuda and k % 16 == 0 and n % 16 == 0 and m > 0)


def lowbit_matmul_scaled_mm(a: QuantizedRows, w: QuantizedRows, fmt: LowbitFormat,
                            bias: torch.Tensor | None = None, fast_accum: bool = False
                            ) -> torch.Tensor:
    """K2 on cuBLASLt/CUTLASS: ``torch._scaled_mm`` with per-row and per-column scales.

    The scales multiply the float32 accumulator in the epilogue; the rounding order there
    is the library's, so the bf16 output can differ from the Triton kernel's in the last bit.
    """
    sa = gemm_scale(a.step, fmt).reshape(-1, 1)
    sw = gemm_scale(w.step, fmt).reshape(1, -1)
    return torch._scaled_mm(a.codes, w.codes.t(), scale_a=sa, scale_b=sw,
                            bias=None if bias is None else bias.to(torch.bfloat16),
                            out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
