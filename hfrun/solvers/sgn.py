"""SGN: stochastic generalized Gauss-Newton (Gargiani et al. 2020), as the authors' release codes it.

One update, on one minibatch B used for everything (gradient, curvature, ratio, line search):

1. g = ∇L(θ; B), L the batch-mean loss. Momentum m ← βm + (1−β)g with Adam's bias
   correction m̂ = m/(1−βᵗ) (β = 0 in every published run, so m̂ = g).
2. CG from d = 0 on (G + ρI)d = −m̂, G the generalized Gauss-Newton matrix at the
   logits (Jᵀ H_L J, with the loss averaged over the batch so G carries 1/|B|), ρ the
   damping (the release's "rho"; hfrun's λ, logged as `lambda`). CG stops when
   max|r| ≤ `cg_tol` or after `cg_warmup_iters` steps for the first
   `cg_warmup_updates` updates and `cg_max_iters` after that. No warm start, no
   backtracking over iterates, no negative-curvature test. An optional diagonal
   preconditioner M⁻¹ = 1/(m̂⊙m̂ + ρ)^α (`preconditioner: gradient`; off in every
   published run; not Martens' per-case one).
3. With `trust_region` (the published runs), the ratio on the full step α₀d (α₀ =
   `step_size`, 1):
       r = (L(θ+α₀d) − L(θ)) / (½(A d + m̂ + g)ᵀd),  A = G + ρI,
   which is gᵀd + ½dᵀAd when β = 0; ρ ← ρ·3/2 if r < 1/4, ρ ← max(ρ·2/3, damping_min)
   if r > 3/4. As released, a NaN ratio changes nothing and the ratio is not guarded;
   `guard_ratio: true` treats a rise of the loss (or a non-finite one) as r = −∞, so
   ρ grows. Without the trust region ρ follows `damping_schedule`: const, linear or
   cos from `initial_damping` to `damping_min` over `damping_schedule_updates` updates.
4. With `line_search`, Armijo backtracking from α₀: α halves (at most
   `max_line_search` = 10 times) until L(θ+αd) ≤ L(θ) + c·α₀·m̂ᵀd, the threshold
   fixed at α₀ as released (c = 1e-4). As released the step is never rejected: after
   the last halving θ + α·d is kept whatever it gives. `reject_uphill: true` keeps θ
   instead when no α passes.

The release's defaults and every published run: ρ₀ = 1e-4, damping_min = 1e-6,
cg_tol = 1e-6, trust region and line search on, β = 0, no preconditioner.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from hfrun.curvature import JV_METHODS, ParamSpec, trainable_parameters
from hfrun.solvers.cg import conjugate_gradient
from hfrun.distributed import SINGLE, DataParallel
from hfrun.solvers.second_order import (ChunkedCurvature, ChunkedObjective, LevenbergMarquardt, armijo, like_parameters,
                                        reduction_ratio, require, require_equal_shares, set_parameters)

DAMPING_SCHEDULES = ("const", "linear", "cos")
PRECONDITIONERS = ("none", "gradient")


class SGN:
    """SGN behind the solver interface: `step(stream)` draws one minibatch and does one update.

    Usable in a plain PyTorch loop:

        solver = SGN(model, SoftmaxCrossEntropy(), batch_size=1000, cg_max_iters=3)
        for _ in range(100):
            stats = solver.step(stream)        # stream.next(n) -> Batch
    """

    def __init__(self, model: nn.Module, loss, *, batch_size: int, cg_max_iters: int = 10, cg_warmup_iters: int = 10,
                 cg_warmup_updates: int = 9, cg_tol: float = 1e-6, initial_damping: float = 1e-4,
                 damping_min: float = 1e-6, trust_region: bool = True, damping_schedule: str = "const",
                 damping_schedule_updates: int = 10, line_search: bool = True, line_search_c: float = 1e-4,
                 line_search_shrink: float = 0.5, max_line_search: int = 10, step_size: float = 1.0,
                 reject_uphill: bool = False, guard_ratio: bool = False, momentum: float = 0.0,
                 preconditioner: str = "none", preconditioner_exponent: float = 1.0, jv_method: str = "auto",
                 weight_cost: float = 0.0):
        require(jv_method in JV_METHODS, f"solver.jv_method must be one of {JV_METHODS}, got {jv_method!r}")
        require(damping_schedule in DAMPING_SCHEDULES,
               f"solver.damping_schedule must be one of {DAMPING_SCHEDULES}, got {damping_schedule!r}")
        require(preconditioner in PRECONDITIONERS,
               f"solver.preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
        for name, value in (("batch_size", batch_size), ("cg_max_iters", cg_max_iters),
                            ("cg_warmup_iters", cg_warmup_iters), ("damping_schedule_updates", damping_schedule_updates)):
            require(int(value) >= 1, f"solver.{name} must be a positive integer, got {value}")
        require(int(cg_warmup_updates) >= 0 and int(max_line_search) >= 0,
               f"solver.cg_warmup_updates and solver.max_line_search must be >= 0, got {cg_warmup_updates}, "
               f"{max_line_search}")
        require(0 <= damping_min <= initial_damping < math.inf,
               f"0 <= solver.damping_min <= solver.initial_damping < inf must hold, got {damping_min}, {initial_damping}")
        require(0 <= cg_tol < math.inf and 0 <= weight_cost < math.inf,
               f"solver.cg_tol and solver.weight_cost must be finite and >= 0, got {cg_tol}, {weight_cost}")
        require(0 < line_search_c < 1 and 0 < line_search_shrink < 1,
               f"solver.line_search_c and solver.line_search_shrink must be in (0, 1), got {line_search_c}, "
               f"{line_search_shrink}")
        require(0 < step_size < math.inf, f"solver.step_size must be finite and > 0, got {step_size}")
        require(0 <= momentum < 1, f"solver.momentum must be in [0, 1), got {momentum}")
        require(0 <= preconditioner_exponent <= 1,
               f"solver.preconditioner_exponent must be in [0, 1], got {preconditioner_exponent}")
        self.model, self.loss = model, loss
        self.batch_size, self.jv_method = int(batch_size), jv_method
        self.cg_max_iters, self.cg_warmup_iters = int(cg_max_iters), int(cg_warmup_iters)
        self.cg_warmup_updates, self.cg_tol = int(cg_warmup_updates), float(cg_tol)
        self.initial_damping, self.damping_min = float(initial_damping), float(damping_min)
        self.trust_region, self.damping_schedule = bool(trust_region), damping_schedule
        self.damping_schedule_updates = int(damping_schedule_updates)
        self.line_search, self.line_search_c = bool(line_search), float(line_search_c)
        self.line_search_shrink, self.max_line_search = float(line_search_shrink), int(max_line_search)
        self.step_size, self.reject_uphill, self.guard_ratio = float(step_size), bool(reject_uphill), bool(guard_ratio)
        self.momentum, self.preconditioner = float(momentum), preconditioner
        self.preconditioner_exponent = float(preconditioner_exponent)
        self.spec = ParamSpec.from_module(model)
        self.objective = ChunkedObjective(model, loss, self.spec, weight_cost)
        self.levenberg_marquardt = LevenbergMarquardt(initial_damping, damping_min)
        self.updates = 0  # t, for the bias correction, the warm-up CG steps and the damping schedule
        self.momentum_buffer: Tensor | None = None
        self.parallel = SINGLE

    def distribute(self, parallel: DataParallel) -> None:
        """Run as one of `parallel.world_size` data-parallel processes (see HessianFree.distribute)."""
        require_equal_shares(parallel, {"batch_size": self.batch_size})
        self.parallel = self.objective.parallel = parallel

    @property
    def damping(self) -> float:
        """ρ for the next update: the trust region's, or the schedule's."""
        if self.trust_region:
            return self.levenberg_marquardt.damping
        return scheduled_damping(self.damping_schedule, self.initial_damping, self.damping_min,
                                 self.updates + 1, self.damping_schedule_updates)

    def step(self, stream) -> dict[str, float]:
        clock = time.perf_counter()
        batch = [stream.next(self.batch_size)]  # this process's share under data parallelism
        cases = batch[0].size * self.parallel.world_size
        theta = self.spec.flatten(trainable_parameters(self.model))
        loss, loss_before, gradient = self.objective.gradient(theta, batch)
        if not (math.isfinite(loss_before) and bool(torch.isfinite(gradient).all())):
            return {"loss": math.nan if math.isfinite(loss) else loss, "objective": loss_before,
                    "examples_grad": cases, "examples_curv": 0}
        damping = self.damping
        self.updates += 1
        direction_of_descent = self._momentum(gradient)
        damped_curvature = ChunkedCurvature(self.model, self.loss, batch, damping=damping, jv_method=self.jv_method,
                                            weight_cost=self.objective.weight_cost, parallel=self.parallel)
        preconditioner = None
        if self.preconditioner == "gradient":
            preconditioner = (direction_of_descent.square() + damping).pow(self.preconditioner_exponent)
        time_gradient = time.perf_counter() - clock

        clock = time.perf_counter()
        iterations = self.cg_warmup_iters if self.updates <= self.cg_warmup_updates else self.cg_max_iters
        cg = conjugate_gradient(damped_curvature, direction_of_descent, max_iters=iterations, tol=0.0,
                                preconditioner=preconditioner, save_iterates=False, residual_tol=self.cg_tol)
        direction = cg.solution
        time_cg = time.perf_counter() - clock

        clock = time.perf_counter()
        value_at = lambda rate: self.objective.value(theta + rate * direction, batch)  # noqa: E731
        value_at_first = value_at(self.step_size)
        # ½(A d + m̂ + g)ᵀd: the release's model value, from CG's last φ = m̂ᵀd + ½dᵀAd at no product
        model_reduction = cg.q_values[-1] + 0.5 * float((gradient - direction_of_descent).dot(direction))
        ratio = self._ratio(loss_before, value_at_first, model_reduction)
        if self.trust_region:
            self.levenberg_marquardt.update(ratio)
        step_size, loss_after = self.step_size, value_at_first
        if self.line_search:
            step_size, loss_after = armijo(value_at, loss_before, float(direction_of_descent.dot(direction)),
                                           value_at_first, c=self.line_search_c, shrink=self.line_search_shrink,
                                           max_tries=self.max_line_search, first_rate=self.step_size,
                                           fixed_threshold=True, reject=self.reject_uphill)
        elif self.reject_uphill and not loss_after < loss_before:
            step_size, loss_after = 0.0, loss_before
        set_parameters(self.model, self.spec, theta + step_size * direction)
        time_line_search = time.perf_counter() - clock
        return {"loss": loss, "objective": loss_before, "lambda": damping, "rho": ratio, "cg_iters": cg.iterations,
                "q_reduction": -model_reduction, "actual_reduction": loss_before - value_at_first,
                "line_search_reduction": loss_before - loss_after, "step_size": step_size,
                "time_gradient_s": time_gradient, "time_cg_s": time_cg, "time_line_search_s": time_line_search,
                "examples_grad": cases, "examples_curv": damped_curvature.products * cases}

    def _momentum(self, gradient: Tensor) -> Tensor:
        """m̂ = m/(1 − βᵗ) with m ← βm + (1 − β)g; g itself when β = 0."""
        if self.momentum == 0:
            return gradient
        if self.momentum_buffer is None:
            self.momentum_buffer = torch.zeros_like(gradient)
        self.momentum_buffer.mul_(self.momentum).add_(gradient, alpha=1 - self.momentum)
        return self.momentum_buffer / (1 - self.momentum ** self.updates)

    def _ratio(self, before: float, after: float, model_reduction: float) -> float:
        if self.guard_ratio:
            return reduction_ratio(before, after, model_reduction)
        if model_reduction == 0:  # d = 0 (a zero gradient): no information
            return math.nan
        return (after - before) / model_reduction

    def state_dict(self) -> dict:
        return {**self.levenberg_marquardt.state_dict(), "updates": self.updates,
                "momentum_buffer": self.momentum_buffer}

    def load_state_dict(self, state: dict) -> None:
        self.levenberg_marquardt.load_state_dict(state)
        self.updates = int(state["updates"])
        self.momentum_buffer = like_parameters(self.model, state["momentum_buffer"])


def scheduled_damping(schedule: str, initial: float, minimum: float, update: int, updates: int) -> float:
    """The release's ρ schedules for update t = 1, 2, … (without the trust region), over K = `updates`:
    const ρ₀; linear ρ₀ + (ρ_min − ρ₀)(t − 1)/(K − 1); cos ρ₀·cos(π/2·t/K); floored at ρ_min (cos: ρ_min after K)."""
    if schedule == "const":
        return initial
    if schedule == "linear":
        slope = (minimum - initial) / (updates - 1) if updates > 1 else minimum - initial
        return max(initial + slope * (update - 1), minimum)
    value = initial * math.cos(math.pi / 2 * (update / updates))
    return minimum if value < minimum or update > updates else value
