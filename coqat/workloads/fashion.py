"""Fashion-MNIST with a small ResNet: the built-in vision workload.

Data: the real Fashion-MNIST (Zalando SE, MIT license) as Debian's ``dataset-fashion-mnist``
installs it (``/usr/share/datasets/fashion-mnist/*.gz``), or any directory holding the four
upstream IDX ``.gz`` files. Nothing is downloaded.

Splits: a fixed seeded permutation of the 60,000 training images gives 55,000 ``train``
and 5,000 ``holdout`` images (holdout never updates weights; the bit-width search trains
its architecture parameters on it); ``val`` is the official 10,000-image test set.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coqat.errors import CoqatError
from coqat.workloads.base import Workload, register
from coqat.workloads.resnet import fashion_resnet
from coqat.workloads.sampling import (check_split, classifier_eval, epoch_indices, positive_int,
                                      stable_seed)

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MEAN, STD = 0.2860, 0.3530  # of the 60k training pixels in [0, 1]
N_HOLDOUT = 5_000


# ----- the data ----------------------------------------------------------------------

def _parse_idx(path: Path, magic: int, shape_tail: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """Decompress an IDX file; return its array and the SHA-256 of the decompressed bytes."""
    corrupt = (f"{path} is corrupt or not a Fashion-MNIST IDX file; reinstall with "
               f"`apt-get install --reinstall dataset-fashion-mnist` or pass --data-dir DIR "
               f"holding the four IDX .gz files")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error):
        raise CoqatError(corrupt) from None
    header = 8 + 4 * len(shape_tail)  # magic, count, then one int per trailing dim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise CoqatError(corrupt)
    count = int.from_bytes(raw[4:8], "big")
    dims = tuple(int.from_bytes(raw[8 + 4 * i:12 + 4 * i], "big") for i in range(len(shape_tail)))
    if dims != shape_tail or len(raw) != header + count * int(np.prod(shape_tail, dtype=np.int64)):
        raise CoqatError(corrupt)
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(count, *shape_tail)
    return arr, hashlib.sha256(raw).hexdigest()


_CACHE: dict[str, dict[str, Any]] = {}


def load_fashion_mnist(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The four arrays (uint8 images [N,28,28], uint8 labels [N]) and their hashes.

    Cached in-process by directory: the arrays are read-only."""
    root = Path(data_dir).expanduser()
    key = str(root.resolve())
    if key in _CACHE:
        return _CACHE[key]
    missing = [f for f in FILES.values() if not (root / f).is_file()]
    if missing:
        raise CoqatError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); install it "
            f"with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding "
            f"the four IDX .gz files")
    arrays, hashes = {}, {}
    for name, fname in FILES.items():
        if name.endswith("images"):
            arr, sha = _parse_idx(root / fname, 2051, (28, 28))
        else:
            arr, sha = _parse_idx(root / fname, 2049, ())
            if arr.size and arr.max() > 9:
                raise CoqatError(f"{root / fname} has labels outside 0-9; it is not "
                                 f"Fashion-MNIST: pass --data-dir DIR holding the right files")
        arrays[name], hashes[fname] = arr, sha
    for part in ("train", "test"):
        if len(arrays[f"{part}_images"]) != len(arrays[f"{part}_labels"]):
            raise CoqatError(f"Fashion-MNIST {part} images and labels differ in count in "
                             f"{root}; reinstall with `apt-get install --reinstall "
                             f"dataset-fashion-mnist`")
    data = {"arrays": arrays, "sha256": hashes, "dir": str(root)}
    _CACHE[key] = data
    return data


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,28,28] -> float32 [N,1,28,28], (x/255 - 0.2860) / 0.3530."""
    x = torch.from_numpy(images.astype(np.float32))  # astype copies: the cache stays read-only
    return x.div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)


@register
class FashionWorkload(Workload):
    """Fashion-MNIST classification with ``fashion_resnet(width, blocks)``; metric: top-1
    accuracy (a fraction in [0, 1]) on the official test set."""

    name = "fashion"
    metric = "val_acc"
    higher_is_better = True
    spec_keys = ("width", "blocks", "data_dir")

    def __init__(self, spec: Mapping[str, Any] | None = None, data_dir: str | None = None,
                 seed: int = 0):
        super().__init__(spec, data_dir=data_dir, seed=seed)
        self.width = positive_int(self.spec.get("width", 16), "width")
        blocks = self.spec.get("blocks", [1, 1, 1])
        if (not isinstance(blocks, (list, tuple)) or not blocks
                or not all(isinstance(b, int) and b >= 1 for b in blocks)):
            raise CoqatError(f"workload 'fashion': blocks must be a list of positive "
                             f"integers such as [1, 1, 1], got {blocks!r}")
        self.blocks = tuple(blocks)
        self.data_dir = data_dir or self.spec.get("data_dir") or DEFAULT_DATA_DIR
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    # ----- model -----
    def build_model(self) -> nn.Module:
        return fashion_resnet(self.width, self.blocks)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, 1, 28, 28),)

    # ----- data -----
    def splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """split -> (uint8 images [N,28,28], uint8 labels [N]); loaded on first use."""
        if self._splits is None:
            arrays = load_fashion_mnist(self.data_dir)["arrays"]
            n = len(arrays["train_labels"])
            if n <= N_HOLDOUT:
                raise CoqatError(f"Fashion-MNIST in {self.data_dir} has only {n} training "
                                 f"images; pass --data-dir DIR holding the full IDX files")
            # Fixed (not run-seeded): every run holds out the same 5,000 images.
            gen = torch.Generator().manual_seed(stable_seed("fashion", "holdout"))
            perm = torch.randperm(n, generator=gen).numpy()
            train_idx, hold_idx = np.sort(perm[N_HOLDOUT:]), np.sort(perm[:N_HOLDOUT])
            ti, tl = arrays["train_images"], arrays["train_labels"]
            self._splits = {
                "train": (ti[train_idx], tl[train_idx]),
                "holdout": (ti[hold_idx], tl[hold_idx]),
                "val": (arrays["test_images"], arrays["test_labels"]),
            }
        return self._splits

    def get_batch(self, split: str, step: int, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        check_split(split)
        images, labels = self.splits()[split]
        idx = epoch_indices(len(labels), self.seed, f"fashion:{split}", step, batch_size,
                            rank, world_size).numpy()
        return normalize(images[idx]), torch.from_numpy(labels[idx].astype(np.int64))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module, max_batches: int | None = None,
                 batch_size: int = 64, split: str = "val") -> dict[str, float]:
        check_split(split)
        images, labels = self.splits()[split]
        return classifier_eval(model, images, labels, normalize, max_batches, batch_size)

    def data_info(self) -> dict[str, Any]:
        data = load_fashion_mnist(self.data_dir)
        return {
            "dataset": "fashion-mnist",
            "dir": data["dir"],
            "sha256_decompressed": data["sha256"],
            "counts": {s: int(len(lbl)) for s, (_, lbl) in self.splits().items()},
            "split_rule": "fixed permutation of the 60k train images: 55k train / 5k "
                          "holdout; val = official 10k test set",
            "normalization": {"mean": MEAN, "std": STD},
            "license_notes": "Fashion-MNIST, MIT license, (c) Zalando SE",
        }
