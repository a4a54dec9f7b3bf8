"""scikit-learn's bundled digits (1,797 8x8 images) with a tiny CNN.

For smoke tests and quick demos ONLY: the set is tiny and nearly saturated, so its
numbers say nothing about quantization quality; label any result from it that way.

Data: ``sklearn.datasets.load_digits()`` (UCI optdigits, BSD-3 via scikit-learn), read
offline from the installed wheel. A fixed permutation gives 1,400 ``train``, 197
``holdout`` and 200 ``val`` images; pixels (0-16) are divided by 16.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coqat.errors import CoqatError
from coqat.workloads.base import Workload, register
from coqat.workloads.sampling import (check_split, classifier_eval, epoch_indices,
                                     positive_int, stable_seed)

SPLIT_SIZES = (("train", 1400), ("holdout", 197), ("val", 200))


class DigitsNet(nn.Module):
    """conv1 (1->w, 3x3) - ReLU - conv2 (w->2w, 3x3, stride 2) - ReLU - fc (2w*4*4 -> 10).
    A smoke-test model: three quantizable layers, one of each shape."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def load_digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (float32 images [N,8,8] in [0,1], int64 labels [N]); fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CoqatError("the digits workload needs scikit-learn; install it with "
                         "`pip install scikit-learn`") from None
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    total = sum(n for _, n in SPLIT_SIZES)
    if len(labels) != total:
        raise CoqatError(f"sklearn's digits has {len(labels)} images, expected {total}; "
                         f"reinstall it with `pip install --force-reinstall scikit-learn`")
    gen = torch.Generator().manual_seed(stable_seed("digits", "split"))
    perm = torch.randperm(total, generator=gen).numpy()
    out, start = {}, 0
    for name, n in SPLIT_SIZES:
        idx = np.sort(perm[start:start + n])
        out[name] = (images[idx], labels[idx])
        start += n
    return out


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)


@register
class DigitsWorkload(Workload):
    """8x8 digits with ``DigitsNet`` (smoke tests only); metric: top-1 accuracy on val."""

    name = "digits"
    metric = "val_acc"
    higher_is_better = True
    spec_keys = ("width",)

    def __init__(self, spec: Mapping[str, Any] | None = None, data_dir: str | None = None,
                 seed: int = 0):
        super().__init__(spec, data_dir=data_dir, seed=seed)
        self.width = positive_int(self.spec.get("width", 8), "width")
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def build_model(self) -> nn.Module:
        return DigitsNet(self.width)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, 1, 8, 8),)

    def splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self._splits is None:
            self._splits = load_digits_splits()
        return self._splits

    def get_batch(self, split: str, step: int, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        check_split(split)
        images, labels = self.splits()[split]
        idx = epoch_indices(len(labels), self.seed, f"digits:{split}", step, batch_size,
                            rank, world_size).numpy()
        return _to_input(images[idx]), torch.from_numpy(labels[idx])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module, max_batches: int | None = None,
                 batch_size: int = 64, split: str = "val") -> dict[str, float]:
        check_split(split)
        images, labels = self.splits()[split]
        return classifier_eval(model, images, labels, _to_input, max_batches, batch_size)

    def data_info(self) -> dict[str, Any]:
        import hashlib

        import sklearn

        splits = self.splits()
        h = hashlib.sha256()
        for name, _ in SPLIT_SIZES:
            h.update(splits[name][0].tobytes())
            h.update(splits[name][1].tobytes())
        return {
            "dataset": "sklearn digits (smoke tests only)",
            "sklearn_version": sklearn.__version__,
            "counts": {name: int(len(splits[name][1])) for name, _ in SPLIT_SIZES},
            "sha256": h.hexdigest(),
            "license_notes": "UCI optdigits as bundled with scikit-learn (BSD-3-Clause)",
        }
