"""Hessian-free optimization (truncated Newton): Martens 2010; Martens & Sutskever 2011.

Each update minimizes the damped quadratic model of the objective around θ,

    q(d) = gᵀd + ½ dᵀ(C + λI + μλ·G_S)d,

with linear conjugate gradient, where g is the gradient on the gradient batch,
C the curvature on a (possibly smaller) curvature batch — the Gauss-Newton
matrix G = Jᵀ H_L J (default) or the Hessian — λ the Levenberg-Marquardt
damping and μλ·G_S the structural damping of an RNN's hidden pre-activations
(M&S 2011). Then:

1. CG starts from 0.95 × the previous update's last CG iterate (Martens'
   release; `warm_start: step` uses the step actually taken instead, `none`
   zero) and stops by Martens' relative progress rule, at `cg_max_iters`, or on
   non-positive curvature.
2. Backtracking: starting from the last CG iterate, walk back through the saved
   iterates (i = ⌈5·1.3ʲ⌉) while the objective on the backtracking batch keeps
   improving; keep the best (Martens 2010, §4.6).
3. λ follows ρ = (f(θ+d) − f(θ)) / q̂(d): ×3/2 if ρ < 1/4, ×2/3 if ρ > 3/4,
   kept in [damping_min, damping_max]; ρ = −∞ when f went up or is NaN.
   After `stall_updates` consecutive updates with ρ < 1/4 at λ = damping_max
   the solver reports itself stalled (the statistic `stalled` holds why), and
   the engine ends the run with that status: without the bound λ would grow
   ×1.5 per update until it overflows, e.g. once the loss sits at its noise
   floor and every step is rejected. With `rho_model: damped`, q̂ = q, the
   model CG minimized; with `rho_model: undamped` (Martens' release, "a
   different model than the one being optimized by CG"),
   q̂(d) = gᵀd + ½ dᵀ(C + weight_cost·I)d, without the λ and μλ terms, at the
   cost of one more curvature product.
4. Armijo line search along d: the largest α = 0.8ᵏ with
   f(θ+αd) ≤ f(θ) + c·α·gᵀd (c = 1e-2); α = 0 if none of `max_line_search`
   tries decreases f.

Steps 2–4 are `checks: martens`, all on one batch: the gradient batch, or a
separate one of `backtrack_batch_size`. `checks: release` makes them as
Sutskever's RNN release does (`opt/hf.py`, `BT_eval='objective'`), each on its
own chunk of the gradient batch:
2'. the CG iterates after iterations 1, 11, 21, … (and the last, where CG
    stopped before its cap) are judged by f on the gradient batch's second
    chunk; the best of them is kept;
3'. ρ compares f on the curvature chunk (the first) with q(d), evaluated again
    with one more curvature product, as the release does;
4'. the line search, on the third chunk, takes the first α = 0.8ᵏ, k ≤ 49, that
    decreases f at all (`line_search_*` and `max_line_search` are Armijo's), and
    with α = 0 the next CG starts from zero.
With fewer chunks the release's fallbacks apply: backtracking on the first,
the line search on the whole gradient batch.

Batches are drawn in chunks of `chunk_size` cases (0: one draw per batch).
A task that draws one sequence length per draw (the pathological tasks) then
gives a gradient batch that mixes lengths, as Sutskever's 10 × 1000 gradient
does, instead of fitting a single length per update. f and ∇f on a chunked
batch are the size-weighted means over its chunks; the curvature batch is the
first `curvature_batch_size` cases of the gradient batch, in as many chunks as
they span, its products the size-weighted means of the chunks' products.

The objective f includes the L2 weight cost ½·weight_cost·‖θ‖², whose
curvature weight_cost·I is added to C. Losses are per-case means, so λ does
not depend on the batch size (see hfrun.losses).
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from hfrun.curvature import JV_METHODS, ParamSpec, martens_preconditioner, per_case_gradient_squares, trainable_parameters
from hfrun.solvers.cg import CGResult, conjugate_gradient
from hfrun.distributed import SINGLE, DataParallel
from hfrun.solvers.second_order import (ChunkedCurvature, ChunkedObjective, LevenbergMarquardt, armijo, draw_chunks,
                                        first_decrease, leading_cases, like_parameters, quadratic_value,
                                        reduction_ratio, require, require_equal_shares, set_parameters)

CURVATURES = ("ggn", "hessian")
PRECONDITIONERS = ("none", "martens")
RHO_MODELS = ("damped", "undamped")
WARM_STARTS = ("solution", "step", "none")
CHECKS = ("martens", "release")
RELEASE_CHECK_EVERY = 10  # the release judges every 10th CG iterate (cg_eval_freq)
RELEASE_LINE_SEARCH = dict(shrink=0.8, max_tries=49)  # the release tries α = 0.8ᵏ, k = 0 … 49


class HessianFree:
    """HF behind the solver interface: `step(stream)` does one outer update and returns its statistics.

    Usable in a plain PyTorch loop:

        solver = HessianFree(model, SquaredError(), gradient_batch_size=1000)
        for _ in range(100):
            stats = solver.step(stream)        # stream.next(n) -> Batch
    """

    def __init__(self, model: nn.Module, loss, *, gradient_batch_size: int, curvature_batch_size: int | None = None,
                 backtrack_batch_size: int | None = None, curvature: str = "ggn", jv_method: str = "auto",
                 initial_damping: float = 1.0,
                 structural_damping: float = 0.0, cg_max_iters: int = 250,
                 cg_tol: float = 5e-4, cg_decay: float = 0.95, preconditioner: str = "none",
                 preconditioner_exponent: float = 0.75, weight_cost: float = 0.0, damping_min: float = 1e-8,
                 damping_max: float = 1e10, stall_updates: int = 20,
                 line_search_c: float = 1e-2, line_search_shrink: float = 0.8, max_line_search: int = 60,
                 rho_model: str = "damped", chunk_size: int = 0, warm_start: str = "solution",
                 restart_uphill: bool = False, checks: str = "martens"):
        require(curvature in CURVATURES, f"solver.curvature must be one of {CURVATURES}, got {curvature!r}")
        require(jv_method in JV_METHODS, f"solver.jv_method must be one of {JV_METHODS}, got {jv_method!r}")
        require(preconditioner in PRECONDITIONERS,
               f"solver.preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
        require(rho_model in RHO_MODELS, f"solver.rho_model must be one of {RHO_MODELS}, got {rho_model!r}")
        require(warm_start in WARM_STARTS, f"solver.warm_start must be one of {WARM_STARTS}, got {warm_start!r}")
        require(checks in CHECKS, f"solver.checks must be one of {CHECKS}, got {checks!r}")
        require(checks == "martens" or rho_model == "damped",
               "solver.checks=release computes the reduction ratio as Sutskever's release does, against the damped "
               "quadratic model, but solver.rho_model=undamped asks for Martens' undamped one. Set "
               "solver.rho_model=damped, or solver.checks=martens.")
        require(checks == "martens" or not backtrack_batch_size,
               "solver.checks=release judges each step on chunks of the gradient batch, as Sutskever's release "
               "does (its 2nd chunk for backtracking, the curvature chunk for the reduction ratio, its 3rd for "
               f"the line search), but solver.backtrack_batch_size={backtrack_batch_size} asks for a separate "
               "batch, which only solver.checks=martens uses. Set solver.backtrack_batch_size=0, or "
               "solver.checks=martens.")
        for name, value in (("gradient_batch_size", gradient_batch_size), ("cg_max_iters", cg_max_iters)):
            require(int(value) >= 1, f"solver.{name} must be a positive integer, got {value}")
        require(0 < damping_min <= initial_damping <= damping_max < math.inf,
               "solver.damping_min <= solver.initial_damping <= solver.damping_max must hold with all three "
               f"finite and > 0, got {damping_min}, {initial_damping}, {damping_max}")
        require(int(stall_updates) >= 1, f"solver.stall_updates must be a positive integer, got {stall_updates}")
        require(int(chunk_size) >= 0, f"solver.chunk_size must be >= 0, got {chunk_size}")
        for name, value in (("curvature_batch_size", curvature_batch_size),
                            ("backtrack_batch_size", backtrack_batch_size)):
            require(value is None or int(value) >= 0, f"solver.{name} must be >= 0 (0 or null: the default), "
                   f"got {value}")
        require(0 < line_search_c < 1, f"solver.line_search_c must be in (0, 1), got {line_search_c}")
        require(0 < line_search_shrink < 1, f"solver.line_search_shrink must be in (0, 1), got {line_search_shrink}")
        require(int(max_line_search) >= 0, f"solver.max_line_search must be >= 0, got {max_line_search}")
        for name, value in (("structural_damping", structural_damping),
                            ("weight_cost", weight_cost), ("cg_tol", cg_tol)):
            require(value >= 0, f"solver.{name} must be >= 0, got {value}")
        require(0 <= cg_decay <= 1, f"solver.cg_decay must be in [0, 1], got {cg_decay}")
        require(0 <= preconditioner_exponent < math.inf,
               f"solver.preconditioner_exponent must be finite and >= 0, got {preconditioner_exponent}")
        self.model, self.loss = model, loss
        self.gradient_batch_size = int(gradient_batch_size)
        self.curvature_batch_size = int(curvature_batch_size or gradient_batch_size)
        self.backtrack_batch_size = int(backtrack_batch_size or 0)  # 0: backtrack on the gradient batch
        self.curvature, self.jv_method, self.structural_damping = curvature, jv_method, float(structural_damping)
        self.cg_max_iters, self.cg_tol = int(cg_max_iters), float(cg_tol)
        self.cg_decay, self.weight_cost = float(cg_decay), float(weight_cost)
        self.preconditioner, self.preconditioner_exponent = preconditioner, float(preconditioner_exponent)
        self.line_search_c, self.line_search_shrink = float(line_search_c), float(line_search_shrink)
        self.max_line_search = int(max_line_search)
        self.rho_model, self.chunk_size, self.warm_start_from = rho_model, int(chunk_size), warm_start
        self.restart_uphill, self.checks = bool(restart_uphill), checks
        self.damping_max, self.stall_updates = float(damping_max), int(stall_updates)
        self.levenberg_marquardt = LevenbergMarquardt(initial_damping, damping_min, damping_max)
        self.spec = ParamSpec.from_module(model)
        self.objective = ChunkedObjective(model, loss, self.spec, self.weight_cost)
        self.warm_start: Tensor | None = None
        self.parallel = SINGLE

    def distribute(self, parallel: DataParallel) -> None:
        """Run as one of `parallel.world_size` data-parallel processes (hfrun/distributed.py); the stream
        passed to `step` must then hand out this rank's shares (distributed.ShardedStream)."""
        require_equal_shares(parallel, {"gradient_batch_size": self.gradient_batch_size,
                                        "curvature_batch_size": self.curvature_batch_size,
                                        "backtrack_batch_size": self.backtrack_batch_size,
                                        "chunk_size": self.chunk_size})
        self.parallel = self.objective.parallel = parallel

    @property
    def damping(self) -> float:
        """λ, held by the Levenberg-Marquardt controller."""
        return self.levenberg_marquardt.damping

    @damping.setter
    def damping(self, value: float) -> None:
        self.levenberg_marquardt.damping = float(value)

    @property
    def updates_stuck_at_max(self) -> int:
        return self.levenberg_marquardt.updates_stuck_at_max

    # ------------------------------------------------------------ one update

    def step(self, stream) -> dict[str, float]:
        clock = time.perf_counter()
        theta = self.spec.flatten(trainable_parameters(self.model))
        gradient_batch = draw_chunks(stream, self.gradient_batch_size, self.chunk_size)
        shares = self.parallel.world_size  # each batch here is this process's share: 1/shares of the cases
        gradient_cases = sum(batch.size for batch in gradient_batch) * shares
        curvature_chunks = leading_cases(gradient_batch, self.curvature_batch_size // shares)
        data_loss, loss_before, gradient = self.objective.gradient(theta, gradient_batch)
        if not (math.isfinite(loss_before) and bool(torch.isfinite(gradient).all())):
            # Nothing sensible can follow; leave θ as it is and let the caller see the non-finite loss.
            return {"loss": math.nan if math.isfinite(data_loss) else data_loss, "objective": loss_before,
                    "examples_grad": gradient_cases, "examples_curv": 0}
        damped_curvature = self._damped_curvature(curvature_chunks)
        curvature_cases = damped_curvature.cases
        preconditioner, examples_grad = None, gradient_cases
        if self.preconditioner == "martens":
            # Martens' release: the mean over cases of the squared per-case gradients ∇ℓᵢ². The operator
            # returns Σᵢ(∇ℓᵢ/B)², so multiply by B. Per-case gradients cost about a gradient on that batch.
            squares = self.parallel.mean(sum(per_case_gradient_squares(self.model, self.loss, chunk) * chunk.size
                                             * weight for chunk, weight in zip(curvature_chunks,
                                                                               damped_curvature.weights)))
            examples_grad += curvature_cases
            preconditioner = martens_preconditioner(squares, self._preconditioner_damping(),
                                                    self.preconditioner_exponent)
        time_gradient = time.perf_counter() - clock

        clock = time.perf_counter()
        x0 = None if self.warm_start is None else self.cg_decay * self.warm_start
        cg = self._solve(damped_curvature, gradient, x0, preconditioner)
        time_cg = time.perf_counter() - clock

        clock = time.perf_counter()
        backtrack_batch, rho_batch, line_search_batch = self._check_batches(stream, gradient_batch,
                                                                            curvature_chunks)
        values_before = {id(gradient_batch): loss_before}  # f(θ) per batch, each computed once

        def value_before(batch: list) -> float:
            if id(batch) not in values_before:
                values_before[id(batch)] = self.objective.value(theta, batch)
            return values_before[id(batch)]

        chosen_iter, direction, backtrack_value = self._backtrack(theta, self._judged_iterates(cg), backtrack_batch)
        objective_before = value_before(rho_batch)
        objective_after = (backtrack_value if rho_batch is backtrack_batch
                           else self.objective.value(theta + direction, rho_batch))
        model_reduction, undamped_curvature_direction = cg.q_values[chosen_iter], None
        if self.checks == "release":  # the release evaluates q(d) again, with one more product
            model_reduction, _ = quadratic_value(self._model_curvature(damped_curvature), gradient, direction)
        if self.rho_model == "undamped":
            damped_curvature.set_damping(0.0)  # drops both λI and μλ·G_S
            model_reduction, undamped_curvature_direction = quadratic_value(
                self._model_curvature(damped_curvature), gradient, direction)
            damped_curvature.set_damping(self._product_damping())
        rho = reduction_ratio(objective_before, objective_after, model_reduction)
        damping_used = self.damping
        self._adapt_damping(rho, theta, direction, gradient, damped_curvature, undamped_curvature_direction,
                            rho_batch, objective_before)
        step_size, objective_final = self._line_search(theta, direction, gradient, line_search_batch,
                                                       value_before(line_search_batch),
                                                       objective_after if line_search_batch is rho_batch else None)
        self.warm_start = self._next_warm_start(cg.solution, step_size, direction)
        set_parameters(self.model, self.spec, theta + step_size * direction)
        time_line_search = time.perf_counter() - clock
        # Forward-only evaluations (backtracking, line search) are not counted as examples, as in M&S 2011.
        stats = {
            "loss": data_loss, "objective": loss_before, "lambda": self.damping, "rho": rho,
            "cg_iters": cg.iterations, "cg_stop": cg.stop_reason, "cg_chosen_iter": chosen_iter,
            "cg_q_start": cg.q_warm_start,
            "cg_restarted": float(cg.restarted), "q_reduction": -model_reduction,
            "actual_reduction": objective_before - objective_after,
            "line_search_reduction": value_before(line_search_batch) - objective_final, "step_size": step_size,
            "time_gradient_s": time_gradient, "time_cg_s": time_cg, "time_line_search_s": time_line_search,
            "time_trace_s": damped_curvature.trace_seconds, "examples_grad": examples_grad,
            "examples_curv": damped_curvature.products * curvature_cases,
        }
        if self.updates_stuck_at_max >= self.stall_updates:
            stats["stalled"] = (
                f"HF made no progress it could trust for {self.updates_stuck_at_max} consecutive updates with λ "
                f"at solver.damping_max={self.damping_max:g} (reduction ratio ρ < 1/4 each time; the last "
                f"ρ = {rho:.3g} with λ = {damping_used:g}, step size {step_size:g}), so the run stopped as "
                f"`stalled` at training loss {data_loss:.6g}. Either the loss is at a floor these batches cannot "
                "go below (the noise floor of a regression, or a solved problem), or the quadratic model no "
                "longer predicts the loss. Compare the final loss with what the task can reach; to go on anyway, "
                "start a new run with a higher solver.damping_max or solver.stall_updates, or a larger "
                "solver.gradient_batch_size (a resume must keep the solver's settings).")
        return stats

    def _damped_curvature(self, chunks: list, block: list[str] | None = None,
                          damping: float | None = None) -> ChunkedCurvature:
        """A = C + λI + μλ·G_S + weight_cost·I on the curvature chunks (or its block of `block`'s parameters),
        at the solver's λ or at `damping`."""
        return ChunkedCurvature(self.model, self.loss, chunks, damping=self.damping if damping is None else damping,
                                structural_damping=self.structural_damping, curvature=self.curvature,
                                jv_method=self.jv_method, weight_cost=self.weight_cost, parallel=self.parallel,
                                block=block)

    def _product_damping(self):
        """What the curvature products are damped with (block-diagonal HF may hold a λ per block)."""
        return self.damping

    def _preconditioner_damping(self):
        """What Martens' preconditioner adds to the squared gradients: λ plus the weight cost, as he does."""
        return self.damping + self.weight_cost

    def _adapt_damping(self, rho: float, theta: Tensor, direction: Tensor, gradient: Tensor, damped_curvature,
                       undamped_curvature_direction: Tensor | None, batch: list, objective_before: float) -> None:
        """λ by the Levenberg-Marquardt rule on ρ (block-diagonal HF may adapt a λ per block instead;
        `undamped_curvature_direction` is the model's undamped A d where `rho_model: undamped` computed it)."""
        self.levenberg_marquardt.update(rho)

    def _solve(self, damped_curvature: ChunkedCurvature, gradient: Tensor, x0: Tensor | None,
               preconditioner: Tensor | None) -> CGResult:
        """CG on the quadratic model (block-diagonal HF replaces this with one CG per block)."""
        return conjugate_gradient(damped_curvature, gradient, x0=x0, max_iters=self.cg_max_iters, tol=self.cg_tol,
                                  preconditioner=preconditioner, restart_uphill=self.restart_uphill,
                                  save_at=self._saved_iterations())

    def _model_curvature(self, damped_curvature: ChunkedCurvature):
        """The curvature product of the quadratic model (block-diagonal HF restricts it to its blocks)."""
        return damped_curvature

    def _next_warm_start(self, solution: Tensor, step_size: float, direction: Tensor) -> Tensor | None:
        """What the next CG starts from (times cg_decay): the last CG iterate, the step taken, or nothing."""
        if self.warm_start_from == "solution":
            # The release starts the next CG from zero after a line search that found no decrease.
            return None if self.checks == "release" and step_size == 0 else solution.detach()
        if self.warm_start_from == "step" and step_size > 0:
            return (step_size * direction).detach()
        return None

    def _saved_iterations(self) -> range | None:
        """The CG iterations whose iterates backtracking judges (besides the last; None: Martens' ⌈5·1.3ʲ⌉)."""
        return range(1, self.cg_max_iters + 1, RELEASE_CHECK_EVERY) if self.checks == "release" else None

    def _check_batches(self, stream, gradient_batch: list, curvature_chunks: list) -> tuple[list, list, list]:
        """The batches (lists of chunks) that backtracking, ρ and the line search judge f on (module docstring)."""
        if self.checks == "release":
            backtrack = gradient_batch[1:2] or gradient_batch[:1]
            return backtrack, curvature_chunks, gradient_batch[2:3] or gradient_batch
        batch = (draw_chunks(stream, self.backtrack_batch_size, self.chunk_size) if self.backtrack_batch_size
                 else gradient_batch)
        return batch, batch, batch

    def _judged_iterates(self, cg: CGResult) -> list[tuple[int, Tensor]]:
        """The CG iterates backtracking chooses from. Martens: all saved ones. Release: those after iterations
        1, 11, 21, …, and the last where CG stopped before its cap (the release never judges a capped run's last
        iterate unless it falls on the schedule)."""
        if self.checks == "martens":
            return cg.iterates
        stopped_early = cg.iterations < self.cg_max_iters or cg.stop_reason not in ("max_iters", "blocks")
        judged = [(iteration, x) for iteration, x in cg.iterates
                  if (iteration - 1) % RELEASE_CHECK_EVERY == 0 or (iteration == cg.iterations and stopped_early)]
        return judged or cg.iterates[-1:]  # no CG step at all: its start

    def _backtrack(self, theta: Tensor, iterates, batch) -> tuple[int, Tensor, float]:
        """Choose among the saved CG iterates by f on `batch`; return (iteration, d, f(θ+d)). Martens: walk back
        from the last while f keeps improving. Release: the best of them all."""
        if self.checks == "release":
            judged = [(self.objective.value(theta + direction, batch), iteration, direction)
                      for iteration, direction in iterates]
            value, iteration, direction = min(judged, key=lambda item: item[0] if math.isfinite(item[0]) else math.inf)
            return iteration, direction, value
        best_iter, best_direction = iterates[-1]
        best_value = self.objective.value(theta + best_direction, batch)
        for iteration, direction in reversed(iterates[:-1]):
            value = self.objective.value(theta + direction, batch)
            if not value < best_value:
                break
            best_iter, best_direction, best_value = iteration, direction, value
        return best_iter, best_direction, best_value

    def _line_search(self, theta: Tensor, direction: Tensor, gradient: Tensor, batch: list, before: float,
                     value_at_first: float | None) -> tuple[float, float]:
        """(α, f(θ+αd)) on `batch`: Armijo (martens) or the first decrease (release); α = 0 keeps θ."""
        def value_at(rate: float) -> float:
            return self.objective.value(theta + rate * direction, batch)

        if self.checks == "release":
            return first_decrease(value_at, before, **RELEASE_LINE_SEARCH)
        return armijo(value_at, before, float(gradient.dot(direction)),
                      value_at(1.0) if value_at_first is None else value_at_first, c=self.line_search_c,
                      shrink=self.line_search_shrink, max_tries=self.max_line_search)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {**self.levenberg_marquardt.state_dict(), "warm_start": self.warm_start}

    def load_state_dict(self, state: dict) -> None:
        self.levenberg_marquardt.load_state_dict(state)
        self.warm_start = like_parameters(self.model, state["warm_start"])
