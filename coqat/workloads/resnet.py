"""ResNets in plain PyTorch, with torchvision's module names.

- ``resnet18``: the ImageNet ResNet-18 (BasicBlock, 1x1-conv downsample), 224x224 input;
  used to pin the BOPs counter to the published HAWQ-V3 figures.
- ``resnet20``: the CIFAR ResNet-20 of He et al. with option-A (parameter-free, zero-padded)
  shortcuts, 32x32 input.
- ``fashion_resnet``: a small ResNet for 28x28 grayscale images (Fashion-MNIST), with
  1x1-conv downsample shortcuts so that a block's conv1 and its downsample read the same
  tensor (an activation tie group).

torchvision has no CPU wheel here, so these are written out; the layer shapes match
torchvision's ``resnet18`` exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut. ``shortcut`` is 'conv' (1x1 conv + BN when the
    shape changes, torchvision / option B) or 'pad' (stride-2 subsample + zero channels,
    option A)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "conv"):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut_kind = shortcut
        self.pad = 0
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            if shortcut == "conv":
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            elif shortcut == "pad":
                self.pad = cout - cin
                self.stride = stride
            else:
                raise ValueError(f"unknown shortcut {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        elif self.pad:
            identity = F.pad(x[:, :, ::self.stride, ::self.stride],
                             (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            identity = x
        return F.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, stem: nn.Module, stages: list[nn.Sequential], width: int,
                 num_classes: int):
        super().__init__()
        # stem modules are attributes (conv1, bn1, maxpool) to keep torchvision's names
        for name, mod in stem.named_children():
            setattr(self, name, mod)
        self._stem = [name for name, _ in stem.named_children()]
        for i, stage in enumerate(stages, start=1):
            setattr(self, f"layer{i}", stage)
        self._n_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._stem:
            x = getattr(self, name)(x)
            if name == "bn1":
                x = F.relu(x)
        for i in range(1, self._n_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stages(widths: list[int], blocks: list[int], cin: int, first_stride: int,
            shortcut: str) -> list[nn.Sequential]:
    stages = []
    for i, (w, n) in enumerate(zip(widths, blocks)):
        stride = first_stride if i == 0 else 2
        layers = []
        for b in range(n):
            layers.append(BasicBlock(cin, w, stride if b == 0 else 1, shortcut))
            cin = w
        stages.append(nn.Sequential(*layers))
    return stages


def resnet18(num_classes: int = 1000) -> ResNet:
    """ImageNet ResNet-18 (torchvision layout): 1.814 GMACs at 224x224."""
    stem = nn.Sequential()
    stem.add_module("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False))
    stem.add_module("bn1", nn.BatchNorm2d(64))
    stem.add_module("maxpool", nn.MaxPool2d(3, stride=2, padding=1))
    return ResNet(stem, _stages([64, 128, 256, 512], [2, 2, 2, 2], 64, 1, "conv"), 512,
                  num_classes)


def resnet20(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-20 with option-A shortcuts: 0.0406 GMACs at 32x32."""
    stem = nn.Sequential()
    stem.add_module("conv1", _conv3x3(3, 16))
    stem.add_module("bn1", nn.BatchNorm2d(16))
    return ResNet(stem, _stages([16, 32, 64], [3, 3, 3], 16, 1, "pad"), 64, num_classes)


def fashion_resnet(width: int = 16, blocks: tuple[int, ...] = (1, 1, 1), num_classes: int = 10,
                   in_channels: int = 1) -> ResNet:
    """Small ResNet for 28x28 inputs: stages of width w, 2w, 4w (strides 1, 2, 2)."""
    stem = nn.Sequential()
    stem.add_module("conv1", _conv3x3(in_channels, width))
    stem.add_module("bn1", nn.BatchNorm2d(width))
    widths = [width * 2**i for i in range(len(blocks))]
    return ResNet(stem, _stages(widths, list(blocks), width, 1, "conv"), widths[-1], num_classes)
