"""Deep autoencoders (Hinton & Salakhutdinov 2006; Martens 2010)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from hfrun.models.init import initialise
from hfrun.models.mlp import ACTIVATIONS, check_activation


class Autoencoder(nn.Module):
    """input → encoder layers → linear code → mirrored decoder → pre-activation reconstruction.

    MNIST in Martens 2010: 784-1000-500-250-30-250-500-1000-784, logistic units,
    a linear 30-unit code layer; the output is logistic through the task's
    sigmoid cross-entropy loss. `init: sparse` is Martens' release: 15 incoming
    weights per unit, N(0, 1) unscaled, biases 0 (hfrun/models/init.py).
    """

    def __init__(self, input_size: int, output_size: int | None = None, encoder_sizes: Sequence[int] = (1000, 500, 250),
                 code_size: int = 30, activation: str = "sigmoid", init: str = "default", init_std: float = 1.0,
                 sparse_fan_in: int = 15, sparse_coeff: float = 1.0):
        super().__init__()
        check_activation(activation)
        output_size = input_size if output_size is None else output_size
        widths = [int(input_size), *map(int, encoder_sizes)]
        if min(*widths, int(code_size), int(output_size)) < 1:
            raise ValueError(f"every layer size must be a positive integer, got encoder {widths}, code "
                             f"{code_size}, output {output_size}")
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], code_size))  # linear code layer
        decoder = [int(code_size), *reversed(widths[1:])]
        for fan_in, fan_out in zip(decoder[:-1], decoder[1:]):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(decoder[-1], int(output_size)))
        self.layers = nn.Sequential(*layers)
        initialise(self, init, init_std, sparse_fan_in, sparse_coeff)

    def forward(self, x):
        return self.layers(x.flatten(1))
