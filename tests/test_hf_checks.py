"""HF's `checks: release`: backtracking, ρ and the line search as Sutskever's RNN release makes them.

One update is checked against a second implementation written from the release's description with dense
float64 matrices: the Gauss-Newton matrix of the curvature chunk built from explicit Jacobians, textbook CG,
the best of the iterates 1, 11, 21, … and the last judged on the second chunk, ρ on the first, the first
decrease 0.8ᵏ on the third.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from hfrun.losses import SquaredError
from hfrun.models.mlp import MLP
from hfrun.solvers.bdhf import BlockDiagonalHF
from hfrun.solvers.cg import CGResult
from hfrun.solvers.hf import HessianFree
from hfrun.solvers.second_order import first_decrease
from hfrun.tasks.base import Batch

CHUNK, INPUTS, THIRD_SLOPE = 300, 40, 0.3
SETTINGS = dict(gradient_batch_size=3 * CHUNK, curvature_batch_size=CHUNK, chunk_size=CHUNK, cg_max_iters=25,
                cg_tol=0.0, initial_damping=1e-4, weight_cost=1e-3, checks="release")


class CyclingChunks:
    """A stream that hands out the same chunks in turn, so that a test knows which chunk plays which part."""

    def __init__(self, chunks: list[Batch]):
        self.chunks, self.drawn = chunks, 0

    def next(self, size: int) -> Batch:
        chunk = self.chunks[self.drawn % len(self.chunks)]
        assert size == chunk.size
        self.drawn += 1
        return chunk


def _chunks(seed: int = 0, third_slope: float = THIRD_SLOPE) -> list[Batch]:
    """Noisy linear regression with input scales 0.8^j: the curvature chunk's small eigenvalues, which CG
    reaches last, fit its noise, so that on another chunk a middle iterate is best. The third chunk's targets
    have a smaller slope, so that a full step overshoots there and the line search has to shorten it."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * CHUNK, INPUTS, generator=generator, dtype=torch.float64) * 0.8 ** torch.arange(INPUTS)
    weights = torch.randn(INPUTS, 1, generator=generator, dtype=torch.float64)
    slope = torch.ones(3 * CHUNK, 1, dtype=torch.float64)
    slope[2 * CHUNK:] = third_slope
    y = slope * (x @ weights) + 0.3 * torch.randn(3 * CHUNK, 1, generator=generator, dtype=torch.float64)
    return [Batch(x[i * CHUNK:(i + 1) * CHUNK], y[i * CHUNK:(i + 1) * CHUNK]) for i in range(3)]


def _model(hidden: tuple[int, ...] = ()) -> MLP:
    torch.manual_seed(3)
    return MLP(INPUTS, 1, list(hidden)).double()


def _flat(model: MLP) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _reference_updates(model: MLP, chunks: list[Batch], updates: int) -> list[dict]:
    """The release's updates written out on dense float64 matrices, from its description: each a dict of the
    chosen iteration, θ after, λ after, ρ, the step, and what other rules would have chosen."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    damping, weight_cost, max_iters = SETTINGS["initial_damping"], SETTINGS["weight_cost"], SETTINGS["cg_max_iters"]
    loss = SquaredError()

    def outputs(flat, chunk):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return functional_call(model, params, (chunk.inputs,))

    def f(flat, chunk_list):
        total = sum(c.size for c in chunk_list)
        data = sum(loss(outputs(flat, c), c.targets) * c.size / total for c in chunk_list)
        return float(data + 0.5 * weight_cost * flat.dot(flat))

    theta, warm, records = _flat(model), None, []
    for _ in range(updates):
        g = torch.autograd.functional.jacobian(lambda t: torch.tensor(0.0, dtype=t.dtype) + sum(
            loss(outputs(t, c), c.targets) * c.size / (3 * CHUNK) for c in chunks) + 0.5 * weight_cost * t.dot(t),
            theta)
        jacobian = torch.autograd.functional.jacobian(lambda t: outputs(t, chunks[0]).reshape(-1), theta)
        a = jacobian.T @ jacobian / CHUNK + (damping + weight_cost) * torch.eye(len(theta), dtype=theta.dtype)

        x = torch.zeros_like(theta) if warm is None else warm.clone()
        r = -g - a @ x
        p, iterates = r.clone(), {}
        for i in range(1, max_iters + 1):  # textbook CG; it runs to the cap (cg_tol = 0)
            alpha = r.dot(r) / p.dot(a @ p)
            x = x + alpha * p
            r_next = r - alpha * (a @ p)
            p = r_next + (r_next.dot(r_next) / r.dot(r)) * p
            r = r_next
            iterates[i] = x.clone()
        judged = [i for i in iterates if (i - 1) % 10 == 0]  # the release's check at 0-based i % 10 == 0

        def best(chunk_list):
            return min(judged, key=lambda i: f(theta + iterates[i], chunk_list))

        chosen = best([chunks[1]])
        walk_back = judged[-1]
        for i in reversed(judged[:-1]):
            if not f(theta + iterates[i], chunks) < f(theta + iterates[walk_back], chunks):
                break
            walk_back = i
        d = iterates[chosen]
        q = float(g.dot(d) + 0.5 * d.dot(a @ d))
        actual = f(theta + d, [chunks[0]]) - f(theta, [chunks[0]])
        rho = actual / q if actual <= 0 else -math.inf
        damping = damping * 1.5 if rho < 0.25 else damping * 2 / 3 if rho > 0.75 else damping
        before = f(theta, [chunks[2]])
        step = next((0.8 ** k for k in range(50) if f(theta + 0.8 ** k * d, [chunks[2]]) < before), 0.0)
        armijo = next((0.8 ** k for k in range(61) if f(theta + 0.8 ** k * d, [chunks[2]])
                       <= before + 1e-2 * 0.8 ** k * float(g.dot(d))), 0.0)
        theta = theta + step * d
        warm = 0.95 * iterates[max_iters] if step > 0 else None
        records.append(dict(chosen=chosen, theta=theta, damping=damping, rho=rho, step=step,
                            on_curvature_chunk=best([chunks[0]]), on_all=best(chunks), walk_back=walk_back,
                            armijo=armijo, gap=sorted(f(theta - step * d + iterates[i], [chunks[1]])
                                                      for i in judged)))
    return records


def test_release_checks_match_a_dense_reference_over_three_updates():
    chunks = _chunks(seed=1)
    expected = _reference_updates(_model(), chunks, updates=3)
    for record in expected:  # the judged values are far enough apart for rounding not to change the choice
        assert record["gap"][1] - record["gap"][0] > 1e-6 * abs(record["gap"][0]), record["gap"]
    # The problem tells the release's rules from their neighbours: another batch or Martens' walk-back would
    # choose another iterate, and Armijo another step, in at least one of the updates.
    assert any(r["chosen"] != r["on_curvature_chunk"] for r in expected)
    assert any(r["chosen"] != r["on_all"] for r in expected)
    assert any(r["step"] != r["armijo"] for r in expected)
    assert any(0 < r["step"] < 1 for r in expected)
    assert any(r["step"] == 0 for r in expected[:-1])  # the next CG then starts from zero

    model = _model()
    solver = HessianFree(model, SquaredError(), **SETTINGS)
    stream, warm_started = CyclingChunks(chunks), False
    for record in expected:
        stats = solver.step(stream)
        assert stats["cg_chosen_iter"] == record["chosen"]
        assert stats["step_size"] == pytest.approx(record["step"], rel=1e-12)
        assert stats["rho"] == pytest.approx(record["rho"], rel=1e-4)  # q(d) is small: rounding shows
        assert solver.damping == pytest.approx(record["damping"], rel=1e-12)
        torch.testing.assert_close(_flat(model), record["theta"], rtol=1e-6, atol=1e-8)  # CG rounding
        # CG's 25 products, one for its warm start's residual, and one for ρ's q(d)
        assert stats["examples_curv"] == CHUNK * (SETTINGS["cg_max_iters"] + warm_started + 1)
        warm_started = record["step"] > 0


def test_martens_checks_judge_the_same_updates_differently():
    """The default (walk back over ⌈5·1.3ʲ⌉ on the whole gradient batch, Armijo) takes other steps here."""
    chunks = _chunks(seed=1)
    release, martens = _model(), _model()
    release_solver = HessianFree(release, SquaredError(), **SETTINGS)
    martens_solver = HessianFree(martens, SquaredError(), **{**SETTINGS, "checks": "martens"})
    release_chosen = [release_solver.step(CyclingChunks(chunks))["cg_chosen_iter"] for _ in range(3)]
    martens_chosen = [martens_solver.step(CyclingChunks(chunks))["cg_chosen_iter"] for _ in range(3)]
    assert release_chosen != martens_chosen
    assert not torch.allclose(_flat(release), _flat(martens))


def _cg_result(iterations: int, stop_reason: str) -> CGResult:
    saved = sorted({i for i in range(1, iterations + 1) if (i - 1) % 10 == 0} | {iterations})
    return CGResult(solution=torch.zeros(1), iterations=iterations, stop_reason=stop_reason,
                    iterates=[(i, torch.full((1,), float(i))) for i in saved])


@pytest.mark.parametrize("iterations, stop_reason, judged", [
    (25, "max_iters", [1, 11, 21]),        # a capped run's last iterate is not judged (the release: 299 % 10 != 0)
    (17, "progress", [1, 11, 17]),         # a run that stopped early is judged where it stopped
    (25, "progress", [1, 11, 21, 25]),     # the progress test fired at the cap itself
    (21, "max_iters", [1, 11, 21]),        # a cap on the schedule
    (0, "converged", [0]),                 # no step at all: its start
])
def test_release_checks_judge_the_release_schedule(iterations, stop_reason, judged):
    solver = HessianFree(_model(), SquaredError(), **{**SETTINGS, "cg_max_iters": max(iterations, 21)})
    if iterations == 25:
        solver.cg_max_iters = 25
    assert [i for i, _ in solver._judged_iterates(_cg_result(iterations, stop_reason))] == judged


class ObjectiveByIterate:
    """A stand-in objective whose value at θ + d is looked up by d's first entry (the iteration)."""

    def __init__(self, values: dict[int, float]):
        self.values = values

    def value(self, theta: torch.Tensor, batch) -> float:
        return self.values[int(round(float(theta[0])))]


def test_release_backtracking_keeps_the_best_where_martens_stops_at_the_first_rise():
    values = {1: 0.5, 11: 0.2, 21: 0.3, 25: 0.25, 0: 1.0}
    iterates = [(i, torch.full((1,), float(i))) for i in (1, 11, 21, 25)]
    for checks, expected in (("release", 11), ("martens", 25)):
        solver = HessianFree(_model(), SquaredError(), **{**SETTINGS, "checks": checks})
        solver.objective = ObjectiveByIterate(values)
        chosen, _, value = solver._backtrack(torch.zeros(1), iterates, batch=None)
        assert (chosen, value) == (expected, values[expected])
    solver.checks = "release"
    values.update({11: math.nan, 21: math.inf})  # never chosen over a finite value
    assert solver._backtrack(torch.zeros(1), iterates, batch=None)[0] == 25


def test_first_decrease_takes_the_first_power_of_the_shrink_that_lowers_f():
    calls = []

    def value_at(rate):
        calls.append(rate)
        return (rate - 0.2) ** 2  # below f(θ) = 0.04 exactly for 0 < α < 0.4

    rate, value = first_decrease(value_at, 0.04, shrink=0.8, max_tries=49)
    assert rate == pytest.approx(0.8 ** 5) and value == pytest.approx((0.8 ** 5 - 0.2) ** 2)
    assert calls == pytest.approx([0.8 ** k for k in range(6)])


def test_first_decrease_rejects_when_nothing_lowers_f_and_skips_nan():
    calls = []

    def value_at(rate):
        calls.append(rate)
        return math.nan if rate > 0.5 else 1.0 + rate

    assert first_decrease(value_at, 1.0, shrink=0.8, max_tries=49) == (0.0, 1.0)
    assert len(calls) == 50  # α = 0.8⁰ … 0.8⁴⁹, as the release tries
    assert first_decrease(lambda rate: math.nan if rate > 0.7 else 0.0, 1.0, shrink=0.8, max_tries=3) == (
        pytest.approx(0.64), 0.0)


def test_release_checks_restart_cg_from_zero_after_a_rejected_step():
    solver = HessianFree(_model(), SquaredError(), **SETTINGS)
    solution, direction = torch.ones(3), torch.full((3,), 0.5)
    assert solver._next_warm_start(solution, 0.0, direction) is None
    assert torch.equal(solver._next_warm_start(solution, 0.64, direction), solution)
    martens = HessianFree(_model(), SquaredError(), **{**SETTINGS, "checks": "martens"})
    assert torch.equal(martens._next_warm_start(solution, 0.0, direction), solution)


def test_release_checks_fall_back_like_the_release_with_fewer_chunks():
    """One chunk: everything on it; two: backtracking on the second, the line search on both."""
    solver = HessianFree(_model(), SquaredError(), **SETTINGS)
    one, two = _chunks()[:1], _chunks()[:2]
    backtrack, _, line_search = solver._check_batches(None, one, one[:1])
    assert [c is one[0] for c in backtrack] == [True] and line_search is one
    backtrack, rho, line_search = solver._check_batches(None, two, two[:1])
    assert [c is two[1] for c in backtrack] == [True] and line_search is two


@pytest.mark.parametrize("bad, message", [
    (dict(checks="sutskever"), "solver.checks must be one of"),
    (dict(backtrack_batch_size=40), "solver.backtrack_batch_size=40 asks for a separate batch"),
    (dict(rho_model="undamped"), "solver.rho_model=undamped asks for Martens' undamped one"),
])
def test_release_checks_refuse_bad_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        HessianFree(_model(), SquaredError(), **{**SETTINGS, **bad})


@pytest.mark.parametrize("block_damping", ["shared", "per_block"])
def test_bdhf_inherits_the_release_checks(block_damping):
    chunks = _chunks()
    model = _model(hidden=(8,))

    def loss() -> float:
        with torch.no_grad():
            return float(sum(SquaredError()(model(c.inputs), c.targets) for c in chunks))

    before = loss()
    solver = BlockDiagonalHF(model, SquaredError(), cut_products=True, block_damping=block_damping, **SETTINGS)
    stats = [solver.step(CyclingChunks(chunks)) for _ in range(5)]
    assert all(s["cg_chosen_iter"] in (1, 11, 21) for s in stats)  # the blocks ran to the cap of 25
    assert loss() < 0.5 * before
