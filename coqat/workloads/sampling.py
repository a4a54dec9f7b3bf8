"""Step-indexed sampling helpers shared by the built-in workloads.

Every batch is a pure function of (seed, split, step, rank): ``stable_seed`` turns those into
a generator seed, ``rank_rows`` picks a rank's rows of the global batch, ``epoch_indices``
walks per-epoch permutations so each example is seen once per epoch. Nothing here holds
state, so resume and DDP need no sampler checkpoint.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coqat.errors import CoqatError
from coqat.workloads.base import SPLITS

def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process and Python version
    (unlike ``hash()``, which is salted per process for strings)."""
    text = ":".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & (2**63 - 1)


def rank_rows(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of the global batch that belong to ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise CoqatError(f"rank {rank} is outside world size {world_size}; "
                         f"use 0 <= rank < world_size")
    if batch_size < 1 or batch_size % world_size:
        raise CoqatError(f"global batch size {batch_size} is not divisible by world size "
                         f"{world_size}; choose a batch size that is a multiple of "
                         f"{world_size}")
    b = batch_size // world_size
    return rank * b, (rank + 1) * b


def positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CoqatError(f"workload key {key} must be a positive integer, got {value!r}")
    return value


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise CoqatError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def epoch_indices(n: int, seed: int, tag: str, step: int, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """Indices into a split of ``n`` samples for batch ``step``, this rank's share.

    The sample stream is the concatenation of per-epoch permutations (epoch ``e`` from a
    generator seeded by ``(seed, tag, e)``); batch ``step`` is positions
    ``[step*B, (step+1)*B)`` of it, so every epoch visits each index exactly once and a
    batch may straddle two epochs. The rank takes its contiguous slice of those rows.
    """
    if step < 0:
        raise CoqatError(f"step must be >= 0, got {step}")
    lo, hi = rank_rows(batch_size, rank, world_size)
    pos = torch.arange(step * batch_size + lo, step * batch_size + hi, dtype=torch.long)
    epochs, offsets = pos // n, pos % n
    out = torch.empty_like(pos)
    for e in torch.unique(epochs).tolist():
        gen = torch.Generator().manual_seed(stable_seed(seed, tag, e))
        perm = torch.randperm(n, generator=gen)
        mask = epochs == e
        out[mask] = perm[offsets[mask]]
    return out


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def classifier_eval(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                    to_input, max_batches: int | None, batch_size: int) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over ``images`` in order, on the model's device."""
    device = model_device(model)
    n = len(labels)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                x = to_input(images[start:stop]).to(device)
                y = torch.from_numpy(labels[start:stop].astype(np.int64)).to(device)
                logits = model(x)
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
                correct += (logits.argmax(dim=1) == y).sum().item()
    finally:
        model.train(was_training)
    n = max(n, 1)
    return {"val_acc": correct / n, "loss": loss_sum / n, "samples": n}
