"""SGN (Gargiani et al. 2020) as its release codes it: CG against a dense solve, one-update least squares,
the damping rule and schedules, the fixed-threshold never-rejecting line search, momentum, resume."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from hfrun.losses import SoftmaxCrossEntropy, SquaredError
from hfrun.models.mlp import MLP
from hfrun.solvers.second_order import LevenbergMarquardt, armijo
from hfrun.solvers.sgn import SGN, scheduled_damping
from hfrun.tasks.base import Batch, DatasetStream, make_generator
from hfrun.tasks.regression import LinearRegression
from test_hf import FullBatch, _linear_params


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def classification_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = MLP(4, 3, hidden_sizes=[5], activation="sigmoid").double()
    batch = Batch(torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,)))
    return model, SoftmaxCrossEntropy(), batch


def dense_ggn_and_gradient(model, loss, batch):
    """G = Jᵀ H_L J and g, both from torch.autograd.functional on a flat parameter vector."""
    theta = flat(model)
    shapes = [p.shape for p in model.parameters()]

    def outputs(t):
        params, start = {}, 0
        for (name, _), shape in zip(model.named_parameters(), shapes):
            params[name] = t[start:start + shape.numel()].view(shape)
            start += shape.numel()
        return torch.func.functional_call(model, params, (batch.inputs,))

    z = outputs(theta)
    J = jacobian(lambda t: outputs(t).reshape(-1), theta)
    H = hessian(lambda flat_z: loss(flat_z.view(z.shape), batch.targets), z.detach().reshape(-1))
    g = torch.autograd.functional.jacobian(lambda t: loss(outputs(t), batch.targets), theta)
    return J.T @ H @ J, g


def test_cg_direction_matches_a_dense_solve_of_the_damped_ggn():
    model, loss, batch = classification_problem()
    G, g = dense_ggn_and_gradient(model, loss, batch)
    rho = 1e-2
    expected = torch.linalg.solve(G + rho * torch.eye(len(g), dtype=torch.float64), -g)
    theta = flat(model)
    solver = SGN(model, loss, batch_size=40, initial_damping=rho, cg_max_iters=500, cg_warmup_updates=0,
                 cg_tol=1e-13, trust_region=False, line_search=False)
    solver.step(FullBatch(batch))
    direction = flat(model) - theta  # step size 1, no line search: θ moved by exactly d
    torch.testing.assert_close(direction, expected, rtol=1e-7, atol=1e-9)


def test_linear_least_squares_reaches_the_optimum_in_one_update():
    torch.manual_seed(0)
    task = LinearRegression(name="linreg", seed=0, device="cpu", dtype=torch.float64)
    model = MLP(10, 1, []).double()
    solver = SGN(model, task.loss, batch_size=2000, initial_damping=1e-12, damping_min=0.0, cg_max_iters=50,
                 cg_warmup_updates=0, cg_tol=1e-12)
    stats = solver.step(FullBatch(Batch(task._on_device(task.train_x), task._on_device(task.train_y))))
    weight, bias = task.optimum()
    optimum = torch.cat([weight.reshape(-1), bias])
    assert torch.linalg.norm(_linear_params(model) - optimum) / torch.linalg.norm(optimum) < 1e-8
    assert stats["step_size"] == 1.0 and stats["cg_iters"] <= 11  # 11 unknowns: CG is exact in 11 steps


def test_damping_rule_and_its_floor():
    controller = LevenbergMarquardt(1e-4, minimum=1e-6)
    controller.update(0.1)
    assert controller.damping == pytest.approx(1.5e-4)
    controller.update(0.5)
    assert controller.damping == pytest.approx(1.5e-4)  # between 1/4 and 3/4: unchanged
    for _ in range(40):
        controller.update(0.9)
    assert controller.damping == 1e-6  # ×2/3 each time, floored on the decrease
    controller.update(math.nan)
    assert controller.damping == 1e-6  # the release's unguarded ratio: NaN changes nothing
    controller.update(0.0)
    assert controller.damping == pytest.approx(1.5e-6)  # the floor is not applied on an increase


def test_damping_schedules_without_the_trust_region():
    assert scheduled_damping("const", 1e-2, 1e-4, 7, 10) == 1e-2
    assert scheduled_damping("linear", 1e-2, 1e-4, 1, 10) == pytest.approx(1e-2)
    assert scheduled_damping("linear", 1e-2, 1e-4, 10, 10) == pytest.approx(1e-4)
    assert scheduled_damping("linear", 1e-2, 1e-4, 5, 10) == pytest.approx(1e-2 + 4 * (1e-4 - 1e-2) / 9)
    assert scheduled_damping("cos", 1e-2, 1e-4, 5, 10) == pytest.approx(1e-2 * math.cos(math.pi / 4))
    assert scheduled_damping("cos", 1e-2, 1e-4, 11, 10) == 1e-4
    model, loss, batch = classification_problem()
    solver = SGN(model, loss, batch_size=40, trust_region=False, damping_schedule="linear", initial_damping=1e-2,
                 damping_min=1e-4, damping_schedule_updates=3)
    assert [solver.step(FullBatch(batch))["lambda"] for _ in range(4)] == pytest.approx([1e-2, 5.05e-3, 1e-4, 1e-4])


def test_line_search_threshold_is_fixed_at_the_first_step_and_never_rejects():
    before, slope, c = 1.0, -1.0, 0.1
    on_scaled_threshold = lambda rate: before + c * rate * slope  # passes c·α·slope, fails c·α₀·slope  # noqa: E731
    rate, _ = armijo(on_scaled_threshold, before, slope, before, c=c, shrink=0.5, max_tries=10)
    assert rate == 0.5  # HF's rule: the threshold shrinks with α
    rate, value = armijo(on_scaled_threshold, before, slope, before, c=c, shrink=0.5, max_tries=10,
                         fixed_threshold=True, reject=False)
    assert rate == 2.0 ** -10 and value == on_scaled_threshold(2.0 ** -10)  # never passes; the last α is kept
    rate, value = armijo(on_scaled_threshold, before, slope, before, c=c, shrink=0.5, max_tries=10,
                         fixed_threshold=True, reject=True)
    assert (rate, value) == (0.0, before)  # the rejecting option keeps θ


def test_reject_uphill_keeps_the_parameters_when_no_step_decreases_the_loss(monkeypatch):
    model, loss, batch = classification_problem()
    solver = SGN(model, loss, batch_size=40, reject_uphill=True)
    monkeypatch.setattr(solver.objective, "value", lambda theta, batches: 1e9)  # every trial step goes uphill
    before = flat(model)
    stats = solver.step(FullBatch(batch))
    assert stats["step_size"] == 0.0 and torch.equal(flat(model), before)
    released = SGN(model, loss, batch_size=40)
    monkeypatch.setattr(released.objective, "value", lambda theta, batches: 1e9)
    assert released.step(FullBatch(batch))["step_size"] == 2.0 ** -10  # as released: kept after 10 halvings


def test_momentum_bias_correction():
    model, loss, _ = classification_problem()
    solver = SGN(model, loss, batch_size=40, momentum=0.9)
    g1, g2 = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    solver.updates = 1
    torch.testing.assert_close(solver._momentum(g1), g1)  # m = 0.1·g1, /(1 − 0.9) = g1
    solver.updates = 2
    torch.testing.assert_close(solver._momentum(g2), (0.9 * 0.1 * g1 + 0.1 * g2) / (1 - 0.81))


def test_warm_up_cg_steps_then_the_configured_cap():
    model, loss, batch = classification_problem()
    solver = SGN(model, loss, batch_size=40, cg_max_iters=3, cg_warmup_iters=10, cg_warmup_updates=9, cg_tol=0.0)
    iterations = [solver.step(FullBatch(batch))["cg_iters"] for _ in range(11)]
    assert iterations == [10] * 9 + [3, 3]


def stream_of(batch_cases: int = 200, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(batch_cases, 4, dtype=torch.float64)
    y = (x[:, :1] * x[:, 1:2]).sin()
    return DatasetStream(x, y, make_generator(seed, torch.device("cpu")))


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(1)
    model = MLP(4, 1, hidden_sizes=[6], activation="sigmoid").double()
    solver = SGN(model, SquaredError(1.0), batch_size=50, momentum=0.5, cg_max_iters=4)
    stream = stream_of()
    for _ in range(3):
        solver.step(stream)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(solver.state_dict()), copy.deepcopy(stream.state_dict()))
    straight = [solver.step(stream)["loss"] for _ in range(4)]
    expected = flat(model)

    resumed_model = MLP(4, 1, hidden_sizes=[6], activation="sigmoid").double()
    resumed_model.load_state_dict(saved[0])
    resumed = SGN(resumed_model, SquaredError(1.0), batch_size=50, momentum=0.5, cg_max_iters=4)
    resumed.load_state_dict(saved[1])
    resumed_stream = stream_of()
    resumed_stream.load_state_dict(saved[2])
    assert [resumed.step(resumed_stream)["loss"] for _ in range(4)] == straight
    assert torch.equal(flat(resumed_model), expected)
    assert resumed.damping == solver.damping and resumed.updates == 7


def test_sgn_fits_a_nonlinear_regression():
    torch.manual_seed(0)
    model = MLP(1, 1, hidden_sizes=[20, 20, 20], activation="sigmoid", init="normal").double()
    x = torch.rand(1000, 1, dtype=torch.float64) * 2 - 1
    stream = DatasetStream(x, torch.sin(3 * x), make_generator(0, torch.device("cpu")))
    solver = SGN(model, SquaredError(1.0), batch_size=250, cg_max_iters=20)
    first = solver.step(stream)["loss"]
    for _ in range(150):
        last = solver.step(stream)["loss"]
    assert last < 1e-3 * first, (first, last)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(damping_schedule="exp"), "solver.damping_schedule"), (dict(preconditioner="martens"), "solver.preconditioner"),
    (dict(momentum=1.0), "solver.momentum"), (dict(cg_max_iters=0), "solver.cg_max_iters"),
    (dict(initial_damping=1e-8, damping_min=1e-6), "solver.damping_min"), (dict(step_size=0), "solver.step_size"),
])
def test_bad_settings_are_rejected(kwargs, fragment):
    model, loss, _ = classification_problem()
    with pytest.raises(ValueError, match=fragment):
        SGN(model, loss, batch_size=10, **kwargs)


def test_a_rejecting_line_search_still_judges_the_last_step_it_tries():
    before, slope, c = 1.0, -1.0, 0.1
    passes_only_when_small = lambda rate: before - 1.0 if rate < 0.2 else before + 1.0  # noqa: E731
    rate, value = armijo(passes_only_when_small, before, slope, before + 1.0, c=c, shrink=0.5, max_tries=3)
    assert (rate, value) == (0.125, before - 1.0)  # found by the third halving, the last one tried
