"""CAGE: curvature-aware error feedback for QAT (Tabesh et al., arXiv 2510.18784).

Straight-through QAT trains the latent float weight ``p`` with the gradient taken at its
quantized value ``Q(p)``. That gradient never sees where ``p`` sits inside its grid cell, so
near a decision boundary ``p`` drifts back and forth and ``Q(p)`` keeps flipping. CAGE adds
the quantization error ``e = p - Q(p)`` (taken without gradient, with the layer's own
quantizer: same bits, same RMS scale rule, same Hadamard rotation as the forward pass) as a
pull toward the grid, with a weight ``lambda_t`` that is silent for most of the QAT phase and
then ramps up. For a quadratic loss ``f(p) = f(Q(p)) + H (p - Q(p))`` exactly, so ``lambda e``
stands in for the Hessian term the STE gradient misses (with ``H ~ lambda I``).

Two variants (facts in reference/cage.md section 1):

decoupled ("cage-d", the default and the authors' code)::

    p <- p - lr_t * lambda_t * (p - Q(p))          after the base optimizer's step

  a decoupled "weight decay toward Q(p)": no momentum, no Adam preconditioning.

coupled ("cage-c", the paper's Algorithm 1 line 11)::

    p.grad <- p.grad + lambda_t * (p - Q(p))       after gradient clipping, before the step

  so the term enters Adam's first and second moments (and is divided by sqrt(v)).

lambda schedule over the QAT phase, progress ``r = (step - qat_start + 1) / qat_steps``::

    linear:   lambda_t = 0 for r <= s,  lambda * (r - s) / (1 - s) after   (= lambda at r = 1)
    constant: lambda_t = 0 for r <= s,  lambda after

Only the weights of quantized layers (``coqat.quant.quantized_modules``: QuantLinear /
QuantConv2d with ``w_bits < 16``) get the term. Embeddings, norms, biases, an unquantized
lm_head and layers whose weight is float (e.g. w16a8) are left alone, and activations never
get it (they are not parameters). Each layer uses its own bits, so in a mixed config a 2-bit
layer is pulled harder than an 8-bit one (its error is larger), which the per-layer log shows.

The update rules are the pure functions ``cage_lambda``, ``decoupled_update_`` and
``coupled_grad_``; ``coqat.training.cage.CageHooks`` applies them inside coqat's training loop
(this module knows nothing of the loop). Under DDP the
hooks run on every rank on identical, already all-reduced weights and gradients, so the ranks
stay in sync with no communication.

Library use::

    from coqat.training.cage import CageHooks
    hooks = CageHooks("decoupled", lam=10.0, silence=0.8, schedule="linear",
                      qat_start=prep.schedule.qat_start, qat_steps=prep.schedule.qat_steps)
    runner.execute(prep, hooks=[hooks])

or ``coqat train --optimizer cage-d --cage-lambda 10 --cage-silence 0.8``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS
from coqat.errors import CoqatError
from coqat.quant import quantized_modules

__all__ = ["MODES", "SCHEDULES", "cage_lambda", "cage_targets", "coupled_grad_",
           "decoupled_update_", "layer_errors", "mode_from_optimizer", "round4"]

MODES: tuple[str, ...] = ("decoupled", "coupled")
SCHEDULES: tuple[str, ...] = ("linear", "constant")
_OPTIMIZER_MODES = {"cage-d": "decoupled", "cage-c": "coupled"}
# Above this many quantized layers the per-layer dict is left out of the log line (mean,
# max and the worst layer are always logged) so metrics.jsonl stays readable.
MAX_LOGGED_LAYERS = 64


def mode_from_optimizer(optimizer: str) -> str:
    """'cage-d' -> 'decoupled', 'cage-c' -> 'coupled' (the CLI's --optimizer names)."""
    try:
        return _OPTIMIZER_MODES[optimizer]
    except KeyError:
        raise CoqatError(f"optimizer {optimizer!r} is not a CAGE variant; use cage-d"
                         " (decoupled) or cage-c (coupled)") from None


def cage_lambda(step: int, qat_start: int, qat_steps: int, lam: float, silence: float,
                schedule: str = "linear") -> float:
    """lambda_t for optimizer step ``step`` (0-based, the loop's numbering).

    The QAT phase covers steps ``qat_start .. qat_start + qat_steps - 1``; its progress
    ``r = (step - qat_start + 1) / qat_steps`` is 1 at its last step. lambda_t is 0 outside
    the phase and for ``r <= silence``; after that it ramps linearly to ``lam`` at r = 1
    ("linear") or jumps to ``lam`` ("constant").
    """
    if schedule not in SCHEDULES:
        raise CoqatError(f"CAGE schedule {schedule!r} is unknown; use linear or constant")
    if not 0 <= silence < 1:
        raise CoqatError(f"CAGE silence {silence} must be in [0, 1)")
    if qat_steps <= 0 or step < qat_start or step >= qat_start + qat_steps:
        return 0.0
    r = (step - qat_start + 1) / qat_steps
    if r <= silence:
        return 0.0
    if schedule == "constant":
        return float(lam)
    return float(lam) * min(1.0, (r - silence) / (1.0 - silence))


@torch.no_grad()
def decoupled_update_(p: torch.Tensor, q: torch.Tensor, lr: float, lam_t: float) -> None:
    """In place: ``p <- p - lr * lam_t * (p - q)`` (CAGE-D, after the optimizer step)."""
    if lr * lam_t != 0.0:
        p.sub_((p - q.to(p.dtype)) * (lr * lam_t))


@torch.no_grad()
def coupled_grad_(p: torch.Tensor, q: torch.Tensor, lam_t: float) -> None:
    """In place: ``p.grad <- p.grad + lam_t * (p - q)`` (CAGE-C, before the optimizer step).

    A parameter without a gradient (unused in this step) gets ``lam_t * (p - q)`` as its
    gradient, as if its task gradient were zero.
    """
    if lam_t == 0.0:
        return
    e = (p - q.to(p.dtype)) * lam_t
    if p.grad is None:
        p.grad = e.to(p.dtype)
    else:
        p.grad.add_(e.to(p.grad.dtype))


def cage_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (fqn, module) whose weight gets the CAGE term: quantized weights only."""
    return [(n, m) for n, m in quantized_modules(model)
            if m.w_bits != FLOAT_BITS and m.weight.requires_grad]


def layer_errors(model: nn.Module) -> dict[str, float]:
    """Per quantized layer ``||w - Q(w)|| / ||w||`` with the layer's own quantizer."""
    return {n: m.weight_error() for n, m in cage_targets(model)}


def round4(x: float) -> float:
    """Four significant digits: enough to see the pull, short in metrics.jsonl."""
    return float(f"{x:.4g}")
