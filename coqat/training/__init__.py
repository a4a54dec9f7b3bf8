"""The one training loop (FP / search / QAT phases), run directories, resume, DDP."""

from coqat.training.loop import StepContext, TrainHooks, build_optimizer, train

__all__ = ["StepContext", "TrainHooks", "build_optimizer", "train"]
