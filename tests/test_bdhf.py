"""Block-diagonal HF (Zhang et al. 2017): the block-diagonal product against the dense float64 GGN with its
off-block entries zeroed, per-block CG against dense solves, one block = HF, a separable problem solved,
and the partitions."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from hfrun.losses import SoftmaxCrossEntropy, SquaredError
from hfrun.models.lstm import LSTM
from hfrun.models.mlp import MLP
from hfrun.models.rnn import RNN
from hfrun.solvers.bdhf import BlockCurvatures, BlockDiagonalHF, BlockDiagonalProduct, layer_of, partition_parameters
from hfrun.solvers.cg import blockwise_conjugate_gradient
from hfrun.solvers.hf import HessianFree
from hfrun.solvers.second_order import ChunkedCurvature
from hfrun.tasks.base import Batch
from test_curvature import assert_close_matrices, dense_ggn
from test_hf import FullBatch
from test_cg import random_spd


def classification_problem():
    torch.manual_seed(0)
    model = MLP(6, 3, [5, 4], activation="tanh").double()
    return model, SoftmaxCrossEntropy(), Batch(torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,)))


PARTITIONS = [("layer", []), ("tensor", []), ("patterns", [r"layers\.0", r"\.bias"])]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("mode, patterns", PARTITIONS)
def test_block_diagonal_product_is_the_dense_ggn_with_off_block_entries_zeroed(mode, patterns, batched):
    model, loss, batch = classification_problem()
    solver = BlockDiagonalHF(model, loss, gradient_batch_size=30, blocks=mode, block_patterns=patterns)
    curvature = ChunkedCurvature(model, loss, [batch], damping=0.3)
    product = BlockDiagonalProduct(curvature, solver.masks, batched=batched)
    identity = torch.eye(len(solver.block_index), dtype=torch.float64)
    actual = torch.stack([product(column) for column in identity], dim=1)
    same_block = solver.block_index[:, None] == solver.block_index[None, :]
    expected = (dense_ggn(model, loss, batch) + 0.3 * identity) * same_block
    assert_close_matrices(actual, expected)
    assert product.batched == batched  # vmap over the curvature operator works on this model
    assert curvature.products == len(identity) * solver.num_blocks  # K products per block-diagonal product


@pytest.mark.parametrize("jv_method", ["traced", "jvp"])
@pytest.mark.parametrize("mode, patterns", PARTITIONS)
def test_cut_block_products_are_the_dense_ggn_with_off_block_entries_zeroed(mode, patterns, jv_method):
    """cut_products: one operator per block, each differentiating its own parameters only, plus weight_cost·I."""
    model, loss, batch = classification_problem()
    solver = BlockDiagonalHF(model, loss, gradient_batch_size=30, blocks=mode, block_patterns=patterns,
                             cut_products=True, initial_damping=0.3, weight_cost=0.01, jv_method=jv_method)
    product = solver._damped_curvature([batch])
    assert isinstance(product, BlockCurvatures) and solver._model_curvature(product) is product
    identity = torch.eye(len(solver.block_index), dtype=torch.float64)
    actual = torch.stack([product(column) for column in identity], dim=1)
    same_block = solver.block_index[:, None] == solver.block_index[None, :]
    expected = (dense_ggn(model, loss, batch) + 0.3 * identity) * same_block + 0.01 * identity
    assert_close_matrices(actual, expected)
    assert product.products == len(identity) * solver.num_blocks  # a block product counts as a product
    used = {operator.jv_method_used for curvature in product.curvatures for operator in curvature.operators}
    assert used == {jv_method}
    product.set_damping(0.0)
    v = torch.randn(len(solver.block_index), dtype=torch.float64)
    torch.testing.assert_close(product(v), (dense_ggn(model, loss, batch) * same_block + 0.01 * identity) @ v)


def test_cut_and_vmapped_block_products_give_the_same_updates_on_a_damped_rnn():
    """Structural damping, Martens' preconditioner, the undamped ratio: the two ways to the block products
    are the same matrix, so BDHF takes the same updates (to rounding) either way."""
    torch.manual_seed(6)
    model = RNN(3, 2, hidden_size=5).double()
    x = torch.randn(40, 6, 3, dtype=torch.float64)
    batch = Batch(x, x[:, :, :2].cumsum(1) * 0.3, torch.ones(40, 6, dtype=torch.float64))
    models = [copy.deepcopy(model), copy.deepcopy(model)]
    # cg_max_iters=7: CG in finite precision magnifies rounding (here about 30× per iteration late in a solve),
    # and the two paths' products, equal to 1e-16, round differently: with 15 iterations the parameters
    # drifted 4e-8 apart over four updates on an AMD EPYC, with 7 about 3e-10. Iterates 5 and 7 are saved,
    # so backtracking still has a choice (it takes 5 at the first update).
    solvers = [BlockDiagonalHF(m, SquaredError(), gradient_batch_size=40, structural_damping=0.3, cg_max_iters=7,
                               preconditioner="martens", rho_model="undamped", weight_cost=1e-3, cut_products=cut)
               for m, cut in zip(models, (True, False))]
    assert solvers[0].num_blocks == 2  # the recurrence (its three tensors) and the readout
    chosen = []
    for _ in range(4):
        cut, vmapped = (solver.step(FullBatch(batch)) for solver in solvers)
        assert cut["cg_iters"] == vmapped["cg_iters"] and cut["examples_curv"] == vmapped["examples_curv"]
        assert cut["cg_chosen_iter"] == vmapped["cg_chosen_iter"]
        assert cut["lambda"] == pytest.approx(vmapped["lambda"], rel=1e-12)
        assert cut["loss"] == pytest.approx(vmapped["loss"], rel=1e-10)
        chosen.append(cut["cg_chosen_iter"])
    assert 5 in chosen, "backtracking chose an earlier iterate at least once"
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_per_block_cg_solves_each_block_independently():
    generator = torch.Generator().manual_seed(1)
    sizes = [3, 7, 12]
    matrices = [random_spd(n, 10.0 ** (k + 1), generator) for k, n in enumerate(sizes)]
    A = torch.block_diag(*matrices)
    blocks = torch.cat([torch.full((n,), b) for b, n in enumerate(sizes)])
    g = torch.randn(sum(sizes), dtype=torch.float64, generator=generator)
    result = blockwise_conjugate_gradient(lambda v: A @ v, g, blocks, 3, max_iters=100, tol=0.0)
    start = 0
    for matrix, n in zip(matrices, sizes):
        expected = torch.linalg.solve(matrix, -g[start:start + n])
        torch.testing.assert_close(result.solution[start:start + n], expected, rtol=1e-8, atol=1e-10)
        start += n
    # each block stops when its own residual vanishes: the small well-conditioned one long before the others
    assert result.block_iterations[0] < result.block_iterations[2] < 100
    # the assembled φ is the sum of the blocks' quadratics
    x = result.solution
    assert result.q_values[-1] == pytest.approx(float(g @ x + 0.5 * x @ A @ x), rel=1e-9)


def test_a_block_that_meets_non_positive_curvature_stops_while_the_others_go_on():
    A = torch.block_diag(torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64),
                         torch.tensor([[-1.0]], dtype=torch.float64))
    g = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    result = blockwise_conjugate_gradient(lambda v: A @ v, g, torch.tensor([0, 0, 1]), 2, max_iters=10, tol=0.0)
    torch.testing.assert_close(result.solution, torch.tensor([-0.5, -1 / 3, 0.0], dtype=torch.float64))
    assert result.block_iterations == [2, 0]


def test_one_block_is_hf_update_for_update():
    model, loss, batch = classification_problem()
    hf_model, bd_model = copy.deepcopy(model), copy.deepcopy(model)
    # cg_max_iters=7 (iterates 5 and 7 saved): with 30, CG ran to 10-12 iterations whose objectives tied to
    # rounding, and backtracking took iterate 10 on one path and 5 on the other on an AMD EPYC (rounding
    # differs between CPUs' BLAS kernels), so the updates differed by 1e-8.
    hf = HessianFree(hf_model, loss, gradient_batch_size=30, cg_max_iters=7)
    bdhf = BlockDiagonalHF(bd_model, loss, gradient_batch_size=30, cg_max_iters=7, blocks="patterns",
                           block_patterns=["."])
    chosen = []
    for _ in range(6):
        a, b = hf.step(FullBatch(batch)), bdhf.step(FullBatch(batch))
        assert b["cg_iters"] == a["cg_iters"] and b["lambda"] == a["lambda"]
        assert b["cg_chosen_iter"] == a["cg_chosen_iter"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-12, abs=1e-14)
        chosen.append(a["cg_chosen_iter"])
    assert 5 in chosen, "backtracking chose an earlier iterate at least once"
    for p, q in zip(hf_model.parameters(), bd_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


class TwoHeads(nn.Module):
    """z = [W₁x₁ + b₁, W₂x₂ + b₂]: each output depends on one layer, so the GGN is block-diagonal by layer."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(3, 1), nn.Linear(4, 1)

    def forward(self, x):
        return torch.cat([self.first(x[:, :3]), self.second(x[:, 3:])], dim=1)


@pytest.mark.parametrize("cut_products", [False, True])
def test_separable_least_squares_reaches_the_known_optimum(cut_products):
    torch.manual_seed(2)
    model = TwoHeads().double()
    x = torch.randn(400, 7, dtype=torch.float64)
    y = torch.stack([x[:, :3] @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3,
                     x[:, 3:] @ torch.tensor([0.2, 0.1, -1.0, 2.0], dtype=torch.float64) - 1.0], dim=1)
    y = y + 0.05 * torch.randn_like(y)
    solver = BlockDiagonalHF(model, SquaredError(), gradient_batch_size=400, initial_damping=1e-3, cg_max_iters=50,
                             cg_tol=1e-12, cut_products=cut_products)
    assert solver.num_blocks == 2
    for _ in range(6):
        solver.step(FullBatch(Batch(x, y)))
    for head, columns, target in ((model.first, slice(0, 3), y[:, 0]), (model.second, slice(3, 7), y[:, 1])):
        design = torch.cat([x[:, columns], torch.ones(400, 1, dtype=torch.float64)], dim=1)
        optimum = torch.linalg.lstsq(design, target[:, None]).solution.flatten()
        found = torch.cat([head.weight.detach().flatten(), head.bias.detach()])
        torch.testing.assert_close(found, optimum, rtol=1e-7, atol=1e-8)


def test_partitions_and_their_errors():
    lstm_names = [name for name, _ in LSTM(7, 10, hidden_size=4, num_layers=3).named_parameters()]
    layers = partition_parameters(lstm_names, "layer")
    assert list(layers) == ["lstm.l0", "lstm.l1", "lstm.l2", "readout"]
    assert layers["lstm.l1"] == ["lstm.weight_ih_l1", "lstm.weight_hh_l1", "lstm.bias_ih_l1", "lstm.bias_hh_l1"]
    assert layer_of("rnn.weight_hh_l0_reverse") == "rnn.l0_reverse" and layer_of("bias") == "bias"
    assert len(partition_parameters(lstm_names, "tensor")) == len(lstm_names)
    patterns = partition_parameters(lstm_names, "patterns", ["_l0", "readout"])
    assert list(patterns) == ["_l0", "other", "readout"] and len(patterns["other"]) == 8
    with pytest.raises(ValueError, match="match no parameter"):
        partition_parameters(lstm_names, "patterns", ["decoder"])
    with pytest.raises(ValueError, match="solver.blocks must be one of"):
        partition_parameters(lstm_names, "neuron")
    with pytest.raises(ValueError, match="needs solver.block_patterns"):
        partition_parameters(lstm_names, "patterns")


@pytest.mark.parametrize("cut_products", [False, True])
def test_the_products_of_an_lstm_run_blockwise_too(cut_products):
    torch.manual_seed(3)
    model = LSTM(3, 2, hidden_size=3, num_layers=2).double()
    batch = Batch(torch.randn(4, 5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    solver = BlockDiagonalHF(model, SoftmaxCrossEntropy(), gradient_batch_size=4, initial_damping=0.1,
                             cut_products=cut_products)
    product = solver._model_curvature(solver._damped_curvature([batch]))
    identity = torch.eye(len(solver.block_index), dtype=torch.float64)
    actual = torch.stack([product(column) for column in identity], dim=1)
    same_block = solver.block_index[:, None] == solver.block_index[None, :]
    expected = (dense_ggn(model, SoftmaxCrossEntropy(), batch) + 0.1 * identity) * same_block
    assert_close_matrices(actual, expected)


def test_undamped_ratio_uses_the_block_diagonal_model_and_restart_uphill_is_refused():
    model, loss, batch = classification_problem()
    solver = BlockDiagonalHF(model, loss, gradient_batch_size=30, rho_model="undamped", weight_cost=0.0)
    curvature = ChunkedCurvature(model, loss, [batch], damping=0.0)
    v = torch.randn(len(solver.block_index), dtype=torch.float64)
    block_model = solver._model_curvature(curvature)
    same_block = solver.block_index[:, None] == solver.block_index[None, :]
    torch.testing.assert_close(block_model(v), (dense_ggn(model, loss, batch) * same_block) @ v)
    for _ in range(3):
        assert solver.step(FullBatch(batch))["loss"] > 0
    with pytest.raises(ValueError, match="restart_uphill is not available with bdhf"):
        BlockDiagonalHF(model, loss, gradient_batch_size=30, restart_uphill=True)


def separable_problem(scale_second: float = 30.0):
    """Two independent linear least-squares heads, the second's inputs scaled so its curvature is far larger."""
    torch.manual_seed(2)
    model = TwoHeads().double()
    x = torch.randn(400, 7, dtype=torch.float64)
    x[:, 3:] *= scale_second
    y = torch.stack([x[:, :3].sum(1) + 0.3, x[:, 3:].mean(1) - 1.0], dim=1) + 0.05 * torch.randn(400, 2, dtype=torch.float64)
    return model, Batch(x, y)


def test_per_block_damping_adapts_each_lambda_on_its_own_ratio():
    """Linear least squares with the undamped model: each block's f is exactly its quadratic model, so every
    ρ_b is 1 and each λ_b falls by 2/3 per update whatever the other block does; the heads reach the optimum."""
    model, batch = separable_problem()
    solver = BlockDiagonalHF(model, SquaredError(), gradient_batch_size=400, initial_damping=1.0, cg_max_iters=3,
                             cg_tol=0.0, rho_model="undamped", cut_products=True, block_damping="per_block",
                             preconditioner="martens", max_line_search=0)
    for update in range(1, 9):
        stats = solver.step(FullBatch(batch))
        assert solver.block_dampings == pytest.approx([(2 / 3) ** update] * 2, rel=1e-9)
        assert stats["lambda_min"] == pytest.approx(stats["lambda_max"], rel=1e-9)
    for _ in range(10):
        solver.step(FullBatch(batch))
    for head, columns, target in ((model.first, slice(0, 3), batch.targets[:, 0]),
                                  (model.second, slice(3, 7), batch.targets[:, 1])):
        design = torch.cat([batch.inputs[:, columns], torch.ones(400, 1, dtype=torch.float64)], dim=1)
        optimum = torch.linalg.lstsq(design, target[:, None]).solution.flatten()
        found = torch.cat([head.weight.detach().flatten(), head.bias.detach()])
        torch.testing.assert_close(found, optimum, rtol=1e-6, atol=1e-7)


def test_per_block_damping_reuses_the_undamped_ratio_product():
    """With rho_model=undamped, the per-block ratios take their q_b from the product the assembled ρ computed:
    an update makes as many block products as with one shared λ (before, one block-diagonal product more)."""
    model, batch = separable_problem()
    products = {}
    for damping in ("shared", "per_block"):
        solver = BlockDiagonalHF(copy.deepcopy(model), SquaredError(), gradient_batch_size=400, cg_max_iters=3,
                                 cg_tol=0.0, rho_model="undamped", cut_products=True, block_damping=damping)
        products[damping] = [solver.step(FullBatch(batch))["examples_curv"] for _ in range(2)]
    assert products["per_block"] == products["shared"]


def test_per_block_ratios_against_a_hand_computed_one():
    """A nonlinear net where the assembled step goes uphill (ρ = −∞: a shared λ would rise) while each block's
    own step goes down: every λ_b moves by the rule applied to its ρ_b, computed here by hand from
    f(θ + P_b d), g and the dense GGN block at the direction the update chose (CG's last iterate)."""
    model, loss, batch = classification_problem()
    before = copy.deepcopy(model)
    solver = BlockDiagonalHF(model, loss, gradient_batch_size=30, initial_damping=0.01, cg_max_iters=5,
                             cut_products=True, block_damping="per_block", max_line_search=0)
    stats = solver.step(FullBatch(batch))
    assert stats["rho"] == -math.inf and stats["cg_chosen_iter"] == stats["cg_iters"]
    direction = solver.warm_start  # CG's last iterate, the direction chosen
    theta0 = torch.cat([p.detach().reshape(-1) for p in before.parameters()])
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(before(batch.inputs), batch.targets),
                                                                    list(before.parameters()))])
    ggn = dense_ggn(before, loss, batch) + 0.01 * torch.eye(len(theta0), dtype=torch.float64)
    f0 = float(loss(before(batch.inputs), batch.targets).detach())
    ratios = []
    for b in range(solver.num_blocks):
        where = solver.positions[b]
        d_b = torch.zeros_like(direction)
        d_b[where] = direction[where]
        moved = copy.deepcopy(before)
        torch.nn.utils.vector_to_parameters(theta0 + d_b, moved.parameters())
        actual = float(loss(moved(batch.inputs), batch.targets).detach()) - f0
        predicted = float(gradient @ d_b + 0.5 * d_b @ ggn @ d_b)
        ratios.append(actual / predicted if actual <= 0 else -math.inf)
        expected = 0.01 * (1.5 if ratios[-1] < 0.25 else 2 / 3 if ratios[-1] > 0.75 else 1.0)
        assert solver.block_dampings[b] == pytest.approx(expected, rel=1e-12), (b, ratios)
    assert solver.block_ratios == pytest.approx(ratios, rel=1e-6)
    assert (stats["rho_min"], stats["rho_max"]) == pytest.approx((min(ratios), max(ratios)), rel=1e-6)
    assert all(value < 0.01 for value in solver.block_dampings)  # where a shared λ would have risen to 0.015


def test_per_block_damping_resumes_exactly_and_its_refusals():
    model, loss, batch = classification_problem()
    options = dict(gradient_batch_size=30, cg_max_iters=8, cut_products=True, block_damping="per_block")
    whole_model, part_model = copy.deepcopy(model), copy.deepcopy(model)
    whole = BlockDiagonalHF(whole_model, loss, **options)
    part = BlockDiagonalHF(part_model, loss, **options)
    for solver in (whole, part):  # blocks that start apart stay apart
        solver.block_levenberg_marquardt[0].damping = 20.0
    for _ in range(5):
        whole.step(FullBatch(batch))
    for _ in range(3):
        part.step(FullBatch(batch))
    state = copy.deepcopy(part.state_dict())
    resumed_model = copy.deepcopy(part_model)
    resumed = BlockDiagonalHF(resumed_model, loss, **options)
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.step(FullBatch(batch))
    assert resumed.block_dampings == whole.block_dampings and len(set(whole.block_dampings)) > 1
    for p, q in zip(whole_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    shared = BlockDiagonalHF(copy.deepcopy(model), loss, gradient_batch_size=30, initial_damping=0.3)
    resumed.load_state_dict(shared.state_dict())  # a shared λ's state starts every block from it
    assert resumed.block_dampings == [0.3] * resumed.num_blocks
    with pytest.raises(ValueError, match="needs solver.cut_products=true"):
        BlockDiagonalHF(model, loss, gradient_batch_size=30, block_damping="per_block")
    with pytest.raises(ValueError, match="solver.block_damping must be one of"):
        BlockDiagonalHF(model, loss, gradient_batch_size=30, block_damping="per_layer")
