"""Traced curvature products (hfrun/traced.py, jv_method=traced|auto) against dense float64 matrices, and
the trace's life: one trace per shape whatever the values, buffers as inputs, fallbacks to jvp."""
from __future__ import annotations

import logging

import pytest
import torch
from test_curvature import (LOSSES, analytic_rnn_problem, assert_close_matrices, dense_ggn, dense_hessian,
                            dense_structural_ggn, lstm_problem, mlp_problem, operator_matrix, rnn_problem)
from torch import nn
from torch.func import vmap

from hfrun import curvature, traced
from hfrun.curvature import CurvatureOperator
from hfrun.models.rnn import RNN
from hfrun.tasks.base import Batch
from hfrun.traced import split_primal_tangent
from torch.fx.experimental.proxy_tensor import make_fx


def hfrun_loop_rnn_problem(loss_name):
    return rnn_problem(loss_name, model_class=lambda: RNN(3, 2, hidden_size=4, impl="loop"))


@pytest.fixture
def count_traces(monkeypatch):
    """How many times a product is traced in the test."""
    calls = []
    original = curvature.trace_product

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(curvature, "trace_product", counting)
    monkeypatch.setattr(curvature, "_ALREADY_LOGGED", set())
    return calls


@pytest.mark.parametrize("curvature_name", ["ggn", "hessian"])
@pytest.mark.parametrize("problem", [mlp_problem, rnn_problem, analytic_rnn_problem, hfrun_loop_rnn_problem],
                         ids=["mlp", "torch_rnn_masked", "analytic_rnn_masked", "loop_rnn_masked"])
def test_traced_products_match_dense_with_structural_damping(problem, curvature_name):
    torch.manual_seed(21)
    model, batch = problem("softmax_ce")
    loss, damping = LOSSES["softmax_ce"], 0.5
    mu = 0.0 if problem is mlp_problem else 0.3
    operator = CurvatureOperator(model, loss, batch, damping=damping, structural_damping=mu,
                                 curvature=curvature_name, jv_method="traced")
    assert operator.jv_method_used == "traced"
    assert not traced.mutates(operator._traced[0].tangent) and not traced.mutates(operator._traced[0].primal)
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    expected = (dense_ggn if curvature_name == "ggn" else dense_hessian)(model, loss, batch) + damping * identity
    if mu:
        expected += mu * damping * dense_structural_ggn(model, batch)
    assert_close_matrices(operator_matrix(operator), expected)
    operator.damping = 2.0  # λ changes between products: λI and μλ·G_S follow
    expected += 1.5 * identity + (mu * 1.5 * dense_structural_ggn(model, batch) if mu else 0)
    assert_close_matrices(operator_matrix(operator), expected)


def test_one_trace_serves_every_batch_and_every_point_of_a_shape(count_traces):
    """The trace holds shapes, not values: new inputs, targets, mask and parameters give their own products."""
    torch.manual_seed(22)
    model, batch = analytic_rnn_problem("mse")
    loss, mu = LOSSES["mse"], 0.3
    for _ in range(3):
        operator = CurvatureOperator(model, loss, batch, damping=0.5, structural_damping=mu, jv_method="auto")
        assert operator.jv_method_used == "traced"
        identity = torch.eye(operator.num_params, dtype=torch.float64)
        expected = dense_ggn(model, loss, batch) + 0.5 * identity + mu * 0.5 * dense_structural_ggn(model, batch)
        assert_close_matrices(operator_matrix(operator), expected)
        with torch.no_grad():
            assert operator.loss_value == pytest.approx(float(loss(model(batch.inputs), batch.targets, batch.mask)))
            for parameter in model.parameters():
                parameter.add_(0.2 * torch.randn_like(parameter))
        batch = Batch(torch.randn_like(batch.inputs), torch.randn_like(batch.targets), batch.mask.flip(0))
    assert len(count_traces) == 1
    longer = Batch(torch.randn(3, 7, 3, dtype=torch.float64), torch.randn(3, 7, 2, dtype=torch.float64))
    CurvatureOperator(model, loss, longer, structural_damping=mu)
    CurvatureOperator(model, loss, longer, structural_damping=mu)
    assert len(count_traces) == 2, "a new shape (and no mask) is traced once more, then reused"


class ScaledMLP(nn.Module):
    """A model with a buffer that changes between batches (as running statistics would)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x):
        return self.layer(torch.tanh(self.scale * x))


def test_buffers_are_inputs_of_the_trace_not_constants(count_traces):
    torch.manual_seed(23)
    model = ScaledMLP().double()
    batch = Batch(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    for scale in (1.0, 3.0):
        model.scale.fill_(scale)
        operator = CurvatureOperator(model, LOSSES["mse"], batch, jv_method="traced")
        assert operator.jv_method_used == "traced"
        assert_close_matrices(operator_matrix(operator), dense_ggn(model, LOSSES["mse"], batch))
    assert len(count_traces) == 1


class ValueDependentMLP(nn.Module):
    """Python control flow on a tensor's value: a trace would bake in one batch's branch."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x):
        return self.layer(x) if float(x.sum()) > 0 else self.layer(-x)


@pytest.mark.parametrize("jv_method, level", [("traced", logging.WARNING), ("auto", logging.INFO)])
def test_a_model_that_cannot_be_traced_uses_jvp(count_traces, caplog, jv_method, level):
    torch.manual_seed(24)
    model = ValueDependentMLP().double()
    for sign in (1, -1):
        batch = Batch(sign * (torch.rand(4, 3, dtype=torch.float64) + 0.1), torch.randn(4, 2, dtype=torch.float64))
        with caplog.at_level(logging.INFO, logger="hfrun.curvature"):
            operator = CurvatureOperator(model, LOSSES["mse"], batch, jv_method=jv_method)
        assert operator.jv_method_used == "jvp"
        assert_close_matrices(operator_matrix(operator), dense_ggn(model, LOSSES["mse"], batch))
    assert len(count_traces) == 1, "a failure is remembered for its shape"
    records = [r for r in caplog.records if "is not traced" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == level
    assert "could not be traced" in records[0].getMessage()


def test_a_trace_that_disagrees_with_jvp_is_not_used(monkeypatch, count_traces, caplog):
    original = traced.TracedProduct.product
    monkeypatch.setattr(traced.TracedProduct, "product", lambda self, cached, varying: 1.01 * original(
        self, cached, varying))
    torch.manual_seed(25)
    model, batch = mlp_problem("mse")
    with caplog.at_level(logging.WARNING, logger="hfrun.curvature"):
        operator = CurvatureOperator(model, LOSSES["mse"], batch, jv_method="traced")
        again = CurvatureOperator(model, LOSSES["mse"], batch, jv_method="traced")
    assert operator.jv_method_used == again.jv_method_used == "jvp"
    assert "differed from the untraced one" in caplog.text
    assert len(count_traces) == 1
    assert_close_matrices(operator_matrix(again), dense_ggn(model, LOSSES["mse"], batch))


def test_float32_lstm_is_traced_through_native_kernels(monkeypatch):
    """oneDNN's LSTM has no forward-mode AD: the operator switches to native kernels and traces those."""
    monkeypatch.setattr(curvature, "_ALREADY_LOGGED", set())
    torch.manual_seed(26)
    model, batch = lstm_problem(torch.float32)
    operator = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.2, jv_method="auto")
    assert operator.jv_method_used == "traced"
    reference = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.2, jv_method="jvp")
    v = torch.randn(operator.num_params)
    torch.testing.assert_close(operator.mv(v), reference.mv(v), rtol=1e-5, atol=1e-6)


def test_traced_products_batch_under_vmap():
    """Block-diagonal HF maps the product over its blocks' tangents with vmap."""
    torch.manual_seed(27)
    model, batch = analytic_rnn_problem("mse")
    operator = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.5, structural_damping=0.3)
    assert operator.jv_method_used == "traced"
    vectors = torch.randn(4, operator.num_params, dtype=torch.float64)
    torch.testing.assert_close(vmap(operator.mv)(vectors), torch.stack([operator.mv(v) for v in vectors]))


def test_split_keeps_the_primal_work_out_of_the_product():
    """f(w, x; v, s) = s·(tanh(x w) ⊙ v): tanh(x w) is computed once per batch, never per product."""

    def function(w, x, v, s):
        return s * (torch.tanh(x @ w) * v), torch.tanh(x @ w).sum()

    w, x = torch.randn(3, 2), torch.randn(4, 3)
    graph = make_fx(function)(w, x, torch.randn(4, 2), torch.tensor(2.0))
    traced_product = split_primal_tangent(graph, num_fixed=2)
    tangent_ops = {str(node.target) for node in traced_product.tangent.graph.nodes if node.op == "call_function"}
    assert not any("tanh" in op or "mm" in op for op in tangent_ops), tangent_ops
    value, cached = traced_product.prepare([w, x])
    torch.testing.assert_close(value, torch.tanh(x @ w).sum())
    for _ in range(2):
        v, s = torch.randn(4, 2), torch.tensor(float(torch.randn(())))
        torch.testing.assert_close(traced_product.product(cached, [v, s]), s * torch.tanh(x @ w) * v)


def test_a_failed_compilation_falls_back_to_the_uncompiled_trace(monkeypatch, caplog):
    """jv_method=compiled where inductor cannot compile (no C++ compiler, an unsupported op): one warning, and the
    products run on the traced graph, exact, not on jvp; no later trace in the process tries to compile."""
    from torch._inductor.exc import InductorError
    attempts = []

    def failing_compile(graph_module, **options):
        def compiled(*args):
            attempts.append(True)
            raise InductorError(RuntimeError("no working C++ compiler found"), None)
        return compiled

    monkeypatch.setattr(traced.torch, "compile", failing_compile)
    monkeypatch.setattr(traced, "_COMPILE_FAILED", [])
    torch.manual_seed(29)
    model, batch = analytic_rnn_problem("mse")
    other_model, _ = analytic_rnn_problem("mse")
    with caplog.at_level(logging.WARNING, logger="hfrun.traced"):
        operator = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.5, structural_damping=0.3,
                                     jv_method="compiled")
        other = CurvatureOperator(other_model, LOSSES["mse"], batch, damping=0.5, jv_method="compiled")
        reference = CurvatureOperator(model, LOSSES["mse"], batch, damping=0.5, structural_damping=0.3,
                                      jv_method="traced")
        v = torch.randn(operator.num_params, dtype=torch.float64)
        for _ in range(2):
            torch.testing.assert_close(operator.mv(v), reference.mv(v), rtol=0, atol=0)
    assert operator.jv_method_used == other.jv_method_used == "traced" and len(attempts) == 1
    warnings = [r.getMessage() for r in caplog.records if "compiling the curvature product failed" in r.getMessage()]
    assert len(warnings) == 1 and "no working C++ compiler found" in warnings[0]


def test_compiled_products_match_dense():
    """jv_method=compiled: the tangent half through torch.compile's inductor (one tiny model: compiling
    takes seconds)."""
    torch.manual_seed(28)
    model, batch = analytic_rnn_problem("mse")
    loss, damping, mu = LOSSES["mse"], 0.5, 0.3
    operator = CurvatureOperator(model, loss, batch, damping=damping, structural_damping=mu, jv_method="compiled")
    assert operator.jv_method_used == "compiled"
    identity = torch.eye(operator.num_params, dtype=torch.float64)
    expected = dense_ggn(model, loss, batch) + damping * identity + mu * damping * dense_structural_ggn(model, batch)
    assert_close_matrices(operator_matrix(operator), expected)


def test_a_failed_trace_keeps_nothing_alive():
    """A stored failure is a message, not an exception whose traceback holds the operator, batch and model."""
    import gc
    import weakref

    torch.manual_seed(29)
    model = ValueDependentMLP().double()
    batch = Batch(torch.rand(4, 3, dtype=torch.float64) + 0.1, torch.randn(4, 2, dtype=torch.float64))
    operators = [CurvatureOperator(model, LOSSES["mse"], batch) for _ in range(2)]
    assert all(operator.jv_method_used == "jvp" for operator in operators)
    alive = [weakref.ref(operator) for operator in operators]
    del operators
    gc.collect()
    assert all(ref() is None for ref in alive)


class ModeDependent(nn.Module):
    """A submodule whose training flag changes the function (as dropout or batch norm would)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.head = nn.Sequential(nn.Tanh())

    def forward(self, x):
        hidden = self.layer(x)
        return self.head(hidden) if self.head.training else hidden


def test_a_submodule_switched_to_eval_gets_its_own_trace(count_traces):
    torch.manual_seed(30)
    model = ModeDependent().double()
    batch = Batch(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    for training in (True, False):
        model.head.train(training)
        operator = CurvatureOperator(model, LOSSES["mse"], batch)
        assert operator.jv_method_used == "traced"
        assert_close_matrices(operator_matrix(operator), dense_ggn(model, LOSSES["mse"], batch))
    assert len(count_traces) == 2


def test_a_product_that_ignores_the_tangent_is_a_fresh_tensor():
    """The caller adds λv to the product in place: it must never be a cached tensor."""

    def function(w, v):
        return torch.tanh(w) * 2, w.sum()

    w = torch.randn(3)
    traced_product = split_primal_tangent(make_fx(function)(w, torch.randn(3)), num_fixed=1)
    _, cached = traced_product.prepare([w])
    traced_product.product(cached, [torch.randn(3)]).add_(100.0)
    torch.testing.assert_close(traced_product.product(cached, [torch.randn(3)]), torch.tanh(w) * 2)


def test_zero_terms_are_dropped_exactly():
    """`drop_zero_terms` removes the work a trace records on tensors known to be zero (a jvp's zero tangent
    for the undifferentiated input), and nothing that changes a value or a dtype."""

    def function(x, w, b, v):
        zero = torch.zeros((), dtype=x.dtype).expand(x.shape)  # what a jvp gives x, which has no tangent
        tangent = torch.addmm(b, zero, w.t()) + zero @ w.t() + v * 2 - torch.zeros_like(v)
        kept = tangent + torch.zeros(3, dtype=torch.float64)  # float32 + float64 is float64: this add stays
        flat = torch.addmm(b, zero, w.t()).view(-1)  # a view of the result needs its contiguous layout
        return kept * torch.full((), 0.0) + kept + flat.view(5, 3), (x @ w.t()).sum()

    x, w, b, v = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3), torch.randn(5, 3)
    graph = make_fx(function, tracing_mode="fake")(x, w, b, v)
    dropped = traced.drop_zero_terms(make_fx(function, tracing_mode="fake")(x, w, b, v))
    calls = [str(node.target) for node in dropped.graph.nodes if node.op == "call_function"]
    assert "aten.addmm.default" not in calls and calls.count("aten.mm.default") == 1, calls  # x @ wᵀ stays
    assert calls.count("aten.mul.Tensor") == 1 and "aten.sub.Tensor" not in calls, calls  # v * 2 stays
    assert calls.count("aten.add.Tensor") == 3, calls  # b + v·2, the float64 zero's and + flat
    expected, actual = graph(x, w, b, v), dropped(x, w, b, v)
    for e, a in zip(expected, actual):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_an_mlp_trace_does_not_multiply_the_inputs_zero_tangent():
    """The MLP's primal half used to compute zeros(B, 784) @ W₁ᵀ, as large as the first layer, every batch."""
    model, batch = mlp_problem("softmax_ce")
    loss = LOSSES["softmax_ce"]
    operator = CurvatureOperator(model, loss, batch)
    assert operator.jv_method_used == "traced"
    (trace,) = traced._TRACES[model].values()
    for half in (trace.primal, trace.tangent):
        for node in half.graph.nodes:
            if node.op == "call_function" and node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                assert not any(str(arg.target) == "aten.expand.default" for arg in node.all_input_nodes
                               if arg.op == "call_function"), node.format_node()
    assert_close_matrices(operator_matrix(operator), dense_ggn(model, loss, batch))


def test_a_product_that_is_its_tangent_plus_zero_is_a_fresh_tensor():
    """v + 0 drops to v: the product must still be a new tensor, not the caller's tangent (it is added to in
    place)."""

    def function(w, v):
        return v + torch.zeros_like(v), w.sum()

    w, v = torch.randn(3), torch.randn(3)
    traced_product = traced.trace_product(function, [w], [v])
    _, cached = traced_product.prepare([w])
    saved = v.clone()
    product = traced_product.product(cached, [v])
    torch.testing.assert_close(product, v)
    product.add_(1.0)
    torch.testing.assert_close(v, saved, rtol=0, atol=0)
