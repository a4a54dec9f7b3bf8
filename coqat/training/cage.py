"""CAGE in the training loop: the update rules of ``coqat.optim.cage`` as loop hooks.

The rules themselves (lambda schedule, decoupled pull, coupled gradient term) are pure
functions in ``coqat.optim.cage``; this module only decides when they run: CAGE-C before
the optimizer step (into the gradient), CAGE-D after it (onto the weights), and only in the
QAT phase.
"""

from __future__ import annotations

import math
from typing import Any

from coqat.errors import CoqatError
from coqat.optim.cage import (MAX_LOGGED_LAYERS, MODES, cage_lambda, cage_targets,
                              coupled_grad_, decoupled_update_, grid_step_factor,
                              lambda_for_pull, layer_errors, mode_from_optimizer, round4)
from coqat.training.hooks import StepContext, TrainHooks

__all__ = ["CageHooks"]


class CageHooks(TrainHooks):
    """CAGE error feedback as training-loop hooks (see the module docstring).

    ``mode``: "decoupled" (cage-d) or "coupled" (cage-c). ``lam``: the final lambda.
    ``silence``: share of the QAT phase with lambda_t = 0. ``schedule``: "linear" or
    "constant". ``qat_start`` / ``qat_steps``: the QAT phase in optimizer steps (from the
    run's ``Schedule``). ``scale``: "none", or "step" to measure each layer's term in its
    grid steps (``coqat.optim.cage``). ``pull``: the pull integral ``lam`` was derived from
    (recorded only; ``from_settings`` derives it). The hooks keep no state that changes
    during training: lambda_t is a function of the step, so a resumed run continues
    exactly; the checkpoint stores the settings to refuse resuming with different ones.
    """

    name = "cage"

    def __init__(self, mode: str = "decoupled", lam: float = 10.0, silence: float = 0.8,
                 schedule: str = "linear", qat_start: int = 0, qat_steps: int = 0,
                 scale: str = "none", pull: float | None = None):
        if mode not in MODES:
            raise CoqatError(f"CAGE mode {mode!r} is unknown; use decoupled (cage-d) or"
                             " coupled (cage-c)")
        if not (math.isfinite(lam) and lam >= 0):
            raise CoqatError(f"CAGE lambda {lam} must be a finite number >= 0")
        if qat_start < 0 or qat_steps < 0:
            raise CoqatError("CAGE qat_start and qat_steps must be >= 0")
        if scale not in ("none", "step"):
            raise CoqatError(f"CAGE scale {scale!r} is unknown; use none or step")
        cage_lambda(0, 0, 1, lam, silence, schedule)  # validates silence and schedule
        self.mode, self.lam, self.silence, self.schedule = mode, float(lam), float(silence), schedule
        self.qat_start, self.qat_steps = int(qat_start), int(qat_steps)
        self.scale, self.pull = scale, pull

    @classmethod
    def from_settings(cls, settings, schedule) -> "CageHooks":
        """From a run's TrainSettings (optimizer, cage_*) and its Schedule (the QAT phase
        and the learning rates a ``cage_pull`` is converted with)."""
        qat_start = schedule.qat_start if schedule.qat_start is not None else schedule.total_steps
        hooks = cls(mode_from_optimizer(settings.optimizer), settings.cage_lambda,
                    settings.cage_silence, settings.cage_schedule, qat_start,
                    schedule.qat_steps, settings.cage_scale, settings.cage_pull)
        if settings.cage_pull is not None:
            steps = range(schedule.total_steps)
            unit = cls(hooks.mode, 1.0, hooks.silence, hooks.schedule, qat_start,
                       schedule.qat_steps)
            hooks.lam = lambda_for_pull(settings.cage_pull,
                                        [schedule.lr(t, settings.lr) for t in steps],
                                        [unit.lambda_at(t) for t in steps])
        return hooks

    def lambda_at(self, step: int) -> float:
        return cage_lambda(step, self.qat_start, self.qat_steps, self.lam, self.silence,
                           self.schedule)

    def layer_factor(self, module) -> float:
        """What the term of ``module`` is multiplied by (1 unless scale = "step")."""
        if self.scale == "none":
            return 1.0
        return grid_step_factor(module.w_bits, module.method)

    def _active(self, ctx: StepContext) -> float:
        # Only in the QAT phase: never during FP training or a bit-width search.
        return self.lambda_at(ctx.step) if ctx.phase == "qat" else 0.0

    def before_optimizer_step(self, ctx: StepContext) -> None:
        lam_t = self._active(ctx)
        if self.mode != "coupled" or lam_t == 0.0:
            return
        for _, m in cage_targets(ctx.model):
            coupled_grad_(m.weight, m.project_weight(), lam_t * self.layer_factor(m))

    def after_optimizer_step(self, ctx: StepContext) -> None:
        lam_t = self._active(ctx)
        if self.mode != "decoupled" or lam_t == 0.0:
            return
        for _, m in cage_targets(ctx.model):
            decoupled_update_(m.weight, m.project_weight(), ctx.lr,
                              lam_t * self.layer_factor(m))

    def log_fields(self, ctx: StepContext) -> dict[str, Any]:
        """lambda_t, and the relative quantization error per layer (what CAGE pulls on)."""
        rec: dict[str, Any] = {"cage_lambda": self._active(ctx)}
        errs = layer_errors(ctx.model) if ctx.phase == "qat" else {}
        if errs:
            worst = max(errs, key=errs.get)
            rec["cage_pull_mean"] = round4(sum(errs.values()) / len(errs))
            rec["cage_pull_max"] = round4(errs[worst])
            rec["cage_pull_max_layer"] = worst
            if len(errs) <= MAX_LOGGED_LAYERS:
                rec["cage_pull"] = {n: round4(v) for n, v in errs.items()}
        return rec

    def config(self) -> dict[str, Any]:
        """The settings, with lambda as applied (also what config.json / final.json record
        under ``cage``)."""
        return {"mode": self.mode, "lam": self.lam, "silence": self.silence,
                "schedule": self.schedule, "qat_start": self.qat_start,
                "qat_steps": self.qat_steps, "scale": self.scale, "pull": self.pull}

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # checkpoints written before scale and pull existed had neither
        saved = {"scale": "none", "pull": None, **state.get("config", {})}
        if state.get("config") and saved != self.config():
            raise CoqatError(f"the checkpoint was written with CAGE settings {saved}, not"
                             f" {self.config()}; resume with the run's own settings")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"CageHooks({args})"
