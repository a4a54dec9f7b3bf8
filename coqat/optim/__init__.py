"""Optimizers and schedules: CAGE error feedback, WSD / FP->QAT schedules, QAT planner.

``CageHooks`` and the CAGE update rules (``cage_lambda``, ``decoupled_update_``,
``coupled_grad_``) live in ``coqat.optim.cage``; they are imported on first use so that
``coqat plan`` and the schedule code do not pull in torch and the training loop.
"""

from coqat.optim.planner import QatPlan, plan, predict_qat_fraction
from coqat.optim.schedules import Schedule

_CAGE_NAMES = ("CageHooks", "cage_lambda", "coupled_grad_", "decoupled_update_", "layer_errors")

__all__ = ["Schedule", "QatPlan", "plan", "predict_qat_fraction", *_CAGE_NAMES]


def __getattr__(name: str):
    if name in _CAGE_NAMES:
        from coqat.optim import cage

        return getattr(cage, name)
    raise AttributeError(f"module 'coqat.optim' has no attribute {name!r}")
