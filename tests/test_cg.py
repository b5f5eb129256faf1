"""Linear CG against torch.linalg.solve, closed forms and the quadratic evaluated densely."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import Tensor

from hfrun.curvature import martens_preconditioner
from hfrun.solvers.cg import conjugate_gradient, saved_iterations

DTYPE = torch.float64


def random_spd(n: int, condition: float, generator: torch.Generator) -> Tensor:
    """Q diag(eigenvalues) Qᵀ with eigenvalues spread log-uniformly over [1, condition]."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DTYPE, generator=generator))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=DTYPE)
    return q @ torch.diag(eigenvalues) @ q.T


def quadratic(A: Tensor, g: Tensor, x: Tensor) -> float:
    """q(x) = gᵀx + ½xᵀAx, evaluated densely."""
    return float(g @ x + 0.5 * x @ A @ x)


def expected_saved_indices(last: int) -> list[int]:
    """⌈5·1.3ʲ⌉ ≤ last, then `last` itself, in exact rational arithmetic."""
    indices, j = [], 0
    while (i := math.ceil(5 * Fraction(13, 10) ** j)) <= last:
        indices.append(i)
        j += 1
    return indices if indices and indices[-1] == last else [*indices, last]


def first_iteration_within(q_values: list[float], optimum: float, relative: float) -> int:
    return next(i for i, q in enumerate(q_values) if q - optimum <= relative * abs(optimum))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_saved_iterations_are_ceil_of_5_times_1_3_to_the_j():
    assert saved_iterations(60) == [5, 7, 9, 11, 15, 19, 25, 32, 41, 54]
    assert saved_iterations(250) == expected_saved_indices(250)[:-1]


@pytest.mark.parametrize("condition", [10.0, 1e4])
def test_solves_spd_systems_like_linalg_solve(generator, condition):
    A = random_spd(30, condition, generator)
    g = torch.randn(30, dtype=DTYPE, generator=generator)
    result = conjugate_gradient(lambda v: A @ v, g, max_iters=300, tol=0.0)
    expected = torch.linalg.solve(A, -g)
    torch.testing.assert_close(result.solution, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())
    assert result.stop_reason in ("converged", "max_iters")


def test_q_values_are_the_quadratic_and_decrease(generator):
    A = random_spd(40, 100.0, generator)
    g = torch.randn(40, dtype=DTYPE, generator=generator)
    result = conjugate_gradient(lambda v: A @ v, g, max_iters=25, tol=0.0)
    assert result.iterations == 25 and result.stop_reason == "max_iters"
    assert len(result.q_values) == 26 and result.q_values[0] == 0.0
    for i, x in result.iterates:
        assert result.q_values[i] == pytest.approx(quadratic(A, g, x), rel=1e-10)
    assert all(later < earlier for earlier, later in zip(result.q_values, result.q_values[1:]))


def test_warm_start_and_preconditioner_still_solve(generator):
    A = random_spd(30, 1e3, generator)
    g = torch.randn(30, dtype=DTYPE, generator=generator)
    expected = torch.linalg.solve(A, -g)
    x0 = 0.95 * expected + 0.01 * torch.randn(30, dtype=DTYPE, generator=generator)
    preconditioner = torch.rand(30, dtype=DTYPE, generator=generator) + 0.5
    result = conjugate_gradient(lambda v: A @ v, g, x0=x0, max_iters=300, tol=0.0, preconditioner=preconditioner)
    assert result.q_values[0] == pytest.approx(quadratic(A, g, x0), rel=1e-12)
    torch.testing.assert_close(result.solution, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())


@pytest.mark.parametrize("uphill", [True, False])
def test_restart_uphill_drops_only_a_warm_start_worse_than_zero(generator, uphill):
    A = random_spd(30, 1e3, generator)
    g = torch.randn(30, dtype=DTYPE, generator=generator)
    expected = torch.linalg.solve(A, -g)
    x0 = -3.0 * expected if uphill else 0.5 * expected  # q(-3x*) = 7.5·|q(x*)| > 0; q(x*/2) = 0.75·q(x*) < 0
    result = conjugate_gradient(lambda v: A @ v, g, x0=x0, max_iters=300, tol=0.0, restart_uphill=True)
    assert result.q_warm_start == pytest.approx(quadratic(A, g, x0), rel=1e-12)
    assert result.restarted == uphill
    assert result.q_values[0] == (0.0 if uphill else pytest.approx(quadratic(A, g, x0), rel=1e-12))
    first_saved_iterate = dict(result.iterates)[5]
    fresh = conjugate_gradient(lambda v: A @ v, g, max_iters=5, tol=0.0)
    if uphill:  # the same iterates as a cold start
        torch.testing.assert_close(first_saved_iterate, fresh.solution, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(result.solution, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())


def test_relative_progress_rule_stops_early_and_saves_the_scheduled_iterates(generator):
    A = random_spd(300, 1e3, generator)
    g = torch.randn(300, dtype=DTYPE, generator=generator)
    tol = 5e-4
    result = conjugate_gradient(lambda v: A @ v, g, max_iters=250, tol=tol)
    assert result.stop_reason == "progress"
    assert 10 < result.iterations < 250

    def progress_test_passes(i: int) -> bool:  # Martens 2010, written out again
        k = max(10, math.ceil(0.1 * i))
        phi = result.q_values
        return i > k and phi[i] < 0 and (phi[i] - phi[i - k]) / phi[i] < k * tol

    assert progress_test_passes(result.iterations)
    assert not any(progress_test_passes(i) for i in range(1, result.iterations))
    assert [i for i, _ in result.iterates] == expected_saved_indices(result.iterations)
    assert result.iterates[-1][1] is not result.solution  # saved copies, not the live vector
    torch.testing.assert_close(result.iterates[-1][1], result.solution, rtol=0, atol=0)
    for i, x in result.iterates:
        assert result.q_values[i] == pytest.approx(quadratic(A, g, x), rel=1e-9)


def test_save_iterates_off_keeps_none():
    A = torch.eye(3, dtype=DTYPE) * torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)
    result = conjugate_gradient(lambda v: A @ v, torch.ones(3, dtype=DTYPE), tol=0.0, save_iterates=False)
    assert result.iterates == []


def test_negative_curvature_keeps_the_last_good_iterate():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=DTYPE))
    g = torch.tensor([1.0, 0.1], dtype=DTYPE)
    result = conjugate_gradient(lambda v: A @ v, g, tol=0.0)
    # By hand: p₀ = −g has p₀ᵀAp₀ = 0.99 > 0, so x₁ = −(gᵀg / gᵀAg)·g; then p₁ᵀAp₁ < 0.
    x1 = -(g @ g) / (g @ A @ g) * g
    assert result.stop_reason == "negative_curvature"
    assert result.iterations == 1
    torch.testing.assert_close(result.solution, x1)
    assert len(result.q_values) == 2 and [i for i, _ in result.iterates] == [1]


def test_negative_curvature_at_the_first_step_returns_the_start():
    A = -torch.eye(4, dtype=DTYPE)
    x0 = torch.full((4,), 0.5, dtype=DTYPE)
    result = conjugate_gradient(lambda v: A @ v, torch.ones(4, dtype=DTYPE), x0=x0)
    assert (result.stop_reason, result.iterations) == ("negative_curvature", 0)
    torch.testing.assert_close(result.solution, x0, rtol=0, atol=0)
    assert result.solution is not x0


def test_exact_solution_stops_as_converged():
    g = torch.tensor([1.0, -2.0, 3.0], dtype=DTYPE)
    result = conjugate_gradient(lambda v: 2 * v, g, tol=0.0)
    assert (result.stop_reason, result.iterations) == ("converged", 1)
    torch.testing.assert_close(result.solution, -g / 2)


def test_zero_gradient_returns_zero_without_products():
    def no_products(v):
        raise AssertionError("mv must not be called")

    result = conjugate_gradient(no_products, torch.zeros(5, dtype=DTYPE))
    assert (result.stop_reason, result.iterations) == ("converged", 0)
    assert torch.count_nonzero(result.solution) == 0
    assert [i for i, _ in result.iterates] == [0]


def test_non_finite_curvature_fails_loudly():
    with pytest.raises(FloatingPointError, match="pᵀAp = nan"):
        conjugate_gradient(lambda v: v * float("nan"), torch.ones(3, dtype=DTYPE))


def test_martens_preconditioner_cuts_iterations_on_an_ill_conditioned_problem(generator):
    """A = D^½(I + S)D^½ with D spanning five decades and a small symmetric coupling S."""
    n = 100
    scales = torch.logspace(-2, 3, n, dtype=DTYPE)[torch.randperm(n, generator=generator)]
    coupling = torch.randn(n, n, dtype=DTYPE, generator=generator)
    coupling = 0.3 * (coupling + coupling.T) / torch.linalg.matrix_norm(coupling + coupling.T, ord=2)
    A = scales.sqrt()[:, None] * (torch.eye(n, dtype=DTYPE) + coupling) * scales.sqrt()[None, :]
    g = torch.randn(n, dtype=DTYPE, generator=generator)
    optimum = quadratic(A, g, torch.linalg.solve(A, -g))
    damping = 1e-2
    # diag(A) plays the part of Σ gᵢ², as the curvature's diagonal that the preconditioner tracks.
    preconditioner = martens_preconditioner(torch.diagonal(A) - damping, damping)

    plain = conjugate_gradient(lambda v: A @ v, g, max_iters=1000, tol=0.0)
    preconditioned = conjugate_gradient(lambda v: A @ v, g, max_iters=1000, tol=0.0, preconditioner=preconditioner)
    plain_iterations = first_iteration_within(plain.q_values, optimum, 1e-8)
    preconditioned_iterations = first_iteration_within(preconditioned.q_values, optimum, 1e-8)
    assert preconditioned_iterations < 0.5 * plain_iterations


def test_residual_rule_stops_at_the_first_iterate_with_max_abs_residual_below_tol():
    """SGN's release rule: stop once max|r| ≤ tol; the residual is checked by hand at every length."""
    generator = torch.Generator().manual_seed(4)
    A = random_spd(30, 1e3, generator)
    g = torch.randn(30, dtype=DTYPE, generator=generator)
    full = [conjugate_gradient(lambda v: A @ v, g, max_iters=k, tol=0.0, save_iterates=False) for k in range(1, 31)]
    residuals = [float((A @ result.solution + g).abs().max()) for result in full]
    tol = sorted(residuals)[len(residuals) // 2]  # a tolerance that some iterate meets
    expected = 1 + next(k for k, value in enumerate(residuals) if value <= tol)
    result = conjugate_gradient(lambda v: A @ v, g, max_iters=30, tol=0.0, save_iterates=False, residual_tol=tol)
    assert result.iterations == expected and result.stop_reason == "converged"
    assert torch.equal(result.solution, full[expected - 1].solution)
