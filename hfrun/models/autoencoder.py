"""Deep autoencoders (Hinton & Salakhutdinov 2006; Martens 2010)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from hfrun.models.mlp import ACTIVATIONS


class Autoencoder(nn.Module):
    """input → encoder layers → linear code → mirrored decoder → pre-activation reconstruction.

    MNIST in Martens 2010: 784-1000-500-250-30-250-500-1000-784, logistic units,
    a linear 30-unit code layer; the output is logistic through the task's
    sigmoid cross-entropy loss.
    """

    def __init__(self, input_size: int, output_size: int | None = None, encoder_sizes: Sequence[int] = (1000, 500, 250),
                 code_size: int = 30, activation: str = "sigmoid"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
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

    def forward(self, x):
        return self.layers(x.flatten(1))
