"""Quantize a model you define yourself: coqat's Python API on your own network and data.

Run it (about a minute on 2 CPU cores)::

    python examples/own_model.py --out runs/example

or use the same file from the command line, through its ``factory`` function::

    coqat bops   --model examples/own_model.py:factory --bits w4a4
    coqat search --model examples/own_model.py:factory --budget w4a4 --steps 200

What coqat needs is a ``coqat.UserModel``: the network, iterables of batches for training
and validation (any DataLoader works; here, lists of tensors), and optionally the loss and
the metric. Everything else (BOPs, tie groups, the search, QAT, reports, exports) comes from
the model itself.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import coqat


class SmallNet(nn.Module):
    """Your model: any nn.Module whose Linear / Conv2d layers coqat should quantize."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def digits_batches(batch_size: int = 64) -> tuple[list, list]:
    """Your data, as batches: scikit-learn's 8x8 digits (1,797 images), 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))

    def batches(xs, ys):
        return [(xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, len(ys),
                                                                           batch_size)]

    return batches(x[:cut], y[:cut]), batches(x[cut:], y[cut:])


def accuracy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x).argmax(-1) == y).float().mean()


def factory() -> coqat.UserModel:
    """What ``--model examples/own_model.py:factory`` calls."""
    torch.manual_seed(0)
    train, val = digits_batches()
    return coqat.UserModel(model=SmallNet(), train=train, val=val, metric=accuracy,
                           metric_name="val_acc", higher_is_better=True, name="smallnet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/example")
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()

    model = factory()
    rep = coqat.bops(model=model, bits="w4a4")
    print(f"{len(rep.layers)} quantizable layers; {rep.totals['gbops_fp32']:.4f} GBOPs at FP32,"
          f" {rep.totals['gbops_w4a4']:.4f} at W4A4")

    # search per-layer bits under the W4A4 budget, with uniform W4A4 as the baseline
    searched, uniform = coqat.search(model=model, budget="w4a4", baselines=["uniform"],
                                     steps=args.steps, fp_steps=args.steps,
                                     search_steps=args.steps // 2, lr=3e-3, out=args.out,
                                     progress=False)
    for rec in (searched, uniform):
        print(f"{rec.method:8s} {rec.metric_name} {rec.metric:.4f} at"
              f" {rec.search.achieved_bops / 1e9:.4f} GBOPs ({rec.bits})")

    # the chosen configuration, for deployment (a run of your own model needs the model again)
    exported = coqat.export(searched.run_dir, "json", model=model)
    print(f"per-layer bits: {exported.out_dir}/bitconfig.json")


if __name__ == "__main__":
    main()
