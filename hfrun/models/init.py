"""Weight initialisations the seed releases use, for the layers of feed-forward models.

- "default": PyTorch's own (uniform ±1/√fan_in, He-style for conv layers).
- "normal" (the SGN release's MLPs): W ~ N(0, init_std²), no fan-in scaling, biases 0.
  With std 1 and sigmoid units this is badly conditioned on purpose: it is what
  SGN's published comparison with SGD ran on (SGD needed lr = 1).
- "sparse" (Martens 2010's release): each unit gets `sparse_fan_in` incoming
  weights at columns drawn *with replacement* (a repeated column is written
  twice, so a row may hold fewer non-zeros), each N(0, 1)·`sparse_coeff`,
  without the 1/√k scaling that the RNN release uses; biases 0.
- "glorot_uniform" (the SGN release's convnets): conv W ~ U(±√(6/(fan_in·…))),
  here Glorot's U(±√(6/(fan_in + fan_out))) for every layer, biases 0.

The model's parameters are drawn from torch's global generator, which the engine
seeds from `seed`; the SGN release fixed its initialisation whatever the seed,
which hfrun does not copy (seeds differ in the initialisation and the data order).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

INITS = ("default", "normal", "sparse", "glorot_uniform")


def check_init(init: str, init_std: float = 1.0, sparse_fan_in: int = 15, sparse_coeff: float = 1.0) -> None:
    if init not in INITS:
        raise ValueError(f"model.init={init!r} is unknown; choose one of {list(INITS)}")
    if not (math.isfinite(init_std) and init_std > 0):
        raise ValueError(f"model.init_std must be finite and > 0, got {init_std!r}")
    if sparse_fan_in < 1:
        raise ValueError(f"model.sparse_fan_in must be a positive integer, got {sparse_fan_in!r}")
    if not (math.isfinite(sparse_coeff) and sparse_coeff > 0):
        raise ValueError(f"model.sparse_coeff must be finite and > 0, got {sparse_coeff!r}")


def martens_sparse_weight(rows: int, cols: int, fan_in: int, coeff: float = 1.0) -> Tensor:
    """(rows, cols): per row, `fan_in` columns drawn with replacement get N(0, 1)·coeff (Martens' release)."""
    weight = torch.zeros(rows, cols)
    columns = torch.randint(cols, (rows, fan_in))
    values = torch.randn(rows, fan_in) * coeff
    for row in range(rows):  # a plain loop so that a repeated column keeps the later draw, as MATLAB does
        weight[row, columns[row]] = values[row]
    return weight


@torch.no_grad()
def initialise(module: nn.Module, init: str, init_std: float = 1.0, sparse_fan_in: int = 15,
               sparse_coeff: float = 1.0) -> None:
    """Re-initialise every nn.Linear and nn.Conv2d inside `module` by the named scheme (see the module docstring)."""
    check_init(init, init_std, sparse_fan_in, sparse_coeff)
    if init == "default":
        return
    for layer in module.modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        weight = layer.weight
        if init == "normal":
            weight.normal_(0.0, init_std)
        elif init == "glorot_uniform":
            nn.init.xavier_uniform_(weight)
        else:
            rows, cols = weight.shape[0], weight[0].numel()
            weight.copy_(martens_sparse_weight(rows, cols, sparse_fan_in, sparse_coeff).view_as(weight))
        if layer.bias is not None:
            layer.bias.zero_()
