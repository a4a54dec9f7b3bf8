"""K4: int4 / int2 pack and unpack in Triton, in the layout of ``coqat.kernels.pack``.

The torch reference (``coqat/kernels/pack.py``) defines the layout: packing runs along the
last dim, rows padded to whole bytes with zero codes; int4 holds code 2j in the low
nibble of byte j, int2 holds code 4j in the lowest two bits; codes are two's complement.
These kernels produce the same bytes (and the same codes back), bit for bit, in one pass.

Both kernels work on 2-D tiles of ``BR`` rows x ``BC`` bytes; an int8 code tile is viewed
as [BR, BC, per] and the ``per`` codes of a byte are combined in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from coqat.errors import CoqatError
from coqat.kernels.pack import code_range

__all__ = ["pack_int4_triton", "unpack_int4_triton", "pack_int2_triton", "unpack_int2_triton"]

_BR = 16
_BC = 64


@triton.jit
def _pack_kernel(codes_ptr, out_ptr, R, N, NB, stride_c, stride_o,
                 BITS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    bytes_ = tl.program_id(1) * BC + tl.arange(0, BC)
    t = tl.arange(0, PER)
    col = bytes_[None, :, None] * PER + t[None, None, :]
    ok = (rows < R)[:, None, None] & (col < N)
    c = tl.load(codes_ptr + rows.to(tl.int64)[:, None, None] * stride_c + col, mask=ok, other=0)
    field = (c.to(tl.int32) & ((1 << BITS) - 1)) << (t * BITS)[None, None, :]
    packed = tl.sum(field, axis=2)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + bytes_[None, :],
             packed.to(tl.uint8), mask=(rows < R)[:, None] & (bytes_ < NB)[None, :])


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, R, N, NB, stride_p, stride_o,
                   BITS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    bytes_ = tl.program_id(1) * BC + tl.arange(0, BC)
    t = tl.arange(0, PER)
    b = tl.load(packed_ptr + rows.to(tl.int64)[:, None] * stride_p + bytes_[None, :],
                mask=(rows < R)[:, None] & (bytes_ < NB)[None, :], other=0).to(tl.int32)
    field = (b[:, :, None] >> (t * BITS)[None, None, :]) & ((1 << BITS) - 1)
    sign = 1 << (BITS - 1)
    code = (field ^ sign) - sign            # sign-extend the two's complement field
    col = bytes_[None, :, None] * PER + t[None, None, :]
    ok = (rows < R)[:, None, None] & (col < N)
    tl.store(out_ptr + rows.to(tl.int64)[:, None, None] * stride_o + col, code.to(tl.int8),
             mask=ok)


def _rows(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() == 0:
        raise CoqatError(f"{what} needs at least one dim (codes are packed along the last)")
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _pack(codes: torch.Tensor, bits: int, check: bool) -> torch.Tensor:
    what = f"pack_int{bits}"
    if codes.dtype != torch.int8:
        raise CoqatError(f"{what} needs int8 codes, got {codes.dtype}; cast with .to(torch.int8)")
    if check and codes.numel():
        lo, hi = code_range(bits)
        cmin, cmax = int(codes.min()), int(codes.max())
        if cmin < lo or cmax > hi:
            raise CoqatError(f"{what}: codes outside the {bits}-bit range [{lo}, {hi}] "
                             f"(min {cmin}, max {cmax})")
    per = 8 // bits
    c2 = _rows(codes, what)
    r, n = c2.shape
    nb = -(-n // per)
    out = torch.empty((r, nb), dtype=torch.uint8, device=codes.device)
    if r and nb:
        grid = (triton.cdiv(r, _BR), triton.cdiv(nb, _BC))
        _pack_kernel[grid](c2, out, r, n, nb, c2.stride(0), out.stride(0),
                           BITS=bits, BR=_BR, BC=_BC, num_warps=4)
    return out.reshape(*codes.shape[:-1], nb)


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    what = f"unpack_int{bits}"
    per = 8 // bits
    if packed.dtype != torch.uint8:
        raise CoqatError(f"{what} needs uint8 bytes, got {packed.dtype}")
    p2 = _rows(packed, what)
    r, nb = p2.shape
    if not (nb - 1) * per < n <= nb * per:
        raise CoqatError(f"{what}: {nb} bytes per row cannot hold {n} codes ({per} per byte); "
                         "pass the row length used when packing")
    out = torch.empty((r, n), dtype=torch.int8, device=packed.device)
    if r and nb:
        grid = (triton.cdiv(r, _BR), triton.cdiv(nb, _BC))
        _unpack_kernel[grid](p2, out, r, n, nb, p2.stride(0), out.stride(0),
                             BITS=bits, BR=_BR, BC=_BC, num_warps=4)
    return out.reshape(*packed.shape[:-1], n)


def pack_int4_triton(codes: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``pack.pack_int4`` in Triton: int8 codes in [-8, 7] -> uint8, two per byte.

    ``check`` verifies the range first (two reductions); pass False when the codes come
    from a 4-bit quantizer and are in range by construction.
    """
    return _pack(codes, 4, check)


def unpack_int4_triton(packed: torch.Tensor, n: int) -> torch.Tensor:
    """``pack.unpack_int4`` in Triton: ``n`` sign-extended int8 codes per row."""
    return _unpack(packed, 4, n)


def pack_int2_triton(codes: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``pack.pack_int2`` in Triton: int8 codes in [-2, 1] -> uint8, four per byte."""
    return _pack(codes, 2, check)


def unpack_int2_triton(packed: torch.Tensor, n: int) -> torch.Tensor:
    """``pack.unpack_int2`` in Triton: ``n`` sign-extended int8 codes per row."""
    return _unpack(packed, 2, n)
