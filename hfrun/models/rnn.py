"""A tanh recurrent network with a linear readout at every step (Martens & Sutskever 2011).

    a_t = W_ih x_t + b_ih + W_hh h_{t−1} + b_hh,   h_t = tanh(a_t),   h_0 = 0 (or learned),
    z_t = W_ho h_t + b_o.

The outputs z are pre-activations: the task's matching loss supplies the
output nonlinearity. The hidden pre-activations a are exposed for structural
damping by `forward_with_preactivations`.

Initializations:
  - "sparse" (M&S 2011): every unit has `sparse_fan_in` non-zero incoming
    weights (at most the layer's fan-in) in W_hh, W_ih and W_ho, drawn from
    N(0, 1)/√k; W_ih is then scaled by `input_scale`. `sparse_scale` picks k:
    "nonzeros", the number of non-zeros in the row (fewer than `sparse_fan_in`
    where the layer has fewer inputs, e.g. W_ih of a 2-input task), or "fan_in",
    `sparse_fan_in` itself whatever the row holds, as Sutskever's release does
    (its `sparsify_strict` with scale 1/√15). The two differ only for layers with
    fewer than `sparse_fan_in` inputs.
  - "spectral" (Sutskever et al. 2013): W_hh sparse as above, then rescaled to
    spectral radius `spectral_radius`; W_ih = 0.001·N(0, 1), dense;
    W_ho sparse as above. `input_scale` is not used.
  All biases (where the model has them) start at zero, and a learned h_0 too unless `initial_state_std`
  says otherwise. Draws come from
  torch's global RNG.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hfrun.models.recurrence import tanh_recurrence

SPECTRAL_INPUT_STD = 0.001  # Sutskever et al. 2013: input-to-hidden weights 0.001·N(0, 1)


SPARSE_SCALES = ("nonzeros", "fan_in")


def sparse_weight(rows: int, cols: int, fan_in: int, scale: str = "nonzeros") -> Tensor:
    """(rows, cols) with min(fan_in, cols) non-zeros per row at random columns, each N(0, 1)/√k,
    k = the number of non-zeros (scale="nonzeros") or fan_in (scale="fan_in")."""
    nonzeros = min(fan_in, cols)
    columns = torch.rand(rows, cols).argsort(dim=1)[:, :nonzeros]
    values = torch.randn(rows, nonzeros) / math.sqrt(nonzeros if scale == "nonzeros" else fan_in)
    return torch.zeros(rows, cols).scatter_(1, columns, values)


def spectral_radius_of(weight: Tensor) -> float:
    """max |eigenvalue| of a square matrix, computed in float64."""
    return float(torch.linalg.eigvals(weight.detach().to(device="cpu", dtype=torch.float64)).abs().max())


def input_drive(rnn: nn.RNN, x_flat: Tensor) -> Tensor:
    """W_ih x (+ b_ih + b_hh when the RNN has biases) for (N, input_size) inputs, one matmul."""
    if rnn.bias:
        return torch.addmm(rnn.bias_ih_l0 + rnn.bias_hh_l0, x_flat, rnn.weight_ih_l0.T)
    return x_flat @ rnn.weight_ih_l0.T


def fused_hidden_states(rnn: nn.RNN, x: Tensor, initial: Tensor | None = None) -> Tensor:
    """h (B, L, H) from torch's RNN kernel, from h_0 = `initial` (H,) or 0. cuDNN is switched off because
    cuDNN RNNs have no double backward (pytorch/pytorch#5261) nor, as far as we know, forward-mode AD,
    which curvature products need; the native kernel is a C++ loop of differentiable ops on any device."""
    start = None if initial is None else initial.expand(1, x.shape[0], -1).contiguous()
    with torch.backends.cudnn.flags(enabled=False):
        return rnn(x, start)[0]


def loop_hidden_states(rnn: nn.RNN, x: Tensor, initial: Tensor | None = None) -> Tensor:
    """h (B, L, H) from a Python loop over steps from h_0 = `initial` or 0; the input projection is one
    batched matmul."""
    drive = input_drive(rnn, x.flatten(0, 1))
    hidden = x.new_zeros(x.shape[0], rnn.hidden_size) if initial is None else initial.expand(x.shape[0], -1)
    states = []
    # unbind, not drive[:, t]: each indexing op's backward would write a full (B, L, H) zero tensor
    for drive_t in drive.unflatten(0, x.shape[:2]).unbind(dim=1):
        hidden = torch.tanh(torch.addmm(drive_t, hidden, rnn.weight_hh_l0.T))
        states.append(hidden)
    return torch.stack(states, dim=1)


def analytic_states(rnn: nn.RNN, x: Tensor, initial: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(h, a), each time-major (L, B, H), from the recurrence with hand-written backward and forward-mode
    rules (models/recurrence.py), driven by `time_major_drive`."""
    return tanh_recurrence(time_major_drive(rnn, x, initial), rnn.weight_hh_l0)


def time_major_drive(rnn: nn.RNN, x: Tensor, initial: Tensor | None = None) -> Tensor:
    """The input drive (L, B, H), time-major, as one matmul; a learned h_0 enters as W_hh h_0 added to the
    first step's drive, which is what it contributes to a_1."""
    x_time_major = x.transpose(0, 1)
    drive = input_drive(rnn, x_time_major.reshape(-1, x.shape[-1])).view(*x_time_major.shape[:2], -1)
    if initial is not None:
        drive = torch.cat([drive[:1] + initial @ rnn.weight_hh_l0.T, drive[1:]])
    return drive


def outputs_without_graph(rnn: nn.RNN, readout: nn.Linear, x: Tensor, initial: Tensor | None = None) -> Tensor:
    """z (B, L, O) one step at a time, keeping no h: the forward passes that record nothing (the line
    search's and backtracking's losses, evaluation). Each step's h is read out while it is in cache and then
    dropped, instead of being stacked into (L, B, H) with its pre-activations, which made the analytic
    recurrence's no-grad forward about 1.5× this loop's time (T = 100, B = 1000, one thread)."""
    weight_t = rnn.weight_hh_l0.t()
    hidden, outputs = None, []
    for drive_t in time_major_drive(rnn, x, initial).unbind(0):
        hidden = torch.tanh(drive_t if hidden is None else torch.addmm(drive_t, hidden, weight_t))
        outputs.append(readout(hidden))
    return torch.stack(outputs, dim=1)


def analytic_hidden_states(rnn: nn.RNN, x: Tensor, initial: Tensor | None = None) -> Tensor:
    return analytic_states(rnn, x, initial)[0].transpose(0, 1)


def input_drive_of_pairs(rnn: nn.RNN, pairs: Tensor, weight: Tensor) -> Tensor:
    """[x_t, h_{t−1}] [W_ih, W_hh]ᵀ (+ b_ih + b_hh): the pre-activations from (B, L, input + H) pairs."""
    product = pairs @ weight.T
    return product + (rnn.bias_ih_l0 + rnn.bias_hh_l0) if rnn.bias else product


HIDDEN_STATES = {"fused": fused_hidden_states, "loop": loop_hidden_states, "analytic": analytic_hidden_states}
INITIAL_STATES = ("zero", "learned")


class RNN(nn.Module):
    """tanh RNN, readout at every step: (B, L, input_size) → (B, L, output_size).

    `impl` picks how the recurrence runs; all hold the same parameters (those
    of an `nn.RNN` named `rnn`, plus `readout`), so weights and checkpoints are
    interchangeable:
      - "analytic" (default): one autograd node with hand-written backward and
        forward-mode rules (models/recurrence.py), time-major, which returns the
        pre-activations a with h instead of recomputing them. On `addition_T100`
        (2 CPU threads) HF ran 1.77× faster per minibatch than with "loop" (README).
      - "loop": a Python loop of differentiable ops under autograd.
      - "fused": torch's RNN kernel, cuDNN off because cuDNN RNNs lack
        forward-mode AD; its `linearize` trace drifts in torch 2.13, so its
        curvature products use jvp.

    Sutskever's release differs in two ways, each an option: it has no biases
    (`bias=False`) and it learns the initial hidden state h_0
    (`initial_state="learned"`, a parameter `initial_state` of size H,
    starting at 0, or at N(0, initial_state_std²) drawn after the weights; the default "zero" fixes h_0 = 0).
    The release's `initialize_self` sparsifies h_0 like every other array: with one row, all of it is
    non-zero, N(0, 1)/√15, so its own start is `initial_state_std=0.258`.
    """

    def __init__(self, input_size: int, output_size: int, hidden_size: int = 100, init: str = "sparse",
                 sparse_fan_in: int = 15, input_scale: float = 0.25, spectral_radius: float = 1.1,
                 impl: str = "analytic", sparse_scale: str = "nonzeros", bias: bool = True,
                 initial_state: str = "zero", initial_state_std: float = 0.0):
        super().__init__()
        for label, size in (("input_size", input_size), ("output_size", output_size),
                            ("hidden_size", hidden_size), ("sparse_fan_in", sparse_fan_in)):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"model.{label} must be a positive integer, got {size!r}")
        if init not in INITIALIZERS:
            raise ValueError(f"model.init={init!r} is unknown; choose one of {sorted(INITIALIZERS)}")
        if impl not in HIDDEN_STATES:
            raise ValueError(f"model.impl={impl!r} is unknown; choose one of {sorted(HIDDEN_STATES)}")
        if sparse_scale not in SPARSE_SCALES:
            raise ValueError(f"model.sparse_scale={sparse_scale!r} is unknown; choose one of {SPARSE_SCALES}")
        for label, scale in (("input_scale", input_scale), ("initial_state_std", initial_state_std)):
            if not (math.isfinite(scale) and scale >= 0):
                raise ValueError(f"model.{label} must be finite and >= 0, got {scale!r}")
        if not (math.isfinite(spectral_radius) and spectral_radius > 0):
            raise ValueError(f"model.spectral_radius must be finite and > 0, got {spectral_radius!r}")
        if initial_state not in INITIAL_STATES:
            raise ValueError(f"model.initial_state={initial_state!r} is unknown; choose one of {INITIAL_STATES}")
        if initial_state_std > 0 and initial_state != "learned":
            raise ValueError(f"model.initial_state_std={initial_state_std} draws a learned h_0's start, but "
                             f"model.initial_state={initial_state!r} fixes h_0 = 0; set model.initial_state=learned "
                             "or leave initial_state_std at 0")
        self.input_size, self.output_size, self.hidden_size = input_size, output_size, hidden_size
        self.init, self.impl = init, impl
        self.rnn = nn.RNN(input_size, hidden_size, nonlinearity="tanh", batch_first=True, bias=bool(bias))
        self.readout = nn.Linear(hidden_size, output_size, bias=bool(bias))
        self.initial_state = nn.Parameter(torch.zeros(hidden_size)) if initial_state == "learned" else None
        with torch.no_grad():
            INITIALIZERS[init](self, sparse_fan_in=sparse_fan_in, sparse_scale=sparse_scale,
                               input_scale=input_scale, spectral_radius=spectral_radius)
            if initial_state_std > 0:  # drawn last, so the weights' draws are those of a zero start
                self.initial_state.normal_(0.0, initial_state_std)

    def _check_inputs(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"RNN expects inputs (batch, steps, {self.input_size}), got {tuple(x.shape)}")

    def hidden_states(self, x: Tensor) -> Tensor:
        """h (B, L, H)."""
        self._check_inputs(x)
        return HIDDEN_STATES[self.impl](self.rnn, x, self.initial_state)

    def forward(self, x: Tensor) -> Tensor:
        """z (B, L, O): the linear readout of h at every step."""
        if self.impl == "analytic":  # the readout on time-major h, then only the small z is transposed
            self._check_inputs(x)
            if not torch.is_grad_enabled():  # nothing to differentiate: no graph node, no stored h or a
                return outputs_without_graph(self.rnn, self.readout, x, self.initial_state)
            return self.readout(analytic_states(self.rnn, x, self.initial_state)[0]).transpose(0, 1)
        return self.readout(self.hidden_states(x))

    def forward_with_preactivations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, a): outputs (B, L, O) and hidden pre-activations a (B, L, H), tanh(a) = h.

        a is recomputed from h in one batched matmul, [x_t, h_{t−1}] [W_ih, W_hh]ᵀ + b_ih + b_hh,
        so it is differentiable in the parameters through h as well.
        """
        if self.impl == "analytic":  # a comes out of the recurrence itself, no recomputation
            self._check_inputs(x)
            hidden, preactivations = analytic_states(self.rnn, x, self.initial_state)
            return self.readout(hidden).transpose(0, 1), preactivations.transpose(0, 1)
        hidden = self.hidden_states(x)
        start = (hidden.new_zeros(hidden.shape[0], 1, self.hidden_size) if self.initial_state is None
                 else self.initial_state.expand(hidden.shape[0], 1, -1))
        previous = torch.cat([start, hidden[:, :-1]], dim=1)
        weight = torch.cat([self.rnn.weight_ih_l0, self.rnn.weight_hh_l0], dim=1)
        preactivations = input_drive_of_pairs(self.rnn, torch.cat([x, previous], dim=-1), weight)
        return self.readout(hidden), preactivations


def zero_biases(model: RNN) -> None:
    if model.rnn.bias:
        for bias in (model.rnn.bias_ih_l0, model.rnn.bias_hh_l0, model.readout.bias):
            bias.zero_()


def init_sparse(model: RNN, *, sparse_fan_in: int, sparse_scale: str, input_scale: float,
                spectral_radius: float) -> None:
    """M&S 2011 sparse initialization (see the module docstring)."""
    rnn = model.rnn
    rnn.weight_hh_l0.copy_(sparse_weight(model.hidden_size, model.hidden_size, sparse_fan_in, sparse_scale))
    rnn.weight_ih_l0.copy_(input_scale * sparse_weight(model.hidden_size, model.input_size, sparse_fan_in,
                                                       sparse_scale))
    model.readout.weight.copy_(sparse_weight(model.output_size, model.hidden_size, sparse_fan_in, sparse_scale))
    zero_biases(model)


def init_spectral(model: RNN, *, sparse_fan_in: int, sparse_scale: str, input_scale: float,
                  spectral_radius: float) -> None:
    """Sutskever et al. 2013: sparse W_hh rescaled to the given spectral radius, tiny dense W_ih."""
    recurrent = sparse_weight(model.hidden_size, model.hidden_size, sparse_fan_in)
    radius = spectral_radius_of(recurrent)
    if radius == 0:
        raise ValueError("the sparse recurrent matrix is nilpotent; raise model.sparse_fan_in")
    rnn = model.rnn
    rnn.weight_hh_l0.copy_(recurrent * (spectral_radius / radius))
    rnn.weight_ih_l0.copy_(SPECTRAL_INPUT_STD * torch.randn(model.hidden_size, model.input_size))
    model.readout.weight.copy_(sparse_weight(model.output_size, model.hidden_size, sparse_fan_in, sparse_scale))
    zero_biases(model)


INITIALIZERS = {"sparse": init_sparse, "spectral": init_spectral}
