"""A curvature product traced once per batch shape and replayed in two halves: the primal half once per
batch, the tangent half once per product.

A curvature product on a batch, e.g. the GGN's Jᵀ(H_L(J v)) (hfrun.curvature), is a function of fixed
inputs (parameters, buffers, inputs, targets, mask) and varying ones (the tangent v, the structural
damping scale μλ). Every operation that does not depend on the varying inputs (the forward pass, H_L's
factors, the slopes 1 − tanh(a)², every intermediate the tangent and backward passes read) gives the
same result for every product on the batch. So:

  1. `make_fx` records one product as a graph of aten ops, with fake tensors (no arithmetic is done);
  2. the nodes reachable from a varying input form the tangent graph; the others form the primal
     graph, whose outputs are the values the tangent graph reads;
  3. per batch, the primal graph runs once (about a forward pass); per product, the tangent graph runs
     on its outputs (a tangent pass and a backward pass: the physical floor of a product).

The graph depends on shapes, not values, so one trace serves every batch of the same shapes. That is
the difference from `torch.func.linearize`, which folds the batch into its trace and so pays the trace
(seconds for a 100-step recurrence) on every batch.

Why by hand rather than torch.compile alone: compile would re-trace and re-compile per batch shape as
this does, but it cannot keep the primal half out of each call, which is what makes a product cost a
tangent pass and a backward pass instead of a forward pass more. What it adds is code generation (fused
elementwise work, no stacking copies); `compile_tangent` applies it to the tangent half
(`jv_method=compiled`). On the CPU, for the 100-step RNN on 1000 sequences, that cut a product by 6-22%
(`make bench` on two machines) but took 13-64 s per batch shape to compile, so it pays on long
runs of one batch shape only: it is the default for the pathological tasks at T >= 100 under the
release's definitions, `auto` (traced) elsewhere (README, "Speed").

The jvp gives the batch's inputs a zero tangent, and the trace multiplies it through the first layer;
`drop_zero_terms` removes that work before the split (on the MLP, a matmul as large as the first layer's
in every batch's set-up; on the RNN, a (B·T, H) zero added into every product).

Safety:
  - Fake tensors make any data-dependent Python (`.item()`, `if tensor:`) fail at trace time, instead
    of silently baking one batch's values into the graph; the caller then falls back to an untraced
    product.
  - Parameters and buffers are inputs of the graph, never constants.
  - A graph with in-place ops (native RNN kernels' decompositions have some) is traced again through
    `torch.func.functionalize`, so that no node of one half writes into a tensor the other half reads
    (functionalizing the function itself fails on custom autograd Functions); the product is never a
    cached tensor itself.
  - The trace holds the forward pass twice (the vjp's and the jvp's); `merge_common_subexpressions`
    merges them (never random ops), and is skipped for a graph that mutates anything.
  - The caller checks each new trace once against the untraced product (hfrun.curvature).
A model whose forward depends on Python state other than its parameters, buffers, training flag and
input shapes would replay stale behaviour: use `solver.jv_method=jvp` for it.
"""
from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor, fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops
from torch.func import functionalize

log = logging.getLogger("hfrun.traced")

MAX_TRACES_PER_MODEL = 256  # traces kept per model (least recently used dropped): one per batch shape, and with
                             # block-diagonal HF's cut products one per block and shape (e.g. 6 blocks × 20 lengths)
_ALIASES = (torch.ops.aten.alias.default, torch.ops.aten.detach.default)

_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → OrderedDict(key → TracedProduct)


class TracedProduct:
    """The two halves of a traced product: `prepare(fixed)` runs the primal half, returning (its first
    output, the cached values); `product(cached, varying)` runs the tangent half."""

    def __init__(self, primal: fx.GraphModule, tangent: fx.GraphModule):
        self.primal, self.tangent = primal, tangent

    def prepare(self, fixed: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        with torch.no_grad():
            first, *cached = self.primal(*fixed)
        return first, tuple(cached)

    def product(self, cached: tuple[Tensor, ...], varying: Sequence[Tensor]) -> Tensor:
        return self.tangent(*cached, *varying)


_COMPILE_FAILED: list[str] = []  # why compiling failed in this process, once it has: later traces are not compiled


class CompiledTangent:
    """The tangent half compiled by torch.compile's inductor at its first call, or, where that first call fails
    (no C++ compiler, an op inductor cannot lower), the traced graph as it is: compiling only makes the same
    products faster, so its failure must not cost the trace. One warning per process, and no later trace tries
    to compile again. Memory errors are not compile failures and reach the caller, as do errors of later calls
    (the compiled code then exists)."""

    def __init__(self, tangent: fx.GraphModule):
        self.eager = tangent
        self.compiled = None if _COMPILE_FAILED else torch.compile(tangent, dynamic=False)
        self.first_call = True

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args: Tensor) -> Tensor:
        if self.compiled is None:
            return self.eager(*args)
        if not self.first_call:
            return self.compiled(*args)
        self.first_call = False
        log.info("jv_method=compiled: compiling the curvature product for a new batch shape, once per shape (on a "
                 "CPU about a minute for a 100-step RNN, several for 200 steps; inductor's cache on disk makes it "
                 "seconds for later runs of the same shape)")
        try:
            return self.compiled(*args)
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as error:  # noqa: BLE001 - the uncompiled graph computes the same products
            self.compiled = None
            if not _COMPILE_FAILED:
                _COMPILE_FAILED.append(f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}")
                log.warning("jv_method=compiled: compiling the curvature product failed (%s); products run traced, "
                            "uncompiled, for the rest of this process", _COMPILE_FAILED[0])
            return self.eager(*args)


class TraceFailed(Exception):
    """A product that could not be traced, or whose trace failed its check, for one key."""


def cached_trace(model: nn.Module, key: Hashable, build: Callable[[], TracedProduct]) -> TracedProduct:
    """The trace stored for `model` under `key`, built (and stored) on first use. A failure is stored as its
    message (no traceback: that would keep the failing call's frames, and with them batches and models,
    alive) and raised again, as TraceFailed, on later calls, so a model that cannot be traced is tried once."""
    traces = _TRACES.setdefault(model, OrderedDict())
    if key not in traces:
        try:
            traces[key] = build()
        except Exception as error:  # noqa: BLE001 - stored and re-raised to every caller with this key
            if isinstance(error, NotImplementedError) and "forward AD" in str(error):
                raise  # a fused kernel without forward-mode AD: the caller retries under native kernels
            traces[key] = f"it could not be traced ({type(error).__name__}: {str(error)[:300]})"
        while len(traces) > MAX_TRACES_PER_MODEL:
            traces.popitem(last=False)
    traces.move_to_end(key)
    stored = traces[key]
    if isinstance(stored, str):
        raise TraceFailed(stored)
    return stored


def forget_trace(model: nn.Module, key: Hashable, reason: str | None) -> None:
    """Store `reason` in place of a trace that failed its check, so that it is not used again; with None,
    drop the trace, so that the next batch of that shape traces and checks again."""
    traces = _TRACES.setdefault(model, OrderedDict())
    if reason is None:
        traces.pop(key, None)
    else:
        traces[key] = reason


def tensor_key(tensors: Sequence[Tensor | None]) -> tuple:
    """What a trace depends on in its tensor inputs: shape, strides, dtype and device of each (None for an
    absent one)."""
    return tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def trace_product(function: Callable[..., tuple[Tensor, Tensor]], fixed: Sequence[Tensor],
                  varying: Sequence[Tensor], compile_tangent: bool = False) -> TracedProduct:
    """Trace `function(*fixed, *varying) -> (product, primal_value)` and split it.

    `product` must be the only output that depends on `varying`; `primal_value` (e.g. the batch loss)
    must not, and comes back from `TracedProduct.prepare`. With `compile_tangent` the tangent half goes
    through torch.compile's inductor (compiled at its first call; `CompiledTangent`).
    """
    graph_module = make_fx(function, tracing_mode="fake")(*fixed, *varying)
    if mutates(graph_module):  # e.g. native RNN kernels' decompositions: trace the graph again, functionalized
        graph_module = make_fx(functionalize(graph_module, remove="mutations_and_views"), tracing_mode="fake")(
            *fixed, *varying)
        if mutates(graph_module):
            raise ValueError("the traced product mutates its inputs")
    graph_module = drop_zero_terms(merge_common_subexpressions(graph_module))
    traced = split_primal_tangent(graph_module, num_fixed=len(fixed))
    if compile_tangent:
        traced.tangent = CompiledTangent(traced.tangent)
    return traced


def mutates(graph_module: fx.GraphModule) -> bool:
    """Whether any node of the graph writes into a tensor (an in-place or out= op)."""
    return any(node.op == "call_function" and getattr(node.target, "_schema", None) is not None
               and node.target._schema.is_mutable for node in graph_module.graph.nodes)


def merge_common_subexpressions(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The graph with aliases replaced by what they alias and repeated pure operations merged (torch.fx's
    CSEPass, random ops excepted), dead code dropped; unchanged where anything is mutated in place, where both
    are unsafe (`trace_product` functionalizes such graphs first)."""
    graph = graph_module.graph
    if mutates(graph_module):
        return graph_module
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ALIASES:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph_module.recompile()
    merged = CSEPass(get_CSE_banned_ops())(graph_module).graph_module  # random ops are never merged
    merged.graph.eliminate_dead_code()
    merged.recompile()
    return merged


aten = torch.ops.aten
_ZERO_SOURCES = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)
_VIEWS = (aten.expand.default, aten.t.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int, aten.permute.default, aten.clone.default)
_ZERO_IF_ANY_FACTOR_IS = (aten.mm.default, aten.bmm.default, aten.mul.Tensor, aten.neg.default)


def drop_zero_terms(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The graph without the work done on tensors known to be zero. A jvp gives inputs that are not
    differentiated (the batch's x) a zero tangent, and the trace records it: e.g. for an MLP
    `mm(expand(zeros([]), (B, 784)), W₁ᵀ)`, a matmul as large as the first layer's, which then lands in
    the primal half (it depends on nothing varying) and is added to every product. Known zeros are the
    zero constructors (and full(0)), their views and copies, and products, matmuls and negations with a zero
    factor; each of the latter becomes a zero scalar expanded to its shape (no arithmetic, no memory), and
    x + 0, x − 0 and addmm(b, 0, W) become x, or b expanded to the result's shape and copied into the
    result's contiguous layout. Ops whose dtype or strides would change otherwise are kept. Exact up to the
    sign of zero, except that 0 × inf and 0 × NaN give 0 here instead of NaN (weights that hold them make the
    whole product meaningless anyway). Unchanged where anything is mutated in place."""
    graph = graph_module.graph
    if mutates(graph_module):
        return graph_module
    zero: set[fx.Node] = set()

    def value(node):
        return node.meta.get("val") if isinstance(node, fx.Node) else None

    def zeros_like_result(node: fx.Node) -> fx.Node:
        result = value(node)
        with graph.inserting_before(node):
            scalar = graph.call_function(aten.zeros.default, ([],), {"dtype": result.dtype, "device": result.device})
            expanded = graph.call_function(aten.expand.default, (scalar, list(result.shape)))
        scalar.meta["val"], expanded.meta["val"] = result.new_zeros(()), result
        zero.update((scalar, expanded))
        return expanded

    def as_result(kept: fx.Node, node: fx.Node) -> fx.Node | None:
        """`kept` in the place of `node`, with node's dtype, shape and strides (later views may depend on
        them): itself, or expanded to node's shape and copied contiguous; None (keep the op) otherwise."""
        kept_value, result = value(kept), value(node)
        if kept_value is None or kept_value.dtype != result.dtype or kept_value.device != result.device:
            return None
        if tuple(kept_value.shape) == tuple(result.shape) and kept_value.stride() == result.stride():
            return kept
        if not result.is_contiguous():
            return None
        with graph.inserting_before(node):
            expanded = graph.call_function(aten.expand.default, (kept, list(result.shape)))
            copied = graph.call_function(aten.clone.default, (expanded,), {"memory_format": torch.contiguous_format})
        expanded.meta["val"], copied.meta["val"] = result.expand(result.shape), result
        if kept in zero:
            zero.update((expanded, copied))
        return copied

    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(value(node), Tensor):
            continue
        target, args = node.target, node.args
        if target in _ZERO_SOURCES or (target is aten.full.default and args[1] == 0):
            zero.add(node)
            continue
        if target in _VIEWS and args[0] in zero:
            zero.add(node)
            continue
        replacement = None
        if target in _ZERO_IF_ANY_FACTOR_IS and any(arg in zero for arg in args):
            replacement = zeros_like_result(node)
        elif target is aten.addmm.default and not node.kwargs and (args[1] in zero or args[2] in zero):
            replacement = zeros_like_result(node) if args[0] in zero else as_result(args[0], node)
        elif target in (aten.add.Tensor, aten.sub.Tensor) and not node.kwargs and args[1] in zero:
            replacement = as_result(args[0], node)
        elif target is aten.add.Tensor and not node.kwargs and args[0] in zero:
            replacement = as_result(args[1], node)
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def _fresh(node: fx.Node) -> bool:
    """Whether the node's value is a new tensor: neither an input of the graph nor a view of another."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and not (schema is not None and schema.returns
                                                and schema.returns[0].alias_info is not None)


def split_primal_tangent(graph_module: fx.GraphModule, num_fixed: int) -> TracedProduct:
    """Split a graph whose first `num_fixed` placeholders are fixed and the rest varying, and whose output
    is (product, primal_value), into the primal graph (fixed placeholders → (primal_value, *values the
    tangent graph reads)) and the tangent graph (those values, the varying placeholders → product)."""
    graph = graph_module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    output_node = next(node for node in graph.nodes if node.op == "output")
    product_node, primal_value_node = output_node.args[0]
    varying = set(placeholders[num_fixed:])
    for node in graph.nodes:
        if node.op not in ("placeholder", "output") and any(arg in varying for arg in node.all_input_nodes):
            varying.add(node)
    if primal_value_node in varying:
        raise ValueError("the traced function's second output depends on the varying inputs")
    # The primal values the tangent half reads (and the product itself, should it not depend on them).
    handed_over: dict[fx.Node, None] = {}
    for node in graph.nodes:
        if node in varying and node.op != "placeholder":
            handed_over.update((arg, None) for arg in node.all_input_nodes if arg not in varying)
    if product_node not in varying:
        handed_over[product_node] = None

    primal_graph, primal_env = fx.Graph(), {}
    for node in graph.nodes:
        if node.op != "output" and node not in varying:
            primal_env[node] = primal_graph.node_copy(node, lambda arg: primal_env[arg])
    primal_graph.output((primal_env[primal_value_node], *(primal_env[node] for node in handed_over)))

    tangent_graph, tangent_env = fx.Graph(), {}
    for index, node in enumerate(handed_over):
        tangent_env[node] = tangent_graph.placeholder(f"primal_{index}")
    for node in placeholders[num_fixed:]:
        tangent_env[node] = tangent_graph.placeholder(node.name)
    for node in graph.nodes:
        if node in varying and node.op != "placeholder":
            tangent_env[node] = tangent_graph.node_copy(node, lambda arg: tangent_env[arg])
    product = tangent_env[product_node]
    if product_node not in varying or not _fresh(product_node):
        # a copy, never a cached tensor, the caller's tangent or a view of either: callers add to it in place
        product = tangent_graph.call_function(torch.ops.aten.clone.default, (product,))
    tangent_graph.output(product)
    primal, tangent = fx.GraphModule(graph_module, primal_graph), fx.GraphModule(graph_module, tangent_graph)
    for half in (primal, tangent):
        half.graph.eliminate_dead_code()
        half.recompile()
    return TracedProduct(primal, tangent)
