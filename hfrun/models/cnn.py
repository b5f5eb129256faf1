"""Convolutional networks: a plain conv stack (LeNet-5 and the SGN release's CIFAR-10 net) and a small ResNet."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hfrun.models.init import initialise
from hfrun.models.mlp import ACTIVATIONS, check_activation


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(size) for size in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"model.input_shape must be (channels, height, width) of positive integers, got {shape}")
    return shape


def _check_sizes(name: str, sizes: Sequence[int]) -> list[int]:
    sizes = [int(size) for size in sizes]
    if min(sizes, default=1) < 1:
        raise ValueError(f"model.{name} must hold positive integers, got {sizes}")
    return sizes


class ConvNet(nn.Module):
    """[Conv(k×k, no padding) → activation → (2×2 max-pool)] per entry of `channels`, then
    [Linear → activation] per entry of `hidden_sizes`, then a linear output layer.

    - LeNet-5 as the SGN release runs it on Fashion-MNIST: channels [6, 16], kernel 5,
      pool [true, true], hidden [120, 84], ReLU (configs/model/lenet5.yaml).
    - The SGN release's CIFAR-10 net: channels [32, 64, 64], kernel 3, pool
      [true, true, false], hidden [64], ReLU (configs/model/cnn.yaml).
    Inputs are (B, C, H, W); `input_shape` = (C, H, W) comes from the task.
    """

    def __init__(self, input_shape: Sequence[int], output_size: int, channels: Sequence[int] = (32, 64, 64),
                 kernel_size: int = 3, pool: Sequence[bool] = (True, True, False), hidden_sizes: Sequence[int] = (64,),
                 activation: str = "relu", init: str = "default", init_std: float = 1.0, sparse_fan_in: int = 15,
                 sparse_coeff: float = 1.0):
        super().__init__()
        check_activation(activation)
        in_channels, height, width = _check_shape(input_shape)
        channels, hidden_sizes = _check_sizes("channels", channels), _check_sizes("hidden_sizes", hidden_sizes)
        if len(pool) != len(channels):
            raise ValueError(f"model.pool needs one true/false per conv layer ({len(channels)}), got {list(pool)}")
        if kernel_size < 1 or output_size < 1:
            raise ValueError(f"model.kernel_size and the output size must be positive, got {kernel_size}, {output_size}")
        layers: list[nn.Module] = []
        for out_channels, pooled in zip(channels, pool):
            height, width = height - kernel_size + 1, width - kernel_size + 1
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size), ACTIVATIONS[activation]()]
            if pooled:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            if min(height, width) < 1:
                raise ValueError(f"the conv stack {channels} (kernel {kernel_size}, pool {list(pool)}) shrinks the "
                                 f"input {tuple(input_shape)} to nothing; use fewer layers or a smaller kernel")
            in_channels = out_channels
        layers.append(nn.Flatten())
        features = in_channels * height * width
        for size in hidden_sizes:
            layers += [nn.Linear(features, size), ACTIVATIONS[activation]()]
            features = size
        layers.append(nn.Linear(features, int(output_size)))
        self.layers = nn.Sequential(*layers)
        initialise(self, init, init_std, sparse_fan_in, sparse_coeff)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ResidualBlock(nn.Module):
    """x → conv3×3(stride) → ReLU → conv3×3 → + shortcut(x) → ReLU. No batch norm (see ResNet).

    The second conv starts at zero (Fixup, Zhang et al. 2019; "zero-init residual"), so every block
    is the identity (or the 1×1 projection) at initialisation and the deep net trains without
    normalisation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, stride=stride))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet for 32×32 images (He et al. 2016's CIFAR layout, narrower and shallower):
    conv3×3 stem → stages of `blocks_per_stage` residual blocks with `widths` channels (stride 2
    between stages) → global average pool → linear output.

    No batch norm, on purpose: a batch-norm layer's output depends on the whole batch, so its
    curvature products are not per-case sums and its train/eval modes differ between the quadratic
    model and the held-out metric. The blocks start as identities instead (ResidualBlock).
    Default 16-32-64 channels, 1 block per stage: 7 conv layers, 0.08 M parameters, which
    trains on 2 CPU cores.
    """

    def __init__(self, input_shape: Sequence[int], output_size: int, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: int = 1):
        super().__init__()
        in_channels, _, _ = _check_shape(input_shape)
        widths = _check_sizes("widths", widths)
        if not widths or blocks_per_stage < 1 or output_size < 1:
            raise ValueError(f"model.widths must be non-empty and model.blocks_per_stage >= 1, got {widths}, "
                             f"{blocks_per_stage}")
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(ResidualBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, int(output_size))

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(torch.relu(self.stem(x)))
        return self.head(features.mean(dim=(2, 3)))
