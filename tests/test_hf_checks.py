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
from hfrun.solvers.hf import HessianFree
from hfrun.solvers.second_order import first_decrease
from hfrun.tasks.base import Batch

CHUNK, INPUTS = 300, 40
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


def _chunks(seed: int = 0) -> list[Batch]:
    """Noisy linear regression with input scales 0.8^j: the curvature chunk's small eigenvalues, which CG
    reaches last, fit its noise, so that on another chunk a middle iterate is best."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * CHUNK, INPUTS, generator=generator, dtype=torch.float64) * 0.8 ** torch.arange(INPUTS)
    weights = torch.randn(INPUTS, 1, generator=generator, dtype=torch.float64)
    y = x @ weights + 0.3 * torch.randn(3 * CHUNK, 1, generator=generator, dtype=torch.float64)
    return [Batch(x[i * CHUNK:(i + 1) * CHUNK], y[i * CHUNK:(i + 1) * CHUNK]) for i in range(3)]


def _model(hidden: tuple[int, ...] = ()) -> MLP:
    torch.manual_seed(3)
    return MLP(INPUTS, 1, list(hidden)).double()


def _reference_update(model: MLP, chunks: list[Batch], damping: float, weight_cost: float, max_iters: int):
    """The release's update on dense matrices: (chosen iteration, new θ, new λ, ρ)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    loss = SquaredError()

    def params(flat):
        out, start = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return out

    def outputs(flat, chunk):
        return functional_call(model, params(flat), (chunk.inputs,))

    def f(flat, chunk_list):
        total = sum(c.size for c in chunk_list)
        data = sum(loss(outputs(flat, c), c.targets) * c.size / total for c in chunk_list)
        return data + 0.5 * weight_cost * flat.dot(flat)

    g = torch.autograd.functional.jacobian(lambda t: f(t, chunks), theta)
    curvature_chunk = chunks[0]
    jacobian = torch.autograd.functional.jacobian(lambda t: outputs(t, curvature_chunk).reshape(-1), theta)
    z = outputs(theta, curvature_chunk).detach().reshape(-1)
    output_hessian = torch.autograd.functional.hessian(
        lambda out: loss(out.reshape(-1, 1), curvature_chunk.targets), z)
    a = jacobian.T @ output_hessian @ jacobian + (damping + weight_cost) * torch.eye(len(theta), dtype=theta.dtype)

    x, r = torch.zeros_like(theta), -g.clone()
    p, iterates = r.clone(), {}
    for i in range(1, max_iters + 1):
        alpha = r.dot(r) / p.dot(a @ p)
        x = x + alpha * p
        r_next = r - alpha * (a @ p)
        p = r_next + (r_next.dot(r_next) / r.dot(r)) * p
        r = r_next
        iterates[i] = x.clone()

    judged = sorted(set(range(1, max_iters + 1, 10)) | {max_iters})
    values = {i: float(f(theta + iterates[i], [chunks[1]])) for i in judged}
    chosen = min(judged, key=lambda i: values[i])
    d = iterates[chosen]
    q = float(g.dot(d) + 0.5 * d.dot(a @ d))
    actual = float(f(theta + d, [chunks[0]]) - f(theta, [chunks[0]]))
    rho = actual / q if actual <= 0 else -math.inf
    new_damping = damping * 1.5 if rho < 0.25 else damping * 2 / 3 if rho > 0.75 else damping
    before = float(f(theta, [chunks[2]]))
    step = 1.0
    while not float(f(theta + step * d, [chunks[2]])) < before:
        step *= 0.8
    return chosen, theta + step * d, new_damping, rho, values


def test_release_checks_match_a_dense_reference_update():
    chunks = _chunks()
    model = _model()
    chosen, expected_theta, expected_damping, expected_rho, values = _reference_update(
        model, chunks, SETTINGS["initial_damping"], SETTINGS["weight_cost"], SETTINGS["cg_max_iters"])
    assert chosen == 11, "the problem should make backtracking choose a middle iterate"
    ranked = sorted(values.values())
    assert ranked[1] - ranked[0] > 1e-6 * abs(ranked[0]), "no near-tie among the judged iterates"

    solver = HessianFree(model, SquaredError(), **SETTINGS)
    stats = solver.step(CyclingChunks(chunks))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert stats["cg_chosen_iter"] == chosen
    assert stats["rho"] == pytest.approx(expected_rho, rel=1e-7)
    assert solver.damping == pytest.approx(expected_damping, rel=1e-12)
    torch.testing.assert_close(theta, expected_theta, rtol=1e-8, atol=1e-10)


def test_martens_checks_judge_the_same_update_differently():
    """The default walks back over ⌈5·1.3ʲ⌉ on the whole gradient batch: a different rule, so (here) another
    iterate. This keeps the reference test above from passing with the release's rule switched off."""
    chunks = _chunks()
    release = HessianFree(_model(), SquaredError(), **SETTINGS).step(CyclingChunks(chunks))
    martens = HessianFree(_model(), SquaredError(), **{**SETTINGS, "checks": "martens"}).step(CyclingChunks(chunks))
    assert martens["cg_chosen_iter"] != release["cg_chosen_iter"]


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
    curvature = one[:1]
    backtrack, rho, line_search = solver._check_batches(None, one, curvature)
    assert [c is one[0] for c in backtrack] == [True] and rho is curvature and line_search is one
    backtrack, rho, line_search = solver._check_batches(None, two, two[:1])
    assert [c is two[1] for c in backtrack] == [True] and line_search is two


@pytest.mark.parametrize("bad, message", [
    (dict(checks="sutskever"), "solver.checks must be one of"),
    (dict(backtrack_batch_size=40), "solver.backtrack_batch_size=40 asks for a separate batch"),
])
def test_release_checks_refuse_bad_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        HessianFree(_model(), SquaredError(), **{**SETTINGS, **bad})


def test_bdhf_inherits_the_release_checks():
    chunks = _chunks()
    model = _model(hidden=(8,))

    def loss() -> float:
        with torch.no_grad():
            return float(sum(SquaredError()(model(c.inputs), c.targets) for c in chunks))

    before = loss()
    solver = BlockDiagonalHF(model, SquaredError(), **SETTINGS)
    stats = [solver.step(CyclingChunks(chunks)) for _ in range(5)]
    assert all(s["cg_chosen_iter"] in (1, 11, 21, 25) for s in stats)
    assert loss() < 0.5 * before
