"""Block-diagonal Hessian-free optimization (Zhang et al. 2017).

HF (hfrun/solvers/hf.py) with the curvature restricted to pairs of parameters in the same block:

    A_bd = Σ_b P_b (C + λI + μλ·G_S + weight_cost·I) P_b,

P_b the projection on block b's coordinates, so the quadratic model splits into one independent
problem per block, A_bb d_b = −g_b, and CG runs per block (`blockwise_conjugate_gradient`: its own step
sizes, its own stopping by Martens' rule or the cap, its own warm start from 0.95 × its last solution).
Everything else is HF's, through the shared second-order core: the gradient and curvature batches,
backtracking over the saved (assembled) iterates and the line search (`checks`, martens or release).
`restart_uphill` is refused:
each block's CG starts from its own warm start.

Damping (`block_damping`):
  - "shared" (default): one Levenberg-Marquardt λ on the assembled direction's reduction ratio ρ (its
    model the block-diagonal one, with `rho_model: undamped` too);
  - "per_block": a λ_b per block (it needs `cut_products`), each adapted by the same rule on its own ratio
    ρ_b = (f(θ + P_b d) − f(θ)) / q_b(P_b d), with q_b the block's quadratic model, g_bᵀd_b + ½ d_bᵀA_bb d_b,
    at the chosen direction d (after backtracking). It costs K forward passes on ρ's batch and
    one block-diagonal product per update (none with `rho_model: undamped`: it reuses the ratio's product).
    A block where d is zero keeps its λ_b. Martens' preconditioner takes each coordinate's λ_b. The
    statistics give `lambda` as the geometric mean of the λ_b, with `lambda_min` and `lambda_max`, and
    `rho_min`, `rho_max` over the blocks judged (`rho` stays the assembled direction's); the run stalls
    when every block judged is stuck at `damping_max`.

Blocks (`blocks`):
  - "layer" (default): one block per layer, its weight and bias together (the parameters of one
    module; a stacked LSTM's layers l0, l1, … apart);
  - "tensor": one block per parameter tensor;
  - "patterns": `block_patterns`, a list of regular expressions on parameter names, one block each, a
    parameter going to the first that matches (unmatched parameters form a last block "other").
The partition is logged once at start-up.

The product A_bd p needs each block's P_b C P_b p: one curvature product per block. Two ways:
  - `cut_products` (the config's default): one curvature operator per block, taken in the block's
    parameters only, the others held fixed (CurvatureOperator's `block`). Only the part of the graph
    that depends on the block is differentiated: its tangent pass starts where the block's parameters
    enter and its backward pass stops there, so a block of the last layers costs a fraction of a product
    and only a block at the input costs a whole one. Each block is traced once per batch shape and runs
    its own forward pass per batch, and the K operators hold their primal values at once (on the
    autoencoder 1.7× a full product's peak memory; `python -m hfrun.bench --memory`). A block
    product counts as a product in `examples_curv` whatever part of the network it differentiates.
  - otherwise, full products with the tangent zero outside the block; with `batched_products` the K
    tangents go through one vectorised product (torch.func.vmap over the curvature operator), otherwise
    (or where vmap fails, logged) one at a time.
`make bench` times one all-blocks product each way against one full GGN product.
"""
from __future__ import annotations

import logging
import math
import re
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hfrun.solvers.cg import CGResult, blockwise_conjugate_gradient
from hfrun.solvers.hf import HessianFree
from hfrun.solvers.second_order import ChunkedCurvature, LevenbergMarquardt, reduction_ratio

log = logging.getLogger("hfrun.solvers.bdhf")
PARTITIONS = ("layer", "tensor", "patterns")
_LAYER_SUFFIX = re.compile(r"_l(\d+)(_reverse)?$")  # torch's RNN/LSTM names: weight_ih_l0, bias_hh_l1_reverse


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its module path, plus the layer index of a stacked RNN/LSTM."""
    module, _, leaf = name.rpartition(".")
    suffix = _LAYER_SUFFIX.search(leaf)
    layer = f"{module}.l{suffix.group(1)}{suffix.group(2) or ''}" if suffix else module
    return layer or leaf


def partition_parameters(names: Sequence[str], mode: str = "layer", patterns: Sequence[str] = ()) -> dict[str, list[str]]:
    """Block name → the parameter names in it, in the order the parameters come."""
    if mode not in PARTITIONS:
        raise ValueError(f"solver.blocks must be one of {PARTITIONS}, got {mode!r}")
    blocks: dict[str, list[str]] = {}
    if mode == "patterns":
        if not patterns:
            raise ValueError("solver.blocks=patterns needs solver.block_patterns, e.g. ['encoder', 'decoder']")
        try:
            compiled = [re.compile(pattern) for pattern in patterns]
        except re.error as error:
            raise ValueError(f"solver.block_patterns holds an invalid regular expression: {error}") from None
    for name in names:
        if mode == "tensor":
            key = name
        elif mode == "layer":
            key = layer_of(name)
        else:
            key = next((pattern.pattern for pattern in compiled if pattern.search(name)), "other")
        blocks.setdefault(key, []).append(name)
    if mode == "patterns":
        empty = [pattern for pattern in patterns if pattern not in blocks]
        if empty:
            raise ValueError(f"solver.block_patterns {empty} match no parameter; the parameters are {list(names)}")
    return blocks


class BlockDiagonalProduct:
    """p ↦ Σ_b P_b A P_b p for a full product A (a ChunkedCurvature), all blocks at once where vmap allows."""

    def __init__(self, curvature: ChunkedCurvature, masks: Tensor, batched: bool = True):
        self.curvature, self.masks, self.batched = curvature, masks, batched

    def __call__(self, p: Tensor) -> Tensor:
        tangents = self.masks * p  # (K, n): block b's part of p, zero elsewhere
        if self.batched:
            local, failure = None, None
            try:  # vmap over this process's products; collectives do not vmap, so they come after
                local = torch.func.vmap(self.curvature.local)(tangents)
            except (RuntimeError, NotImplementedError) as error:
                failure = str(error).splitlines()[0] if str(error) else type(error).__name__
            if self.curvature.parallel.all_true(failure is None):  # every process, or none, falls back
                products = self.curvature.reduce(local, tangents)  # one reduction of all K
                self.curvature.products += len(tangents)
                return (self.masks * products).sum(0)
            log.warning("batched block products failed (%s); running them one block at a time",
                        failure or "in another process")
            self.batched = False
        return sum(mask * self.curvature(tangent) for mask, tangent in zip(self.masks, tangents))


class BlockCurvatures:
    """p ↦ Σ_b P_b A P_b p from one ChunkedCurvature per block, each in its block's coordinates (`positions`:
    the block's flat coordinates, in model order). It stands where HF has its ChunkedCurvature (set_damping,
    products, trace_seconds, cases, weights, local); under data parallelism the blocks' local products are
    assembled and reduced once."""

    def __init__(self, curvatures: list[ChunkedCurvature], positions: list[Tensor]):
        self.curvatures, self.positions = curvatures, positions
        first = curvatures[0]
        self.cases, self.weights, self.parallel = first.cases, first.weights, first.parallel
        self.trace_seconds = sum(curvature.trace_seconds for curvature in curvatures)

    @property
    def products(self) -> int:
        """Block products, each counted as a product (as the batched path counts them)."""
        return sum(curvature.products for curvature in self.curvatures)

    def set_damping(self, damping: float | Sequence[float]) -> None:
        """One λ for every block, or one per block."""
        dampings = [damping] * len(self.curvatures) if isinstance(damping, (int, float)) else damping
        for curvature, value in zip(self.curvatures, dampings, strict=True):
            curvature.set_damping(value)

    def local(self, p: Tensor) -> Tensor:
        product = torch.zeros_like(p)
        for curvature, where in zip(self.curvatures, self.positions):
            product[where] = curvature.local(p[where])
        return product

    def __call__(self, p: Tensor) -> Tensor:
        for curvature in self.curvatures:
            curvature.products += 1
        return self.curvatures[0].reduce(self.local(p), p)  # the mean over ranks, plus weight_cost·p


BLOCK_DAMPINGS = ("shared", "per_block")


class BlockDiagonalHF(HessianFree):
    """BDHF behind the solver interface; takes HF's options plus the block partition and the damping (see the
    module docstring). Usable in a plain PyTorch loop like HessianFree."""

    def __init__(self, model: nn.Module, loss, *, blocks: str = "layer", block_patterns: Sequence[str] = (),
                 batched_products: bool = True, cut_products: bool = False, block_damping: str = "shared",
                 **options):
        if options.get("restart_uphill"):
            raise ValueError("solver.restart_uphill is not available with bdhf: its CG runs per block from one "
                             "warm start; set solver.restart_uphill=false or solver.warm_start=none")
        if block_damping not in BLOCK_DAMPINGS:
            raise ValueError(f"solver.block_damping must be one of {BLOCK_DAMPINGS}, got {block_damping!r}")
        if block_damping == "per_block" and not cut_products:
            raise ValueError("solver.block_damping=per_block needs solver.cut_products=true: each block's λ "
                             "damps that block's own curvature operator")
        super().__init__(model, loss, **options)
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.partition = partition_parameters(names, blocks, list(block_patterns))
        block_of_parameter = {name: index for index, members in enumerate(self.partition.values())
                              for name in members}
        reference = next(model.parameters())
        self.block_index = torch.cat([torch.full((p.numel(),), block_of_parameter[name], dtype=torch.long,
                                                 device=reference.device)
                                      for name, p in model.named_parameters() if p.requires_grad])
        self.num_blocks = len(self.partition)
        self.masks = torch.stack([(self.block_index == b).to(reference.dtype) for b in range(self.num_blocks)])
        self.positions = [torch.nonzero(self.block_index == b).squeeze(1) for b in range(self.num_blocks)]
        self.batched_products, self.cut_products = bool(batched_products), bool(cut_products)
        self.block_levenberg_marquardt = ([LevenbergMarquardt(self.damping, self.levenberg_marquardt.minimum,
                                                              self.damping_max) for _ in range(self.num_blocks)]
                                          if block_damping == "per_block" else None)
        self.block_ratios: list[float | None] = [None] * self.num_blocks  # ρ_b at the last update (None: not judged)
        log.info("BDHF blocks (%d), %s, %s: %s", self.num_blocks,
                 "each differentiated alone (cut_products)" if self.cut_products else
                 "full products masked to each block" + (", vmapped" if self.batched_products else ""),
                 "a λ per block" if block_damping == "per_block" else "one shared λ",
                 "; ".join(f"{block}: {', '.join(members)}" for block, members in self.partition.items()))

    # ------------------------------------------------------------ damping

    @property
    def block_dampings(self) -> list[float]:
        """λ_b of every block (all the shared λ unless block_damping is per_block)."""
        if self.block_levenberg_marquardt is None:
            return [self.damping] * self.num_blocks
        return [controller.damping for controller in self.block_levenberg_marquardt]

    @property
    def damping(self) -> float:
        """λ; with a λ per block, their geometric mean (what `lambda` reports)."""
        if getattr(self, "block_levenberg_marquardt", None) is None:
            return self.levenberg_marquardt.damping
        return math.exp(statistics.fmean(math.log(value) for value in self.block_dampings))

    @damping.setter
    def damping(self, value: float) -> None:
        for controller in [self.levenberg_marquardt, *(getattr(self, "block_levenberg_marquardt", None) or [])]:
            controller.damping = float(value)

    @property
    def updates_stuck_at_max(self) -> int:
        """Consecutive updates with ρ < 1/4 at λ = damping_max; per block, the fewest among the blocks judged
        at the last update (a block where d is zero is not judged, so it cannot hold a stall off)."""
        if self.block_levenberg_marquardt is None:
            return self.levenberg_marquardt.updates_stuck_at_max
        judged = [controller.updates_stuck_at_max for controller, ratio
                  in zip(self.block_levenberg_marquardt, self.block_ratios) if ratio is not None]
        return min(judged) if judged else 0

    def _product_damping(self):
        return self.damping if self.block_levenberg_marquardt is None else self.block_dampings

    def _preconditioner_damping(self):
        if self.block_levenberg_marquardt is None:
            return super()._preconditioner_damping()
        dampings = torch.tensor(self.block_dampings, dtype=self.masks.dtype, device=self.masks.device)
        return dampings[self.block_index] + self.weight_cost

    def _adapt_damping(self, rho: float, theta: Tensor, direction: Tensor, gradient: Tensor, damped_curvature,
                       undamped_curvature_direction: Tensor | None, batch: list, objective_before: float) -> None:
        """Shared: HF's rule on the assembled ρ. Per block: each λ_b by the same rule on ρ_b (module docstring),
        its q_b from the undamped A d that HF's ρ computed, or from one damped block-diagonal product."""
        if self.block_levenberg_marquardt is None:
            self.levenberg_marquardt.update(rho)
            return
        curvature_direction = (damped_curvature(direction) if undamped_curvature_direction is None
                               else undamped_curvature_direction)
        per_block = torch.zeros(self.num_blocks, dtype=direction.dtype, device=direction.device)
        model_reductions = per_block.index_add(0, self.block_index,
                                               direction * (gradient + 0.5 * curvature_direction)).tolist()
        moved = per_block.index_add(0, self.block_index, direction.abs()).tolist()
        for b, (controller, where) in enumerate(zip(self.block_levenberg_marquardt, self.positions)):
            self.block_ratios[b] = None
            if moved[b] == 0:
                continue  # d is zero on this block: nothing to judge its λ by
            block_direction = torch.zeros_like(direction)
            block_direction[where] = direction[where]
            after = self.objective.value(theta + block_direction, batch)
            self.block_ratios[b] = reduction_ratio(objective_before, after, model_reductions[b])
            controller.update(self.block_ratios[b])

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.block_levenberg_marquardt is not None:
            state["block_damping"] = [controller.state_dict() for controller in self.block_levenberg_marquardt]
        return state

    def load_state_dict(self, state: dict) -> None:
        """A state saved with a shared λ (no `block_damping`) starts every block's λ_b from it."""
        super().load_state_dict(state)
        if self.block_levenberg_marquardt is not None:
            saved_blocks = state.get("block_damping") or [self.levenberg_marquardt.state_dict()] * self.num_blocks
            for controller, saved in zip(self.block_levenberg_marquardt, saved_blocks, strict=True):
                controller.load_state_dict(saved)

    def step(self, stream) -> dict[str, float]:
        stats = super().step(stream)
        if self.block_levenberg_marquardt is not None and "lambda" in stats:
            stats["lambda_min"], stats["lambda_max"] = min(self.block_dampings), max(self.block_dampings)
            judged = [ratio for ratio in self.block_ratios if ratio is not None]
            if judged:
                stats["rho_min"], stats["rho_max"] = min(judged), max(judged)
        return stats

    # ------------------------------------------------------------ products

    def _damped_curvature(self, chunks: list, block: list[str] | None = None, damping: float | None = None):
        """With cut_products, all blocks (each at its λ_b, or all at `damping`); `block` is not for BDHF."""
        if not self.cut_products:
            return super()._damped_curvature(chunks, block, damping)
        if block is not None:
            raise ValueError("BlockDiagonalHF builds its blocks itself; `block` is not an option here")
        dampings = self.block_dampings if damping is None else [damping] * self.num_blocks
        return BlockCurvatures([super(BlockDiagonalHF, self)._damped_curvature(chunks, members, block_damping)
                                for members, block_damping in zip(self.partition.values(), dampings)],
                               self.positions)

    def _model_curvature(self, damped_curvature) -> BlockCurvatures | BlockDiagonalProduct:
        if isinstance(damped_curvature, BlockCurvatures):
            return damped_curvature
        return BlockDiagonalProduct(damped_curvature, self.masks, self.batched_products)

    def _solve(self, damped_curvature, gradient: Tensor, x0: Tensor | None,
               preconditioner: Tensor | None) -> CGResult:
        product = self._model_curvature(damped_curvature)
        result = blockwise_conjugate_gradient(product, gradient, self.block_index, self.num_blocks, x0=x0,
                                              max_iters=self.cg_max_iters, tol=self.cg_tol,
                                              preconditioner=preconditioner, save_at=self._saved_iterations())
        if isinstance(product, BlockDiagonalProduct):
            self.batched_products = product.batched  # a vmap failure is not retried every update
        return result
