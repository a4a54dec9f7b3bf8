"""The block-Hadamard rotation on tensor cores, shared by K1 and the backward kernels.

Numerics (``coqat.quant.hadamard``): every output is ``fl32(S * s)`` with ``S`` the +-1 sum
of a block accumulated in float32 and ``s`` the float32 normalization. Here ``S`` is one
``tl.dot`` of the input tile with the exact +-1 matrix, accumulated in float32:

- bf16 / fp16 inputs are dot operands as they are (a product with +-1 is exact);
- a float32 input is split into three bf16 pieces, ``x = hi + mid + lo`` exactly
  (``hi`` = x rounded to bf16, ``mid`` = the rest rounded to bf16, ``lo`` = what is left,
  at most 8 significant bits), and the three dots accumulate into one float32 sum. Three
  bf16 dots cost less than one float32 dot on CUDA cores, and TF32 would round the inputs.

Tiles. A row of ``K`` elements is cut into chunks of ``G`` columns (128, or the next power
of two >= K for short rows, at least 16 for ``tl.dot``); the Hadamard block ``B`` divides
both ``G`` and ``K``, so the +-1 matrix of a chunk is block-diagonal with ``G / B`` copies
of the ``B x B`` Sylvester matrix and no block straddles a chunk or the end of a row. A
program's tile is ``[R, G]``: ``R = BM * CPT`` chunks, ``CPT`` consecutive chunks of each of
``BM`` rows, so that per-row reductions (K1's scale) stay inside one program.

Under the CPU interpreter, bf16 dots are not supported (reference/kernels.md section 3), so
the dots take float32 operands there: the pieces are exact in float32 as well, so the same
sums are formed and only the dot's operand dtype differs from the GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from coqat.errors import CoqatError
from coqat.quant.hadamard import device_constant, hadamard_scale

__all__ = ["ChunkTiling", "hadamard_triton", "masked_rotate_triton", "hadamard_tile",
           "dot_dtype", "num_sms"]

# Elements of a program's tile: 16384 keeps an [R, G] float32 accumulator at 64 registers a
# thread on 8 warps.
TILE_ELEMS = 16384


@triton.jit
def load_hadamard(h_ptr, G: tl.constexpr):
    """The [G, G] +-1 matrix of ``hadamard_tile`` (L2-resident after the first program).

    Loading it costs far fewer registers than building it in the kernel (measured: 80 vs
    220 a thread for a 64 x 128 tile on 8 warps).
    """
    i = tl.arange(0, G)
    return tl.load(h_ptr + i[:, None] * G + i[None, :])


@triton.jit
def _dot(a, h, acc, DT: tl.constexpr):
    if DT == tl.float32:
        # the interpreter's float32 stand-in for bf16: exact products, float32 sums
        return tl.dot(a.to(DT), h, acc, input_precision="ieee", out_dtype=tl.float32)
    else:
        return tl.dot(a.to(DT), h, acc, out_dtype=tl.float32)


@triton.jit
def rotate_tile(x, h, SPLIT: tl.constexpr, DT: tl.constexpr, HSCALE: tl.constexpr):
    """``fl32(x @ h) * fl32(HSCALE)`` for a tile ``x [R, G]``, float32 accumulation.

    SPLIT: ``x`` is float32 and goes in as three exact bf16 pieces (see the module doc).
    """
    acc = tl.zeros([x.shape[0], x.shape[1]], dtype=tl.float32)
    if SPLIT:
        x = x.to(tl.float32)
        hi = x.to(tl.bfloat16).to(tl.float32)
        rest = x - hi                                  # exact: the bits hi did not take
        mid = rest.to(tl.bfloat16).to(tl.float32)
        lo = rest - mid                                # exact, and exact in bf16
        acc = _dot(hi, h, acc, DT)
        acc = _dot(mid, h, acc, DT)
        acc = _dot(lo, h, acc, DT)
    else:
        acc = _dot(x, h, acc, DT)
    return acc * HSCALE


@triton.jit
def chunk_coords(row0, chunk0, M, K, stride, BM: tl.constexpr, CPT: tl.constexpr,
                 G: tl.constexpr):
    """Rows, element offsets and the in-bounds mask of a tile [BM * CPT, G].

    Tile row r holds chunk ``chunk0 + r % CPT`` of row ``row0 + r // CPT``.
    """
    r = tl.arange(0, BM * CPT)
    row = row0 + r // CPT
    col = ((chunk0 + r % CPT) * G)[:, None] + tl.arange(0, G)[None, :]
    ok = (row < M)[:, None] & (col < K)
    offs = row.to(tl.int64)[:, None] * stride + col
    return row, col, offs, ok


@triton.jit
def _masked_rotate_kernel(g_ptr, mask_ptr, h_ptr, out_ptr, M, K, stride_g, stride_m, stride_o,
                          BM: tl.constexpr, CPT: tl.constexpr, G: tl.constexpr,
                          HSCALE: tl.constexpr, SPLIT: tl.constexpr, DT: tl.constexpr,
                          HAS_MASK: tl.constexpr):
    """out = (M * g) H, one tile a program (BM rows x CPT chunks of G columns)."""
    chunks = tl.cdiv(K, G)
    tiles_per_row = tl.cdiv(chunks, CPT)
    pid = tl.program_id(0)
    row0 = (pid // tiles_per_row) * BM
    chunk0 = (pid % tiles_per_row) * CPT
    row, col, offs, ok = chunk_coords(row0, chunk0, M, K, stride_g, BM, CPT, G)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    if HAS_MASK:
        moffs = row.to(tl.int64)[:, None] * stride_m + col // 8
        byte = tl.load(mask_ptr + moffs, mask=ok, other=0).to(tl.int32)
        g = tl.where(((byte >> (col % 8)) & 1) != 0, g, 0.0)
    y = rotate_tile(g, load_hadamard(h_ptr, G), SPLIT, DT, HSCALE)
    ooffs = row.to(tl.int64)[:, None] * stride_o + col
    tl.store(out_ptr + ooffs, y.to(out_ptr.dtype.element_ty), mask=ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(x_dtype: torch.dtype) -> tuple[torch.dtype, bool]:
    """(dot operand dtype, split) for an input dtype; float32 stand-ins under the interpreter."""
    split = x_dtype == torch.float32
    if _interpreting():
        return torch.float32, split
    return (torch.float16 if x_dtype == torch.float16 else torch.bfloat16), split


@functools.lru_cache(maxsize=64)
def hadamard_tile(g: int, block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[g, g] block-diagonal +-1 matrix: ``g / block`` copies of the ``block`` Sylvester matrix.

    A constant cached per device, made on the first call of a shape; under CUDA-graph
    capture that first call happens in the warm-up run, before capture, and the tensor is
    allocated outside the graph's pool (``device_constant``).
    """
    i = torch.arange(g)
    p = i[:, None] & i[None, :] & (block - 1)
    parity = torch.zeros_like(p)
    while bool(p.any()):
        parity ^= p & 1
        p >>= 1
    same = (i[:, None] // block) == (i[None, :] // block)
    return device_constant(torch.where(same, 1 - 2 * parity, 0).to(dtype), device)


class ChunkTiling:
    """How rows of ``k`` elements are cut for a block ``block`` (see the module doc).

    g: chunk width; chunks: chunks a row; cpt: chunks of a row in one tile; seg: tiles a
    row (> 1 only for rows longer than one tile); bm: rows a tile.
    """

    def __init__(self, rows: int, k: int, block: int, tile_elems: int = TILE_ELEMS,
                 whole_rows: bool = True):
        if block < 1 or block & (block - 1) or block > 128 or k % block:
            raise CoqatError(f"Hadamard block {block} must be a power of two <= 128 dividing "
                             f"the row length {k}")
        self.g = 128 if k >= 128 else max(16, next_pow2(k))
        self.chunks = -(-k // self.g)
        per_tile = max(1, tile_elems // self.g)
        chunks_p2 = next_pow2(self.chunks)
        self.cpt = min(chunks_p2, per_tile)
        self.seg = chunks_p2 // self.cpt if whole_rows else -(-self.chunks // self.cpt)
        bm = max(1, per_tile // chunks_p2) if self.cpt == chunks_p2 else 1
        self.bm = max(min(bm, next_pow2(rows)), 16 // self.cpt if self.cpt < 16 else 1)
        self.r = self.bm * self.cpt

    def num_warps(self) -> int:
        return max(1, min(8, self.r * self.g // 2048))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def masked_rotate_triton(g: torch.Tensor, mask_bits: torch.Tensor | None, block: int,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """``(M * g) H`` for a 2-D ``g`` (unit column stride): ``masked_rotate_ref`` on tensor
    cores. ``mask_bits`` is the packed mask (``pack_mask_bits``) or None (no mask)."""
    if g.dim() != 2 or g.stride(1) != 1:
        raise CoqatError(f"masked_rotate needs a 2-D tensor with contiguous rows, got shape "
                         f"{tuple(g.shape)}; pass g.contiguous()")
    m, k = g.shape
    out = torch.empty((m, k), dtype=out_dtype, device=g.device)
    if m == 0 or k == 0:
        return out
    # Whole rows are not needed here: tiles of 64 chunks (8192 elements) over rows x chunks.
    t = ChunkTiling(m, k, block, tile_elems=8192, whole_rows=False)
    dt, split = dot_dtype(g.dtype)
    grid = (triton.cdiv(m, t.bm) * t.seg,)
    _masked_rotate_kernel[grid](
        g, mask_bits if mask_bits is not None else g, hadamard_tile(t.g, block, dt, g.device),
        out, m, k, g.stride(0), mask_bits.stride(0) if mask_bits is not None else 0,
        out.stride(0), BM=t.bm, CPT=t.cpt, G=t.g, HSCALE=hadamard_scale(block), SPLIT=split,
        DT=TL_DTYPES[dt], HAS_MASK=mask_bits is not None, num_warps=min(4, t.num_warps()))
    return out


def hadamard_triton(x: torch.Tensor, block: int) -> torch.Tensor:
    """``coqat.quant.hadamard_transform`` (block > 1) on tensor cores; float32 output."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return masked_rotate_triton(x2, None, block, torch.float32).reshape(x.shape)
