"""torchrun / DistributedDataParallel support for the one training loop.

Under ``torchrun --nproc_per_node N coqat train ...`` the environment carries RANK,
WORLD_SIZE and LOCAL_RANK; the loop then initialises a process group (gloo on CPU, NCCL on
GPU), wraps the model in DDP, and gives each rank its slice of every global batch. Rank 0
alone writes the run directory. Without those variables everything is a no-op.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None = None) -> torch.device:
        """The device this rank trains on: the requested one, else CUDA if present."""
        if requested and requested != "auto":
            dev = torch.device(requested)
        else:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type == "cuda" and self.enabled:
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        return dev

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size)
            # Tear the group down while the interpreter is still whole: a gloo group left to
            # the C++ destructors at exit can abort the process (SIGABRT, "terminate called
            # without an active exception") after all the work has succeeded.
            atexit.register(self.shutdown)

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """Mean of a Python float over ranks (for logging)."""
        if not (self.enabled and dist.is_initialized()):
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def broadcast_object(self, obj):
        if not (self.enabled and dist.is_initialized()):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not (self.enabled and dist.is_initialized()):
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (to check ranks agree)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
