"""Preconditioned linear conjugate gradient for the quadratic model of Hessian-free optimization.

Minimises q(d) = gᵀd + ½ dᵀA d, i.e. solves A d = −g, with A given only as a
product `mv(v) = A v` (Martens 2010):
  - preconditioner: a positive diagonal M, applied as M⁻¹r;
  - termination by relative progress: stop at iteration i when i > k, φ_i < 0 and
    (φ_i − φ_{i−k})/φ_i < k·ε, with k = max(10, ⌈0.1·i⌉), ε = `tol`, φ_i = q(x_i);
  - non-positive curvature pᵀAp ≤ 0 stops without taking that step, keeping the last iterate;
  - iterates are saved at i = ⌈5·1.3ʲ⌉ (or at the iterations `save_at` names) and at the end, for
    backtracking over them;
  - with `restart_uphill`, a warm start x0 with q(x0) > 0 = q(0) is dropped and CG starts from 0.
φ is tracked from the residual r = −g − Ax at no extra product: φ(x) = ½ xᵀ(g − r).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Collection

import torch
from torch import Tensor

FIRST_SAVED_ITERATION = 5
SAVE_RATIO_NUMERATOR, SAVE_RATIO_DENOMINATOR = 13, 10  # iterates saved at ⌈5·1.3ʲ⌉


@dataclass
class CGResult:
    """What CG did. `q_values[i]` is φ after i iterations (index 0: the start)."""

    solution: Tensor
    iterations: int
    stop_reason: str  # 'progress' | 'max_iters' | 'negative_curvature' | 'converged'
    iterates: list[tuple[int, Tensor]] = field(default_factory=list)
    q_values: list[float] = field(default_factory=list)
    q_warm_start: float = 0.0  # q(x0) of the given start (0 without one), before any restart
    restarted: bool = False    # x0 was dropped because q(x0) > 0


def saved_iterations(max_iters: int) -> list[int]:
    """⌈5·1.3ʲ⌉ for j = 0, 1, … up to max_iters, in exact integer arithmetic."""
    saved, j = [], 0
    while (i := -(-FIRST_SAVED_ITERATION * SAVE_RATIO_NUMERATOR**j // SAVE_RATIO_DENOMINATOR**j)) <= max_iters:
        saved.append(i)
        j += 1
    return saved


def _save_schedule(save_iterates: bool, save_at: Collection[int] | None, max_iters: int) -> set[int]:
    """The iterations whose iterates CG keeps (besides the last): `save_at`, by default ⌈5·1.3ʲ⌉."""
    if not save_iterates:
        return set()
    return set(saved_iterations(max_iters)) if save_at is None else set(save_at)


def made_too_little_progress(q_values: list[float], i: int, tol: float) -> bool:
    """Martens' relative-progress test at iteration i (q_values[i] is φ_i)."""
    k = max(10, math.ceil(0.1 * i))
    return i > k and q_values[i] < 0 and (q_values[i] - q_values[i - k]) / q_values[i] < k * tol


def conjugate_gradient(mv: Callable[[Tensor], Tensor], g: Tensor, x0: Tensor | None = None,
                       max_iters: int = 250, tol: float = 5e-4, preconditioner: Tensor | None = None,
                       save_iterates: bool = True, restart_uphill: bool = False,
                       residual_tol: float | None = None, save_at: Collection[int] | None = None) -> CGResult:
    """Approximately minimise q(x) = gᵀx + ½xᵀAx from x0 (default 0); see the module docstring.

    `tol` = 0 switches the relative-progress test off; CG then runs until
    `max_iters` or until the residual vanishes (in the M⁻¹-norm, below machine
    precision relative to the start). `residual_tol` adds SGN's release rule:
    stop once max|r| ≤ residual_tol (checked after each iteration).
    """
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    if preconditioner is not None and preconditioner.shape != g.shape:
        raise ValueError(f"preconditioner shape {tuple(preconditioner.shape)} does not match g {tuple(g.shape)}")
    x = torch.zeros_like(g) if x0 is None else x0.clone()
    residual = -g if x0 is None else -g - mv(x)
    q_values = [0.0 if x0 is None else 0.5 * float(torch.dot(x, g - residual))]
    q_warm_start, restarted = q_values[0], restart_uphill and q_values[0] > 0
    if restarted:  # the warm start is worse than no step at all
        x, residual, q_values = torch.zeros_like(g), -g, [0.0]
    preconditioned = residual if preconditioner is None else residual / preconditioner
    direction = preconditioned.clone()
    rz = torch.dot(residual, preconditioned)
    rz_start = float(rz)
    vanished = rz_start * torch.finfo(g.dtype).eps ** 2
    save_at = _save_schedule(save_iterates, save_at, max_iters)
    residual_limit = -math.inf if residual_tol is None else residual_tol
    iterates: list[tuple[int, Tensor]] = []

    i, stop_reason = 0, ("converged" if rz_start <= 0 else "max_iters")
    while stop_reason == "max_iters" and i < max_iters:
        i += 1
        curvature_direction = mv(direction)
        pap = torch.dot(direction, curvature_direction)
        # A non-positive pᵀAp gives step 0, so x stays the last good iterate without a sync first.
        step = torch.where(pap > 0, rz / pap, torch.zeros_like(rz))
        x.addcmul_(direction, step)
        residual.addcmul_(curvature_direction, step, value=-1)
        if preconditioner is None:
            preconditioned = residual
        else:
            torch.div(residual, preconditioner, out=preconditioned)
        rz_next = torch.dot(residual, preconditioned)
        q = 0.5 * (torch.dot(x, g) - torch.dot(x, residual))
        if residual_tol is None:
            pap_value, rz_value, q_value = torch.stack([pap, rz_next, q]).tolist()  # the one sync
            residual_max = 0.0
        else:
            pap_value, rz_value, q_value, residual_max = torch.stack([pap, rz_next, q, residual.abs().max()]).tolist()
        if not math.isfinite(pap_value):
            raise FloatingPointError(f"CG iteration {i}: the curvature product gave pᵀAp = {pap_value}; "
                                     "check the loss and the parameters for NaN or inf")
        if pap_value <= 0:
            i, stop_reason = i - 1, "negative_curvature"
            break
        q_values.append(q_value)
        if i in save_at:
            iterates.append((i, x.clone()))
        if rz_value <= vanished or residual_max <= residual_limit:
            stop_reason = "converged"
        elif tol > 0 and made_too_little_progress(q_values, i, tol):
            stop_reason = "progress"
        else:
            direction.mul_(rz_next / rz).add_(preconditioned)
            rz = rz_next
    if save_iterates and (not iterates or iterates[-1][0] != i):
        iterates.append((i, x.clone()))
    return CGResult(solution=x, iterations=i, stop_reason=stop_reason, iterates=iterates, q_values=q_values,
                    q_warm_start=q_warm_start, restarted=restarted)


def blockwise_conjugate_gradient(mv: Callable[[Tensor], Tensor], g: Tensor, blocks: Tensor, num_blocks: int,
                                 x0: Tensor | None = None, max_iters: int = 250, tol: float = 5e-4,
                                 preconditioner: Tensor | None = None, save_iterates: bool = True,
                                 save_at: Collection[int] | None = None) -> CGResult:
    """Independent CG runs, one per block of coordinates, in lockstep (block-diagonal HF, Zhang et al. 2017).

    `blocks[j]` is the block of coordinate j; `mv` multiplies by a block-diagonal A (its off-block entries
    zero), so each block's CG sees only its own A_bb and g_b: every inner product, step size α_b and
    conjugation factor β_b is per block, and each block stops by itself (Martens' relative progress on its
    own φ_b, non-positive curvature, or a vanished residual), keeping its iterate while the others go on.
    One product per iteration serves all blocks still running. The result's `q_values[i]` is Σ_b φ_b after
    i iterations, its iterates are the assembled x at the saved iterations, and `block_iterations` says how
    many steps each block took.
    """
    if max_iters < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")

    def per_block(values: Tensor) -> Tensor:
        return torch.zeros(num_blocks, dtype=g.dtype, device=g.device).index_add_(0, blocks, values)

    x = torch.zeros_like(g) if x0 is None else x0.clone()
    residual = -g if x0 is None else -g - mv(x)
    preconditioned = residual if preconditioner is None else residual / preconditioner
    direction = preconditioned.clone()
    rz = per_block(residual * preconditioned)
    vanished = rz * torch.finfo(g.dtype).eps ** 2
    block_q = [[value] for value in (0.5 * per_block(x * (g - residual))).tolist()]
    q_values = [sum(q[0] for q in block_q)]
    running = rz > 0
    steps_taken = torch.zeros(num_blocks, dtype=torch.long, device=g.device)
    save_at = _save_schedule(save_iterates, save_at, max_iters)
    iterates: list[tuple[int, Tensor]] = []
    i = 0
    while bool(running.any()) and i < max_iters:
        i += 1
        curvature_direction = mv(direction * running[blocks])
        pap = per_block(direction * curvature_direction)
        take = running & (pap > 0)
        if not bool(torch.isfinite(pap[running]).all()):
            raise FloatingPointError(f"CG iteration {i}: the curvature product gave a non-finite pᵀAp; "
                                     "check the loss and the parameters for NaN or inf")
        step = torch.where(take, rz / torch.where(take, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x.addcmul_(direction, step[blocks])
        residual.addcmul_(curvature_direction, step[blocks], value=-1)
        preconditioned = residual if preconditioner is None else residual / preconditioner
        rz_next = per_block(residual * preconditioned)
        q_now = (0.5 * per_block(x * (g - residual))).tolist()
        running = take.clone()  # a block that met non-positive curvature stops before that step
        steps_taken += take.long()
        for b in torch.nonzero(take).flatten().tolist():
            block_q[b].append(q_now[b])
            steps = len(block_q[b]) - 1
            if rz_next[b] <= vanished[b] or (tol > 0 and made_too_little_progress(block_q[b], steps, tol)):
                running[b] = False
        q_values.append(sum(q[-1] for q in block_q))
        if i in save_at:
            iterates.append((i, x.clone()))
        beta = torch.where(running, rz_next / torch.where(running, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        direction = preconditioned + beta[blocks] * direction
        rz = torch.where(running, rz_next, rz)
    if save_iterates and (not iterates or iterates[-1][0] != i):
        iterates.append((i, x.clone()))
    result = CGResult(solution=x, iterations=i, stop_reason="blocks", iterates=iterates, q_values=q_values,
                      q_warm_start=q_values[0])
    result.block_iterations = steps_taken.tolist()
    return result
