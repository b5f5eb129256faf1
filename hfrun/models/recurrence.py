"""The tanh recurrence as one autograd node that knows its own derivatives.

    a_t = d_t + W h_{t−1},   h_t = tanh(a_t),   h_0 = 0,   t = 1 … L,

with d (L, B, H) the input drive (W_ih x_t + biases, computed outside) and W (H, H) the recurrent weight.
Returns both h and the pre-activations a (which structural damping needs), each (L, B, H).

Why by hand: autograd through a Python loop records ~4 nodes per step, accumulates W's gradient step by
step and re-stacks (B, L, H) tensors; forward-mode AD (torch.func.jvp) reruns the loop's primal ops next
to the tangents. Here the primal loop runs once, without a graph, and keeps h; then
  - backward:  δ_t = (ḡ_t + W ᵀδ_{t+1}) ⊙ (1 − h_t²) + ā_t  (ḡ, ā the cotangents of h and a),
               ∂/∂d = δ,  ∂/∂W = Σ_t δ_t h_{t−1}ᵀ, the latter one (H, B·L) × (B·L, H) matmul;
  - jvp:       ȧ_t = ḋ_t + Ẇ h_{t−1} + W ḣ_{t−1},  ḣ_t = (1 − h_t²) ⊙ ȧ_t, with every Ẇ h_{t−1} in
               one matmul up front, so each step is one (B, H) × (H, H) matmul, as in the primal.
Both rules are written in differentiable torch ops, so torch.func can take vjps of the vjp (double_vjp),
jvps of the vjp (Hessian products) and vmap over cases (per-case gradients). One composition is wrong:
a jvp of a jvp (forward over forward, e.g. jacfwd(jacfwd(f))) loses the second-order terms through the
recurrence, because torch does not differentiate a custom jvp rule forward again (a torch limitation,
seen with a one-op Function too). hfrun never takes one; use model.impl=loop for that.
"""
from __future__ import annotations

import torch
from torch import Tensor


class TanhRecurrence(torch.autograd.Function):
    """Time-major throughout, (L, B, H): every step reads and writes contiguous (B, H) blocks (strided
    per-step slices of a batch-major tensor made each step's matmul about 1.7× slower). Each step is one
    matmul (with the additive term folded into addmm) and one fused elementwise op (tanh, or
    tanh_backward: x ⊙ (1 − h²)), so no (L, B, H) slope or shifted copy of h is ever built."""

    generate_vmap_rule = True

    @staticmethod
    def forward(drive: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        weight_t = weight.t()
        preactivations = [drive[0]]  # h_0 = 0: a_1 is the drive itself
        hiddens = [torch.tanh(drive[0])]
        for drive_t in drive[1:].unbind(0):
            preactivations.append(torch.addmm(drive_t, hiddens[-1], weight_t))
            hiddens.append(torch.tanh(preactivations[-1]))
        return torch.stack(hiddens), torch.stack(preactivations)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, weight = inputs
        hidden, _ = output
        ctx.save_for_backward(weight, hidden)
        ctx.save_for_forward(weight, hidden)
        # An unused output's cotangent comes as None, not as an (L, B, H) tensor of zeros added in at every
        # step: a's, in every gradient that does not use the pre-activations (0.92× the gradient's time).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, hidden_cotangent: Tensor | None, preactivation_cotangent: Tensor | None):
        weight, hidden = ctx.saved_tensors
        if hidden_cotangent is None and preactivation_cotangent is None:
            return None, None
        if hidden_cotangent is None:
            hidden_cotangent = torch.zeros_like(hidden)
        deltas = []
        for t in range(hidden.shape[0] - 1, -1, -1):
            carried = hidden_cotangent[t] if not deltas else torch.addmm(hidden_cotangent[t], deltas[-1], weight)
            delta = torch.ops.aten.tanh_backward(carried, hidden[t])
            if preactivation_cotangent is not None:
                delta = delta + preactivation_cotangent[t]
            deltas.append(delta)
        delta = torch.stack(deltas[::-1])
        if not ctx.needs_input_grad[1]:  # a frozen W: skip its (H, B·L) × (B·L, H) product
            return delta, None
        size = hidden.shape[-1]  # reshape, not flatten: flatten has no batching rule for batched grads
        earlier_cases = (hidden.shape[0] - 1) * hidden.shape[1]  # explicit: reshape(-1, H) of an empty tensor fails
        # Σ_t δ_t h_{t−1}ᵀ over t ≥ 2 (h_0 = 0 adds nothing), without a shifted copy of h
        weight_gradient = delta[1:].reshape(earlier_cases, size).t() @ hidden[:-1].reshape(earlier_cases, size)
        return delta, weight_gradient

    @staticmethod
    def jvp(ctx, drive_tangent: Tensor | None, weight_tangent: Tensor | None) -> tuple[Tensor, Tensor]:
        weight, hidden = ctx.saved_tensors
        steps, size = hidden.shape[0], hidden.shape[-1]
        earlier_cases = (steps - 1) * hidden.shape[1]  # explicit: reshape(-1, H) of an empty tensor fails
        if drive_tangent is None:
            drive_tangent = torch.zeros_like(hidden)
        if weight_tangent is not None:  # ḋ_t + Ẇ h_{t−1} for t ≥ 2, one matmul over all steps
            later = torch.addmm(drive_tangent[1:].reshape(earlier_cases, size),
                                hidden[:-1].reshape(earlier_cases, size), weight_tangent.t())
            later = later.reshape(drive_tangent[1:].shape)
        else:
            later = drive_tangent[1:]
        weight_t = weight.t()
        preactivation_tangents = [drive_tangent[0]]
        hidden_tangents = [torch.ops.aten.tanh_backward(drive_tangent[0], hidden[0])]
        for t in range(1, steps):
            preactivation_tangents.append(torch.addmm(later[t - 1], hidden_tangents[-1], weight_t))
            hidden_tangents.append(torch.ops.aten.tanh_backward(preactivation_tangents[-1], hidden[t]))
        return torch.stack(hidden_tangents), torch.stack(preactivation_tangents)


def tanh_recurrence(drive: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(h, a), each time-major (L, B, H), of a_t = drive_t + W h_{t−1}, h_t = tanh(a_t), h_0 = 0, for a
    time-major drive (L, B, H)."""
    return TanhRecurrence.apply(drive, weight)
