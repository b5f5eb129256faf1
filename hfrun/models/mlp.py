"""Fully connected networks."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from hfrun.models.init import initialise

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation={activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}")


class MLP(nn.Module):
    """input → [Linear → activation] × len(hidden_sizes) → Linear → pre-activation outputs.

    The output layer is linear: the task's matching loss applies softmax or
    sigmoid itself. With `hidden_sizes=[]` this is an affine map. Inputs of any
    shape (B, ...) are flattened. `init` picks the initialisation
    (hfrun/models/init.py): PyTorch's default, N(0, init_std²) as the SGN release,
    or Martens' sparse init.
    """

    def __init__(self, input_size: int, output_size: int, hidden_sizes: Sequence[int] = (256, 256),
                 activation: str = "tanh", init: str = "default", init_std: float = 1.0, sparse_fan_in: int = 15,
                 sparse_coeff: float = 1.0):
        super().__init__()
        check_activation(activation)
        sizes = [int(input_size), *[int(h) for h in hidden_sizes], int(output_size)]
        if min(sizes) < 1:
            raise ValueError(f"every layer size must be a positive integer, got {sizes}")
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        self.layers = nn.Sequential(*layers)
        initialise(self, init, init_std, sparse_fan_in, sparse_coeff)

    def forward(self, x):
        return self.layers(x.flatten(1))
