"""`make bench`: the cost of curvature products against the cost of a gradient, on this machine.

One process, one device, side by side. Per workload:
  grad_ms       one gradient of the batch loss (forward + backward)
  trace_ms      the first set-up on a batch shape: for jv_method=traced it includes the trace (paid once
                per model and shape) and its check
  setup_ms      the per-batch work a curvature operator caches once, later batches of the same shape:
                the primal half of a traced product; the primal pass and vjp closure for jvp; the
                trace for linearize (every batch)
  gvp_ms        one GGN-vector product with the batch's primal work cached
  cg_iter_ms    one CG iteration (a product plus CG's vector work)
  hf10_ms       one full HF update (gradient, set-up, 10 CG iterations, backtracking, line search),
                λ = 1e-4; hf_cg_iters says how many CG ran before the residual vanished (the
                autoencoder on random images at initialization: about 8)
  peer10_ms     the same update as a user would write it with torch.func and no trace, on the same
                model and batch: gradient, 10 CG iterations with jvp products through the vjp closure
                cached for the batch, the loss at the new point (`reference_hf_update`)
  gvp/grad      a product against a gradient
  cg_overhead   CG's vector work (the same iterations with a trivial product) as a fraction
                of a product; target < 5%
Times are medians of interleaved rounds after warm-up, with float32 denormals
flushed to zero on the CPU and glibc's malloc keeping freed memory (as in a run; --system-allocator
leaves it as it is). The RNN rows are held against a plain-loop RNN under autograd, the last row.

A second table times the RNN's gradient against the plain loop's, with and without the pre-activations that
structural damping needs. A third times one SGN update with k = 3 and 10 CG steps on the SGN release's MNIST and sine MLPs
(batch 1000) against (1 + k) gradients; a fourth times block-diagonal HF's all-blocks product (one block per
layer, batched through vmap or one block at a time) against one full GGN product. `--data` instead splits an epoch of the data-set tasks into data
handling and gradients; `--task` and `--memory` are described under --help.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from hfrun.allocator import keep_freed_memory
from hfrun.curvature import CurvatureOperator
from hfrun.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy, SquaredError
from hfrun.models.autoencoder import Autoencoder
from hfrun.models.mlp import MLP
from hfrun.models.rnn import RNN
from hfrun.solvers.cg import conjugate_gradient
from hfrun.solvers.hf import HessianFree
from hfrun.tasks.base import Batch

HF_CG_ITERS = 10
HF_DAMPING = 1e-4
SETUP_REPEATS = 3
UPDATE_REPEATS = 5


@dataclass
class Workload:
    name: str
    model: nn.Module
    loss: Callable
    batch: Batch
    jv_method: str = "linearize"
    structural_damping: float = 0.0


class FixedBatch:
    def __init__(self, batch: Batch):
        self.batch = batch

    def next(self, batch_size: int) -> Batch:
        return self.batch


def workloads(device: torch.device, scale: float, compiled: bool = True) -> list[Workload]:
    """The table's rows. `compiled` adds the analytic RNN's rows with compiled products (the pathological tasks'
    default at T >= 100), whose first set-up compiles for about a minute on a CPU."""
    def n(size: int) -> int:
        return max(2, int(size * scale))

    mlp_batch = Batch(torch.randn(n(5000), 784, device=device), torch.randint(0, 10, (n(5000),), device=device))
    images = torch.rand(n(1000), 784, device=device)
    rnn_inputs = torch.randn(n(1000), 100, 2, device=device)
    mask = torch.zeros(n(1000), 100, device=device)
    mask[:, -1] = 1
    rnn_batch = Batch(rnn_inputs, torch.randn(n(1000), 100, 1, device=device), mask)
    mlp = MLP(784, 10, [256, 256]).to(device)
    autoencoder = Autoencoder(784).to(device)
    image_batch = Batch(images, (images > 0.5).float())
    rows = []
    for jv_method in ("traced", "linearize", "jvp", "double_vjp"):
        rows.append(Workload("MLP 784-256-256-10, B5000", mlp, SoftmaxCrossEntropy(), mlp_batch, jv_method))
    for jv_method in ("traced", "jvp", "double_vjp"):
        rows.append(Workload("autoencoder 784-…-30-…-784, B1000", autoencoder, SigmoidCrossEntropy(), image_batch,
                             jv_method))
    rows.append(Workload("tanh RNN-100 T100 B1000, nn.RNN", RNN(2, 1, impl="fused").to(device), SquaredError(),
                         rnn_batch, "traced"))
    rnn_loop = RNN(2, 1, impl="loop").to(device)
    rows.append(Workload("tanh RNN-100 T100 B1000, loop", rnn_loop, SquaredError(), rnn_batch, "traced"))
    rnn_analytic = RNN(2, 1, impl="analytic").to(device)
    rnn_analytic.load_state_dict(rnn_loop.state_dict())
    for jv_method in ("traced", "linearize", "jvp", "double_vjp") + ("compiled",) * compiled:
        rows.append(Workload("tanh RNN-100 T100 B1000, analytic", rnn_analytic, SquaredError(), rnn_batch,
                             jv_method))
    for jv_method in ("traced", "jvp") + ("compiled",) * compiled:  # the pathological tasks' setting, μ = 0.03
        rows.append(Workload("tanh RNN-100 T100 B1000, analytic, structural damping", rnn_analytic, SquaredError(),
                             rnn_batch, jv_method, structural_damping=0.03))
    # The reference the RNN rows are held against: the plain loop a user would write, under autograd.
    plain_loop = PlainLoopRNN(2, 100, 1).to(device)
    for jv_method in ("traced", "jvp"):
        rows.append(Workload("tanh RNN-100 T100 B1000, plain-loop model", plain_loop, SquaredError(), rnn_batch,
                             jv_method))
    return rows


class PlainLoopRNN(nn.Module):
    """h_t = tanh(W_ih x_t + W_hh h_{t−1} + b), z_t = W_ho h_t + b_o, written the obvious way: the
    yardstick for hfrun's RNN (its gradient is what one pays without hfrun)."""

    def __init__(self, inputs: int, hidden: int, outputs: int):
        super().__init__()
        self.hidden_size = hidden
        self.input_layer, self.recurrent = nn.Linear(inputs, hidden), nn.Linear(hidden, hidden, bias=False)
        self.readout = nn.Linear(hidden, outputs)

    def forward(self, x):
        hidden, outputs = x.new_zeros(x.shape[0], self.hidden_size), []
        for x_t in x.unbind(1):
            hidden = torch.tanh(self.input_layer(x_t) + self.recurrent(hidden))
            outputs.append(self.readout(hidden))
        return torch.stack(outputs, dim=1)

    def forward_with_preactivations(self, x):
        """(z, a): outputs (B, L, O) and the pre-activations a_t = W_ih x_t + W_hh h_{t−1} + b (B, L, H)."""
        hidden, outputs, preactivations = x.new_zeros(x.shape[0], self.hidden_size), [], []
        for x_t in x.unbind(1):
            preactivations.append(self.input_layer(x_t) + self.recurrent(hidden))
            hidden = torch.tanh(preactivations[-1])
            outputs.append(self.readout(hidden))
        return torch.stack(outputs, dim=1), torch.stack(preactivations, dim=1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def elapsed_ms(work: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    work()
    _synchronize(device)
    return 1000 * (time.perf_counter() - start)


def print_table(title: str, columns: list[str], rows: list[list[str]], left: int = 1) -> None:
    """One rich table of formatted rows; the first `left` columns are names, the rest right-aligned figures."""
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index < left else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def measure(workload: Workload, device: torch.device, repeats: int) -> dict[str, float]:
    """Interleaved rounds (gradient, product, CG iterations, CG's vector work), so that load on a
    shared machine hits all of them alike; ratios are medians of per-round ratios."""
    # A copy per row: the HF update below changes the weights, and every row should start from the same ones.
    model, loss, batch = copy.deepcopy(workload.model), workload.loss, workload.batch
    params = list(model.parameters())

    def gradient():
        return torch.autograd.grad(loss(model(batch.inputs), batch.targets, batch.mask), params)

    def setup():
        return CurvatureOperator(model, loss, batch, damping=1.0, jv_method=workload.jv_method,
                                 structural_damping=workload.structural_damping)

    trace_ms = elapsed_ms(setup, device)
    operator = setup()
    setup_ms = statistics.median(elapsed_ms(setup, device) for _ in range(SETUP_REPEATS))
    vector = torch.randn(operator.num_params, device=device)
    g = torch.randn(operator.num_params, device=device)
    cg_iters = 5

    def cg_with(product):
        return lambda: conjugate_gradient(product, g, max_iters=cg_iters, tol=0.0)

    # CG's own vector work: the same iterations with a product that costs one scaled copy.
    vector_work = cg_with(lambda v: v * 2.0)
    # λ small, so that CG does not converge (residual below float precision) before its last iteration.
    solver = HessianFree(model, loss, gradient_batch_size=batch.size, cg_max_iters=HF_CG_ITERS, cg_tol=0.0,
                         initial_damping=HF_DAMPING, preconditioner="none", jv_method=workload.jv_method,
                         structural_damping=workload.structural_damping)
    stream = FixedBatch(batch)
    for work in (gradient, lambda: operator.mv(vector), vector_work):
        work()  # warm-up
    rounds = []
    for _ in range(repeats):
        grad_ms = elapsed_ms(gradient, device)
        gvp_ms = elapsed_ms(lambda: operator.mv(vector), device)
        cg_iter_ms = elapsed_ms(cg_with(operator.mv), device) / cg_iters
        vector_ms = elapsed_ms(vector_work, device) / cg_iters
        rounds.append({"grad_ms": grad_ms, "gvp_ms": gvp_ms, "cg_iter_ms": cg_iter_ms,
                       "gvp/grad": gvp_ms / grad_ms, "cg_overhead": vector_ms / gvp_ms})
    row = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    row["trace_ms"], row["setup_ms"], row["jv_method_used"] = trace_ms, setup_ms, operator.jv_method_used
    solver.step(stream)  # warm-up of the solver's own path
    reference_hf_update(model, loss, batch)
    update_rounds, stats = [], {}
    for _ in range(UPDATE_REPEATS):  # interleaved with the peer's update on the same model and batch
        hf10_ms = elapsed_ms(lambda: stats.update(solver.step(stream)), device)
        peer10_ms = elapsed_ms(lambda: reference_hf_update(model, loss, batch), device)
        update_rounds.append({"hf10_ms": hf10_ms, "peer10_ms": peer10_ms, "hf10/peer": hf10_ms / peer10_ms})
    row.update({key: statistics.median(r[key] for r in update_rounds) for key in update_rounds[0]})
    row["hf_cg_iters"] = stats["cg_iters"]
    return row


def reference_hf_update(model: nn.Module, loss: Callable, batch: Batch, cg_iters: int = HF_CG_ITERS,
                        damping: float = HF_DAMPING) -> float:
    """The peer hfrun's update is held against: one HF update as a user would write it with torch.func,
    no trace. The gradient and the vjp closure from one forward pass; CG on (G + λI) d = −g from d = 0,
    each product Jᵀ(H_L(J v)) + λv with J v by jvp (which reruns the forward pass) and Jᵀ through the
    cached closure; then the loss at θ + d. Returns that loss; leaves the model as it was. It does less than
    hfrun's update (no backtracking over CG iterates, no line search, no λ adaptation, no warm start), so
    hf10/peer is biased against hfrun by those forward passes. Its CG and flattening are its own, not
    hfrun's, so that the peer shares no code with what it is held against."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def forward(params):
        return functional_call(model, params, (batch.inputs,))

    def flat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors.values()])

    def unflat(vector):
        return {name: chunk.view_as(p) for (name, p), chunk in
                zip(params.items(), vector.split([p.numel() for p in params.values()]))}

    z, vjp_fn = vjp(forward, params)
    output_gradient = grad(lambda z: loss(z, batch.targets, batch.mask))(z)
    gradient = flat(vjp_fn(output_gradient)[0])
    hessian = loss.output_hessian(z, batch.targets, batch.mask)

    def product(v):
        _, jv = jvp(forward, (params,), (unflat(v),))
        return flat(vjp_fn(hessian.mv(jv))[0]) + damping * v

    direction, residual = torch.zeros_like(gradient), -gradient
    search = residual.clone()
    residual_norm = residual.dot(residual)
    for _ in range(cg_iters):
        curvature_search = product(search)
        step = residual_norm / search.dot(curvature_search)
        direction += step * search
        residual -= step * curvature_search
        new_norm = residual.dot(residual)
        search = residual + (new_norm / residual_norm) * search
        residual_norm = new_norm
    new_params = {name: p + d for (name, p), d in zip(params.items(), unflat(direction).values())}
    with torch.no_grad():
        return float(loss(functional_call(model, new_params, (batch.inputs,)), batch.targets, batch.mask))


def compare_on_task(task: str, updates: int, key: str = "solver.jv_method",
                    values: tuple[str, ...] = ("jvp", "linearize"), solver: str = "hf") -> dict[str, dict[str, float]]:
    """Updates of a second-order solver (HF by default, or BDHF, SGN) on a configured task (its own solver
    hints) under each value of one config key (e.g.
    solver.jv_method or model.impl), each from the same model, solver and data-stream state in turn, so all
    see the same batches; prints per-update times, totals and ms per 1000-sequence minibatch, with and without
    the time spent tracing products for new batch shapes (paid once per shape in a run)."""
    from hydra import compose, initialize_config_dir

    from hfrun.config import CONFIG_DIR
    from hfrun.engine import build_model, build_solver, build_task

    device = torch.device("cpu")
    runs = {}
    for value in values:
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            cfg = compose("config", overrides=[f"solver={solver}", f"task={task}", "seed=0", f"{key}={value}"])
        torch.manual_seed(0)
        task_object = build_task(cfg, device, torch.float32)
        model = build_model(cfg, task_object, device, torch.float32)
        runs[value] = (model, build_solver(cfg, model, task_object), task_object.train_stream())
    first = runs[values[0]]
    for model, _, _ in runs.values():  # the same weights whatever the key changes
        model.load_state_dict(first[0].state_dict())
    totals = {value: {"update_s": 0.0, "cg_s": 0.0, "trace_s": 0.0, "examples": 0} for value in values}
    for update in range(updates):
        start_state = copy.deepcopy((first[0].state_dict(), first[1].state_dict(), first[2].state_dict()))
        for value in (values if update % 2 == 0 else values[::-1]):
            model, solver, stream = runs[value]
            model.load_state_dict(start_state[0])
            solver.load_state_dict(copy.deepcopy(start_state[1]))
            stream.load_state_dict(copy.deepcopy(start_state[2]))
            start = time.perf_counter()
            stats = solver.step(stream)
            totals[value]["update_s"] += time.perf_counter() - start
            totals[value]["cg_s"] += stats["time_cg_s"]
            totals[value]["trace_s"] += stats.get("time_trace_s", 0.0)
            totals[value]["examples"] += stats["examples_grad"] + stats["examples_curv"]
        for value in values[1:]:  # every run continues from the first value's state, so all see one path
            runs[value][0].load_state_dict(first[0].state_dict())
        print(f"update {update}: {stats['cg_iters']} CG iterations")
    base = totals[values[0]]
    plain_ms = plain_loop_gradient_ms(first[2], first[0])
    for value in values:
        total = totals[value]
        minibatches = total["examples"] / 1000
        per_minibatch = 1000 * total["update_s"] / minibatches
        untraced = 1000 * (total["update_s"] - total["trace_s"]) / minibatches
        print(f"{key}={value:>10}: updates {total['update_s']:.1f} s ({total['update_s'] / base['update_s']:.2f}x), "
              f"CG {total['cg_s']:.1f} s ({total['cg_s'] / base['cg_s']:.2f}x), "
              f"{per_minibatch:.0f} ms per 1000-sequence minibatch; tracing new shapes {total['trace_s']:.1f} s, "
              f"{untraced:.0f} ms per minibatch without it"
              + (f" ({per_minibatch / plain_ms:.2f}x and {untraced / plain_ms:.2f}x a plain-loop gradient)"
                 if plain_ms else ""))
    if plain_ms:
        print(f"a plain-loop RNN gradient on 1000 of the task's sequences, same sizes: {plain_ms:.0f} ms")
    return totals


def plain_loop_gradient_ms(stream, model: nn.Module, repeats: int = 5) -> float | None:
    """The M&S unit's yardstick: one gradient of a plain-loop RNN (PlainLoopRNN, the model's sizes) on 1000 of
    the stream's sequences, median of `repeats`; None for a model that is not hfrun's RNN."""
    if not isinstance(model, RNN):
        return None
    batch = copy.deepcopy(stream).next(1000)
    plain = PlainLoopRNN(model.input_size, model.hidden_size, model.output_size)
    params, loss = list(plain.parameters()), SquaredError()
    targets = torch.zeros(*batch.inputs.shape[:2], model.output_size)

    def gradient():
        return torch.autograd.grad(loss(plain(batch.inputs), targets, batch.mask), params)

    gradient()
    return statistics.median(elapsed_ms(gradient, torch.device("cpu")) for _ in range(repeats))


def rnn_gradient_work(model: nn.Module, loss: Callable, batch: Batch,
                      with_preactivations: bool = False) -> Callable[[], tuple[Tensor, ...]]:
    """One RNN gradient as a callable; with pre-activations, a small term in a (1e-3 · mean a²) stands in for
    structural damping's use of them, so that the gradient flows through them."""
    params = list(model.parameters())

    def work():
        if with_preactivations:
            z, a = model.forward_with_preactivations(batch.inputs)
            value = loss(z, batch.targets, batch.mask) + 1e-3 * a.square().mean()
        else:
            value = loss(model(batch.inputs), batch.targets, batch.mask)
        return torch.autograd.grad(value, params)
    return work


def rnn_gradient_table(device: torch.device, scale: float, repeats: int) -> dict[str, float]:
    """The RNN gradient of each implementation against the plain loop's, in interleaved rounds (T = 100, 1000
    sequences, loss on the last step): hfrun's RNN as is, with its pre-activations a returned for structural
    damping (a small term in a stands in for its use, so that the gradient flows through them), and
    model.impl=loop. Ratios are medians of per-round ratios to the plain loop doing the same work: a row with
    pre-activations is held against the plain loop that keeps its a_t and pays the same term in a, so the
    ratio measures the recurrence, not the (B, L, H) term's own cost."""
    cases = max(2, int(1000 * scale))
    inputs = torch.randn(cases, 100, 2, device=device)
    targets = torch.randn(cases, 100, 1, device=device)
    mask = torch.zeros(cases, 100, device=device)
    mask[:, -1] = 1
    loss = SquaredError()
    plain = PlainLoopRNN(2, 100, 1).to(device)
    analytic, loop = RNN(2, 1).to(device), RNN(2, 1, impl="loop").to(device)

    def gradient_of(model, with_preactivations=False):
        return rnn_gradient_work(model, loss, Batch(inputs, targets, mask), with_preactivations)

    works = {"plain loop": gradient_of(plain), "plain loop, with pre-activations": gradient_of(plain, True),
             "analytic": gradient_of(analytic), "analytic, with pre-activations": gradient_of(analytic, True),
             "loop": gradient_of(loop), "loop, with pre-activations": gradient_of(loop, True)}
    reference = {name: "plain loop, with pre-activations" if "pre-activations" in name else "plain loop"
                 for name in works}
    for work in works.values():
        work()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in works}
    ratios: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        round_ms = {name: elapsed_ms(work, device) for name, work in works.items()}
        for name, ms in round_ms.items():
            times[name].append(ms)
            ratios[name].append(ms / round_ms[reference[name]])
    result = {name: statistics.median(ratios[name]) for name in works}
    print_table("tanh RNN-100 gradient, T100 B1000, against the plain loop under autograd doing the same work "
                "(interleaved rounds)", ["model", "grad_ms", "/ plain loop"],
                [[name, f"{statistics.median(times[name]):.1f}", f"{result[name]:.2f}"] for name in works])
    return result


SGN_CG_ITERS = (3, 10)


def sgn_workloads(device: torch.device, scale: float) -> list[tuple[str, nn.Module, Callable, Batch]]:
    """The SGN release's MNIST and sine networks on batches of 1000 (random data of the right shapes)."""
    cases = max(2, int(1000 * scale))
    mnist = MLP(784, 10, [20, 20, 20], activation="sigmoid", init="normal").to(device)
    sine = MLP(1, 1, [20, 20, 20], activation="sigmoid", init="normal").to(device)
    return [("SGN MLP 784-20-20-20-10, B1000", mnist, SoftmaxCrossEntropy(),
             Batch(torch.rand(cases, 784, device=device), torch.randint(0, 10, (cases,), device=device))),
            ("SGN MLP 1-20-20-20-1, B1000", sine, SquaredError(1.0),
             Batch(torch.rand(cases, 1, device=device) * 2 - 1, torch.randn(cases, 1, device=device)))]


def sgn_measure(model: nn.Module, loss, batch: Batch, device: torch.device, repeats: int) -> dict[str, float]:
    """One SGN update with exactly k CG steps (cg_tol 0) against k + 1 gradients: update / (grad·(1 + k))."""
    from hfrun.solvers.sgn import SGN

    stream = FixedBatch(batch)

    def gradient():
        model.zero_grad(set_to_none=True)
        loss(model(batch.inputs), batch.targets).backward()

    row = {}
    for iters in SGN_CG_ITERS:
        solver = SGN(copy.deepcopy(model), loss, batch_size=batch.size, cg_max_iters=iters, cg_warmup_updates=0,
                     cg_tol=0.0)
        for _ in range(2):  # warm-up
            gradient(), solver.step(stream)
        ratios, updates = [], []
        for _ in range(repeats):
            grad_ms = statistics.median(elapsed_ms(gradient, device) for _ in range(3))
            update_ms = elapsed_ms(lambda: solver.step(stream), device)
            ratios.append(update_ms / (grad_ms * (1 + iters)))
            updates.append(update_ms)
        row[f"update_ms_cg{iters}"] = statistics.median(updates)
        row[f"ratio_cg{iters}"] = statistics.median(ratios)
    row["grad_ms"] = statistics.median(elapsed_ms(gradient, device) for _ in range(repeats))
    return row


def sgn_table(device: torch.device, scale: float, repeats: int) -> None:
    columns = ["grad_ms", *(f"{kind}_cg{k}" for k in SGN_CG_ITERS for kind in ("update_ms", "ratio"))]
    rows = []
    for name, model, loss, batch in sgn_workloads(device, scale):
        row = sgn_measure(model, loss, batch, device, repeats)
        rows.append([name, *(f"{row[c]:.2f}" if c.startswith("ratio") else f"{row[c]:.1f}" for c in columns)])
    print_table("SGN: one update with k CG steps against (1 + k) gradients (ratio = update / (grad·(1+k)); the "
                "floor is (1 + k·product/gradient)/(1 + k), about 1.1-1.2 with traced products)",
                ["workload", *columns], rows)


def bdhf_table(device: torch.device, scale: float, repeats: int) -> list[dict]:
    """One all-blocks product of block-diagonal HF (one block per layer) against one full GGN product: with
    the blocks' tangents batched through vmap, one block at a time, and cut (one operator per block that
    differentiates only the block's parameters, `cut_products`). A CG iteration is one such product."""
    from hfrun.solvers.bdhf import BlockDiagonalHF, BlockDiagonalProduct
    from hfrun.solvers.second_order import ChunkedCurvature

    cases = max(2, int(1000 * scale))
    steps = 100 if scale >= 0.1 else 5  # smoke tests: a short recurrence traces in a fraction of the time
    images = torch.rand(cases, 784, device=device)
    problems = [("autoencoder 784-…-30-…-784, B1000", Autoencoder(784).to(device), SigmoidCrossEntropy(),
                 Batch(images, images)),
                ("SGN MLP 784-20-20-20-10, B1000", MLP(784, 10, [20, 20, 20], activation="sigmoid").to(device),
                 SoftmaxCrossEntropy(), Batch(images, torch.randint(0, 10, (cases,), device=device))),
                (f"tanh RNN-100 T{steps} B1000, analytic", RNN(2, 1).to(device), SquaredError(),
                 Batch(torch.randn(cases, steps, 2, device=device), torch.randn(cases, steps, 1, device=device)))]
    rows = []
    for name, model, loss, batch in problems:
        solver = BlockDiagonalHF(model, loss, gradient_batch_size=cases)
        curvature = ChunkedCurvature(model, loss, [batch], damping=1.0)
        batched = BlockDiagonalProduct(curvature, solver.masks, batched=True)
        looped = BlockDiagonalProduct(curvature, solver.masks, batched=False)
        cut = BlockDiagonalHF(model, loss, gradient_batch_size=cases, cut_products=True)._damped_curvature([batch])
        v = torch.randn(len(solver.block_index), device=device)
        works = {"full_ms": lambda: curvature(v), "batched_ms": lambda: batched(v), "looped_ms": lambda: looped(v),
                 "cut_ms": lambda: cut(v)}
        for work in works.values():
            work()  # warm-up
        times: dict[str, list[float]] = {key: [] for key in works}
        for _ in range(repeats):
            for key, work in works.items():
                times[key].append(elapsed_ms(work, device))
        row = {"workload": name, "blocks": solver.num_blocks, **{key: statistics.median(t) for key, t in times.items()}}
        row["batched/full"] = row["batched_ms"] / row["full_ms"]
        row["looped/full"] = row["looped_ms"] / row["full_ms"]
        row["cut/full"] = row["cut_ms"] / row["full_ms"]
        rows.append(row)
    columns = ["blocks", "full_ms", "batched_ms", "looped_ms", "cut_ms", "batched/full", "looped/full", "cut/full"]
    print_table("BDHF: one all-blocks curvature product (one per layer) against one full GGN product",
                ["workload", *columns],
                [[row["workload"], *(str(row[c]) if c == "blocks" else f"{row[c]:.2f}" if "/" in c
                                     else f"{row[c]:.1f}" for c in columns)] for row in rows])
    return rows


def data_table(tasks: tuple[str, ...], overrides: tuple[str, ...] = (), batch_size: int = 1000) -> list[dict]:
    """Per data-set task with its default model: the start-up (read, verify, prepare the data) and one
    epoch split into data handling (drawing shuffled minibatches of `batch_size` from the stream) and
    compute (a gradient of each, forward and backward), to show that data handling does not dominate.
    Uses the data sets where a run would find them ($HFRUN_DATASETS, task.data_dir=...)."""
    from hydra import compose, initialize_config_dir

    from hfrun.config import CONFIG_DIR
    from hfrun.engine import build_model, build_task

    rows = []
    for name in tasks:
        with initialize_config_dir(str(CONFIG_DIR), version_base=None):
            cfg = compose("config", overrides=[f"task={name}", "seed=0", *overrides])
        torch.manual_seed(0)
        start = time.perf_counter()
        task = build_task(cfg, torch.device("cpu"), torch.float32)
        startup_s = time.perf_counter() - start
        model = build_model(cfg, task, torch.device("cpu"), torch.float32)
        stream, batches = task.train_stream(), max(1, task.train_cases // batch_size)
        data_s = compute_s = 0.0
        for _ in range(batches):
            start = time.perf_counter()
            batch = stream.next(batch_size)
            data_s += time.perf_counter() - start
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            task.loss(model(batch.inputs), batch.targets, batch.mask).backward()
            compute_s += time.perf_counter() - start
        rows.append({"task": name, "model": type(model).__name__, "cases": task.train_cases, "startup_s": startup_s,
                     "data_ms": 1000 * data_s, "compute_ms": 1000 * compute_s,
                     "data_share": data_s / (data_s + compute_s)})
    print_table(f"one epoch of minibatches of {batch_size} on the CPU ({torch.get_num_threads()} threads): data "
                "handling vs gradients", ["task", "model", "cases", "startup_s", "data_ms", "compute_ms", "data_share"],
                [[row["task"], row["model"], str(row["cases"]), f"{row['startup_s']:.2f}", f"{row['data_ms']:.0f}",
                  f"{row['compute_ms']:.0f}", f"{row['data_share']:.1%}"] for row in rows], left=2)
    return rows


MEMORY_PROBE = """
import resource, sys, torch
from hfrun.allocator import keep_freed_memory
from hfrun.curvature import CurvatureOperator
from hfrun.losses import SquaredError
from hfrun.models.rnn import RNN
from hfrun.tasks.base import Batch
keep_freed_memory(); torch.set_flush_denormal(True); torch.manual_seed(0)
steps, what, jv_method, mu = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
inputs = torch.randn(1000, steps, 2)
mask = torch.zeros(1000, steps)
mask[:, -1] = 1
batch, model, loss = Batch(inputs, torch.randn(1000, steps, 1), mask), RNN(2, 1), SquaredError()
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if what == "gradient":
    before = peak()
    z, a = model.forward_with_preactivations(inputs) if mu else (model(inputs), None)
    torch.autograd.grad(loss(z, batch.targets, mask), list(model.parameters()))
else:
    before = peak()
    operator = CurvatureOperator(model, loss, batch, damping=1.0, structural_damping=mu, jv_method=jv_method)
    if what == "product":
        before = peak()
        operator.mv(torch.randn(operator.num_params))
print(peak() - before)
"""


def peak_memory_mib(steps: int, what: str, jv_method: str = "traced", structural_damping: float = 0.0) -> float:
    """Growth of the peak resident memory (MiB) of a fresh process over one gradient, one curvature
    operator's set-up, or one product after set-up, for the tanh RNN-100 on 1000 sequences of `steps`
    steps (ru_maxrss: the process keeps freed memory, so its peak is what the work needed at once)."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(steps), what, jv_method,
                             str(structural_damping)], capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


BDHF_MEMORY_PROBE = """
import resource, sys, torch
from hfrun.allocator import keep_freed_memory
from hfrun.losses import SigmoidCrossEntropy, SquaredError
from hfrun.models.autoencoder import Autoencoder
from hfrun.models.rnn import RNN
from hfrun.solvers.bdhf import BlockDiagonalHF, BlockDiagonalProduct
from hfrun.solvers.second_order import ChunkedCurvature
from hfrun.tasks.base import Batch
keep_freed_memory(); torch.set_flush_denormal(True); torch.manual_seed(0)
problem, what, cases = sys.argv[1], sys.argv[2], int(sys.argv[3])
if problem == "autoencoder":
    images = torch.rand(cases, 784)
    model, loss, batch = Autoencoder(784), SigmoidCrossEntropy(), Batch(images, images)
else:
    model, loss = RNN(2, 1), SquaredError()
    batch = Batch(torch.randn(cases, 100, 2), torch.randn(cases, 100, 1))
solver = BlockDiagonalHF(model, loss, gradient_batch_size=cases, cut_products=what == "cut")
v = torch.randn(len(solver.block_index))
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak()
if what == "cut":
    product = solver._damped_curvature([batch])
else:
    curvature = ChunkedCurvature(model, loss, [batch], damping=1.0)
    product = curvature if what == "full" else BlockDiagonalProduct(curvature, solver.masks, batched=what == "batched")
product(v)
print(peak() - before)
"""


def bdhf_peak_memory_mib(problem: str, what: str, cases: int = 1000) -> float:
    """Growth of the peak resident memory (MiB) of a fresh process over the set-up and one product: a full GGN
    product, or BDHF's all-blocks product (vmapped, one block at a time, or cut: K operators holding their
    primal values at once), on `cases` cases of the autoencoder or the tanh RNN-100 at T = 100."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", BDHF_MEMORY_PROBE, problem, what, str(cases)], capture_output=True,
                            text=True, check=True)
    return float(result.stdout.split()[-1])


def memory_table(steps_list: tuple[int, ...] = (100, 200)) -> None:
    rows = [[str(steps), *(f"{peak_memory_mib(steps, what, method, 0.03):.0f}" for what, method in (
        ("gradient", "jvp"), ("setup", "traced"), ("product", "traced"), ("setup", "linearize"),
        ("product", "linearize"), ("setup", "jvp"), ("product", "jvp")))] for steps in steps_list]
    print_table("peak memory growth (MiB), tanh RNN-100, 1000 sequences, model.impl=analytic, structural damping",
                ["T", "gradient", "set-up (traced)", "product (traced)", "set-up (linearize)", "product (linearize)",
                 "set-up (jvp)", "product (jvp)"], rows, left=0)
    whats = ("full", "batched", "looped", "cut")
    print_table("peak memory growth (MiB) over set-up and one product: a full GGN product against BDHF's all-blocks "
                "product (a block per layer), 1000 cases",
                ["model", "full GGN", "BDHF vmapped", "BDHF one block at a time", "BDHF cut"],
                [[problem, *(f"{bdhf_peak_memory_mib(problem, what):.0f}" for what in whats)]
                 for problem in ("autoencoder", "rnn")], left=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every batch size (smoke tests)")
    parser.add_argument("--task", help="instead of the table: time updates of --solver on this task (e.g. addition_T30) "
                                       "under each value of --compare, from the same states")
    parser.add_argument("--compare", default="solver.jv_method=jvp,traced", metavar="KEY=V1,V2",
                        help="with --task: the config key and values to compare (e.g. model.impl=loop,analytic)")
    parser.add_argument("--updates", type=int, default=8, help="with --task: how many updates")
    parser.add_argument("--solver", default="hf", help="with --task: the solver config (hf, bdhf, sgn)")
    parser.add_argument("--memory", action="store_true",
                        help="instead of the table: peak memory of a gradient, a set-up and a product, T = 100, 200, "
                             "and of BDHF's all-blocks products")
    parser.add_argument("--data", metavar="TASK,TASK", help="instead of the table: one epoch of these data-set "
                        "tasks split into data handling and gradients (e.g. mnist,boston,sine_f10)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="with --data: config overrides "
                        "for every task (e.g. task.verify=false)")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="the table's rows with compiled products (about a minute each to compile on a CPU)")
    parser.add_argument("--system-allocator", action="store_true",
                        help="leave glibc's malloc as it is (runs set run.keep_freed_memory=true), to measure that")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.task else  # the task comparison runs on the CPU
                          "cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
        if not args.system_allocator:  # as a run does (hfrun/allocator.py)
            keep_freed_memory()
    torch.manual_seed(0)
    if args.memory:
        memory_table()
        return
    if args.data:
        data_table(tuple(args.data.split(",")), tuple(args.set))
        return
    if args.task:
        key, _, values = args.compare.partition("=")
        compare_on_task(args.task, args.updates, key, tuple(values.split(",")), args.solver)
        return
    columns = ["grad_ms", "gvp_ms", "gvp/grad", "cg_iter_ms", "cg_overhead", "setup_ms", "trace_ms", "hf10_ms",
               "peer10_ms", "hf10/peer", "hf_cg_iters"]
    rows = []
    for workload in workloads(device, args.scale, args.compiled):
        row = measure(workload, device, args.repeats)
        rows.append([f"{workload.name} ({row['jv_method_used']})", *(f"{row[c]:.1%}" if c == "cg_overhead" else
                                                                     f"{row[c]:.2f}" if "/" in c else
                                                                     f"{row[c]}" if c == "hf_cg_iters" else
                                                                     f"{row[c]:.1f}" for c in columns)])
    print_table(f"hfrun bench on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}",
                ["workload", *columns], rows)
    rnn_gradient_table(device, args.scale, args.repeats)
    sgn_table(device, args.scale, args.repeats)
    bdhf_table(device, args.scale, args.repeats)


if __name__ == "__main__":
    main()
