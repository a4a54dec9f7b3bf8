"""K1: fused block-Hadamard rotation + row quantizer in one Triton kernel.

A program owns ``BM`` whole rows (``coqat.kernels.triton_rotate`` describes the [R, G] tile
of row chunks). It reads the rows once, rotates them on tensor cores, and writes the codes
in the GEMM's storage (FP8 e4m3 or INT8), one float32 step per row, the gradient mask
packed eight to a byte, and (8-bit QuEST) the row sums of the codes. The QuEST scale needs
the RMS of the whole *rotated* row before the first code can be written: rows that fit in
one tile (K <= 16384 at 128 columns a chunk) are kept in registers between the statistic
and the quantization; longer rows take two sweeps, the second rotating the reloaded tile
again. Programs are persistent (a fixed grid looping over row blocks), so the +-1 matrix is
built once a program.

Agreement with ``coqat.quant`` (the reference):

- The rotation is the contract's float32 accumulation (see ``triton_rotate``): it can differ
  from the torch reference's in the last bits where the float32 sums round differently, so a
  code can differ by one step where the rotated value sits at a rounding tie of the
  quantizer. Everything after the rotation is designed to be bit-exact given equal rotated
  values, so no other difference can arise:
- RMS: squares and their sum in float64 (exact squares, sums accurate far below float32's
  resolution), ``sqrt`` and division correctly rounded, then rounded to float32. The
  float64 sum runs in a different order than torch's; the float32 RMS can differ only if
  the float64 sums straddle a float32 rounding boundary (relative gap ~2^-50).
- Every float32 step is a separate IEEE operation in the reference's order: kernels are
  compiled with ``enable_fp_fusion=False`` (no FMA contraction); the per-row divisions use
  ``tl.div_rn`` (Triton's ``/`` is approximate for float32) and the per-element one the
  three-op correctly rounded division of ``_div_rn``; round-half-to-even is the exact
  magic-number form ``(t + 1.5 * 2^23) - 1.5 * 2^23`` (valid for |t| < 2^22).
- Codes are exact integers before any FP8 cast, so the cast cannot round (and the CPU
  interpreter, whose FP8 casts round differently, gives the GPU's bits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from coqat.errors import CoqatError
from coqat.kernels.reference import QuantizedRows, RowQuantizer
from coqat.kernels.triton_rotate import (
    ChunkTiling,
    chunk_coords,
    dot_dtype,
    TL_DTYPES,
    hadamard_tile,
    load_hadamard,
    num_sms,
    rotate_tile,
)
from coqat.quant.hadamard import hadamard_scale
from coqat.quant.quantizers import ALPHA, default_trust

__all__ = ["quantize_rows_triton", "QuantConfig", "quant_config", "DEFAULT_CONFIG"]

# Magic constant for round-half-to-even of a float32 |t| < 2^22: 1.5 * 2^23.
_RNE_MAGIC = tl.constexpr(12582912.0)
_QUEST_EPS = 1e-8
_RTN_EPS = 1e-12
# Persistent programs per SM (the grid is min(row blocks, this x SMs)).
PROGRAMS_PER_SM = 2


@triton.jit
def _per_row(v, BM: tl.constexpr, CPT: tl.constexpr):
    """Broadcast a per-row value [BM] to the tile's chunk rows, as a column [BM * CPT, 1]."""
    return tl.reshape(tl.broadcast_to(v[:, None], [BM, CPT]), [BM * CPT])[:, None]


@triton.jit
def _row_stat(r, QUEST: tl.constexpr, BM: tl.constexpr, CPT: tl.constexpr):
    """QuEST: float64 sum of squares of each row. RTN: max |r| (exact in any order).

    Elements past the end of a row were loaded as 0 and rotate to 0, so they add nothing.
    """
    if QUEST:
        r64 = r.to(tl.float64)
        s = tl.sum(tl.reshape(tl.sum(r64 * r64, axis=1), [BM, CPT]), axis=1)
    else:
        s = tl.max(tl.reshape(tl.max(tl.abs(r), axis=1), [BM, CPT]), axis=1)
    return s


@triton.jit
def _load_rotated(x_ptr, row0, chunk0, M, K, stride_x, h_ptr, BM: tl.constexpr, CPT: tl.constexpr,
                  G: tl.constexpr, B: tl.constexpr, HSCALE: tl.constexpr, SPLIT: tl.constexpr,
                  DT: tl.constexpr):
    """A tile of rows as float32, rotated when B > 1 (zeros past the ends of the rows)."""
    row, col, offs, ok = chunk_coords(row0, chunk0, M, K, stride_x, BM, CPT, G)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    if B > 1:
        r = rotate_tile(x, load_hadamard(h_ptr, G), SPLIT, DT, HSCALE)
    else:
        r = x.to(tl.float32)
    return r, row, col, ok


@triton.jit
def _div_rn(a, b, inv_b):
    """Correctly rounded float32 a / b, given inv_b = RN(1/b).

    q0 = RN(a * inv_b) is within one ulp of a/b, the residual a - b*q0 is exact in one fma,
    and q0 + residual * inv_b rounded once is the correctly rounded quotient (Markstein's
    theorem; checked on 4.8e8 pairs, reports/kernels.md). It can only differ for a
    subnormal dividend, where |a/b| < 2^-26 and every caller rounds the quotient (+1/2) to
    the same integer anyway. Three float32 ops instead of the ~10 of a div.rn.
    """
    q0 = a * inv_b
    rem = tl.fma(-q0, b, a)
    return tl.fma(rem, inv_b, q0)


@triton.jit
def _quantize_store(r, row, col, chunk0, ok, step, inv_step, lo, hi, radius,
                    codes_ptr, mask_ptr, stride_c, stride_m, M, K,
                    BM: tl.constexpr, CPT: tl.constexpr, G: tl.constexpr,
                    QUEST: tl.constexpr, ODD: tl.constexpr, FP8: tl.constexpr,
                    WITH_MASK: tl.constexpr):
    """Quantize a rotated tile, store codes and the packed mask; return the row sums of c."""
    step_e = _per_row(step, BM, CPT)
    inv_e = _per_row(inv_step, BM, CPT)
    lo_e = _per_row(lo, BM, CPT)
    hi_e = _per_row(hi, BM, CPT)
    radius_e = _per_row(radius, BM, CPT)
    if QUEST:
        clipped = tl.minimum(tl.maximum(r, lo_e), hi_e)
        t = _div_rn(clipped, step_e, inv_e) + 0.5
        k = (t + _RNE_MAGIC) - _RNE_MAGIC
        values = k * step_e - step_e * 0.5
        passed = tl.abs(values - r) <= radius_e
        if ODD:
            stored = k * 2.0 - 1.0     # 2c + 1 = 2k - 1, exact for small integers
        else:
            stored = k - 1.0
        c = k - 1.0
    else:
        c = _div_rn(r, step_e, inv_e)
        c = (c + _RNE_MAGIC) - _RNE_MAGIC
        c = tl.minimum(tl.maximum(c, lo_e), hi_e)
        passed = tl.abs(r) <= radius_e
        stored = c
    if FP8:
        stored = stored.to(tl.float8e4nv)
    else:
        stored = stored.to(tl.int8)
    tl.store(codes_ptr + row.to(tl.int64)[:, None] * stride_c + col, stored, mask=ok)
    if WITH_MASK:
        # Eight columns a byte, low bit first: byte j of chunk c of a row is column byte
        # c * G/8 + j of that row's packed mask.
        R: tl.constexpr = BM * CPT
        bits = (passed & ok).to(tl.int32) << (tl.arange(0, G) % 8)[None, :]
        packed = tl.sum(tl.reshape(bits, [R, G // 8, 8]), axis=2).to(tl.uint8)
        chunk = chunk0 + tl.arange(0, R) % CPT
        bcol = (chunk * (G // 8))[:, None] + tl.arange(0, G // 8)[None, :]
        bok = (row < M)[:, None] & (bcol * 8 < K)
        tl.store(mask_ptr + row.to(tl.int64)[:, None] * stride_m + bcol, packed, mask=bok)
    return tl.sum(tl.reshape(tl.sum(tl.where(ok, c, 0.0).to(tl.int32), axis=1), [BM, CPT]), axis=1)


@triton.jit
def _quantize_rows_kernel(
        x_ptr, h_ptr, codes_ptr, step_ptr, mask_ptr, rowsum_ptr,
        M, K, stride_x, stride_c, stride_m,
        alpha, eps, levels, trust, clip_ratio, qmax,
        BM: tl.constexpr, CPT: tl.constexpr, SEG: tl.constexpr, G: tl.constexpr,
        B: tl.constexpr, HSCALE: tl.constexpr, SPLIT: tl.constexpr, DT: tl.constexpr,
        QUEST: tl.constexpr, ODD: tl.constexpr, FP8: tl.constexpr,
        WITH_MASK: tl.constexpr, WITH_ROWSUM: tl.constexpr):
    """Persistent programs, each looping over blocks of BM rows: statistic, step, codes."""
    n_blocks = tl.cdiv(M, BM)
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        row0 = blk * BM
        rows = row0 + tl.arange(0, BM)

        # Sweep 1: the row statistic of the rotated rows.
        r, row, col, ok = _load_rotated(x_ptr, row0, 0, M, K, stride_x, h_ptr, BM, CPT, G, B,
                                        HSCALE, SPLIT, DT)
        stat = _row_stat(r, QUEST, BM, CPT)
        for s in range(1, SEG):
            r, row, col, ok = _load_rotated(x_ptr, row0, s * CPT, M, K, stride_x, h_ptr, BM, CPT, G,
                                            B, HSCALE, SPLIT, DT)
            if QUEST:
                stat += _row_stat(r, QUEST, BM, CPT)
            else:
                stat = tl.maximum(stat, _row_stat(r, QUEST, BM, CPT))

        # Per-row step, in the reference's order of float32 operations.
        if QUEST:
            rms = tl.sqrt(stat / K).to(tl.float32)    # float64 sqrt is sqrt.rn.f64
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

        # Sweep 2: quantize and store (the last tile of sweep 1 is still in registers).
        csum = _quantize_store(r, row, col, (SEG - 1) * CPT, ok, step, inv_step, lo, hi,
                               radius, codes_ptr, mask_ptr, stride_c, stride_m, M, K, BM, CPT,
                               G, QUEST, ODD, FP8, WITH_MASK)
        for s in range(0, SEG - 1):
            r, row, col, ok = _load_rotated(x_ptr, row0, s * CPT, M, K, stride_x, h_ptr, BM, CPT, G,
                                            B, HSCALE, SPLIT, DT)
            csum += _quantize_store(r, row, col, s * CPT, ok, step, inv_step, lo, hi, radius,
                                    codes_ptr, mask_ptr, stride_c, stride_m, M, K, BM, CPT,
                                    G, QUEST, ODD, FP8, WITH_MASK)
        if WITH_ROWSUM:
            tl.store(rowsum_ptr + rows, csum, mask=rows < M)


class QuantConfig(NamedTuple):
    """A K1 launch: ``tile_elems`` elements a tile (whole rows up to that width), ``num_warps``
    warps a program (None: 8 for 16-bit inputs, 4 for float32 ones, whose three dots spill
    registers on 8 warps), ``programs_per_sm`` persistent programs an SM on CUDA (0: one
    program a row block), or exactly ``grid`` programs."""

    tile_elems: int = 8192
    num_warps: int | None = None
    programs_per_sm: int = PROGRAMS_PER_SM
    grid: int | None = None


# The launch K1 uses when none is given; benchmarks/kernels.py sweeps the alternatives on
# the GPU and reports the fastest (reports/kernels.md).
DEFAULT_CONFIG = QuantConfig()


def quant_config() -> QuantConfig:
    """The default K1 launch (see ``QuantConfig``)."""
    return DEFAULT_CONFIG


def quantize_rows_triton(x: torch.Tensor, q: RowQuantizer, with_mask: bool = True,
                         config: QuantConfig | None = None) -> QuantizedRows:
    """K1: ``quantize_ref(x, q, with_mask)`` computed by one fused Triton kernel.

    ``x`` is a 2-D bf16 / fp16 / fp32 tensor with unit column stride (rows may be strided).
    Returns the reference's ``QuantizedRows``: equal codes, steps, masks and row sums except
    where the float32 rotation rounds differently at a quantizer tie (module docstring).
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise CoqatError(
            f"quantize_rows_triton needs a 2-D tensor with contiguous rows, got shape "
            f"{tuple(x.shape)} strides {x.stride()}; pass x.contiguous()")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise CoqatError(f"quantize_rows_triton takes bf16, fp16 or fp32 input, got {x.dtype}")
    rows, k = x.shape
    cfg = config or quant_config()
    t = ChunkTiling(rows, k, q.block, tile_elems=cfg.tile_elems)
    fmt = q.fmt
    dev = x.device
    codes = torch.empty((rows, k), dtype=fmt.torch_dtype, device=dev)
    step = torch.empty((rows,), dtype=torch.float32, device=dev)
    mask = torch.empty((rows, (k + 7) // 8), dtype=torch.uint8, device=dev) if with_mask else None
    rowsum = torch.empty((rows,), dtype=torch.int32, device=dev) if fmt.correction else None
    quest = q.method == "quest"
    trust = (default_trust(q.bits) if q.trust is None else q.trust) if quest else 0.0
    if rows > 0:
        grid = triton.cdiv(rows, t.bm)
        if cfg.grid:
            grid = min(grid, cfg.grid)
        elif cfg.programs_per_sm and x.is_cuda:
            grid = min(grid, num_sms(dev.index or 0) * cfg.programs_per_sm)
        dt, split = dot_dtype(x.dtype)
        _quantize_rows_kernel[(grid,)](
            x, hadamard_tile(t.g, q.block, dt, dev) if q.block > 1 else x, codes, step, mask if with_mask else step, rowsum if rowsum is not None else step,
            rows, k, x.stride(0), codes.stride(0), mask.stride(0) if with_mask else 0,
            ALPHA[q.bits] if quest else 0.0, _QUEST_EPS if quest else _RTN_EPS,
            float(q.levels), trust, float(q.clip_ratio), float(q.qmax),
            BM=t.bm, CPT=t.cpt, SEG=t.seg, G=t.g, B=q.block, HSCALE=hadamard_scale(q.block),
            SPLIT=split, DT=TL_DTYPES[dt], QUEST=quest, ODD=fmt.odd, FP8=fmt.dtype == "fp8",
            WITH_MASK=with_mask, WITH_ROWSUM=rowsum is not None,
            num_warps=cfg.num_warps or (4 if split else 8), enable_fp_fusion=False)
    return QuantizedRows(codes, step, mask, rowsum)
