"""Torch reference of the low-bit kernels: the same integer semantics, on any device.

This module is the oracle the Triton kernels are tested against, and the implementation of
the kernel path where Triton cannot run (CPU). Codes agree except where the float32 rotation
rounds differently at a quantizer tie (``coqat.quant.hadamard``); the GEMM is bit-exact.
It does not define any numerics of its own: the rotation is ``coqat.quant.hadamard_transform`` and the codes,
steps and gradient masks are ``coqat.quant.quantize_rows``. What it adds is how those
integers are *stored and multiplied* on tensor cores.

Storage of the integer codes (``LowbitFormat``), chosen per layer from its two bit widths:

======================  ===========  ========================  ==========================
quantizer, max(w, a)    dtype        stored value              value = stored * s, s =
======================  ===========  ========================  ==========================
QuEST, 2-4 bits         FP8 e4m3     2c + 1 (odd, |.| <= 15)   step / 2
QuEST, 5-6 bits         INT8         2c + 1 (odd, |.| <= 63)   step / 2
QuEST, 8 bits           INT8         c (+ row sums)            step, plus a correction
RTN, 2-5 bits           FP8 e4m3     c (|.| <= 15)             step
RTN, 6-8 bits           INT8         c (|.| <= 127)            step
======================  ===========  ========================  ==========================

QuEST's grid has no zero: a value is ``(c + 1/2) * step``. Storing the odd integer
``2c + 1`` keeps every product an exact integer (FP8 e4m3 holds every integer up to 16,
INT8 up to 127). For 8 bits ``2c + 1`` needs 9 bits, so the code ``c`` is stored and the
GEMM adds the exact correction ``sum (ca + 1/2)(cw + 1/2) = sum ca*cw + (Ra + Rw)/2 + K/4``
with the row sums ``R = sum c`` (quest.md section 3).

The GEMM (K2) contract, in float32 with every operation rounded separately (no FMA)::

    C   = sum_k a[m, k] * w[n, k]          exact (integers; |C| < 2^24 for FP8)
    acc = float32(C)
    acc = acc + (float32(Ra[m] + Rw[n]) * 0.5 + float32(K) * 0.25)     correction only
    out = (acc * sa[m]) * sw[n]  (+ bias[n]),  then cast to the output dtype

The gradient mask is stored packed, eight elements a byte: bit j of byte i is element
``8 i + j`` of the row (``pack_mask_bits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from coqat.bitconfig import FLOAT_BITS, check_bits
from coqat.errors import CoqatError
from coqat.quant.hadamard import hadamard_reference, hadamard_transform
from coqat.quant.quantizers import QuantSpec, quantize_rows

__all__ = [
    "FP8_DTYPE", "LowbitFormat", "RowQuantizer", "QuantizedRows", "lowbit_format",
    "quantize_ref", "store_codes", "integer_codes", "gemm_scale", "lowbit_matmul_ref",
    "dequantize_ref", "pack_mask_bits", "unpack_mask_bits", "masked_rotate_ref",
]

FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class LowbitFormat:
    """How one layer's integer codes are stored for its GEMM (see the module docstring).

    dtype:      "fp8" (float8 e4m3) or "int8".
    odd:        codes are stored as ``2c + 1`` and scaled by ``step / 2``.
    correction: codes are stored as ``c``; the GEMM needs row sums and adds the +1/2 terms.
    """

    dtype: str
    odd: bool
    correction: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        return FP8_DTYPE if self.dtype == "fp8" else torch.int8


def lowbit_format(w_bits: int, a_bits: int, method: str = "quest") -> LowbitFormat:
    """The storage of a layer whose weight and input are both quantized.

    Both operands of one GEMM share one format, decided by the wider of the two widths.
    """
    check_bits(w_bits, "weight bits")
    check_bits(a_bits, "activation bits")
    if FLOAT_BITS in (w_bits, a_bits):
        raise CoqatError(
            f"the low-bit GEMM needs both operands quantized, got w{w_bits}a{a_bits}; "
            "a 16-bit operand runs on the reference path (--kernels auto)")
    bits = max(w_bits, a_bits)
    if method == "quest":
        if bits <= 4:
            return LowbitFormat("fp8", odd=True, correction=False)
        if bits <= 6:
            return LowbitFormat("int8", odd=True, correction=False)
        return LowbitFormat("int8", odd=False, correction=True)
    if method == "rtn":
        return LowbitFormat("fp8" if bits <= 5 else "int8", odd=False, correction=False)
    raise CoqatError(f"quantizer method {method!r} is unknown; use quest or rtn")


@dataclass(frozen=True)
class RowQuantizer:
    """Everything K1 needs to quantize the rows of one operand.

    ``block`` is the Hadamard block actually applied along the row (1 = none); it must be a
    power of two that divides the row length. ``trust`` / ``clip_ratio`` as in
    ``coqat.quant.quantize_rows``.
    """

    bits: int
    fmt: LowbitFormat
    method: str = "quest"
    block: int = 128
    trust: float | None = None
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        QuantSpec(self.bits, self.method, self.block, self.trust, self.clip_ratio)
        if self.bits == FLOAT_BITS:
            raise CoqatError("RowQuantizer needs a quantized width (2-8 bits), got 16")
        if self.block < 1 or self.block & (self.block - 1) or self.block > 128:
            raise CoqatError(f"Hadamard block {self.block} must be a power of two in 1..128")

    @property
    def levels(self) -> int:
        """2^b - 1 for QuEST (the step divides the clip range into this many parts)."""
        return 2 ** self.bits - 1

    @property
    def qmax(self) -> int:
        """RTN's largest code 2^(b-1) - 1."""
        return 2 ** (self.bits - 1) - 1


class QuantizedRows(NamedTuple):
    """K1's output for a 2-D operand of ``rows`` rows of ``K`` elements.

    codes:     (rows, K) float8_e4m3fn or int8, in the storage of ``LowbitFormat``.
    step:      (rows,) float32: ``quantize_rows(...).scale``, bit for bit.
    mask_bits: (rows, ceil(K/8)) uint8, the packed gradient (trust/clip) mask, or None.
    rowsum:    (rows,) int32, the sum of the integer codes c (formats with correction), or None.
    """

    codes: torch.Tensor
    step: torch.Tensor
    mask_bits: torch.Tensor | None
    rowsum: torch.Tensor | None


def store_codes(c: torch.Tensor, fmt: LowbitFormat) -> torch.Tensor:
    """Integer codes c (int8) -> the format's storage (2c+1 for odd formats)."""
    v = c.to(torch.int16)
    if fmt.odd:
        v = v * 2 + 1
    return v.to(torch.float32).to(fmt.torch_dtype) if fmt.dtype == "fp8" else v.to(torch.int8)


def integer_codes(codes: torch.Tensor, fmt: LowbitFormat) -> torch.Tensor:
    """The storage back to the integer codes c (int8) of ``quantize_rows``."""
    v = codes.to(torch.float32).to(torch.int16) if fmt.dtype == "fp8" else codes.to(torch.int16)
    if fmt.odd:
        v = torch.div(v - 1, 2, rounding_mode="floor")
    return v.to(torch.int8)


def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """(rows, K) bool -> (rows, ceil(K/8)) uint8; bit j of byte i is element 8i + j."""
    rows, k = mask.shape
    pad = (-k) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(rows, -1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=mask.device)
    return (m.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_mask_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``pack_mask_bits``: (rows, ceil(K/8)) uint8 -> (rows, K) bool."""
    shifts = torch.arange(8, dtype=torch.int32, device=bits.device)
    m = (bits.to(torch.int32)[..., None] >> shifts) & 1
    return m.reshape(bits.shape[0], -1)[:, :k].bool()


def _rotated(x: torch.Tensor, block: int) -> torch.Tensor:
    """The rows exactly as the quantized modules see them: float32, rotated if block > 1."""
    return hadamard_transform(x, block) if block > 1 else x.to(torch.float32)


def quantize_ref(x: torch.Tensor, q: RowQuantizer, with_mask: bool = True) -> QuantizedRows:
    """K1 reference: rotate and quantize each row of the 2-D ``x``; no gradient.

    The codes, steps and masks are those of ``quantize_rows(hadamard_transform(x, block))``
    (what ``QuantLinear`` computes), re-expressed in ``q.fmt``'s storage.
    """
    if x.dim() != 2:
        raise CoqatError(f"quantize_ref needs a 2-D tensor of rows, got shape {tuple(x.shape)}")
    with torch.no_grad():
        res = quantize_rows(_rotated(x.detach(), q.block), q.bits, q.method, q.trust, q.clip_ratio)
        codes = store_codes(res.codes, q.fmt)
        mask = pack_mask_bits(res.mask) if with_mask else None
        rowsum = res.codes.to(torch.int32).sum(-1, dtype=torch.int32) if q.fmt.correction else None
        return QuantizedRows(codes, res.scale.reshape(-1), mask, rowsum)


def gemm_scale(step: torch.Tensor, fmt: LowbitFormat) -> torch.Tensor:
    """The per-row factor that turns stored codes into values: step/2 (odd) or step."""
    return step * 0.5 if fmt.odd else step


def lowbit_matmul_ref(a: QuantizedRows, w: QuantizedRows, fmt: LowbitFormat,
                      bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """K2 reference: ``out[m, n] = sum_k value_a[m, k] * value_w[n, k]`` per the contract.

    The integer product is taken in float64, which is exact for any realistic K (|C| < 2^53).
    """
    k = a.codes.shape[1]
    if w.codes.shape[1] != k:
        raise CoqatError(f"lowbit_matmul: reduction dims differ ({k} vs {w.codes.shape[1]})")
    c = a.codes.to(torch.float64) @ w.codes.to(torch.float64).t()
    acc = c.to(torch.float32)
    if fmt.correction:
        if a.rowsum is None or w.rowsum is None:
            raise CoqatError("lowbit_matmul: this format needs the row sums of both operands")
        r = (a.rowsum[:, None] + w.rowsum[None, :]).to(torch.float32)
        acc = acc + (r * 0.5 + torch.full((), float(k) * 0.25, device=acc.device))
    out = (acc * gemm_scale(a.step, fmt)[:, None]) * gemm_scale(w.step, fmt)[None, :]
    if bias is not None:
        out = out + bias.to(torch.float32)[None, :]
    return out.to(out_dtype)


def dequantize_ref(q: QuantizedRows, fmt: LowbitFormat, method: str = "quest",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values in the rotated basis: QuEST ``(c + 1/2) * step``, RTN ``c * step``.

    Bit-equal to ``coqat.quant.dequantize(c, step, method)`` before the cast to ``dtype``:
    for odd storage ``(2c+1) * (step/2)`` is the same real product, rounded once.
    """
    v = q.codes.to(torch.float32)
    if method == "quest" and not fmt.odd:
        v = v + 0.5
    return (v * gemm_scale(q.step, fmt)[:, None]).to(dtype)


def masked_rotate_ref(g: torch.Tensor, mask_bits: torch.Tensor | None, block: int,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """The backward of "rotate, then quantize": ``(M * g) H``, cast to ``out_dtype``.

    The rotation is the one ``hadamard_transform`` (and its backward) computes.
    """
    k = g.shape[1]
    gm = g.to(torch.float32)
    if mask_bits is not None:
        gm = gm.masked_fill(~unpack_mask_bits(mask_bits, k), 0.0)
    if block > 1:
        gm = hadamard_reference(gm, block)
    return gm.to(out_dtype)
