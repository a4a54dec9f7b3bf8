"""QuEST and RTN fake quantizers: the one numerics definition of coqat's quantization.

Everything here quantizes *rows*: the last dim is the row, every leading dim indexes rows,
and each row gets one scale. For activations (..., K) that is one scale per token, for a
Linear weight (N_out, K) one per output channel.

QuEST (Panferov et al., ICML 2025), on a row x~ of n float32 values (already rotated):

    rms   = sqrt(sum(x~^2) / n)                    float64 accumulation, then float32
    scale = ALPHA[b] * rms + 1e-8                  clip range +-scale (MSE-optimal for N(0,1))
    D     = (2 * scale) / (2^b - 1)                step; 2^b levels at (k - 1/2) D, no zero
    k     = round(clamp(x~, -scale, scale) / D + 0.5)     round half to even
    xq    = k * D - D / 2                          outermost levels are +-scale
    code  = k - 1   in [-2^(b-1), 2^(b-1) - 1]     dequantized as (code + 1/2) * D
    M     = |xq - x~| <= trust * rms               trust defaults to ALPHA[b] / (2^b - 1)

RTN (round to nearest, the baseline), on a row x:

    absmax = max |x|
    scale  = clip_ratio * absmax / (2^(b-1) - 1) + 1e-12   (eps only keeps 0-rows finite)
    code   = clamp(round(x / scale), -(2^(b-1) - 1), 2^(b-1) - 1)   symmetric, has zero
    xq     = code * scale
    M      = |x| <= clip_ratio * absmax            all ones for clip_ratio = 1

Every step is a separate float32 op in exactly that order (no fused multiply-add), with
float32 constants living on the tensor's device, so CPU, CUDA and a hand-written kernel
compute the same bits. The backward of the quantizer is the straight-through estimator
masked by M ("trust" for QuEST, "clip" for RTN): dL/dx~ = M * dL/dxq.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import NamedTuple

import torch

from coqat.bitconfig import FLOAT_BITS, QUANT_BITS, check_bits
from coqat.errors import CoqatError
from coqat.quant.hadamard import hadamard_block_for, hadamard_transform

__all__ = [
    "ALPHA", "METHODS", "FORMS", "QuantResult", "QuantSpec", "RowParams",
    "default_trust", "row_params", "quantize_rows", "quantize_rows_with", "row_statistic",
    "quantize_rows_from", "dequantize",
    "ste_quantize", "fake_quant", "project",
]

METHODS: tuple[str, ...] = ("quest", "rtn")
FORMS: tuple[str, ...] = ("half", "full")

# MSE-optimal clip alpha_b for a standard Gaussian on the 2^b-level half-integer grid
# (QuEST's OPTIMAL_GAUSSIAN_SCALES). Read-only: a module-level dict would be mutable state.
ALPHA: types.MappingProxyType = types.MappingProxyType({
    1: 0.7978845587140913,
    1.585: 1.2240089519030855,
    2: 1.4935346200015913,
    3: 2.051068354131873,
    4: 2.513930578568423,
    5: 2.9160938834961225,
    6: 3.276597282593217,
    7: 3.6010497188221655,
    8: 3.884938678807525,
})

_QUEST_EPS = 1e-8   # keeps the scale of an all-zero row positive (QuEST's own eps)
_RTN_EPS = 1e-12    # avoids 0/0 on an all-zero row; below one ulp of any normal-sized scale


class QuantResult(NamedTuple):
    """What ``quantize_rows`` returns; all shapes follow the input (..., n).

    values: float32 (..., n), the fake-quantized tensor.
    codes:  int8 (..., n), the integer codes (None where ``quantize_rows_from`` was asked
            for values and mask only).
    scale:  float32 (..., 1), the step per row. Dequantize with ``dequantize``:
            QuEST ``(codes + 1/2) * scale``, RTN ``codes * scale``.
    mask:   bool (..., n), where the straight-through gradient passes (trust / clip mask).
    """

    values: torch.Tensor
    codes: torch.Tensor | None
    scale: torch.Tensor
    mask: torch.Tensor


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise CoqatError(f"quantizer method {method!r} is unknown; use one of {', '.join(METHODS)}")
    return method


def _check_form(form: str) -> str:
    if form not in FORMS:
        raise CoqatError(f"form {form!r} is unknown; use 'half' (stay rotated) or 'full' (rotate back)")
    return form


def _check_quant_bits(bits: int) -> int:
    check_bits(bits)
    if bits == FLOAT_BITS:
        raise CoqatError(
            f"bits = {FLOAT_BITS} means 'not quantized'; quantize_rows needs one of "
            f"{', '.join(map(str, QUANT_BITS))} (fake_quant/ste_quantize pass 16 through)")
    return bits


def _check_extras(method: str, trust: float | None, clip_ratio: float) -> None:
    if trust is not None:
        if method != "quest":
            raise CoqatError("trust applies to the quest quantizer only; for rtn use clip_ratio")
        if not trust > 0:
            raise CoqatError(f"trust = {trust} must be > 0 (in RMS units; None = half a step)")
    if not 0 < clip_ratio <= 1:
        raise CoqatError(f"clip_ratio = {clip_ratio} must be in (0, 1]")
    if clip_ratio != 1.0 and method != "rtn":
        raise CoqatError("clip_ratio applies to the rtn quantizer only; for quest use trust")


def default_trust(bits: int) -> float:
    """QuEST's default trust radius ALPHA[b] / (2^b - 1), in RMS units: half a step.

    Computed in float64; the quantizer rounds it to float32 before multiplying by the rms.
    """
    _check_quant_bits(bits)
    return ALPHA[bits] / (2 ** bits - 1)


def _f32(value: float, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A float32 (or ``dtype``) constant on ``like``'s device.

    A real (0-dim) tensor on the device rather than a Python scalar: CUDA rewrites
    ``t / python_scalar`` as a multiply by the reciprocal, which rounds differently from a
    true division. ``torch.full`` rounds ``value`` to nearest and fills on the device
    (no host-to-device copy).
    """
    return torch.full((), value, dtype=dtype, device=like.device)


class RowParams(NamedTuple):
    """A width's constants as 0-dim float32 tensors on the data's device: QuEST's ALPHA[b],
    its level count 2^b - 1 and trust radius (RMS units); RTN's largest code 2^(b-1) - 1.

    As tensors they can also be picked from a table at run time (``torch.stack`` the params
    of several widths and index them): the search's hard choice is then data, not code, so
    a compiled step need not be recompiled for every width it draws.
    """

    alpha: torch.Tensor
    levels: torch.Tensor
    trust: torch.Tensor
    qmax: torch.Tensor


def row_params(bits: int, like: torch.Tensor, trust: float | None = None) -> RowParams:
    """The ``RowParams`` of ``bits`` on ``like``'s device (QuEST and RTN fields both)."""
    _check_quant_bits(bits)
    return RowParams(_f32(ALPHA[bits], like), _f32(2 ** bits - 1, like),
                     _f32(default_trust(bits) if trust is None else trust, like),
                     _f32(2 ** (bits - 1) - 1, like))


def _quest_rms(x: torch.Tensor) -> torch.Tensor:
    """QuEST's row statistic: the RMS of each row (float64 sum, rounded once to float32)."""
    n = x.shape[-1]
    sumsq = torch.sum(x.to(torch.float64) ** 2, dim=-1, keepdim=True)
    return torch.sqrt(sumsq / _f32(n, x, torch.float64)).to(torch.float32)


def _quest_from_rms(x: torch.Tensor, rms: torch.Tensor, p: RowParams,
                    codes: bool = True) -> QuantResult:
    scale = rms * p.alpha
    scale = scale + _f32(_QUEST_EPS, x)
    step = (scale * _f32(2.0, x)) / p.levels
    clipped = torch.clamp(x, min=-scale, max=scale)
    k = torch.round(clipped / step + _f32(0.5, x))
    values = k * step - step / _f32(2.0, x)
    mask = (values - x).abs() <= p.trust * rms
    return QuantResult(values, (k - _f32(1.0, x)).to(torch.int8) if codes else None, step, mask)


def _rtn_absmax(x: torch.Tensor) -> torch.Tensor:
    """RTN's row statistic: the largest magnitude of each row."""
    return x.abs().amax(dim=-1, keepdim=True)


def _rtn_from_absmax(x: torch.Tensor, absmax: torch.Tensor, p: RowParams, clip_ratio: float,
                     codes: bool = True) -> QuantResult:
    clip = _f32(clip_ratio, x) * absmax
    scale = clip / p.qmax + _f32(_RTN_EPS, x)
    c = torch.clamp(torch.round(x / scale), min=-p.qmax, max=p.qmax)
    values = c * scale
    mask = x.abs() <= clip
    return QuantResult(values, c.to(torch.int8) if codes else None, scale, mask)


def row_statistic(x: torch.Tensor, method: str = "quest") -> torch.Tensor:
    """The per-row statistic a width's scale is made from (QuEST: RMS, RTN: absmax) of a
    float32 tensor; the same for every width, so several widths of one tensor need it once
    (``quantize_rows_from``)."""
    return _quest_rms(x) if method == "quest" else _rtn_absmax(x)


def quantize_rows_from(x: torch.Tensor, stat: torch.Tensor, params: RowParams,
                       method: str = "quest", clip_ratio: float = 1.0,
                       codes: bool = True) -> QuantResult:
    """``quantize_rows_with`` given the rows' ``row_statistic`` (float32 ``x``, no checks, no
    gradient): the same operations, so the same bits. ``codes=False`` skips the int8 codes
    (``QuantResult.codes`` is None) for callers that need only values and mask."""
    with torch.no_grad():
        if method == "quest":
            return _quest_from_rms(x, stat, params, codes)
        return _rtn_from_absmax(x, stat, params, clip_ratio, codes)


def quantize_rows_with(x: torch.Tensor, params: RowParams, method: str = "quest",
                       clip_ratio: float = 1.0) -> QuantResult:
    """``quantize_rows`` with the width given as ``RowParams`` (no checks, no gradient):
    the same operations, so equal params give equal bits."""
    with torch.no_grad():
        x = x.detach().to(torch.float32)
        return quantize_rows_from(x, row_statistic(x, method), params, method, clip_ratio)


def quantize_rows(x: torch.Tensor, bits: int, method: str = "quest",
                  trust: float | None = None, clip_ratio: float = 1.0) -> QuantResult:
    """Quantize every row (last dim) of ``x``; no gradient. See the module docstring.

    ``x`` is normally a 2-D float32 tensor of rows (already rotated for QuEST); any leading
    dims are treated as more rows, and other float dtypes are cast to float32 first.
    ``bits`` must be a quantized width (2, 3, 4, 5, 6, 8). ``trust`` (QuEST only) is the
    trust radius in RMS units, default half a step; ``clip_ratio`` (RTN only) shrinks the
    clip range below the row's absmax.
    """
    _check_quant_bits(bits)
    _check_method(method)
    _check_extras(method, trust, clip_ratio)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise CoqatError(f"quantize_rows needs rows of at least one element, got shape {tuple(x.shape)}")
    return quantize_rows_with(x, row_params(bits, x, trust), method, clip_ratio)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, method: str = "quest") -> torch.Tensor:
    """Values from integer codes: QuEST ``(c + 1/2) * scale`` (no zero level), RTN ``c * scale``.

    Equal to ``QuantResult.values`` up to one float32 rounding (the training value is computed
    as ``k*D - D/2``, this as ``(c + 1/2)*D``); integer kernels use this form.
    """
    c = codes.to(torch.float32)
    if _check_method(method) == "quest":
        c = c + _f32(0.5, c)
    return c * scale


class _STEQuantizeFn(torch.autograd.Function):
    """Forward: the quantized values exactly. Backward: the gradient masked by M."""

    @staticmethod
    def forward(ctx, x, bits, method, trust, clip_ratio):
        result = quantize_rows(x, bits, method, trust, clip_ratio)
        ctx.save_for_backward(result.mask)
        return result.values

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad.masked_fill(~mask, 0.0), None, None, None, None


def ste_quantize(x_rot: torch.Tensor, bits: int, method: str = "quest",
                 trust: float | None = None, clip_ratio: float = 1.0) -> torch.Tensor:
    """Quantize the rows of an already-rotated tensor, with the masked straight-through backward.

    Returns exactly ``quantize_rows(x_rot, ...).values`` (float32); the gradient w.r.t.
    ``x_rot`` is ``M * grad`` (cast back to ``x_rot``'s dtype). ``bits == 16`` returns
    ``x_rot`` unchanged. This is the piece to use when several bit widths of one rotated
    tensor are mixed: rotate once with ``hadamard_transform``, quantize many times.
    """
    check_bits(bits)
    if bits == FLOAT_BITS:
        return x_rot
    _check_quant_bits(bits)
    _check_method(method)
    _check_extras(method, trust, clip_ratio)
    # The cast sits outside the Function so autograd returns the gradient in x_rot's dtype.
    return _STEQuantizeFn.apply(x_rot.to(torch.float32), bits, method, trust, clip_ratio)


def _resolve_max_block(method: str, hadamard_block: int | None) -> int:
    """``None`` means the method's default: 128 for QuEST (rotation is part of it), 0 for RTN."""
    if hadamard_block is None:
        return 128 if method == "quest" else 0
    if int(hadamard_block) < 0:
        raise CoqatError(f"hadamard_block = {hadamard_block} must be >= 0 (0 or 1 = no rotation)")
    return int(hadamard_block)


def fake_quant(x: torch.Tensor, bits: int, method: str = "quest", hadamard_block: int | None = None,
               form: str = "half", trust: float | None = None, clip_ratio: float = 1.0) -> torch.Tensor:
    """Fake-quantize ``x`` over its last dim (one scale per row of every leading index).

    Rotation: the block is ``hadamard_block_for(x.shape[-1], hadamard_block)``, where
    ``hadamard_block=None`` means 128 for QuEST and 0 (no rotation) for RTN; pass an int to
    choose (0 or 1 = no rotation, also for QuEST; > 1 rotates RTN too).

    ``form="half"`` returns ``Q(xH)`` in the rotated basis (QuEST's HalfHadamard: right
    when both operands of a matmul are rotated by the same H); gradient ``H(M * g)``.
    ``form="full"`` returns ``Q(xH) H`` in the original basis; gradient ``H(M * H g)``.
    Without rotation both forms are ``Q(x)``.

    ``x`` is cast to float32 first; the output is float32 and the gradient comes back in
    ``x``'s dtype. ``bits == 16`` is the identity: ``x`` itself, no rotation, no cast.
    """
    check_bits(bits)
    _check_method(method)
    _check_form(form)
    _check_extras(method, trust, clip_ratio)
    if bits == FLOAT_BITS:
        return x
    if x.dim() == 0 or x.shape[-1] == 0:
        raise CoqatError(f"fake_quant needs a last dim of at least one element, got shape {tuple(x.shape)}")
    block = hadamard_block_for(x.shape[-1], _resolve_max_block(method, hadamard_block))
    x32 = x.to(torch.float32)
    if block == 1:
        return ste_quantize(x32, bits, method, trust, clip_ratio)
    q = ste_quantize(hadamard_transform(x32, block), bits, method, trust, clip_ratio)
    return q if form == "half" else hadamard_transform(q, block)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bits, method, Hadamard block limit and mask options.

    ``hadamard_block`` is the *largest* block allowed; the block used for a row of ``dim``
    elements is ``block_for(dim)``. ``None`` means the method's default (128 for QuEST,
    no rotation for RTN).
    """

    bits: int
    method: str = "quest"
    hadamard_block: int | None = None
    trust: float | None = None
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_method(self.method)
        _check_extras(self.method, self.trust, self.clip_ratio)
        _resolve_max_block(self.method, self.hadamard_block)

    @property
    def is_quantized(self) -> bool:
        return self.bits != FLOAT_BITS

    def block_for(self, dim: int) -> int:
        """The Hadamard block actually used for rows of ``dim`` elements (1 = none)."""
        return hadamard_block_for(dim, _resolve_max_block(self.method, self.hadamard_block))


def project(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(w)`` in the original basis, without gradient: the point CAGE's error feedback uses.

    Rows are the last dim (a Linear weight's input dim). For QuEST this is the full form
    ``Q(wH) H``. Returned in ``w``'s dtype; ``w`` itself when ``spec.bits == 16``.
    """
    if not spec.is_quantized:
        return w
    with torch.no_grad():
        q = fake_quant(w.detach(), spec.bits, spec.method, spec.hadamard_block, "full",
                       spec.trust, spec.clip_ratio)
    return q.to(w.dtype)
