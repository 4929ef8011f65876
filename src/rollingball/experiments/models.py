"""Models by name: ``build_model(name, input_shape, num_classes)``.

- ``mlp``: fully connected ReLU network (default two hidden layers of 100).
- ``cnn1d``: the MNIST-1D convolutional net (three 1-D convolutions of 25 channels).
- ``cnn2d``: a small 2-D CNN (32 and 64 channels, max-pooling, one hidden layer of 128).
- ``small_cnn``: the laptop Fashion-MNIST CNN: two 3x3 convolutions (16 and 32 channels)
  with BatchNorm and max-pooling, Dropout, one hidden layer with BatchNorm (see
  :class:`CNNBatchNorm`).
- ``resnet6`` / ``resnet8``: the paper's ResNets with an ImageNet-style stem (7x7 stride-2
  convolution and max-pooling) and stages [1, 1, 0, 0] of BasicBlocks (6 weight layers)
  or Bottlenecks (8 weight layers).
- ``vgg9``: eight 3x3 convolutions with BatchNorm and one linear layer.
- ``resnet18``: the CIFAR ResNet-18 (3x3 stem, no max-pooling, stages [2, 2, 2, 2]).
- ``wrn16_8`` / ``wrn28_10``: pre-activation Wide-ResNets (Zagoruyko & Komodakis, 2016).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "build_model", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}


class MLP(nn.Module):
    """Flatten, then ``Linear -> activation`` for each hidden width, then a linear classifier.

    ``activation`` is one of relu (default), tanh, gelu, silu, softplus. RBO's projection
    solves a smooth equation; on a ReLU network's piecewise-linear landscape it stalls at a
    residual of about 1e-2, on smooth activations it converges (see docs/results.md).
    ``init``: "default" (PyTorch's) or "he" (weights normal with std √(2/fan_in), zero biases).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (100, 100),
        activation: str = "relu",
        init: str = "default",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if init not in ("default", "he"):
            raise ValueError(f"unknown init {init!r}; choose 'default' or 'he'")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        if init == "he":
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.in_features))
                    nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """The MNIST-1D CNN: three 1-D convolutions (kernel 5, stride 2 after the first), ReLU."""

    def __init__(self, length: int, num_classes: int, channels: int = 25, in_channels: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, in_channels, length)).shape[1]
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


class CNN2d(nn.Module):
    """conv(32) -> pool -> conv(64) -> pool -> linear(128) -> linear, ReLU throughout."""

    def __init__(self, in_channels: int, num_classes: int, hw: tuple[int, int]):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = 64 * (hw[0] // 4) * (hw[1] // 4)
        self.classifier = nn.Sequential(
            nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class CNNBatchNorm(nn.Module):
    """[conv3x3 -> BatchNorm -> ReLU -> max-pool 2] x 2 (``channels``) -> Dropout(``dropout[0]``)
    -> linear(``hidden``) -> BatchNorm -> ReLU -> Dropout(``dropout[1]``) -> linear."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hw: tuple[int, int],
        channels: Sequence[int] = (16, 32),
        hidden: int = 128,
        dropout: Sequence[float] = (0.25, 0.5),
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers += [
                nn.Conv2d(width, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            width = c
        layers += [nn.Dropout(dropout[0]), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        scale = 2 ** len(channels)
        flat = width * (hw[0] // scale) * (hw[1] // scale)
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout[1]),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class ResNet(nn.Module):
    """ResNet with stages of ``blocks`` at widths 64·2^i; stages with 0 blocks are left out.

    ``stem="imagenet"``: 7x7 stride-2 convolution and 3x3 stride-2 max-pooling;
    ``stem="cifar"``: one 3x3 stride-1 convolution.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: Sequence[int],
        in_channels: int,
        num_classes: int,
        stem: str = "cifar",
    ):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
            )
        stages: list[nn.Module] = []
        in_planes = 64
        for i, n in enumerate(blocks):
            planes = 64 * 2**i
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_planes, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


VGG9_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


class VGG(nn.Module):
    """VGG: 3x3 conv -> BatchNorm -> ReLU per number, 2x2 max-pooling per "M", global
    average pooling, one linear classifier (pools are skipped once the map is 1 pixel wide)."""

    def __init__(self, config: Sequence[int | str], in_channels: int, num_classes: int, hw: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, hw
        for item in config:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            width = int(item)
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class WideBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 (+ shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k: (depth − 4)/6 blocks per stage at widths 16k, 32k, 64k."""

    def __init__(
        self, depth: int, widen: int, in_channels: int, num_classes: int, dropout: float = 0.0
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for stage, width in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(
                    WideBlock(in_planes, width, 2 if (stage > 0 and j == 0) else 1, dropout)
                )
                in_planes = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(in_planes),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_planes, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def _image_shape(input_shape: Sequence[int], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model {name!r} needs image inputs (C, H, W), got shape {tuple(input_shape)}"
        )
    c, h, w = input_shape
    return int(c), int(h), int(w)


def _mlp(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    return MLP(math.prod(shape), k, **kw)


def _cnn1d(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    if len(shape) == 1:
        return CNN1d(int(shape[0]), k, **kw)
    if len(shape) == 2:
        return CNN1d(int(shape[1]), k, in_channels=int(shape[0]), **kw)
    raise ValueError(f"model 'cnn1d' needs inputs of shape (L,) or (C, L), got {tuple(shape)}")


def _cnn2d(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    c, h, w = _image_shape(shape, "cnn2d")
    return CNN2d(c, k, (h, w), **kw)


def _small_cnn(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    c, h, w = _image_shape(shape, "small_cnn")
    return CNNBatchNorm(c, k, (h, w), **kw)


def _resnet6(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    return ResNet(
        BasicBlock, [1, 1, 0, 0], _image_shape(shape, "resnet6")[0], k, stem="imagenet", **kw
    )


def _resnet8(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    return ResNet(
        Bottleneck, [1, 1, 0, 0], _image_shape(shape, "resnet8")[0], k, stem="imagenet", **kw
    )


def _resnet18(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    return ResNet(
        BasicBlock, [2, 2, 2, 2], _image_shape(shape, "resnet18")[0], k, stem="cifar", **kw
    )


def _vgg9(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    c, h, _ = _image_shape(shape, "vgg9")
    return VGG(VGG9_CONFIG, c, k, h, **kw)


def _wrn16_8(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    return WideResNet(16, 8, _image_shape(shape, "wrn16_8")[0], k, **kw)


def _wrn28_10(shape: Sequence[int], k: int, **kw: Any) -> nn.Module:
    return WideResNet(28, 10, _image_shape(shape, "wrn28_10")[0], k, **kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "cnn1d": _cnn1d,
    "cnn2d": _cnn2d,
    "small_cnn": _small_cnn,
    "resnet6": _resnet6,
    "resnet8": _resnet8,
    "vgg9": _vgg9,
    "resnet18": _resnet18,
    "wrn16_8": _wrn16_8,
    "wrn28_10": _wrn28_10,
}


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (without the batch dimension).

    ``kwargs`` go to the model's constructor, e.g. ``hidden=[256, 256]`` for ``mlp``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](tuple(input_shape), num_classes, **kwargs)
