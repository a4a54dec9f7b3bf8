"""K1: fused block-Hadamard rotation + row quantizer in one Triton kernel.

One program owns ``BM`` whole rows. It reads the rows once from memory, rotates them, and
writes the codes in the GEMM's storage (FP8 e4m3 or INT8), one float32 step per row, the
gradient mask packed eight to a byte, and (8-bit QuEST) the row sums of the codes. The
QuEST scale needs the RMS of the whole *rotated* row before the first code can be written,
so rows longer than one tile take two sweeps: the first accumulates the statistic, the
second reloads the tile (from L2: the rows of one program were just read) and quantizes.

Thread layout: a thread owns 64 elements of one Hadamard block (8 runs of 8 contiguous
columns), so the butterflies of those bits never leave its registers. A 128 block is
shared by two threads; each loads both 64-halves and combines them with the +-signs of the
top butterfly stage on the way in (x_lo + x_hi or x_lo - x_hi), so no thread ever needs
another thread's data.

Bit-exactness with ``coqat.quant`` (the reference) is designed in, not tuned in:

- Rotation: the +-1 butterflies run in float64, where every partial sum of <= 128 bf16
  or float32 values is exact (the reference's own exactness condition), then one float64
  multiply by the float64 constant 2^-(log2 b)/2 and one rounding to float32: the same
  two roundings as ``hadamard_transform``. (Inputs are widened to float64 by moving their
  bits, see ``_f64_scaled_bits``; the result is the same.)
- RMS: squares and their sum in float64, ``sqrt`` and division correctly rounded
  (``sqrt.rn.f64``, ``div.rn.f64``), then rounded to float32. The float64 sum runs in a
  different order than torch's; the float32 result can differ only if the float64 sums
  straddle a float32 rounding boundary (relative gap ~2^-50: about one row in 10^8), the
  same caveat that holds between the reference on CPU and on CUDA.
- Every float32 step is a separate IEEE operation in the reference's order: kernels are
  compiled with ``enable_fp_fusion=False`` (no FMA contraction); the per-row divisions use
  ``tl.div_rn`` (Triton's ``/`` is approximate for float32) and the per-element one the
  three-op correctly rounded division of ``_div_rn``; round-half-to-even is the exact
  magic-number form ``(t + 1.5 * 2^23) - 1.5 * 2^23`` (valid for |t| < 2^22).
- Codes are exact integers before any FP8 cast, so the cast cannot round (and the CPU
  interpreter, whose FP8 casts round differently, gives the GPU's bits).

Speed (reports/kernels.md): the float64 rotation makes the kernel latency-bound, not
bandwidth-bound: ~0.45 ms at 16384x8192 on an H100 (1.0 TB/s) against 0.18 ms without a
rotation. Nsight Compute shows 215 registers a thread under Triton 3.6, hence 8 warps an
SM and an issue slot used every other cycle.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from coqat.errors import CoqatError
from coqat.kernels.reference import QuantizedRows, RowQuantizer
from coqat.quant.hadamard import hadamard_scale
from coqat.quant.quantizers import ALPHA, default_trust

__all__ = ["quantize_rows_triton", "QuantConfig", "QUANT_CONFIG"]

# Magic constant for round-half-to-even of a float32 |t| < 2^22: 1.5 * 2^23.
_RNE_MAGIC = tl.constexpr(12582912.0)
_QUEST_EPS = 1e-8
# Widen inputs to float64 by integer bit operations instead of conversion instructions
# (same bits; see _f64_scaled_bits). Faster together with WARP_MULT_DEFAULT = 2 on the
# H100 (benchmarks/kernels.py measures every combination).
INT_CVT_DEFAULT = True
# Elements of a K1 tile per thread (64: a whole 64-half of a 128 block; 32: a quarter).
ELEMS_DEFAULT = 64
# Warps per program relative to one thread per (row, group, h) slot. 2 measured faster on
# the H100 (0.45 vs 0.53 ms at 16384x8192, reports/kernels.md): Triton then spreads the q
# registers of a thread over two warps, and the shorter per-thread work hides more latency.
WARP_MULT_DEFAULT = 2
# Persistent grid: programs per SM looping over row blocks (0 = one program per block),
# and the software-pipelining depth of that loop (2: the next block's loads go to shared
# memory while this block computes).
PERSIST_DEFAULT = 0
STAGES_DEFAULT = 1
_RTN_EPS = 1e-12


@triton.jit
def _butterfly_dim0(x, Q: tl.constexpr, J: tl.constexpr, V: tl.constexpr, LOG: tl.constexpr):
    """+-1 butterflies on the low LOG bits of dim 0 of x [Q, J, V] (a register dim)."""
    for s in tl.static_range(LOG):
        y = tl.reshape(x, [Q // (2 << s), 2, 1 << s, J, V])
        y = tl.permute(y, (0, 2, 3, 4, 1))
        a, b = tl.split(y)
        y = tl.join(a + b, a - b)
        y = tl.permute(y, (0, 4, 1, 2, 3))
        x = tl.reshape(y, [Q, J, V])
    return x


@triton.jit
def _butterfly_dim2(x, Q: tl.constexpr, J: tl.constexpr, V: tl.constexpr, LOG: tl.constexpr):
    """+-1 butterflies on the low LOG bits of dim 2 of x [Q, J, V] (the contiguous vector)."""
    for s in tl.static_range(LOG):
        y = tl.reshape(x, [Q, J, V // (2 << s), 2, 1 << s])
        y = tl.permute(y, (0, 1, 2, 4, 3))
        a, b = tl.split(y)
        y = tl.join(a + b, a - b)
        y = tl.permute(y, (0, 1, 2, 4, 3))
        x = tl.reshape(y, [Q, J, V])
    return x


@triton.jit
def _tile_coords(row0, k0, BM: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
                 Q: tl.constexpr, H: tl.constexpr, V: tl.constexpr):
    """Row and column of every element of a tile [Q, BM*NG*H, V].

    A tile covers BM rows and NG groups of G = Q*H*V columns per row. Dim 1 enumerates
    (row, group, h) and is spread over lanes and warps; dims 0 (q) and 2 (v, 8 contiguous
    columns) stay in each thread's registers, so the Hadamard butterflies on them need no
    data exchange between threads. With H = 2 (the 128 block), the two threads of a group
    own the two halves of its outputs.
    """
    j = tl.arange(0, BM * NG * H)
    row = row0 + j // (NG * H)
    g = (j // H) % NG
    h = j % H
    q = tl.arange(0, Q)
    v = tl.arange(0, V)
    col = (k0 + g * G + h * (G // H))[None, :, None] + q[:, None, None] * V + v[None, None, :]
    return row, h, col


@triton.jit
def _f64_scaled_bits(x, flip):
    """(-1)^flip * x * 2^-896 as float64, exactly, from the bits of a bf16 / float32 x.

    Shifting a float32 bit pattern right by 3 into the high word of a float64 keeps sign,
    exponent and mantissa; only the exponent bias is off (127 vs 1023), so the float64 is
    exactly x * 2^-896 -- for zeros and subnormals too (they land on float64 subnormals).
    No conversion instruction is issued, and the sign flip of the top butterfly stage
    rides along in the same integer op. The butterflies are linear, so the 2^-896 is
    folded into the final scaling constant. ``flip`` (0/1) negates.
    """
    if x.dtype == tl.bfloat16:
        # bf16 -> float32 is a 16-bit shift; its low mantissa bits, and so the low word, are 0
        b = x.to(tl.float32).to(tl.uint32, bitcast=True) ^ (flip.to(tl.uint32) << 31)
        hi = (b & 0x80000000) | ((b >> 3) & 0x0FFFE000)
        bits = hi.to(tl.uint64) << 32
    else:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True) ^ (flip.to(tl.uint32) << 31)
        hi = (b & 0x80000000) | ((b & 0x7FFFFFFF) >> 3)
        bits = (hi.to(tl.uint64) << 32) | (b << 29).to(tl.uint64)
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _square_f64(r):
    """r * r in float64 for a float32 r, with r widened by integer ops (exponent re-biased).

    Exact for normal r. Zeros and float32 subnormals come out as |value| < 2^-126 instead,
    which adds less than 2^-240 to a row's sum of squares: such terms are absorbed by any
    row with a value above 2^-60, and a row whose RMS is that small has scale = the 1e-8
    eps and a mask that is 0 whatever the RMS, so no output can change.
    """
    a = r.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    hi = (a >> 3) + 0x38000000
    v = ((hi.to(tl.uint64) << 32) | (a << 29).to(tl.uint64)).to(tl.float64, bitcast=True)
    return v * v


@triton.jit
def _load_rotated(x_ptr, row0, k0, M, stride_xm, K: tl.constexpr, BM: tl.constexpr,
                  NG: tl.constexpr, G: tl.constexpr, Q: tl.constexpr, H: tl.constexpr,
                  V: tl.constexpr, LOG_B: tl.constexpr, HSCALE: tl.constexpr,
                  EVEN: tl.constexpr, INT_CVT: tl.constexpr = False):
    """The tile's rotated rows as float32 [Q, BM*NG*H, V] (zeros past the end of the rows).

    Exact float64 butterflies, one float64 scaling, one rounding to float32.
    """
    row, h, col = _tile_coords(row0, k0, BM, NG, G, Q, H, V)
    # With H > 1 the H threads of a group each load all H slices of the block (column offset
    # t * G/H) and combine them with the signs of the H x H Sylvester matrix: the top
    # log2(H) butterfly stages happen on the way in, with no data exchange between threads.
    col = col - (h * (G // H))[None, :, None]
    ptr = x_ptr + row.to(tl.int64)[None, :, None] * stride_xm + col
    if not EVEN:
        ok = (row < M)[None, :, None] & (col < K)
    if LOG_B == 0:
        if EVEN:
            x = tl.load(ptr)
        else:
            x = tl.load(ptr, mask=ok, other=0.0)
        x = x.to(tl.float32)
    else:
        for t in tl.static_range(H):
            if EVEN:
                xt = tl.load(ptr + t * (G // H))
            else:
                xt = tl.load(ptr + t * (G // H), mask=ok, other=0.0)
            th = h & t
            flip = ((th ^ (th >> 1)) & 1)[None, :, None]     # parity of t & h (H <= 4)
            # INT_CVT: work on x * 2^-896 built from the bits (see _f64_scaled_bits)
            if INT_CVT:
                xt = _f64_scaled_bits(xt, flip)
            else:
                xt = xt.to(tl.float64) * (1 - 2 * flip).to(tl.float64)
            if t == 0:
                x = xt
            else:
                x = x + xt
        LOG_V: tl.constexpr = LOG_B if LOG_B < 3 else 3
        x = _butterfly_dim2(x, Q, BM * NG * H, V, LOG_V)
        LOG_H: tl.constexpr = 0 if H == 1 else (1 if H == 2 else 2)
        x = _butterfly_dim0(x, Q, BM * NG * H, V, LOG_B - LOG_V - LOG_H)
        if INT_CVT:
            x = x * tl.full([Q, BM * NG * H, V], HSCALE * 2.0 ** 896, tl.float64)
        else:
            x = x * tl.full([Q, BM * NG * H, V], HSCALE, tl.float64)
    return x.to(tl.float32)


@triton.jit
def _row_sum(t, Q: tl.constexpr, BM: tl.constexpr, NGH: tl.constexpr, V: tl.constexpr):
    """Sum of a tile [Q, BM*NGH, V] over each row: [BM]."""
    t = tl.sum(t, axis=2)
    t = tl.sum(t, axis=0)
    return tl.sum(tl.reshape(t, [BM, NGH]), axis=1)


@triton.jit
def _row_max(t, Q: tl.constexpr, BM: tl.constexpr, NGH: tl.constexpr, V: tl.constexpr):
    t = tl.max(t, axis=2)
    t = tl.max(t, axis=0)
    return tl.max(tl.reshape(t, [BM, NGH]), axis=1)


@triton.jit
def _per_elem(v, Q: tl.constexpr, BM: tl.constexpr, NGH: tl.constexpr, V: tl.constexpr):
    """Broadcast a per-row value [BM] to the tile [Q, BM*NGH, V]."""
    t = tl.reshape(tl.broadcast_to(v[:, None], [BM, NGH]), [BM * NGH])
    return t[None, :, None]


@triton.jit
def _row_stat(r, QUEST: tl.constexpr, Q: tl.constexpr, BM: tl.constexpr, NGH: tl.constexpr,
              V: tl.constexpr, INT_CVT: tl.constexpr = False):
    """QuEST: the float64 sum of squares of each row. RTN: max |r| (exact in any order)."""
    if QUEST:
        # Squares of float32 values are exact in float64, so fma(a, a, b*b) rounds exactly
        # like the reference's a*a + b*b; it saves a multiply per pair.
        if INT_CVT:
            s = _row_sum(_square_f64(r), Q, BM, NGH, V)
        else:
            r64 = tl.reshape(r.to(tl.float64), [Q, BM * NGH, V // 2, 2])
            a, b = tl.split(r64)
            s = _row_sum(tl.fma(a, a, b * b), Q, BM, NGH, V // 2)
    else:
        s = _row_max(tl.abs(r), Q, BM, NGH, V)
    return s


@triton.jit
def _div_rn(a, b, inv_b, MARKSTEIN: tl.constexpr):
    """Correctly rounded float32 a / b.

    MARKSTEIN: with inv_b = RN(1/b), q0 = RN(a * inv_b) is within one ulp of a/b, the
    residual a - b*q0 is exact in one fma, and q0 + residual * inv_b rounded once is the
    correctly rounded quotient (Markstein's theorem; checked here on 4.8e8 pairs, including
    quotients next to every rounding boundary). It can only differ for a subnormal
    dividend, where |a/b| < 2^-26 and every caller rounds the quotient (+1/2) to the same
    integer anyway. Three float32 ops instead of the ~10 of a div.rn.
    """
    if MARKSTEIN:
        q0 = a * inv_b
        rem = tl.fma(-q0, b, a)
        q = tl.fma(rem, inv_b, q0)
    else:
        q = tl.div_rn(a, b)
    return q


@triton.jit
def _quantize_store(r, row0, k0, M, step, inv_step, lo, hi, radius,
                    codes_ptr, mask_ptr, stride_cm, stride_mm,
                    K: tl.constexpr, BM: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
                    Q: tl.constexpr, H: tl.constexpr, V: tl.constexpr,
                    QUEST: tl.constexpr, ODD: tl.constexpr, FP8: tl.constexpr,
                    WITH_MASK: tl.constexpr, MARKSTEIN: tl.constexpr, EVEN: tl.constexpr):
    """Quantize a rotated tile, store codes and the packed mask; return the row sums of c."""
    NGH: tl.constexpr = NG * H
    row, h, col = _tile_coords(row0, k0, BM, NG, G, Q, H, V)
    row_ok = row < M
    ok = row_ok[None, :, None] & (col < K)
    step_e = _per_elem(step, Q, BM, NGH, V)
    inv_e = _per_elem(inv_step, Q, BM, NGH, V)
    lo_e = _per_elem(lo, Q, BM, NGH, V)
    hi_e = _per_elem(hi, Q, BM, NGH, V)
    radius_e = _per_elem(radius, Q, BM, NGH, V)
    if QUEST:
        clipped = tl.minimum(tl.maximum(r, lo_e), hi_e)
        t = _div_rn(clipped, step_e, inv_e, MARKSTEIN) + 0.5
        k = (t + _RNE_MAGIC) - _RNE_MAGIC
        values = k * step_e - step_e * 0.5
        passed = tl.abs(values - r) <= radius_e
        if ODD:
            stored = tl.fma(k, 2.0, -1.0)  # 2c + 1 = 2k - 1, exact for small integers
        else:
            stored = k - 1.0
        c = k - 1.0
    else:
        c = _div_rn(r, step_e, inv_e, MARKSTEIN)
        c = (c + _RNE_MAGIC) - _RNE_MAGIC
        c = tl.minimum(tl.maximum(c, lo_e), hi_e)
        passed = tl.abs(r) <= radius_e
        stored = c
    if FP8:
        stored = stored.to(tl.float8e4nv)
    else:
        stored = stored.to(tl.int8)
    crow = row.to(tl.int64)[None, :, None]
    if EVEN:
        tl.store(codes_ptr + crow * stride_cm + col, stored)
    else:
        tl.store(codes_ptr + crow * stride_cm + col, stored, mask=ok)
    if WITH_MASK:
        if K % V != 0:
            passed = passed & ok   # the last byte of a row is partly past its end
        bits = passed.to(tl.int32) << tl.arange(0, V)[None, None, :]
        packed = tl.sum(bits, axis=2).to(tl.uint8)            # [Q, BM*NGH]: 8 columns a byte
        j = tl.arange(0, BM * NGH)
        g = (j // H) % NG
        bcol = ((k0 + g * G + h * (G // H)) // V)[None, :] + tl.arange(0, Q)[:, None]
        mptr = mask_ptr + row.to(tl.int64)[None, :] * stride_mm + bcol
        if EVEN:
            tl.store(mptr, packed)
        else:
            tl.store(mptr, packed, mask=row_ok[None, :] & (bcol * V < K))
    return _row_sum(tl.where(ok, c, 0.0).to(tl.int32), Q, BM, NGH, V)


@triton.jit
def _quantize_row_block(
        row0, x_ptr, codes_ptr, step_ptr, mask_ptr, rowsum_ptr,
        M, stride_xm, stride_cm, stride_mm,
        alpha, eps, levels, trust, clip_ratio, qmax,
        K: tl.constexpr, BM: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
        Q: tl.constexpr, H: tl.constexpr, LOG_B: tl.constexpr, HSCALE: tl.constexpr,
        QUEST: tl.constexpr, ODD: tl.constexpr, FP8: tl.constexpr,
        WITH_MASK: tl.constexpr, WITH_ROWSUM: tl.constexpr, MARKSTEIN: tl.constexpr,
        EVEN: tl.constexpr, INT_CVT: tl.constexpr):
    """Quantize rows [row0, row0 + BM): statistic sweep, per-row step, quantize sweep."""
    V: tl.constexpr = 8
    NGH: tl.constexpr = NG * H
    TK: tl.constexpr = NG * G
    NK: tl.constexpr = (K + TK - 1) // TK
    rows = row0 + tl.arange(0, BM)

    # Sweep 1: the row statistic of the rotated rows.
    if NK == 1:
        r = _load_rotated(x_ptr, row0, 0, M, stride_xm, K, BM, NG, G, Q, H, V, LOG_B, HSCALE, EVEN,
                          INT_CVT)
        stat = _row_stat(r, QUEST, Q, BM, NGH, V, INT_CVT)
    else:
        if QUEST:
            stat = tl.zeros([BM], tl.float64)
        else:
            stat = tl.zeros([BM], tl.float32)
        for kc in tl.static_range(NK):
            rc = _load_rotated(x_ptr, row0, kc * TK, M, stride_xm, K, BM, NG, G, Q, H, V, LOG_B,
                               HSCALE, EVEN, INT_CVT)
            if QUEST:
                stat += _row_stat(rc, QUEST, Q, BM, NGH, V, INT_CVT)
            else:
                stat = tl.maximum(stat, _row_stat(rc, QUEST, Q, BM, NGH, V, INT_CVT))

    # Per-row step, in the reference's order of float32 operations.
    if QUEST:
        rms = tl.sqrt(stat / K).to(tl.float32)
        scale = rms * alpha
        scale = scale + eps
        step = tl.div_rn(scale * 2.0, tl.zeros([BM], tl.float32) + levels)
        lo = -scale
        hi = scale
        radius = trust * rms
    else:
        clip = clip_ratio * stat
        step = tl.div_rn(clip, tl.zeros([BM], tl.float32) + qmax) + eps
        lo = tl.zeros([BM], tl.float32) - qmax
        hi = tl.zeros([BM], tl.float32) + qmax
        radius = clip
    inv_step = tl.div_rn(tl.zeros([BM], tl.float32) + 1.0, step)
    tl.store(step_ptr + rows, step, mask=rows < M)

    # Sweep 2: quantize and store.
    if NK == 1:
        csum = _quantize_store(r, row0, 0, M, step, inv_step, lo, hi, radius, codes_ptr, mask_ptr,
                               stride_cm, stride_mm, K, BM, NG, G, Q, H, V, QUEST, ODD, FP8,
                               WITH_MASK, MARKSTEIN, EVEN)
    else:
        csum = tl.zeros([BM], tl.int32)
        for kc in tl.static_range(NK):
            rc = _load_rotated(x_ptr, row0, kc * TK, M, stride_xm, K, BM, NG, G, Q, H, V, LOG_B,
                               HSCALE, EVEN, INT_CVT)
            csum += _quantize_store(rc, row0, kc * TK, M, step, inv_step, lo, hi, radius,
                                    codes_ptr, mask_ptr, stride_cm, stride_mm, K, BM, NG, G, Q,
                                    H, V, QUEST, ODD, FP8, WITH_MASK, MARKSTEIN, EVEN)
    if WITH_ROWSUM:
        tl.store(rowsum_ptr + rows, csum, mask=rows < M)


@triton.jit
def _quantize_rows_kernel(
        x_ptr, codes_ptr, step_ptr, mask_ptr, rowsum_ptr,
        M, stride_xm, stride_cm, stride_mm,
        alpha, eps, levels, trust, clip_ratio, qmax,
        K: tl.constexpr, BM: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
        Q: tl.constexpr, H: tl.constexpr, LOG_B: tl.constexpr, HSCALE: tl.constexpr,
        QUEST: tl.constexpr, ODD: tl.constexpr, FP8: tl.constexpr,
        WITH_MASK: tl.constexpr, WITH_ROWSUM: tl.constexpr, MARKSTEIN: tl.constexpr,
        EVEN: tl.constexpr, INT_CVT: tl.constexpr, PERSIST: tl.constexpr,
        STAGES: tl.constexpr):
    """One program per BM rows, or (PERSIST) a fixed grid looping over row blocks so the
    loads of the next block can overlap the arithmetic of this one."""
    if PERSIST:
        n_blocks = tl.cdiv(M, BM)
        for b in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0), num_stages=STAGES):
            _quantize_row_block(b * BM, x_ptr, codes_ptr, step_ptr, mask_ptr, rowsum_ptr,
                                M, stride_xm, stride_cm, stride_mm,
                                alpha, eps, levels, trust, clip_ratio, qmax, K, BM, NG, G, Q,
                                H, LOG_B, HSCALE, QUEST, ODD, FP8, WITH_MASK, WITH_ROWSUM,
                                MARKSTEIN, EVEN, INT_CVT)
    else:
        _quantize_row_block(tl.program_id(0) * BM, x_ptr, codes_ptr, step_ptr, mask_ptr,
                            rowsum_ptr, M, stride_xm, stride_cm, stride_mm,
                            alpha, eps, levels, trust, clip_ratio, qmax, K, BM, NG, G, Q, H,
                            LOG_B, HSCALE, QUEST, ODD, FP8, WITH_MASK, WITH_ROWSUM, MARKSTEIN,
                            EVEN, INT_CVT)


class QuantConfig(NamedTuple):
    """One K1 program: ``bm`` rows x ``tk`` columns per sweep, on ``num_warps`` warps, each
    thread owning ``elems`` elements of the tile (see ``_group``)."""

    bm: int
    tk: int
    num_warps: int
    elems: int = 64
    persist: int = 0      # > 0: a fixed grid of persist programs per SM looping over rows
    stages: int = 1       # software-pipelining depth of that loop


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _group(block: int, elems: int = 64) -> tuple[int, int, int]:
    """(G, Q, H) for a Hadamard block: G columns a group, Q vectors of 8 per thread, H threads.

    ``elems`` (8..64, a power of two) is how many elements each thread owns; a block larger
    than that is shared by H = block / elems threads (at most 4).
    """
    g = max(block, 8)
    q = max(1, min(g, elems) // 8)
    h = g // (8 * q)
    if h > 4:
        raise CoqatError(f"K1 supports at most 4 threads per Hadamard block; raise elems ({elems})")
    return g, q, h


def QUANT_CONFIG(rows: int, k: int, block: int, max_tk: int = 16384,
                 elems: int | None = None) -> QuantConfig:
    """The default K1 tile: whole rows up to ``max_tk`` columns in one sweep, ~8192 elements
    a program, ``elems`` per thread (whose butterflies never leave its registers). Rows
    wider than ``max_tk`` are swept twice.
    """
    elems = ELEMS_DEFAULT if elems is None else elems
    g, q, h = _group(block, elems)
    tk = min(max(_next_pow2(k), g), max_tk)
    threads_per_row = (tk // g) * h
    per_thread = q * 8
    bm = max(1, min(max(1, 8192 // per_thread) // threads_per_row, _next_pow2(rows)))
    num_warps = max(1, min(16, WARP_MULT_DEFAULT * bm * threads_per_row // 32))
    return QuantConfig(bm, tk, num_warps, elems, PERSIST_DEFAULT, STAGES_DEFAULT)


def quantize_rows_triton(x: torch.Tensor, q: RowQuantizer, with_mask: bool = True,
                         config: QuantConfig | None = None, markstein: bool = True,
                         int_cvt: bool | None = None) -> QuantizedRows:
    """K1: ``quantize_ref(x, q, with_mask)`` computed by one fused Triton kernel.

    ``x`` is a 2-D bf16 / fp16 / fp32 tensor with unit column stride (rows may be strided).
    Returns the same ``QuantizedRows`` as the reference, bit for bit. ``markstein=False``
    uses Triton's div.rn instead of the three-op division (same bits, for comparison).
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise CoqatError(
            f"quantize_rows_triton needs a 2-D tensor with contiguous rows, got shape "
            f"{tuple(x.shape)} strides {x.stride()}; pass x.contiguous()")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise CoqatError(f"quantize_rows_triton takes bf16, fp16 or fp32 input, got {x.dtype}")
    rows, k = x.shape
    if k % q.block:
        raise CoqatError(f"Hadamard block {q.block} does not divide the row length {k}")
    cfg = config or QUANT_CONFIG(rows, k, q.block)
    g, qq, h = _group(q.block, cfg.elems)
    if cfg.tk % g or cfg.tk & (cfg.tk - 1) or cfg.bm & (cfg.bm - 1):
        raise CoqatError(f"K1 tile {cfg} must have power-of-two sizes and a width that is a "
                         f"multiple of {g} columns")
    fmt = q.fmt
    dev = x.device
    codes = torch.empty((rows, k), dtype=fmt.torch_dtype, device=dev)
    step = torch.empty((rows,), dtype=torch.float32, device=dev)
    mask = torch.empty((rows, (k + 7) // 8), dtype=torch.uint8, device=dev) if with_mask else None
    rowsum = torch.empty((rows,), dtype=torch.int32, device=dev) if fmt.correction else None
    quest = q.method == "quest"
    trust = (default_trust(q.bits) if q.trust is None else q.trust) if quest else 0.0
    if rows > 0:
        grid = (triton.cdiv(rows, cfg.bm),)
        if cfg.persist:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if x.is_cuda else 4
            grid = (min(grid[0], sms * cfg.persist),)
        _quantize_rows_kernel[grid](
            x, codes, step, mask if with_mask else step, rowsum if rowsum is not None else step,
            rows, x.stride(0), codes.stride(0), mask.stride(0) if with_mask else 0,
            ALPHA[q.bits] if quest else 0.0, _QUEST_EPS if quest else _RTN_EPS,
            float(q.levels), trust, float(q.clip_ratio), float(q.qmax),
            K=k, BM=cfg.bm, NG=cfg.tk // g, G=g, Q=qq, H=h, LOG_B=q.block.bit_length() - 1,
            HSCALE=hadamard_scale(q.block), QUEST=quest, ODD=fmt.odd, FP8=fmt.dtype == "fp8",
            WITH_MASK=with_mask, WITH_ROWSUM=rowsum is not None, MARKSTEIN=markstein,
            EVEN=(k % cfg.tk == 0 and rows % cfg.bm == 0),
            INT_CVT=INT_CVT_DEFAULT if int_cvt is None else int_cvt,
            PERSIST=bool(cfg.persist), STAGES=cfg.stages,
            num_warps=cfg.num_warps, enable_fp_fusion=False)
    return QuantizedRows(codes, step, mask, rowsum)
