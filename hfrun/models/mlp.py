"""Fully connected networks."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class MLP(nn.Module):
    """input → [Linear → activation] × len(hidden_sizes) → Linear → pre-activation outputs.

    The output layer is linear: the task's matching loss applies softmax or
    sigmoid itself. With `hidden_sizes=[]` this is an affine map.
    """

    def __init__(self, input_size: int, output_size: int, hidden_sizes: Sequence[int] = (256, 256), activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
        sizes = [int(input_size), *[int(h) for h in hidden_sizes], int(output_size)]
        if min(sizes) < 1:
            raise ValueError(f"every layer size must be a positive integer, got {sizes}")
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.flatten(1))
