"""Per-case metrics, summed over a batch (the task divides by the number of cases). Lower is better.

- `wrong_classes`: argmax of the outputs ≠ the target class (the error rate's numerator).
- `squared_error`: Σ over output units of (prediction − target)², where the prediction
  is the loss's output nonlinearity applied to the pre-activations (identity for the
  squared-error loss, the logistic for sigmoid cross-entropy). For one output unit and
  a linear output this is the MSE's numerator; for the autoencoder it is Martens 2010's
  reconstruction error (sum over the 784 pixels, mean over cases).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def wrong_classes(outputs: Tensor, targets: Tensor, loss=None) -> Tensor:
    return (outputs.argmax(dim=-1) != targets).sum()


def squared_error(outputs: Tensor, targets: Tensor, loss=None) -> Tensor:
    predictions = outputs if loss is None else loss.predict(outputs)
    return (predictions - targets).square().sum()


METRICS: dict[str, Callable[..., Tensor]] = {"error": wrong_classes, "mse": squared_error,
                                             "squared_error": squared_error}
