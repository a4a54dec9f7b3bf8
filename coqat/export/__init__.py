"""Export adapters from a BitConfig (+ trained weights) to deployment formats."""

from coqat.export.targets import TARGETS, Target, get_target

__all__ = ["TARGETS", "Target", "get_target"]
