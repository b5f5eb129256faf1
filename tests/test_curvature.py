"""Curvature-vector products against dense float64 matrices built without hfrun.curvature.

References: full Jacobians by torch.autograd.functional.jacobian over a flat
parameter vector, loss Hessians by torch.autograd.functional.hessian, and the
RNN's pre-activations by a hand-written recurrence.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call, jvp

from hfrun import curvature
from hfrun.curvature import JV_METHODS, CurvatureOperator, ParamSpec, martens_preconditioner, per_case_gradient_squares
from hfrun.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy, SquaredError
from hfrun.models.rnn import RNN
from hfrun.tasks.base import Batch

# Every method but "compiled", whose inductor compilation takes tens of seconds per model (tests/test_traced.py
# checks it once).
FAST_JV_METHODS = tuple(method for method in JV_METHODS if method != "compiled")

LOSSES = {"mse": SquaredError(), "softmax_ce": SoftmaxCrossEntropy(), "sigmoid_ce": SigmoidCrossEntropy()}
CASES, STEPS, INPUTS, HIDDEN, OUTPUTS = 3, 5, 3, 4, 2


class TinyRNN(nn.Module):
    """tanh RNN with a readout at every step, exposing its hidden pre-activations."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(INPUTS, HIDDEN, batch_first=True)
        self.readout = nn.Linear(HIDDEN, OUTPUTS)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.rnn(x)[0])

    def forward_with_preactivations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.rnn(x)[0]
        previous = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
        rnn = self.rnn
        a = x @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + previous @ rnn.weight_hh_l0.T + rnn.bias_hh_l0
        return self.readout(hidden), a


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(INPUTS, HIDDEN, batch_first=True)
        self.readout = nn.Linear(HIDDEN, OUTPUTS)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.lstm(x)[0][:, -1])


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(INPUTS, 5), nn.Tanh(), nn.Linear(5, OUTPUTS))


def targets_for(loss_name: str, shape: tuple[int, ...]) -> Tensor:
    if loss_name == "mse":
        return torch.randn(shape, dtype=torch.float64)
    if loss_name == "softmax_ce":
        return torch.randint(0, shape[-1], shape[:-1])
    return torch.rand(shape, dtype=torch.float64)


def mlp_problem(loss_name: str) -> tuple[nn.Module, Batch]:
    model = tiny_mlp().double()
    inputs = torch.randn(CASES + 1, INPUTS, dtype=torch.float64)
    return model, Batch(inputs, targets_for(loss_name, (CASES + 1, OUTPUTS)))


def analytic_rnn_problem(loss_name: str) -> tuple[nn.Module, Batch]:
    """hfrun's RNN on the recurrence with hand-written derivatives, non-zero biases, the masked batch."""
    model, batch = rnn_problem(loss_name, model_class=lambda: RNN(INPUTS, OUTPUTS, hidden_size=HIDDEN, impl="analytic"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model, batch


def rnn_problem(loss_name: str, model_class=TinyRNN) -> tuple[nn.Module, Batch]:
    """A sequence batch whose (B, T) mask scores some positions only."""
    model = model_class().double()
    inputs = torch.randn(CASES, STEPS, INPUTS, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 0, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.float64)
    return model, Batch(inputs, targets_for(loss_name, (CASES, STEPS, OUTPUTS)), mask)


# ---------------------------------------------------------------- dense references


def flat_parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def parameter_dict(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    params, offset = {}, 0
    for name, p in model.named_parameters():
        params[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return params


def outputs_at(model: nn.Module, flat: Tensor, x: Tensor) -> Tensor:
    return functional_call(model, parameter_dict(model, flat), (x,))


def rnn_by_hand(model: TinyRNN, flat: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(z, a) of TinyRNN (or hfrun's RNN: same parameter names) from its recurrence a_t = W_ih x_t + b_ih + W_hh h_{t−1} + b_hh, h_t = tanh(a_t)."""
    p = parameter_dict(model, flat)
    hidden, outputs, preactivations = x.new_zeros(x.shape[0], HIDDEN), [], []
    for step in range(x.shape[1]):
        a = x[:, step] @ p["rnn.weight_ih_l0"].T + p["rnn.bias_ih_l0"] + hidden @ p["rnn.weight_hh_l0"].T + p["rnn.bias_hh_l0"]
        hidden = torch.tanh(a)
        preactivations.append(a)
        outputs.append(hidden @ p["readout.weight"].T + p["readout.bias"])
    return torch.stack(outputs, 1), torch.stack(preactivations, 1)


def dense_ggn(model: nn.Module, loss, batch: Batch) -> Tensor:
    """Jᵀ H_L J with J the full Jacobian of the outputs and H_L the Hessian of the loss in the outputs."""
    theta = flat_parameters(model)
    z = outputs_at(model, theta, batch.inputs)
    J = jacobian(lambda t: outputs_at(model, t, batch.inputs).reshape(-1), theta)
    H_L = hessian(lambda flat_z: loss(flat_z.view(z.shape), batch.targets, batch.mask), z.detach().reshape(-1))
    return J.T @ H_L @ J


def dense_hessian(model: nn.Module, loss, batch: Batch) -> Tensor:
    return hessian(lambda t: loss(outputs_at(model, t, batch.inputs), batch.targets, batch.mask),
                   flat_parameters(model))


def dense_structural_ggn(model: TinyRNN, batch: Batch) -> Tensor:
    """J_aᵀ diag(1 − tanh(a)²)/B J_a for the hidden pre-activations a."""
    theta = flat_parameters(model)
    a = rnn_by_hand(model, theta, batch.inputs)[1]
    J_a = jacobian(lambda t: rnn_by_hand(model, t, batch.inputs)[1].reshape(-1), theta)
    H_S = torch.diag((1 - torch.tanh(a).square()).reshape(-1) / batch.size)
    return J_a.T @ H_S @ J_a


def operator_matrix(operator: CurvatureOperator) -> Tensor:
    """The dense matrix of `operator.mv`, column by column."""
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    return torch.stack([operator.mv(column) for column in identity], dim=1)


def assert_close_matrices(actual: Tensor, expected: Tensor, rtol: float = 1e-9) -> None:
    scale = expected.abs().max().clamp_min(1e-300)
    assert (actual - expected).abs().max() <= rtol * scale, f"max error {(actual - expected).abs().max():.3e}, scale {scale:.3e}"


# ---------------------------------------------------------------- tests


def test_reference_recurrence_matches_the_model():
    model, batch = rnn_problem("mse")
    z, a = model.forward_with_preactivations(batch.inputs)
    z_ref, a_ref = rnn_by_hand(model, flat_parameters(model), batch.inputs)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(a, a_ref)


@pytest.mark.parametrize("steps", [1, STEPS])
@pytest.mark.parametrize("bias, initial_state", [(True, "zero"), (False, "learned")])
def test_analytic_rnn_forward_without_graph_matches_the_loop(steps, bias, initial_state):
    """The analytic RNN's outputs under no_grad (a step-by-step loop that keeps no h: line searches, evaluation)
    and with a graph (the hand-written recurrence) equal those of model.impl=loop, a plain autograd loop."""
    torch.manual_seed(4)
    analytic = RNN(INPUTS, OUTPUTS, hidden_size=HIDDEN, bias=bias, initial_state=initial_state).double()
    with torch.no_grad():
        for parameter in analytic.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    loop = RNN(INPUTS, OUTPUTS, hidden_size=HIDDEN, bias=bias, initial_state=initial_state, impl="loop").double()
    loop.load_state_dict(analytic.state_dict())
    inputs = torch.randn(CASES, steps, INPUTS, dtype=torch.float64)
    with torch.no_grad():
        without_graph = analytic(inputs)
    with_graph = analytic(inputs)
    assert with_graph.requires_grad and not without_graph.requires_grad
    torch.testing.assert_close(without_graph, loop(inputs).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_graph.detach(), without_graph, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("jv_method", ["traced", "jvp"])
def test_analytic_rnn_one_step_damped_product_and_gradient_match_dense(jv_method):
    """Sequences of one step: the recurrence's rules have no h_{t−1} term at all (no recurrent matmul)."""
    torch.manual_seed(13)
    model, batch = analytic_rnn_problem("mse")
    batch = Batch(batch.inputs[:, :1], batch.targets[:, :1], torch.ones(CASES, 1, dtype=torch.float64))
    loss, damping, mu = LOSSES["mse"], 0.5, 0.3
    operator = CurvatureOperator(model, loss, batch, damping=damping, structural_damping=mu, jv_method=jv_method)
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    expected = dense_ggn(model, loss, batch) + damping * identity + mu * damping * dense_structural_ggn(model, batch)
    assert_close_matrices(operator_matrix(operator), expected)
    gradient = torch.autograd.grad(loss(model(batch.inputs), batch.targets, batch.mask), list(model.parameters()))
    reference = torch.func.grad(lambda flat: loss(rnn_by_hand(model, flat, batch.inputs)[0], batch.targets,
                                                   batch.mask))(flat_parameters(model))
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in gradient]), reference, rtol=1e-10, atol=1e-12)


def block_positions(model: nn.Module, names: list[str]) -> Tensor:
    """The flat coordinates of the named parameters, in model order."""
    positions, offset = [], 0
    for name, p in model.named_parameters():
        if name in names:
            positions.append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    return torch.cat(positions)


@pytest.mark.parametrize("curvature_name, jv_method", [("ggn", "traced"), ("ggn", "jvp"), ("ggn", "linearize"),
                                                       ("ggn", "double_vjp"), ("hessian", "traced")])
@pytest.mark.parametrize("block", [["rnn.weight_hh_l0"], ["readout.weight", "readout.bias"],
                                   ["rnn.bias_ih_l0", "readout.bias", "rnn.weight_ih_l0"]])
def test_block_operator_is_the_dense_matrix_restricted_to_the_block(block, curvature_name, jv_method):
    """CurvatureOperator(block=...): P_b (C + λI + μλ·G_S) P_b in the block's coordinates (model order, whatever
    order the names come in), the rest of θ held fixed, against the dense float64 matrices' sub-blocks."""
    torch.manual_seed(14)
    model, batch = analytic_rnn_problem("softmax_ce")
    loss, damping, mu = LOSSES["softmax_ce"], 0.5, 0.3
    operator = CurvatureOperator(model, loss, batch, damping=damping, structural_damping=mu,
                                 curvature=curvature_name, jv_method=jv_method, block=block)
    full = dense_ggn(model, loss, batch) if curvature_name == "ggn" else dense_hessian(model, loss, batch)
    full = full + damping * torch.eye(full.shape[0], dtype=torch.float64) + mu * damping * dense_structural_ggn(model, batch)
    where = block_positions(model, block)
    assert operator.num_params == len(where) and operator.jv_method_used == jv_method
    assert_close_matrices(operator_matrix(operator), full[where][:, where])
    gradient = torch.autograd.grad(loss(model(batch.inputs), batch.targets, batch.mask), list(model.parameters()))
    torch.testing.assert_close(operator.gradient(), torch.cat([g.reshape(-1) for g in gradient])[where])


def test_block_operator_refuses_names_that_are_not_trainable_parameters():
    model, batch = analytic_rnn_problem("mse")
    with pytest.raises(ValueError, match="rnn.nothing"):
        CurvatureOperator(model, LOSSES["mse"], batch, block=["rnn.weight_hh_l0", "rnn.nothing"])
    with pytest.raises(ValueError, match="must name some"):
        CurvatureOperator(model, LOSSES["mse"], batch, block=[])


def test_param_spec_round_trip_uses_views():
    model = tiny_mlp().double()
    spec = ParamSpec.from_module(model)
    flat = torch.randn(spec.num_params, dtype=torch.float64)
    params = spec.unflatten(flat)
    assert list(params) == [name for name, _ in model.named_parameters()]
    assert all(params[name].shape == p.shape for name, p in model.named_parameters())
    params["0.weight"][0, 0] = 42.0  # a view writes through to the flat vector
    assert flat[0] == 42.0
    torch.testing.assert_close(spec.flatten(params), flat, rtol=0, atol=0)
    torch.testing.assert_close(spec.flatten(list(params.values())), flat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="flat vector"):
        spec.unflatten(flat[:-1])


def test_param_spec_skips_frozen_parameters():
    model = tiny_mlp().double()
    model[0].bias.requires_grad_(False)
    spec = ParamSpec.from_module(model)
    assert "0.bias" not in spec.names
    assert spec.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("jv_method", FAST_JV_METHODS)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("problem", [mlp_problem, rnn_problem, analytic_rnn_problem],
                         ids=["mlp", "rnn_masked", "analytic_rnn_masked"])
def test_ggn_product_matches_dense_ggn(problem, loss_name, jv_method):
    torch.manual_seed(0)
    model, batch = problem(loss_name)
    loss = LOSSES[loss_name]
    operator = CurvatureOperator(model, loss, batch, jv_method=jv_method)
    assert_close_matrices(operator_matrix(operator), dense_ggn(model, loss, batch))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_ggn_is_symmetric_and_positive_semidefinite(loss_name):
    torch.manual_seed(1)
    model, batch = rnn_problem(loss_name)
    operator = CurvatureOperator(model, LOSSES[loss_name], batch)
    u, v = torch.randn(2, operator.num_params, dtype=torch.float64)
    torch.testing.assert_close(u @ operator.mv(v), v @ operator.mv(u))
    matrix = operator_matrix(operator)
    assert torch.linalg.eigvalsh((matrix + matrix.T) / 2).min() >= -1e-10


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("problem", [mlp_problem, rnn_problem, analytic_rnn_problem],
                         ids=["mlp", "rnn_masked", "analytic_rnn_masked"])
def test_hessian_product_matches_dense_hessian(problem, loss_name):
    torch.manual_seed(2)
    model, batch = problem(loss_name)
    loss = LOSSES[loss_name]
    operator = CurvatureOperator(model, loss, batch, curvature="hessian")
    assert_close_matrices(operator_matrix(operator), dense_hessian(model, loss, batch))


def test_damping_adds_lambda_times_v_and_can_change():
    torch.manual_seed(3)
    model, batch = mlp_problem("softmax_ce")
    operator = CurvatureOperator(model, LOSSES["softmax_ce"], batch, damping=0.7)
    undamped = dense_ggn(model, LOSSES["softmax_ce"], batch)
    v = torch.randn(operator.num_params, dtype=torch.float64)
    torch.testing.assert_close(operator.mv(v), undamped @ v + 0.7 * v)
    operator.damping = 3.0
    torch.testing.assert_close(operator.mv(v), undamped @ v + 3.0 * v)


@pytest.mark.parametrize("jv_method", FAST_JV_METHODS)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("problem", [mlp_problem, rnn_problem, analytic_rnn_problem],
                         ids=["mlp", "rnn_masked", "analytic_rnn_masked"])
def test_gradient_and_loss_value_match_autograd(problem, loss_name, jv_method):
    torch.manual_seed(4)
    model, batch = problem(loss_name)
    loss = LOSSES[loss_name]
    value = loss(model(batch.inputs), batch.targets, batch.mask)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))])
    operator = CurvatureOperator(model, loss, batch, structural_damping=0.1, jv_method=jv_method)
    torch.testing.assert_close(operator.gradient(), expected)
    operator.gradient().zero_()  # callers get a copy
    torch.testing.assert_close(operator.gradient(), expected)
    assert operator.loss_value == pytest.approx(value.detach().item(), rel=1e-12)


@pytest.mark.parametrize("jv_method", FAST_JV_METHODS)
def test_analytic_rnn_hessian_with_structural_damping_matches_dense(jv_method):
    """Forward-over-reverse through the hand-written backward: H + λI + μλ·G_S against dense float64."""
    torch.manual_seed(12)
    model, batch = analytic_rnn_problem("softmax_ce")
    loss, damping, mu = LOSSES["softmax_ce"], 0.5, 0.3
    operator = CurvatureOperator(model, loss, batch, damping=damping, structural_damping=mu, curvature="hessian",
                                 jv_method=jv_method)
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    expected = dense_hessian(model, loss, batch) + damping * identity + mu * damping * dense_structural_ggn(model, batch)
    assert_close_matrices(operator_matrix(operator), expected)


@pytest.mark.parametrize("curvature_name, jv_method",
                         [("ggn", "linearize"), ("ggn", "jvp"), ("ggn", "double_vjp"), ("hessian", "jvp")])
def test_structural_damping_matches_its_dense_definition(curvature_name, jv_method):
    torch.manual_seed(5)
    model, batch = rnn_problem("softmax_ce")
    loss, damping, mu = LOSSES["softmax_ce"], 0.5, 0.3
    operator = CurvatureOperator(model, loss, batch, damping=damping, structural_damping=mu,
                                 curvature=curvature_name, jv_method=jv_method)
    curvature_matrix = dense_ggn(model, loss, batch) if curvature_name == "ggn" else dense_hessian(model, loss, batch)
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    expected = curvature_matrix + damping * identity + mu * damping * dense_structural_ggn(model, batch)
    assert operator.structural_damping == mu
    # TinyRNN runs nn.RNN's native kernel, whose traced products torch 2.13 gets wrong after the first:
    # the check must have replaced linearize by jvp (hfrun's loop RNN is checked with linearize below).
    assert operator.jv_method_used == ("double_vjp" if jv_method == "double_vjp" and curvature_name == "ggn" else "jvp")
    assert_close_matrices(operator_matrix(operator), expected)


@pytest.mark.parametrize("impl", ["loop", "analytic"])
@pytest.mark.parametrize("jv_method", FAST_JV_METHODS)
def test_hfrun_loop_rnn_damped_products_match_dense(jv_method, impl):
    """hfrun's own RNN (per-step loop, or the recurrence with hand-written derivatives), GGN + λI + μλ·G_S:
    the linearize path must be the one used where it is asked for."""
    torch.manual_seed(11)
    model, batch = rnn_problem("mse", model_class=lambda: RNN(INPUTS, OUTPUTS, hidden_size=HIDDEN, impl=impl))
    loss, damping, mu = LOSSES["mse"], 0.5, 0.3
    operator = CurvatureOperator(model, loss, batch, damping=damping, structural_damping=mu, jv_method=jv_method)
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    expected = dense_ggn(model, loss, batch) + damping * identity + mu * damping * dense_structural_ggn(model, batch)
    assert_close_matrices(operator_matrix(operator), expected)
    assert (operator._linearized is not None) == (jv_method == "linearize")


def test_linearize_that_disagrees_with_jvp_is_replaced_by_jvp(monkeypatch, caplog):
    """A traced linearization whose later products go wrong (as torch 2.13's does through nn.RNN's
    native kernel) is caught by the per-batch check, logged, and never used for this model again."""
    monkeypatch.setattr(curvature, "_ALREADY_LOGGED", set())
    real_linearize = curvature.linearize

    def linearize_wrong_after_first_call(func, params):
        output, linearized = real_linearize(func, params)
        calls = []

        def drifting(tangents):
            calls.append(1)
            return tuple(t * len(calls) for t in linearized(tangents))

        return output, drifting

    monkeypatch.setattr(curvature, "linearize", linearize_wrong_after_first_call)
    torch.manual_seed(12)
    model, batch = mlp_problem("mse")
    with caplog.at_level(logging.WARNING, logger="hfrun.curvature"):
        operator = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.5, jv_method="linearize")
    assert "third product differed from jvp's" in caplog.text
    assert operator._linearized is None and model in curvature._MODELS_WITHOUT_LINEARIZE
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    assert_close_matrices(operator_matrix(operator), dense_ggn(model, LOSSES["mse"], batch) + 0.5 * identity)
    assert CurvatureOperator(model, LOSSES["mse"], batch, jv_method="linearize")._linearized is None


def test_linearize_not_implemented_even_natively_falls_back_to_jvp(monkeypatch, caplog):
    """A NotImplementedError from tracing, with native kernels too, ends in jvp products, not a crash."""
    monkeypatch.setattr(curvature, "_ALREADY_LOGGED", set())

    def linearize_not_implemented(func, params):
        raise NotImplementedError("no forward-mode formula for some op")

    monkeypatch.setattr(curvature, "linearize", linearize_not_implemented)
    torch.manual_seed(14)
    model, batch = mlp_problem("mse")
    with caplog.at_level(logging.WARNING, logger="hfrun.curvature"):
        operator = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.5, jv_method="linearize")
    assert operator.jv_method_used == "jvp" and "tracing failed even with native kernels" in caplog.text
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    assert_close_matrices(operator_matrix(operator), dense_ggn(model, LOSSES["mse"], batch) + 0.5 * identity)
    assert CurvatureOperator(model, LOSSES["mse"], batch, jv_method="linearize").jv_method_used == "jvp"


def test_linearize_check_leaves_the_global_rng_alone():
    torch.manual_seed(15)
    model, batch = mlp_problem("mse")
    state = torch.get_rng_state()
    assert CurvatureOperator(model, LOSSES["mse"], batch, jv_method="linearize").jv_method_used == "linearize"
    assert torch.equal(torch.get_rng_state(), state)


def test_torch_rnn_kernel_products_are_right_whatever_linearize_does():
    """nn.RNN's native kernel: repeated jv_method=linearize products still match the dense GGN."""
    torch.manual_seed(13)
    model, batch = rnn_problem("mse")
    operator = CurvatureOperator(model, LOSSES["mse"], batch, jv_method="linearize")
    dense = dense_ggn(model, LOSSES["mse"], batch)
    for _ in range(3):
        v = torch.randn(operator.num_params, dtype=torch.float64)
        torch.testing.assert_close(operator.mv(v), dense @ v, rtol=1e-9, atol=1e-12)


def test_structural_damping_is_ignored_without_preactivations(monkeypatch, caplog):
    monkeypatch.setattr(curvature, "_ALREADY_LOGGED", set())
    torch.manual_seed(6)
    model, batch = mlp_problem("mse")
    with caplog.at_level(logging.INFO, logger="hfrun.curvature"):
        operator = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.5, structural_damping=0.3)
    assert operator.structural_damping == 0.0
    assert "structural_damping=0.3 is ignored" in caplog.text
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    assert_close_matrices(operator_matrix(operator), dense_ggn(model, LOSSES["mse"], batch) + 0.5 * identity)


def test_rejects_unknown_options():
    model, batch = mlp_problem("mse")
    with pytest.raises(ValueError, match="curvature='fisher' is unknown"):
        CurvatureOperator(model, LOSSES["mse"], batch, curvature="fisher")
    with pytest.raises(ValueError, match="jv_method='finite_differences' is unknown"):
        CurvatureOperator(model, LOSSES["mse"], batch, jv_method="finite_differences")
    with pytest.raises(ValueError, match="structural_damping must be >= 0"):
        CurvatureOperator(model, LOSSES["mse"], batch, structural_damping=-1.0)


def per_case_squares_by_loop(model: nn.Module, loss, batch: Batch) -> Tensor:
    """Σ_i g_i² with g_i = ∇ℓ_i / B, from one autograd call per case."""
    squares = 0
    for case in range(batch.size):
        mask = None if batch.mask is None else batch.mask[case : case + 1]
        value = loss(model(batch.inputs[case : case + 1]), batch.targets[case : case + 1], mask) / batch.size
        squares = squares + torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))]).square()
    return squares


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("problem", [mlp_problem, rnn_problem, analytic_rnn_problem],
                         ids=["mlp_vmap", "rnn_loop_fallback", "analytic_rnn_vmap"])
def test_per_case_gradient_squares_match_a_loop_over_cases(problem, loss_name):
    torch.manual_seed(7)
    model, batch = problem(loss_name)
    loss = LOSSES[loss_name]
    torch.testing.assert_close(per_case_gradient_squares(model, loss, batch), per_case_squares_by_loop(model, loss, batch))


def test_per_case_gradient_squares_in_chunks(monkeypatch):
    torch.manual_seed(8)
    model, batch = mlp_problem("softmax_ce")
    monkeypatch.setattr(curvature, "_linear_gradient_squares", lambda *args: None)  # the vmap path
    monkeypatch.setattr(curvature, "PER_CASE_GRADIENT_ELEMENTS", 1)  # one case per vmap call
    expected = per_case_squares_by_loop(model, LOSSES["softmax_ce"], batch)
    torch.testing.assert_close(per_case_gradient_squares(model, LOSSES["softmax_ce"], batch), expected)


class SharedLayer(nn.Module):
    """One Linear applied twice: its per-case gradients are not δ_i a_iᵀ of one call."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(INPUTS, INPUTS)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))[:, :OUTPUTS]


class CenteredMLP(nn.Module):
    """Subtracts the batch mean first, so the cases interact and a one-case vmap sees another function."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(INPUTS, OUTPUTS)

    def forward(self, x):
        return self.layer(x - x.mean(0))


def test_per_case_gradient_squares_in_one_backward_pass_where_the_linear_layers_allow():
    """The one-backward way, (δ²)ᵀ(a²) per nn.Linear, against a loop over cases; it steps aside (vmap) for a
    layer called twice, and after its check against vmap for a model whose cases interact."""
    torch.manual_seed(9)
    model, batch = mlp_problem("mse")
    params = curvature.trainable_parameters(model)
    fast = curvature._linear_gradient_squares(model, LOSSES["mse"], batch, params, curvature.ParamSpec(params))
    torch.testing.assert_close(fast / batch.size**2, per_case_squares_by_loop(model, LOSSES["mse"], batch))
    assert curvature._LINEAR_SQUARES_CHECKED.get(model) is None
    torch.testing.assert_close(per_case_gradient_squares(model, LOSSES["mse"], batch), fast / batch.size**2)
    assert curvature._LINEAR_SQUARES_CHECKED[model] is True
    shared = SharedLayer().double()
    params = curvature.trainable_parameters(shared)
    assert curvature._linear_gradient_squares(shared, LOSSES["mse"], batch, params,
                                              curvature.ParamSpec(params)) is None
    torch.testing.assert_close(per_case_gradient_squares(shared, LOSSES["mse"], batch),
                               per_case_squares_by_loop(shared, LOSSES["mse"], batch))
    centered = CenteredMLP().double()
    vmapped = per_case_squares_by_loop(centered, LOSSES["mse"], batch)
    torch.testing.assert_close(per_case_gradient_squares(centered, LOSSES["mse"], batch), vmapped)
    assert curvature._LINEAR_SQUARES_CHECKED[centered] is False


def test_martens_preconditioner_closed_form():
    squares = torch.tensor([0.0, 1.0, 15.0], dtype=torch.float64)
    torch.testing.assert_close(martens_preconditioner(squares, 1.0),
                               torch.tensor([1.0, 2.0 ** 0.75, 8.0], dtype=torch.float64))
    torch.testing.assert_close(martens_preconditioner(squares, 1.0, exponent=1.0), squares + 1.0)


@pytest.mark.parametrize("jv_method", FAST_JV_METHODS)
def test_lstm_float64_matches_dense_ggn(jv_method):
    torch.manual_seed(9)
    model, batch = lstm_problem()
    operator = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.2, jv_method=jv_method)
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    assert_close_matrices(operator_matrix(operator), dense_ggn(model, LOSSES["mse"], batch) + 0.2 * identity)


def lstm_problem(dtype=torch.float64) -> tuple[nn.Module, Batch]:
    model = TinyLSTM().to(dtype)
    inputs = torch.randn(CASES, STEPS, INPUTS, dtype=dtype)
    return model, Batch(inputs, torch.randn(CASES, OUTPUTS, dtype=dtype))


def forward_mode_fails(model: nn.Module, x: Tensor) -> bool:
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangents = {name: torch.zeros_like(p) for name, p in params.items()}
    try:
        jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))
    except NotImplementedError:
        return True
    return False


@pytest.mark.parametrize("curvature_name, jv_method",
                         [("ggn", "linearize"), ("ggn", "jvp"), ("hessian", "jvp"), ("ggn", "double_vjp")])
def test_float32_lstm_products_match_dense_float64(monkeypatch, caplog, curvature_name, jv_method):
    """On the CPU a float32 nn.LSTM runs oneDNN's kernel, which has no forward-mode AD:
    forward-mode products must fall back to the native kernels; double_vjp needs no fallback."""
    monkeypatch.setattr(curvature, "_ALREADY_LOGGED", set())
    torch.manual_seed(10)
    model, batch = lstm_problem(torch.float32)
    needs_fallback = forward_mode_fails(model, batch.inputs) and (curvature_name, jv_method) != ("ggn", "double_vjp")
    model64 = copy.deepcopy(model).double()
    batch64 = Batch(batch.inputs.double(), batch.targets.double())
    dense = dense_ggn if curvature_name == "ggn" else dense_hessian
    expected = dense(model64, LOSSES["mse"], batch64) + 0.2 * torch.eye(flat_parameters(model).numel(), dtype=torch.float64)

    with caplog.at_level(logging.WARNING, logger="hfrun.curvature"):
        operator = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.2, curvature=curvature_name,
                                     jv_method=jv_method)
        identity = torch.eye(operator.num_params, dtype=torch.float32)
        actual = torch.stack([operator.mv(column) for column in identity], dim=1).double()
    assert_close_matrices(actual, expected, rtol=1e-5)
    fell_back = "lacks a derivative that curvature products need" in caplog.text
    assert fell_back == needs_fallback
    assert (model in curvature._MODELS_WITHOUT_FUSED_FORWARD_AD) == needs_fallback
    # A later operator on the same model goes straight to the native kernels and stays correct.
    again = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.2, curvature=curvature_name, jv_method=jv_method)
    assert (again._context is curvature._fused_kernels_off) == needs_fallback
    v = torch.randn(again.num_params)
    torch.testing.assert_close(again.mv(v).double(), expected @ v.double(), rtol=1e-5, atol=1e-5)
