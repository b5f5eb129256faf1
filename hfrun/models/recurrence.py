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
Where nothing differentiates, batches or traces the rules themselves (a plain gradient: the forward and
its backward without create_graph), each step writes straight into one preallocated (L, B, H) output with
out= ops, instead of allocating L step results and stacking them into a copy at the end
(`_writes_into_buffers` says where; README, "Benchmark: curvature products against a gradient", gives
the measured gain).
Both rules are written in differentiable torch ops, so torch.func can take vjps of the vjp (double_vjp),
jvps of the vjp (Hessian products) and vmap over cases (per-case gradients). One composition is wrong:
a jvp of a jvp (forward over forward, e.g. jacfwd(jacfwd(f))) loses the second-order terms through the
recurrence, because torch does not differentiate a custom jvp rule forward again (a torch limitation,
seen with a one-op Function too). hfrun never takes one; use model.impl=loop for that.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.forward_ad import unpack_dual
from torch.utils._python_dispatch import _get_current_dispatch_mode


class TanhRecurrence(torch.autograd.Function):
    """Time-major throughout, (L, B, H): every step reads and writes contiguous (B, H) blocks (strided
    per-step slices of a batch-major tensor made each step's matmul about 1.7× slower). Each step is one
    matmul (with the additive term folded into addmm) and one fused elementwise op (tanh, or
    tanh_backward: x ⊙ (1 − h²)), so no (L, B, H) slope or shifted copy of h is ever built.
    The jvp rule always stacks: its steps are differentiated or batched again wherever it runs."""

    generate_vmap_rule = True

    @staticmethod
    def forward(drive: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        weight_t = weight.t()
        hidden_buffer, preactivation_buffer = _buffers_like(drive, 2, drive, weight)
        if preactivation_buffer is None:
            preactivations = [drive[0]]  # h_0 = 0: a_1 is the drive itself
        else:
            preactivations = [preactivation_buffer[0].copy_(drive[0])]
        hiddens = [torch.tanh(drive[0], out=_step(hidden_buffer, 0))]
        for t in range(1, drive.shape[0]):
            preactivations.append(torch.addmm(drive[t], hiddens[-1], weight_t, out=_step(preactivation_buffer, t)))
            hiddens.append(torch.tanh(preactivations[-1], out=_step(hidden_buffer, t)))
        return _stacked(hiddens, hidden_buffer), _stacked(preactivations, preactivation_buffer)

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
        (delta_buffer,) = _buffers_like(hidden, 1, hidden, weight, hidden_cotangent, preactivation_cotangent)
        deltas = []
        for t in range(hidden.shape[0] - 1, -1, -1):
            out = _step(delta_buffer, t)
            carried = hidden_cotangent[t] if not deltas else torch.addmm(hidden_cotangent[t], deltas[-1], weight,
                                                                          out=out)
            delta = _tanh_backward(carried, hidden[t], out=out)
            if preactivation_cotangent is not None:
                delta = torch.add(delta, preactivation_cotangent[t], out=out)
            deltas.append(delta)
        delta = _stacked(deltas[::-1], delta_buffer)
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


def _writes_into_buffers(*tensors: Tensor | None) -> bool:
    """Whether a rule may write its steps straight into preallocated (L, B, H) outputs with out= ops: plain
    eager tensors, with no graph being recorded (create_graph), no torch.func transform at this level, no vmap
    (is_grads_batched), tracer (make_fx's fake tensors), compiler or forward-mode AD watching, and no autocast
    (out= ops are not autocast, so a bfloat16 drive would meet a float32 W). Elsewhere each step must be an op
    that can be differentiated, batched or traced, so the steps are stacked at the end instead. Under
    torch.func's grad, vjp or jvp the forward does write into buffers: torch.func runs it one level down, on
    plain tensors, and differentiates through the rules instead. Both ways give the same values up to
    rounding: bit-identical where each step's (B, H) slab is a multiple of 16 bytes (MKL's matmul rounds
    differently for operands at other alignments, in the last bit)."""
    if (torch.is_grad_enabled() or torch._C._functorch.maybe_current_level() is not None
            or _get_current_dispatch_mode() is not None or torch.compiler.is_compiling()
            or torch.is_autocast_enabled(tensors[0].device.type)):
        return False
    return all(t is None or _plain(t) for t in tensors)


def _plain(tensor: Tensor) -> bool:
    """Neither a subclass (fake tensors), a batched tensor (is_grads_batched's vmap) nor a dual tensor."""
    return (type(tensor) in (Tensor, nn.Parameter) and not torch._C._functorch.is_legacy_batchedtensor(tensor)
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor) and unpack_dual(tensor).tangent is None)


def _buffers_like(like: Tensor, count: int, *tensors: Tensor | None) -> list[Tensor | None]:
    """`count` empty contiguous (L, B, H) outputs for the steps to be written into, where `_writes_into_buffers`
    allows it for `tensors`; otherwise `count` Nones."""
    if _writes_into_buffers(*tensors):
        return [like.new_empty(like.shape) for _ in range(count)]
    return [None] * count


def _step(buffer: Tensor | None, t: int) -> Tensor | None:
    """Step t's slot of the buffer, the out= of that step's op; None (a fresh result) without a buffer."""
    return None if buffer is None else buffer[t]


def _stacked(steps: list[Tensor], buffer: Tensor | None) -> Tensor:
    """The (L, B, H) tensor of the steps: the buffer they were written into, or their stack."""
    return torch.stack(steps) if buffer is None else buffer


def _tanh_backward(cotangent: Tensor, hidden_t: Tensor, out: Tensor | None) -> Tensor:
    """cotangent ⊙ (1 − h²), one fused op, written into `out` when given."""
    if out is None:
        return torch.ops.aten.tanh_backward(cotangent, hidden_t)
    return torch.ops.aten.tanh_backward.grad_input(cotangent, hidden_t, grad_input=out)


def tanh_recurrence(drive: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(h, a), each time-major (L, B, H), of a_t = drive_t + W h_{t−1}, h_t = tanh(a_t), h_0 = 0, for a
    time-major drive (L, B, H)."""
    return TanhRecurrence.apply(drive, weight)
