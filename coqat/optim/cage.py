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

The strength as a pull integral. In CAGE-D the term removes the share ``lr_t * lambda_t`` of
each weight's error at step t, so what a run's lambda does depends on its LR schedule. The
pull integral ``P = sum_t lr_t * lambda_t`` over the run's steps says it schedule-free (the
paper's recipe, peak lr 1.2e-3 with one-cycle cosine, lambda 10, silence 0.8, gives
P ~ 1.6). ``lambda_for_pull`` inverts it: with the ramp written ``lambda_t = lambda * g_t``,
``lambda = P / sum_t lr_t * g_t``, summed over the very ``lr_t`` (``Schedule.lr``) and
``g_t`` (``cage_lambda`` with lambda 1) that training applies, so the run's integral is P
up to float rounding. For CAGE-C the same lambda is used; its term goes through Adam, so
there P only names the lambda a CAGE-D run of that pull would use.

Per-layer scaling (``cage_scale = "step"``). The term ``lr_t lambda_t e`` removes the same
*share* of the error at every width, so in absolute terms it shrinks with the grid: a weight
half a step off its grid point moves by ``lr_t lambda_t D / 2`` with ``D`` the layer's grid
step, which falls as 2^-b. With "step" each layer's term is measured in its own grid steps
and expressed in units of its weight scale: ``lambda_t e * (rms / D)``, ``rms`` the RMS of a
rotated weight row (the Hadamard rotation keeps it) and ``D`` that row's QuEST step, so
``rms / D = (2^b - 1) / (2 ALPHA[b])``, a constant of the bits (``grid_step_factor``: 1.00 at
2 bits, 1.71 at 3, 2.98 at 4, 32.8 at 8). A weight half a step off is then pulled by
``lr_t lambda_t rms / 2`` at every width, and a layer's own pull integral is ``P`` times
its factor. It is defined for the QuEST quantizer only (RTN's step depends on each row's
maximum, not on the bits).

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

or ``coqat train --optimizer cage-d --cage-lambda 10 --cage-silence 0.8`` (or
``--cage-pull 1.6 [--cage-scale step]`` in place of ``--cage-lambda``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from coqat.bitconfig import FLOAT_BITS
from coqat.errors import CoqatError
from coqat.quant import quantized_modules
from coqat.quant.quantizers import ALPHA

__all__ = ["MODES", "SCHEDULES", "cage_lambda", "cage_targets", "coupled_grad_",
           "decoupled_update_", "grid_step_factor", "lambda_for_pull", "layer_errors",
           "mode_from_optimizer", "round4"]

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


def lambda_for_pull(pull: float, lrs: Sequence[float], shape: Sequence[float]) -> float:
    """The lambda whose schedule ``lambda * shape[t]`` gives ``sum_t lrs[t] * lambda_t ==
    pull``: ``lrs`` are the run's learning rates per step, ``shape`` its lambda_t at
    lambda = 1 (both over every step of the run)."""
    if not (math.isfinite(pull) and pull >= 0):
        raise CoqatError(f"CAGE pull {pull} must be a finite number >= 0")
    total = math.fsum(lr * g for lr, g in zip(lrs, shape, strict=True))
    if total <= 0:
        if pull == 0:
            return 0.0
        raise CoqatError("CAGE is silent at every step of this run (no QAT phase, or the"
                         " silence covers it), so no lambda gives a pull > 0; lower"
                         " --cage-silence or train quantized")
    return pull / total


def grid_step_factor(bits: int, method: str = "quest") -> float:
    """``rms / D`` of a QuEST row at ``bits``: the weight RMS in grid steps, by which
    ``cage_scale = "step"`` multiplies a layer's term (module docstring)."""
    if method != "quest":
        raise CoqatError(f"CAGE scale 'step' is defined for the QuEST quantizer, not"
                         f" {method!r}; use --cage-scale none or --quantizer quest")
    if bits not in ALPHA:
        raise CoqatError(f"CAGE scale 'step' has no grid step for {bits}-bit weights")
    return (2 ** bits - 1) / (2 * ALPHA[bits])


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
