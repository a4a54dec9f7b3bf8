"""Optimizers and schedules: CAGE error feedback rules, WSD / FP->QAT schedules, QAT planner.

The CAGE update rules (``cage_lambda``, ``decoupled_update_``, ``coupled_grad_``) live in
``coqat.optim.cage``; ``coqat.training.cage.CageHooks`` runs them inside the training loop.
"""

from coqat.optim.planner import QatPlan, plan, predict_qat_fraction
from coqat.optim.schedules import Schedule

__all__ = ["Schedule", "QatPlan", "plan", "predict_qat_fraction"]
