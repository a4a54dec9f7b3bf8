"""Weights for formats that have no Hadamard rotation and no half-integer grid.

compressed-tensors (as transformers loads it) and torchao run ``x @ W^T`` on the plain,
un-rotated input with a symmetric integer weight grid ``code * scale``. coqat's layers:

- RTN without rotation: already that grid; the codes and steps carry over exactly.
- QuEST (or RTN with a rotation): the forward multiplies the rotated input by the
  dequantized weight in the rotated basis; rotating that weight back gives the one matrix
  ``W_eff`` the layer applies to the un-rotated input (H is symmetric and its own inverse).
  ``W_eff`` is not on any integer grid, so it is re-rounded: per output row, the scale
  whose grid has the least squared error to ``W_eff`` (clip ratios 0.40 ... 1.00 of the
  row's absmax). This changes the model; the export lists it and measures what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS, LayerBits
from coqat.exporters.qparams import as_quant_module, dequantize_codes, weight_codes
from coqat.quant.hadamard import hadamard_transform

__all__ = ["GridWeight", "exact_grid", "effective_weight", "round_to_grid", "grid_weight"]

# Clip ratios tried per row when re-rounding: 0.40, 0.42, ..., 1.00.
_CLIP_RATIOS = torch.linspace(0.4, 1.0, 31)


@dataclass
class GridWeight:
    """One Linear weight on a symmetric integer grid: value = codes * scale.

    ``codes`` int8 (N, K) within +-(2^(bits-1) - 1); ``scale`` float32 (N, 1); ``exact``:
    the values are coqat's own, bit for bit; else ``rel_error`` is ||values - W_eff|| /
    ||W_eff|| of the re-rounding.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    exact: bool
    rel_error: float = 0.0

    def values(self) -> torch.Tensor:
        return self.codes.to(torch.float32) * self.scale


def exact_grid(m: nn.Module, lb: LayerBits) -> bool:
    """Whether the layer's quantized weight is already a plain integer grid in the
    un-rotated basis (RTN, no Hadamard rotation), so no re-rounding is needed."""
    q = as_quant_module(m, lb)
    return q.method == "rtn" and q.w_block <= 1 and q.a_block <= 1


def effective_weight(m: nn.Module, lb: LayerBits, fqn: str = "layer") -> torch.Tensor:
    """The float32 matrix the layer applies to its un-rotated input (see module docstring)."""
    q = as_quant_module(m, lb)
    with torch.no_grad():
        if q.w_bits == FLOAT_BITS:
            return q.weight.detach().to(torch.float32).clone()
        lc = weight_codes(q, fqn)
        w = dequantize_codes(lc.codes, lc.step, lc.method)
        return hadamard_transform(w, q.w_block) if q.w_block > 1 else w


def round_to_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row least-squares symmetric grid of ``bits`` bits for ``w`` (N, K)."""
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    best_err = torch.full((w.shape[0], 1), float("inf"))
    best_scale = absmax / qmax
    for r in _CLIP_RATIOS:
        scale = r * absmax / qmax
        codes = torch.clamp(torch.round(w / scale), -qmax, qmax)
        err = ((codes * scale - w) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    codes = torch.clamp(torch.round(w / best_scale), -qmax, qmax).to(torch.int8)
    return codes, best_scale.to(torch.float32)


def grid_weight(m: nn.Module, lb: LayerBits, bits: int, fqn: str = "layer") -> GridWeight:
    """The layer's weight on a ``bits``-bit symmetric integer grid: coqat's own codes when
    the layer is RTN without rotation and ``bits`` >= its width (a wider grid holds the
    same codes), else ``W_eff`` re-rounded."""
    q = as_quant_module(m, lb)
    if exact_grid(m, lb) and q.w_bits != FLOAT_BITS and bits >= q.w_bits:
        lc = weight_codes(q, fqn)
        return GridWeight(lc.codes, lc.step.reshape(-1, 1).to(torch.float32), bits, True)
    w = effective_weight(m, lb, fqn)
    codes, scale = round_to_grid(w, bits)
    gw = GridWeight(codes, scale, bits, False)
    err = torch.linalg.vector_norm(gw.values() - w) / torch.linalg.vector_norm(w).clamp_min(1e-30)
    gw.rel_error = float(err)
    return gw
