"""What the second-order solvers (HF, SGN; block-diagonal HF next) share, in one place.

- Batches drawn in chunks, and the leading cases of a chunked batch (Martens' curvature chunk of the
  gradient batch).
- `ChunkedObjective`: f(θ) = Σ_c (n_c/n)·L(θ; chunk c) + ½·weight_cost·‖θ‖² and its gradient. Losses are
  per-case means, so the size-weighted mean over chunks is the loss of the whole batch; this is the one
  place where sums over cases are reduced.
- `ChunkedCurvature`: v ↦ Σ_c (n_c/n)·(C_c + λI + μλ·G_S,c)v + weight_cost·v, the damped curvature of the
  quadratic model, from one `CurvatureOperator` per chunk; it counts its products.
- Data parallelism (hfrun/distributed.py): under W processes each holds an equal share of every batch, and
  the objective, its gradient and the curvature products above are the mean over ranks of the shares' values
  (`DataParallel.mean`), here and nowhere else in the solvers.
- `LevenbergMarquardt`: λ ×3/2 when the reduction ratio ρ < 1/4, ×2/3 when ρ > 3/4 (Martens 2010, and
  SGN 2020 for its damping), kept in [minimum, maximum]; a NaN ratio changes nothing. It counts the
  consecutive updates with ρ < 1/4 at the maximum, which HF reports as a stall.
- `reduction_ratio`: ρ = (f(θ+d) − f(θ)) / q(d), guarded (−∞ when f rose or is not finite).
- `armijo`: backtracking along d until f(θ+αd) ≤ f(θ) + c·α·gᵀd (HF) or ≤ f(θ) + c·α₀·gᵀd, the threshold
  fixed at the first step (SGN's release), either rejecting the step when no α passes (HF) or keeping the
  last one tried (SGN's release).
- `first_decrease`: Sutskever's release's line search, the first α = 0.8ᵏ that decreases f at all (HF with
  `checks: release`).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hfrun.curvature import CurvatureOperator, ParamSpec, trainable_parameters
from hfrun.distributed import SINGLE, DataParallel


def require(condition: bool, message: str) -> None:
    """A solver option check: ValueError(message) unless condition (the engine shows it as one paragraph)."""
    if not condition:
        raise ValueError(message)


@torch.no_grad()
def set_parameters(model: nn.Module, spec: ParamSpec, theta: Tensor) -> None:
    """Write the flat vector θ into the model's trainable parameters."""
    for p, value in zip(trainable_parameters(model).values(), spec.unflatten(theta).values()):
        p.copy_(value)


def require_equal_shares(parallel: DataParallel, sizes: dict[str, int]) -> None:
    """Every batch size (solver.<name>) a multiple of the number of processes, so that the shares are equal."""
    uneven = {name: size for name, size in sizes.items() if size and size % parallel.world_size}
    require(not uneven, "Under data parallelism every batch is shared equally by the processes, so each batch "
            f"size must be a multiple of their number, {parallel.world_size}; "
            + ", ".join(f"solver.{name}={size}" for name, size in uneven.items())
            + " is not. Change it, or the number of processes (torchrun --nproc_per_node).")


def like_parameters(model: nn.Module, tensor: Tensor | None) -> Tensor | None:
    """A checkpointed solver vector (warm start, momentum) on the model's device and dtype; None stays None."""
    if tensor is None:
        return None
    reference = next(model.parameters())
    return tensor.to(reference.device, reference.dtype)


def draw_chunks(stream, size: int, chunk_size: int = 0) -> list:
    """`size` cases as a list of chunks of at most `chunk_size` (one chunk when chunk_size is 0)."""
    chunk = chunk_size or size
    return [stream.next(min(chunk, size - start)) for start in range(0, size, chunk)]


def leading_cases(chunks: list, size: int) -> list:
    """The first `size` cases of a chunked batch, as chunks: Martens' curvature chunk of the gradient batch."""
    taken = []
    for batch in chunks:
        if size <= 0:
            break
        if size < batch.size:
            batch = type(batch)(batch.inputs[:size], batch.targets[:size],
                                None if batch.mask is None else batch.mask[:size])
        taken.append(batch)
        size -= batch.size
    return taken


class ChunkedObjective:
    """f(θ) = L(θ; chunks) + ½·weight_cost·‖θ‖², L the size-weighted mean of the chunks' losses (over the
    ranks' equal shares of the chunks under data parallelism)."""

    def __init__(self, model: nn.Module, loss, spec: ParamSpec, weight_cost: float = 0.0,
                 parallel: DataParallel = SINGLE):
        self.model, self.loss, self.spec, self.weight_cost = model, loss, spec, float(weight_cost)
        self.parallel = parallel

    def value(self, theta: Tensor, batches: list) -> float:
        """f(θ) on the chunks, without a graph."""
        total = sum(batch.size for batch in batches)
        params = self.spec.unflatten(theta)
        with torch.no_grad():
            value = self.parallel.mean_value(float(sum(
                self.loss(functional_call(self.model, params, (batch.inputs,)), batch.targets, batch.mask)
                * (batch.size / total) for batch in batches)))
            if self.weight_cost:
                value = value + 0.5 * self.weight_cost * float(theta.dot(theta))
        return float(value)

    def gradient(self, theta: Tensor, batches: list) -> tuple[float, float, Tensor]:
        """(data loss L, objective f, ∇f) at the model's current parameters θ, on the chunks."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = sum(batch.size for batch in batches)
        data_loss, gradient = 0.0, torch.zeros_like(theta)
        for batch in batches:
            loss = self.loss(self.model(batch.inputs), batch.targets, batch.mask) * (batch.size / total)
            gradient += self.spec.flatten(torch.autograd.grad(loss, params))
            data_loss += float(loss.detach())
        if self.parallel.active:
            gradient, data_loss = self.parallel.mean(gradient), self.parallel.mean_value(data_loss)
        objective = data_loss
        if self.weight_cost:
            gradient = gradient + self.weight_cost * theta
            objective += 0.5 * self.weight_cost * float(theta.dot(theta))
        return data_loss, objective, gradient


class ChunkedCurvature:
    """The damped curvature of the quadratic model on a chunked batch, as a product v ↦ A v.

    A = Σ_c (n_c/n)·(C_c + λI + μλ·G_S,c) + weight_cost·I, with one CurvatureOperator per chunk (see
    hfrun.curvature for C, λ and μ), the mean over ranks of their shares' products under data parallelism.
    `damping` may change between products; `products` counts them; `trace_seconds` is the time the
    operators spent tracing products for new batch shapes; `cases` is the global batch's size. With
    `block` (parameter names) it is that block of A, in the block's coordinates (CurvatureOperator).
    """

    def __init__(self, model: nn.Module, loss, chunks: list, *, damping: float, structural_damping: float = 0.0,
                 curvature: str = "ggn", jv_method: str = "auto", weight_cost: float = 0.0,
                 parallel: DataParallel = SINGLE, block: list[str] | None = None):
        self.parallel = parallel
        self.cases = sum(chunk.size for chunk in chunks) * parallel.world_size
        self.operators = [CurvatureOperator(model, loss, chunk, damping=damping,
                                            structural_damping=structural_damping, curvature=curvature,
                                            jv_method=jv_method, block=block) for chunk in chunks]
        self.weights = [chunk.size * parallel.world_size / self.cases for chunk in chunks]
        self.trace_seconds = sum(operator.trace_seconds for operator in self.operators)
        self.weight_cost = float(weight_cost)
        self.products = 0

    def set_damping(self, damping: float) -> None:
        """λ for the next products (0 drops both λI and μλ·G_S)."""
        for operator in self.operators:
            operator.damping = damping

    def local(self, v: Tensor) -> Tensor:
        """This rank's share of the product, without the weight cost: what `reduce` combines."""
        return (self.operators[0].mv(v) if len(self.operators) == 1
                else sum(weight * operator.mv(v) for weight, operator in zip(self.weights, self.operators)))

    def reduce(self, local_products: Tensor, v: Tensor) -> Tensor:
        """The ranks' `local` products of v (or of a stack of vectors) combined, plus weight_cost·v."""
        product = self.parallel.mean(local_products)
        return product + self.weight_cost * v if self.weight_cost else product

    def __call__(self, v: Tensor) -> Tensor:
        self.products += 1
        return self.reduce(self.local(v), v)


def quadratic_value(curvature_product: Callable[[Tensor], Tensor], gradient: Tensor, d: Tensor) -> tuple[float, Tensor]:
    """(gᵀd + ½ dᵀA d, A d) for A given by its product; one product, returned for reuse."""
    curvature_direction = curvature_product(d)
    return float(gradient.dot(d) + 0.5 * d.dot(curvature_direction)), curvature_direction


def reduction_ratio(before: float, after: float, model_reduction: float) -> float:
    """ρ = (f(θ+d) − f(θ)) / q(d); −∞ when f rose, is not finite, or the model predicts no decrease."""
    if not math.isfinite(after) or after > before or model_reduction >= 0:
        return -math.inf
    return (after - before) / model_reduction


class LevenbergMarquardt:
    """The damping λ, adapted by the reduction ratio ρ: ×`boost` below 1/4, ×`drop` above 3/4 (floored at
    `minimum` on a decrease, capped at `maximum` on an increase); a NaN ρ leaves λ alone."""

    def __init__(self, initial: float, minimum: float, maximum: float = math.inf):
        self.damping, self.minimum, self.maximum = float(initial), float(minimum), float(maximum)
        self.updates_stuck_at_max = 0  # consecutive updates with ρ < 1/4 at λ = maximum

    def update(self, rho: float) -> None:
        stuck = rho < 0.25 and self.damping >= self.maximum
        self.updates_stuck_at_max = self.updates_stuck_at_max + 1 if stuck else 0
        if rho < 0.25:
            self.damping = min(self.damping * 1.5, self.maximum)
        elif rho > 0.75:
            self.damping = max(self.damping * 2 / 3, self.minimum)

    def state_dict(self) -> dict:
        return {"damping": self.damping, "updates_stuck_at_max": self.updates_stuck_at_max}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint from before damping_max existed may hold a λ far above it (or inf): bring it back.
        self.damping = min(float(state["damping"]), self.maximum)
        self.updates_stuck_at_max = int(state.get("updates_stuck_at_max", 0))


def armijo(value_at: Callable[[float], float], before: float, slope: float, value_at_first: float, *,
           c: float, shrink: float, max_tries: int, first_rate: float = 1.0, fixed_threshold: bool = False,
           reject: bool = True) -> tuple[float, float]:
    """Backtracking line search along d from α = first_rate; `slope` = gᵀd, `value_at(α)` = f(θ + αd).

    Accepts the first α with a finite f(θ+αd) ≤ f(θ) + c·α·slope (or c·first_rate·slope with
    `fixed_threshold`, SGN's release), multiplying α by `shrink` up to `max_tries` times. When none passes:
    (0, f(θ)) with `reject` (also when d is not a descent direction), else the last α tried and its value
    (SGN's release keeps θ + α·d after its last halving whatever it gives).
    """
    if reject and not slope < 0:  # not a descent direction: no step along it can satisfy Armijo meaningfully
        return 0.0, before
    rate, value = first_rate, value_at_first
    for _ in range(max_tries):
        threshold = before + c * (first_rate if fixed_threshold else rate) * slope
        if math.isfinite(value) and value <= threshold:
            return rate, value
        rate *= shrink
        value = value_at(rate)
    threshold = before + c * (first_rate if fixed_threshold else rate) * slope
    if reject and not (math.isfinite(value) and value <= threshold):  # the last α tried is judged too
        return 0.0, before
    return rate, value


def first_decrease(value_at: Callable[[float], float], before: float, *, shrink: float,
                   max_tries: int) -> tuple[float, float]:
    """Sutskever's release's line search: the first α = shrinkᵏ, k = 0 … max_tries, with f(θ+αd) < f(θ)
    (any decrease, no Armijo constant); (0, f(θ)) when none decreases f. `value_at(α)` = f(θ + αd)."""
    rate = 1.0
    for _ in range(max_tries + 1):
        value = value_at(rate)
        if math.isfinite(value) and value < before:
            return rate, value
        rate *= shrink
    return 0.0, before
