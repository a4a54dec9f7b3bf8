"""Extension points of the one training loop.

A phase that needs more than plain training (the bit-width search adds a loss term and
steps its own parameters; CAGE adds error feedback around the optimizer step) passes
``TrainHooks`` to ``coqat.training.loop.train``; each hook sees a ``StepContext``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from coqat.config import TrainSettings
from coqat.optim.schedules import Schedule
from coqat.training.distributed import DistEnv
from coqat.workloads.base import Workload

__all__ = ["StepContext", "TrainHooks"]


@dataclass
class StepContext:
    """What a hook sees at a step."""

    step: int
    lr: float
    phase: str
    model: nn.Module                 # the unwrapped model
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    settings: TrainSettings
    workload: Workload
    device: torch.device
    dist: DistEnv
    loss: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


class TrainHooks:
    """Extension points of the loop. Every method is optional; the base does nothing."""

    #: key under which this hook's state is checkpointed
    name = "hooks"
    #: False: the hook runs the model between two training steps (the search's architecture
    #: step does), so a compiled step must not be captured as a CUDA graph: a replay may
    #: overwrite memory the hook's own forward still holds. The loop then compiles without
    #: graphs (``coqat.training.loop.compile_step``).
    cuda_graphs = True

    def on_start(self, ctx: StepContext) -> None: ...
    def on_qat_start(self, ctx: StepContext) -> None: ...
    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None: return None
    def before_optimizer_step(self, ctx: StepContext) -> None: ...
    def after_optimizer_step(self, ctx: StepContext) -> None: ...
    def log_fields(self, ctx: StepContext) -> dict[str, Any]: return {}
    def state_dict(self) -> dict[str, Any]: return {}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
