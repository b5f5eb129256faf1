"""Stacked LSTM classifiers for sequences (BDHF 2017's sequential-MNIST experiment)."""
from __future__ import annotations

from torch import Tensor, nn


class LSTM(nn.Module):
    """(B, T, input_size) → `num_layers` stacked LSTM layers of `hidden_size` → a linear layer on the last
    layer's hidden state at the last step → (B, output_size) pre-activations.

    torch's LSTM kernel runs the recurrence. On the CPU in float32 it is oneDNN's, which has no
    forward-mode derivative: the curvature products detect that once and switch to the native kernel
    (hfrun/curvature.py logs it), or use `solver.jv_method=double_vjp`, which needs none.
    """

    def __init__(self, input_size: int, output_size: int, hidden_size: int = 128, num_layers: int = 3):
        super().__init__()
        if min(input_size, output_size, hidden_size, num_layers) < 1:
            raise ValueError(f"the LSTM's sizes must be positive integers, got input {input_size}, output "
                             f"{output_size}, hidden {hidden_size}, layers {num_layers}")
        self.lstm = nn.LSTM(int(input_size), int(hidden_size), num_layers=int(num_layers), batch_first=True)
        self.readout = nn.Linear(int(hidden_size), int(output_size))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"the LSTM takes sequences of shape (batch, time, features), got {tuple(x.shape)}")
        return self.readout(self.lstm(x)[0][:, -1])
