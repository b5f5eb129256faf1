"""Matching losses on pre-activation outputs and their output Hessians H_L.

Every loss is averaged over cases: L = (1/B) Σ_b Σ_{t,o} mask_bt · ℓ(z_bto, y_bto),
where B is the first dimension of the outputs z, any middle dimensions are
positions (time steps) and the last is the output unit. This is Martens'
per-case normalization (Martens 2010), so the damping λ means the same thing
whatever the batch size.

For a matching loss the Hessian with respect to the pre-activations is cheap and
exact (Schraudolph 2002):
  - linear output + squared error ½(z−y)²:   H_L = I
  - softmax + cross-entropy:                 H_L = diag(p) − ppᵀ per position
  - sigmoid + binary cross-entropy:          H_L = diag(p(1−p))
each times mask_bt / B. `output_hessian(z, y, mask)` computes the factors once
(p, the mask) and returns an object whose `mv(u)` multiplies by H_L.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _position_weights(z: Tensor, mask: Tensor | None) -> Tensor:
    """Weights of shape z.shape[:-1] + (1,), already divided by the number of cases."""
    cases = z.shape[0]
    if mask is None:
        return torch.full((1,) * z.dim(), 1.0 / cases, dtype=z.dtype, device=z.device)
    if mask.shape != z.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match outputs {tuple(z.shape)} without the unit dimension")
    return (mask.to(z.dtype) / cases).unsqueeze(-1)


@dataclass
class DiagonalHessian:
    """H_L = diag(d); d already carries the mask and 1/B."""

    diag: Tensor

    def mv(self, u: Tensor) -> Tensor:
        return self.diag * u


@dataclass
class SoftmaxHessian:
    """H_L = w·(diag(p) − ppᵀ) at each position, w = mask/B."""

    probs: Tensor
    weights: Tensor

    def mv(self, u: Tensor) -> Tensor:
        pu = self.probs * u
        return self.weights * (pu - self.probs * pu.sum(-1, keepdim=True))


class SquaredError:
    """Linear output with L = scale·‖z − y‖² per case (scale ½ by default, H_L = 2·scale·I); targets have the
    shape of z. The SGN release's regression objective is the plain mean squared error, scale 1."""

    name = "mse"

    def __init__(self, scale: float = 0.5):
        if not scale > 0:
            raise ValueError(f"the squared error's scale must be > 0, got {scale!r}")
        self.scale = float(scale)

    def __call__(self, z: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.scale * ((z - y).square() * _position_weights(z, mask)).sum()

    def output_hessian(self, z: Tensor, y: Tensor, mask: Tensor | None = None) -> DiagonalHessian:
        return DiagonalHessian((2 * self.scale * _position_weights(z, mask)).expand_as(z))

    def predict(self, z: Tensor) -> Tensor:
        return z


class SoftmaxCrossEntropy:
    """Softmax output with L = −log p_y per position; targets are class indices of shape z.shape[:-1]."""

    name = "softmax_ce"

    def __call__(self, z: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        nll = -torch.gather(F.log_softmax(z, dim=-1), -1, y.long().unsqueeze(-1))
        return (nll * _position_weights(z, mask)).sum()

    def output_hessian(self, z: Tensor, y: Tensor, mask: Tensor | None = None) -> SoftmaxHessian:
        return SoftmaxHessian(torch.softmax(z, dim=-1), _position_weights(z, mask))

    def predict(self, z: Tensor) -> Tensor:
        return torch.softmax(z, dim=-1)


class SigmoidCrossEntropy:
    """Sigmoid output with binary cross-entropy per unit; targets in [0, 1] of the shape of z."""

    name = "sigmoid_ce"

    def __call__(self, z: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none")
        return (bce * _position_weights(z, mask)).sum()

    def output_hessian(self, z: Tensor, y: Tensor, mask: Tensor | None = None) -> DiagonalHessian:
        p = torch.sigmoid(z)
        return DiagonalHessian(p * (1 - p) * _position_weights(z, mask))

    def predict(self, z: Tensor) -> Tensor:
        return torch.sigmoid(z)


LOSSES = {cls.name: cls for cls in (SquaredError, SoftmaxCrossEntropy, SigmoidCrossEntropy)}


def make_loss(name: str):
    """The matching loss called `name` (mse, softmax_ce, sigmoid_ce)."""
    try:
        return LOSSES[name]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
