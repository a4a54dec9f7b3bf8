"""Sub-byte packing of signed integer codes: the torch REFERENCE layout.

This is the on-disk and in-memory layout of coqat's packed weights (``coqat deploy``) and
the definition a Triton pack/unpack kernel is tested against, bit for bit. It is the same
layout as ONNX's INT4/INT2 tensors and QuEST's CUDA kernel (element 2i in the low nibble).

Layout (codes are signed two's complement integers held in an int8 tensor):

- Packing runs along the LAST dim; every leading index is an independent row, and rows
  stay row-major: codes of shape ``(..., n)`` give bytes of shape ``(..., ceil(n / per))``
  with ``per`` = 2 (int4) or 4 (int2) codes per byte.
- int4, two per byte: byte ``j`` of a row holds code ``2j`` in bits 0-3 (the low nibble)
  and code ``2j+1`` in bits 4-7::

      byte[j] = (c[2j] & 0xF) | ((c[2j+1] & 0xF) << 4)

  Each nibble is the code's 4-bit two's complement: -8 -> 0b1000, -1 -> 0b1111, 7 -> 0b0111.
- int2, four per byte: byte ``j`` holds code ``4j + t`` in bits ``2t .. 2t+1``, so code
  ``4j`` sits in the lowest two bits::

      byte[j] = (c[4j] & 3) | (c[4j+1] & 3) << 2 | (c[4j+2] & 3) << 4 | (c[4j+3] & 3) << 6

  2-bit two's complement: -2 -> 0b10, -1 -> 0b11, 0 -> 0b00, 1 -> 0b01.
- When ``n`` is not a multiple of ``per``, each row's last byte is padded with zero codes
  (zero bits); unpacking needs ``n`` to drop them.
- Bytes are returned as ``torch.uint8``; unpacking sign-extends back to ``torch.int8``.
- int8 codes are stored as they are (one per byte, no packing).

Worked examples: int4 codes ``[1, -1]`` -> byte ``0xF1``; ``[-8, 7]`` -> ``0x78``;
int2 codes ``[-2, -1, 0, 1]`` -> ``0b01_00_11_10`` = ``0x4E``.

Widths without a power-of-two container are stored in the next container up, never
squeezed: 3-bit codes in int4 nibbles, 5- and 6-bit codes in int8 bytes (``storage_bits``).
"""

from __future__ import annotations

import torch

from coqat.errors import CoqatError

__all__ = [
    "CODES_PER_BYTE", "storage_bits", "code_range", "pack_int4", "unpack_int4",
    "pack_int2", "unpack_int2", "pack_codes", "unpack_codes", "packed_nbytes",
]

#: codes per byte for each storage width
CODES_PER_BYTE = {8: 1, 4: 2, 2: 4}


def storage_bits(bits: int) -> int:
    """The container width a ``bits``-bit code is stored in: 2 -> 2, 3/4 -> 4, 5/6/8 -> 8."""
    if bits == 2:
        return 2
    if bits in (3, 4):
        return 4
    if bits in (5, 6, 8):
        return 8
    raise CoqatError(f"cannot pack {bits}-bit codes; packed widths are 2, 3, 4, 5, 6 and 8")


def code_range(bits: int) -> tuple[int, int]:
    """The signed range ``[-2^(b-1), 2^(b-1) - 1]`` of ``bits``-bit two's complement codes."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _check_codes(codes: torch.Tensor, bits: int, what: str) -> None:
    if codes.dtype != torch.int8:
        raise CoqatError(f"{what} needs int8 codes, got {codes.dtype}; cast with .to(torch.int8)")
    if codes.dim() == 0:
        raise CoqatError(f"{what} needs at least one dim (codes are packed along the last)")
    lo, hi = code_range(bits)
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise CoqatError(f"{what}: codes outside the {bits}-bit range [{lo}, {hi}] "
                         f"(min {int(codes.min())}, max {int(codes.max())})")


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    # Work in int32 so that masking and shifting never meet int8 sign semantics.
    c = codes.to(torch.int32) & ((1 << bits) - 1)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*codes.shape[:-1], (n + pad) // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, n: int, what: str) -> torch.Tensor:
    per = 8 // bits
    if packed.dtype != torch.uint8:
        raise CoqatError(f"{what} needs uint8 bytes, got {packed.dtype}")
    if packed.dim() == 0:
        raise CoqatError(f"{what} needs at least one dim")
    if not (packed.shape[-1] - 1) * per < n <= packed.shape[-1] * per:
        raise CoqatError(f"{what}: {packed.shape[-1]} bytes per row cannot hold {n} codes "
                         f"({per} per byte); pass the row length used when packing")
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    fields = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    # sign-extend: a field with its top bit set is negative
    fields = fields - ((fields >> (bits - 1)) << bits)
    out = fields.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]
    return out.to(torch.int8).contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] two per byte along the last dim (code 2j in the low nibble)."""
    _check_codes(codes, 4, "pack_int4")
    return _pack(codes, 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: ``n`` int8 codes per row from uint8 bytes (..., ceil(n/2))."""
    return _unpack(packed, 4, n, "unpack_int4")


def pack_int2(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-2, 1] four per byte along the last dim (code 4j lowest)."""
    _check_codes(codes, 2, "pack_int2")
    return _pack(codes, 2)


def unpack_int2(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_int2``: ``n`` int8 codes per row from uint8 bytes (..., ceil(n/4))."""
    return _unpack(packed, 2, n, "unpack_int2")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit codes in their storage width (``storage_bits``): uint8 bytes for
    2/3/4-bit codes, the int8 codes themselves for 5/6/8-bit ones."""
    store = storage_bits(bits)
    _check_codes(codes, bits, f"pack_codes({bits}-bit)")
    if store == 8:
        return codes.contiguous()
    return _pack(codes, store)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: int8 codes, ``n`` per row."""
    store = storage_bits(bits)
    if store == 8:
        if packed.dtype != torch.int8 or packed.shape[-1] != n:
            raise CoqatError(f"unpack_codes({bits}-bit): expected int8 rows of {n} codes, got "
                             f"{packed.dtype} rows of {packed.shape[-1]}")
        return packed
    return _unpack(packed, store, n, f"unpack_codes({bits}-bit)")


def packed_nbytes(shape: tuple[int, ...] | torch.Size, bits: int) -> int:
    """Bytes ``pack_codes`` produces for codes of ``shape`` (rows padded to whole bytes)."""
    per = 8 // storage_bits(bits)
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return rows * -(-int(shape[-1]) // per)
