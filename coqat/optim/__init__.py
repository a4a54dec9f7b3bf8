"""Optimizers and schedules: CAGE error feedback, WSD / FP->QAT schedules, QAT planner."""

from coqat.optim.planner import plan, predict_qat_fraction
from coqat.optim.schedules import Schedule

__all__ = ["Schedule", "plan", "predict_qat_fraction"]
