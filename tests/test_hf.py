"""HF end to end: known optima of convex problems, and a nonlinear fit against SGD and Adam."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hfrun.curvature import JV_METHODS, trainable_parameters
from hfrun.losses import SigmoidCrossEntropy, SquaredError
from hfrun.models.mlp import MLP
from hfrun.solvers.first_order import SGD, Adam
from hfrun.solvers.hf import HessianFree
from hfrun.tasks.base import Batch, DatasetStream, make_generator
from hfrun.tasks.regression import LinearRegression

EXACT = dict(initial_damping=0.1, cg_max_iters=200, cg_tol=1e-10, weight_cost=0.0)


class FullBatch:
    """A stream that always returns the whole data set."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def next(self, batch_size: int) -> Batch:
        assert batch_size == self.batch.size
        return self.batch


def _linear_params(model: MLP) -> torch.Tensor:
    layer = model.layers[-1]
    return torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])


@pytest.mark.parametrize("jv_method", [m for m in JV_METHODS if m != "compiled"])  # compiled: test_traced
def test_linear_least_squares_reaches_optimum_in_few_updates(jv_method):
    torch.manual_seed(0)
    task = LinearRegression(name="linreg", seed=0, device="cpu", dtype=torch.float64)
    model = MLP(10, 1, []).double()
    solver = HessianFree(model, task.loss, gradient_batch_size=2000, jv_method=jv_method, **EXACT)
    stream = task.train_stream()
    for _ in range(8):
        solver.step(stream)
    weight, bias = task.optimum()
    optimum = torch.cat([weight.reshape(-1), bias])
    assert torch.linalg.norm(_linear_params(model) - optimum) / torch.linalg.norm(optimum) < 1e-6


def _logistic_data(n=500, d=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    true_w = torch.randn(d, generator=generator, dtype=torch.float64)
    y = (torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(x @ true_w)).to(torch.float64)
    return x, y[:, None]


def _newton_optimum(x, y, weight_cost):
    """The regularized logistic-regression optimum by Newton's method on dense float64 Hessians."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    def objective(theta):
        z = design @ theta
        return nn.functional.binary_cross_entropy_with_logits(z, y[:, 0]) + 0.5 * weight_cost * theta.dot(theta)

    theta = torch.zeros(design.shape[1], dtype=x.dtype)
    for _ in range(30):
        g = torch.autograd.functional.jacobian(objective, theta)
        h = torch.autograd.functional.hessian(objective, theta)
        theta = theta - torch.linalg.solve(h, g)
    return theta


def test_logistic_regression_reaches_newton_optimum():
    x, y = _logistic_data()
    weight_cost = 1e-3
    expected = _newton_optimum(x, y, weight_cost)
    torch.manual_seed(0)
    model = MLP(5, 1, []).double()
    solver = HessianFree(model, SigmoidCrossEntropy(), gradient_batch_size=len(x),
                         **{**EXACT, "weight_cost": weight_cost})
    stream = FullBatch(Batch(x, y))
    for _ in range(15):
        stats = solver.step(stream)
    error = torch.linalg.norm(_linear_params(model) - expected) / torch.linalg.norm(expected)
    assert error < 1e-6, (error, stats)


def _sine_data():
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None]
    return Batch(x, torch.sin(3 * x))


def _fit(make_solver, budget_examples: int) -> float:
    """Train a fresh 1-20-20-1 tanh net until `budget_examples` went through gradients and curvature products."""
    torch.manual_seed(1)
    model = MLP(1, 1, [20, 20]).double()
    batch = _sine_data()
    solver = make_solver(model)
    stream, spent = FullBatch(batch), 0
    while spent < budget_examples:
        stats = solver.step(stream)
        spent += stats["examples_grad"] + stats["examples_curv"]
    with torch.no_grad():
        return float(SquaredError()(model(batch.inputs), batch.targets))


def test_hf_beats_tuned_sgd_and_adam_on_nonlinear_regression():
    budget = 256 * 300  # the cost of 300 full-batch gradients
    hf = _fit(lambda m: HessianFree(m, SquaredError(), gradient_batch_size=256, initial_damping=1.0,
                                    cg_max_iters=50, preconditioner="martens"), budget)
    first_order = {
        f"{cls.__name__}(lr={lr})": _fit(lambda m, cls=cls, lr=lr, kw=kw: cls(m, SquaredError(), lr=lr, batch_size=256, **kw), budget)
        for cls, kw, lrs in ((SGD, {"momentum": 0.9}, (0.03, 0.1, 0.3)), (Adam, {}, (3e-3, 1e-2, 3e-2)))
        for lr in lrs
    }
    finite = {name: loss for name, loss in first_order.items() if math.isfinite(loss)}
    assert hf < min(finite.values()), (hf, first_order)


def test_hessian_curvature_runs_and_decreases_the_loss():
    losses = []
    torch.manual_seed(1)
    model = MLP(1, 1, [20, 20]).double()
    solver = HessianFree(model, SquaredError(), gradient_batch_size=256, curvature="hessian", cg_max_iters=50)
    stream = FullBatch(_sine_data())
    for _ in range(15):
        losses.append(solver.step(stream)["loss"])
    assert losses[-1] < 0.2 * losses[0]


def test_state_dict_round_trip_keeps_damping_and_warm_start():
    task = LinearRegression(name="linreg", seed=0, device="cpu", dtype=torch.float64)
    model = MLP(10, 1, []).double()
    solver = HessianFree(model, task.loss, gradient_batch_size=500, initial_damping=3.0)
    solver.step(task.train_stream())
    clone = HessianFree(MLP(10, 1, []).double(), task.loss, gradient_batch_size=500)
    clone.load_state_dict(solver.state_dict())
    assert clone.damping == solver.damping != 3.0
    assert torch.equal(clone.warm_start, solver.warm_start)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"curvature": "fisher"}, "solver.curvature"),
    ({"preconditioner": "jacobi"}, "solver.preconditioner"),
    ({"initial_damping": -1.0}, "solver.initial_damping"),
    ({"cg_max_iters": 0}, "solver.cg_max_iters"),
    ({"jv_method": "finite_differences"}, "solver.jv_method"),
    ({"initial_damping": 10.0, "damping_max": 1.0}, "solver.damping_max"),
    ({"damping_max": float("inf")}, "solver.damping_max"),
    ({"stall_updates": 0}, "solver.stall_updates"),
])
def test_bad_settings_are_rejected(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        HessianFree(MLP(2, 1, []), SquaredError(), gradient_batch_size=10, **kwargs)


def test_chunked_gradient_and_objective_equal_the_whole_batch():
    torch.manual_seed(0)
    model = MLP(1, 1, [8]).double()
    solver = HessianFree(model, SquaredError(), gradient_batch_size=256, chunk_size=100, weight_cost=1e-3)
    batch = _sine_data()
    chunks = [Batch(batch.inputs[i:i + 100], batch.targets[i:i + 100]) for i in range(0, 256, 100)]
    theta = solver.spec.flatten(trainable_parameters(model))
    whole, chunked = solver.objective.gradient(theta, [batch]), solver.objective.gradient(theta, chunks)
    assert whole[0] == pytest.approx(chunked[0], rel=1e-12) and whole[1] == pytest.approx(chunked[1], rel=1e-12)
    assert torch.allclose(whole[2], chunked[2], rtol=1e-10, atol=1e-14)
    assert solver.objective.value(theta, chunks) == pytest.approx(solver.objective.value(theta, [batch]), rel=1e-12)


def test_chunked_draws_and_undamped_rho_run_end_to_end():
    task = LinearRegression(name="linreg", seed=0, device="cpu", dtype=torch.float64)
    model = MLP(10, 1, []).double()
    solver = HessianFree(model, task.loss, gradient_batch_size=1000, chunk_size=300, rho_model="undamped",
                         initial_damping=0.1, cg_tol=1e-10)
    stream = task.train_stream()
    losses = [solver.step(stream)["loss"] for _ in range(6)]
    stats = solver.step(stream)
    assert stats["examples_grad"] == 1000
    assert losses[-1] < 1e-2 * losses[0]


@pytest.mark.parametrize("warm_start", ["solution", "step", "none"])
def test_warm_start_choices(warm_start):
    """`solution` keeps the last CG iterate, `step` the step actually taken (none after a rejected one)."""
    torch.manual_seed(0)
    model = MLP(1, 1, [8]).double()
    solver = HessianFree(model, SquaredError(), gradient_batch_size=256, warm_start=warm_start, cg_max_iters=30)
    stream = FullBatch(_sine_data())
    before = solver.spec.flatten(trainable_parameters(model)).clone()
    first = solver.step(stream)
    taken = solver.spec.flatten(trainable_parameters(model)) - before
    assert first["cg_q_start"] == 0.0
    if warm_start == "none":
        assert solver.warm_start is None
    elif warm_start == "step":
        assert first["step_size"] > 0 and torch.allclose(solver.warm_start, taken, rtol=0, atol=1e-12)
        assert solver._next_warm_start(torch.ones_like(taken), 0.0, torch.ones_like(taken)) is None
    else:
        assert solver.warm_start is not None and solver.warm_start.norm() > 0
    second = solver.step(stream)
    assert (second["cg_q_start"] == 0.0) == (warm_start == "none")


def test_unknown_warm_start_is_rejected():
    with pytest.raises(ValueError, match="solver.warm_start"):
        HessianFree(MLP(2, 1, []), SquaredError(), gradient_batch_size=10, warm_start="previous")


class SlicingStream:
    """Hands out consecutive rows of fixed data, so the test knows which cases each chunk holds."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets, self.position = inputs, targets, 0

    def next(self, batch_size: int) -> Batch:
        rows = slice(self.position, self.position + batch_size)
        self.position += batch_size
        return Batch(self.inputs[rows], self.targets[rows])


def test_curvature_batch_spanning_several_chunks_is_their_size_weighted_mean():
    """The CG system against a dense float64 solve: G on the first 600 of 1000 cases, drawn in chunks of 300."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1000, 10, generator=generator, dtype=torch.float64)
    targets = inputs @ torch.randn(10, 1, generator=generator, dtype=torch.float64) + 0.3
    model = MLP(10, 1, []).double()
    damping, weight_cost = 0.5, 1e-3
    solver = HessianFree(model, SquaredError(), gradient_batch_size=1000, curvature_batch_size=600, chunk_size=300,
                         initial_damping=damping, weight_cost=weight_cost, cg_max_iters=100, cg_tol=0.0)
    theta = solver.spec.flatten(trainable_parameters(model)).clone()
    stats = solver.step(SlicingStream(inputs, targets))
    design = torch.cat([inputs, torch.ones(1000, 1, dtype=torch.float64)], dim=1)  # weight then bias
    residual = design @ theta[:, None] - targets
    gradient = (design.T @ residual / 1000).squeeze(1) + weight_cost * theta
    curvature = design[:600].T @ design[:600] / 600 + (damping + weight_cost) * torch.eye(11, dtype=torch.float64)
    expected = torch.linalg.solve(curvature, -gradient)
    torch.testing.assert_close(solver.warm_start, expected, rtol=1e-9, atol=1e-12)
    assert stats["examples_curv"] == 600 * stats["cg_iters"]


def test_damping_stays_bounded_and_a_stall_at_the_optimum_is_reported():
    """At the least-squares optimum no step can lower the full-batch loss: every update is rejected and λ
    grows ×1.5 each time. It stops at damping_max (unbounded it overflowed float32 after ~220 updates) and,
    after stall_updates rejected updates there, the solver reports the stall; the model is at the optimum."""
    task = LinearRegression(name="linreg", seed=0, device="cpu", dtype=torch.float32)
    model = MLP(10, 1, [])
    solver = HessianFree(model, task.loss, gradient_batch_size=2000, damping_max=1e3, stall_updates=4,
                         weight_cost=0.0)
    stream, history = task.train_stream(), []
    for _ in range(200):
        stats = solver.step(stream)
        history.append(stats)
        assert solver.damping <= 1e3
        if "stalled" in stats:
            break
    assert "stalled" in history[-1] and "damping_max=1000" in history[-1]["stalled"]
    assert [s["lambda"] for s in history[-4:]] == [1e3] * 4 and all(s["rho"] < 0.25 for s in history[-4:])
    assert not any("stalled" in s for s in history[:-1])
    optimum_loss = float(task.loss(task.train_x @ task.optimum()[0].T + task.optimum()[1], task.train_y))
    assert history[-1]["loss"] == pytest.approx(optimum_loss, rel=1e-4)


def test_a_checkpointed_damping_above_the_bound_is_brought_back():
    """last.pt of a run from before damping_max may hold λ = 4.8e37 or inf: resuming must not overflow."""
    task = LinearRegression(name="linreg", seed=0, device="cpu", dtype=torch.float32)
    solver = HessianFree(MLP(10, 1, []), task.loss, gradient_batch_size=500)
    solver.load_state_dict({"damping": math.inf, "warm_start": None})
    assert solver.damping == solver.damping_max and solver.updates_stuck_at_max == 0
    stats = solver.step(task.train_stream())
    assert math.isfinite(stats["loss"]) and stats["lambda"] <= solver.damping_max
