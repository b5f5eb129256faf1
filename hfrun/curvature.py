"""Curvature-vector products for any nn.Module, built on torch.func.

For a network z = f(θ; x) and a matching loss L(z, y) (hfrun.losses, averaged
over the B cases of the batch), `CurvatureOperator.mv(v)` returns

    (C + λI + μλ·G_S) v

where
  - C = G = Jᵀ H_L J, the generalized Gauss-Newton matrix (curvature="ggn"),
    J = ∂z/∂θ and H_L = ∂²L/∂z² (Schraudolph 2002; Martens 2010), or
  - C = H = ∂²L(f(θ))/∂θ², the Hessian (curvature="hessian"), as the
    forward-mode derivative of the gradient (Pearlmutter 1994);
  - G_S = J_aᵀ H_S J_a is structural damping (Martens & Sutskever 2011): the
    GGN of a matching loss on the hidden pre-activations a of tanh units,
    H_S = diag(1 − tanh(a)²)/B, per-case normalised like the main loss. It
    needs the model to expose `forward_with_preactivations(x) -> (z, a)`.

Gv costs a Jv product and one reverse pass (Jᵀu): of the order of one gradient
(M&S 2011 §3.1). `jv_method` picks how:
  - "traced": the whole product is traced once per model, loss and batch shape
    (hfrun/traced.py); per batch, its primal half runs once (about a forward
    pass), and each product runs only its tangent half: a tangent pass and a
    backward pass over the cached forward, the physical floor. Every new trace
    is checked against the untraced product; a model that cannot be traced, or
    whose trace disagrees, uses "jvp" (logged once). It serves the Hessian too
    (the tangent half of forward-over-reverse);
  - "compiled": "traced" with the tangent half compiled by torch.compile's
    inductor at its first call per shape: products 6-22% faster on the RNN
    (`make bench` on two machines; README), but a minute of compilation per batch shape on the CPU (where it
    cannot compile, the traced graph runs uncompiled, with one warning);
  - "auto" (the default): "traced", falling back to "jvp" without a warning;
  - "jvp": forward-mode AD, which reruns the primal forward pass alongside the
    tangents in every product, with the vjp closure cached per batch; nothing
    is traced;
  - "linearize": `torch.func.linearize`, which traces the forward-mode pass
    again for every batch (seconds for a 100-step RNN) and then runs only its
    tangent half. Kept for comparison; every trace is checked against jvp;
  - "double_vjp": the vjp of the linear map u ↦ Jᵀu, built once per batch.
    As cheap as a traced product on feed-forward nets, but several times
    slower through a recurrence, whose per-step slicing has costly second
    derivatives.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
import weakref
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, linearize, vjp, vmap

from hfrun.tasks.base import Batch
from hfrun.traced import TracedProduct, TraceFailed, cached_trace, forget_trace, tensor_key, trace_product

log = logging.getLogger(__name__)

CURVATURES = ("ggn", "hessian")
JV_METHODS = ("auto", "traced", "compiled", "linearize", "jvp", "double_vjp")

# Cap on the per-case gradients held at once by `per_case_gradient_squares`: cases × parameters.
PER_CASE_GRADIENT_ELEMENTS = 2**24

# Models whose fused kernels lack forward-mode AD, or whose forward fails under vmap: learned once,
# so later operators on the same model skip the failing attempt.
_MODELS_WITHOUT_FUSED_FORWARD_AD: weakref.WeakSet = weakref.WeakSet()
_MODELS_WITHOUT_VMAP: weakref.WeakSet = weakref.WeakSet()
_MODELS_WITHOUT_LINEARIZE: weakref.WeakSet = weakref.WeakSet()
PROBE_SEED = 20110628  # the probes that check a linearize trace (any fixed seed)
NON_FINITE_PROBE = "jvp's own product of the probe is not finite"
_ALREADY_LOGGED: set[str] = set()
TRACED_METHODS = ("auto", "traced", "compiled")


def _log_once(key: str, level: int, message: str, *args) -> None:
    if key not in _ALREADY_LOGGED:
        _ALREADY_LOGGED.add(key)
        log.log(level, message, *args)


class ParamSpec:
    """The layout of a model's trainable parameters as one flat vector, in `named_parameters` order."""

    def __init__(self, params: Mapping[str, Tensor]):
        self.names = tuple(params)
        self.shapes = tuple(p.shape for p in params.values())
        self.numels = tuple(p.numel() for p in params.values())
        self.num_params = sum(self.numels)

    @classmethod
    def from_module(cls, model: nn.Module) -> "ParamSpec":
        return cls(trainable_parameters(model))

    def flatten(self, tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
        """One 1-D tensor from a dict keyed by parameter name, or a sequence in spec order."""
        if isinstance(tensors, Mapping):
            tensors = [tensors[name] for name in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views into `flat`, keyed by parameter name."""
        if flat.shape != (self.num_params,):
            raise ValueError(f"expected a flat vector of {self.num_params} parameters, got shape {tuple(flat.shape)}")
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.names, flat.split(self.numels), self.shapes)}


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that require grad, detached: the point θ at which curvature is taken."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _split_block(params: dict[str, Tensor], block: Iterable[str] | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the block's parameters, the others), each in model order; every parameter is in the block when
    `block` is None."""
    if block is None:
        return params, {}
    names = set(block)
    unknown = sorted(names - set(params))
    if unknown or not names:
        raise ValueError(f"block={sorted(names)} must name some of the model's trainable parameters; "
                         f"{unknown or 'none'} are not among {list(params)}")
    return ({name: p for name, p in params.items() if name in names},
            {name: p for name, p in params.items() if name not in names})


@contextlib.contextmanager
def _fused_kernels_off():
    """Native kernels instead of oneDNN/cuDNN ones, which lack forward-mode AD (e.g. the LSTM)."""
    cudnn = torch.backends.cudnn
    with warnings.catch_warnings():
        # Toggling oneDNN warns about Intel-GPU TF32 support, which is irrelevant here.
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False), cudnn.flags(
                enabled=False, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                allow_tf32=cudnn.allow_tf32):
            yield


class _PreactivationForward(nn.Module):
    """Calls `model.forward_with_preactivations`, so functional_call can run it with given parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.forward_with_preactivations(x)


def _differs(want: Tensor, got: Tensor) -> str | None:
    """How `got` differs from `want` beyond rounding (1000·eps of want's largest entry), or None. Traced and
    untraced products run the same aten ops and agree to the last bits where the trace is sound; the
    faults the checks catch are of the order of the products themselves."""
    tolerance = 1000 * torch.finfo(want.dtype).eps * float(want.abs().max().clamp_min(1e-30))
    error = float((want - got).abs().max())
    return None if error <= tolerance else f"by {error:.3g} (tolerance {tolerance:.3g})"


class _TraceCheckFailed(Exception):
    """A traced product that does not match the untraced one."""


class _NotCheckable(Exception):
    """The untraced product is not finite on this batch: nothing to check a trace against."""


class CurvatureOperator:
    """v ↦ (C + λI + μλ·G_S) v on one batch, at the model's parameters when constructed.

    C is the GGN Jᵀ H_L J or the Hessian H (see the module docstring). The
    primal work is done once here: outputs, the vjp closure, the loss-Hessian
    factors. `damping` (λ) may be changed between products; `structural_damping`
    (μ) is fixed, and 0 when the model has no `forward_with_preactivations`.
    `block`, a list of trainable parameter names, restricts the operator to
    those parameters: v and the product are in their coordinates (model
    order), P_b (C + λI + μλ·G_S) P_b, the other parameters held as constants.
    Only the block's part of the graph is then differentiated: the tangent pass
    starts where the block's parameters enter, and the backward pass stops there
    (block-diagonal HF's per-block products).
    `jv_method` (hfrun.curvature.JV_METHODS, see the module docstring) picks how products are computed;
    `jv_method_used` says which one the products use after any fallback.
    """

    def __init__(self, model: nn.Module, loss: Callable, batch: Batch, damping: float = 0.0,
                 structural_damping: float = 0.0, curvature: str = "ggn", jv_method: str = "auto",
                 block: Iterable[str] | None = None):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature={curvature!r} is unknown; choose one of {list(CURVATURES)}")
        if jv_method not in JV_METHODS:
            raise ValueError(f"jv_method={jv_method!r} is unknown; choose one of {list(JV_METHODS)}")
        if structural_damping < 0:
            raise ValueError(f"structural_damping must be >= 0, got {structural_damping!r}")
        self.model, self.loss, self.batch = model, loss, batch
        self.curvature, self.jv_method = curvature, jv_method
        self.damping = float(damping)
        self.params, self._frozen = _split_block(trainable_parameters(model), block)
        self.spec = ParamSpec(self.params)
        self.num_params = self.spec.num_params
        self._structural_damping = self._effective_structural_damping(model, float(structural_damping))
        self._forward_module = _PreactivationForward(model) if self._structural_damping > 0 else model
        self._param_prefix = "model." if self._structural_damping > 0 else ""
        self._context = _fused_kernels_off if model in _MODELS_WITHOUT_FUSED_FORWARD_AD else contextlib.nullcontext
        self.trace_seconds = 0.0  # time spent tracing (and checking) products for a new batch shape
        try:
            with self._context():
                self._cache_primal()
        except NotImplementedError as error:  # a fused kernel without forward-mode AD, met by linearize
            if self._context is _fused_kernels_off:
                raise
            self._switch_to_native_kernels(error)

    @property
    def structural_damping(self) -> float:
        return self._structural_damping

    @staticmethod
    def _effective_structural_damping(model: nn.Module, mu: float) -> float:
        if mu > 0 and not callable(getattr(model, "forward_with_preactivations", None)):
            _log_once("no_preactivations", logging.INFO,
                      "structural_damping=%g is ignored: %s has no forward_with_preactivations(x)",
                      mu, type(model).__name__)
            return 0.0
        return mu

    def _forward(self, params: dict[str, Tensor], inputs: Tensor | None = None,
                 buffers: Mapping[str, Tensor] = {},  # noqa: B006 - never mutated
                 frozen: Mapping[str, Tensor] | None = None) -> tuple[Tensor, ...]:
        """(z,) or, with structural damping, (z, a), at `params` (and `buffers`, else the model's own; the
        parameters outside the block at `frozen`, else the model's, detached) on `inputs` (else the batch's)."""
        constants = self._frozen if frozen is None else frozen
        named = {self._param_prefix + name: tensor for name, tensor in {**constants, **params, **buffers}.items()}
        outputs = functional_call(self._forward_module, named, (self.batch.inputs if inputs is None else inputs,))
        return tuple(outputs) if self._structural_damping > 0 else (outputs,)

    def _batch_loss(self, z: Tensor) -> Tensor:
        return self.loss(z, self.batch.targets, self.batch.mask)

    def _cache_primal(self) -> None:
        self._gradient = None
        self._vjp_fn = None
        self._linearized = None
        self._traced = self._prepare_traced() if self.jv_method in TRACED_METHODS else None
        if self._traced is not None:  # compiled only where compiling worked (CompiledTangent)
            self.jv_method_used = "compiled" if getattr(self._traced[0].tangent, "is_compiled", False) else "traced"
        else:
            self._cache_untraced()

    def _cache_untraced(self) -> None:
        """The primal work of the untraced products: outputs, the vjp closure, the loss-Hessian factors."""
        outputs, self._vjp_fn = vjp(self._forward, self.params)
        z = outputs[0]
        output_gradient, loss_value = grad_and_value(self._batch_loss)(z)
        self.loss_value = float(loss_value)
        # Cotangents that pick out the gradient of the main loss only (none on the pre-activations).
        self._gradient_cotangents = (output_gradient, *(torch.zeros_like(a) for a in outputs[1:]))
        self._loss_hessian = self.loss.output_hessian(z, self.batch.targets, self.batch.mask)
        if self._structural_damping > 0:
            tanh_a = torch.tanh(outputs[1])
            self._tanh_hessian = (1 - tanh_a * tanh_a) / z.shape[0]
        if self.curvature == "ggn" and self.jv_method == "linearize" and self.model not in _MODELS_WITHOUT_LINEARIZE:
            self._linearized = self._linearize()
        self.jv_method_used = ("linearize" if self._linearized is not None else
                               "double_vjp" if self.jv_method == "double_vjp" and self.curvature == "ggn"
                               else "jvp")
        if self.jv_method_used == "double_vjp":
            # u ↦ Jᵀu is linear, so its vjp at any u maps v ↦ Jv; at u = ∇_z L its value is the gradient.
            (gradient,), self._jv_by_double_vjp = vjp(self._vjp_fn, self._gradient_cotangents)
            self._gradient = self.spec.flatten(gradient)

    # ---- jv_method "auto", "traced" and "compiled" (hfrun/traced.py) ----

    def _fixed_inputs(self) -> list[Tensor]:
        """The traced product's fixed inputs: parameters (the block's, then the others), buffers, inputs,
        targets and the mask if any."""
        batch = self.batch
        return [*self.params.values(), *self._frozen.values(), *self._buffers.values(), batch.inputs, batch.targets,
                *(() if batch.mask is None else (batch.mask,))]

    def _trace_key(self, fixed: list[Tensor]) -> tuple:
        """What a trace depends on besides the values of its inputs (see hfrun/traced.py)."""
        loss_settings = tuple(sorted((name, repr(value)) for name, value in vars(self.loss).items()))
        return (type(self.loss), loss_settings, self.curvature, self.jv_method == "compiled",
                self._structural_damping > 0, self._context is _fused_kernels_off,
                tuple(module.training for module in self.model.modules()), self.spec.names, tuple(self._frozen),
                tuple(self._buffers),
                self.batch.mask is None, tensor_key(fixed))

    def _prepare_traced(self) -> tuple[TracedProduct, tuple[Tensor, ...]] | None:
        """(the traced product, this batch's cached primal values), or None: the products then use jvp.

        A new trace is checked once against the untraced product; a failure is remembered for the key
        (model, loss, shapes, ...), logged once per model type, and not tried again."""
        self._buffers = {name: b for name, b in self.model.named_buffers()}
        fixed = self._fixed_inputs()
        key = self._trace_key(fixed)
        first = next(iter(self.params.values()))
        varying = [*(torch.zeros_like(p) for p in self.params.values()), first.new_zeros(())]
        built = []

        def build() -> TracedProduct:
            built.append(True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*(get_attr|is_same_size|TF32).*")
                return trace_product(self._traceable_product(), fixed, varying,
                                     compile_tangent=self.jv_method == "compiled")

        clock = time.perf_counter()
        try:
            traced = cached_trace(self.model, key, build)
        except TraceFailed as failure:
            return self._trace_failed(str(failure))
        except NotImplementedError:  # a fused kernel without forward-mode AD (cached_trace lets it through)
            if self._context is not _fused_kernels_off:
                raise  # __init__ switches to native kernels, and this traces again under them
            forget_trace(self.model, key, "it could not be traced even with native kernels")
            return self._trace_failed("it could not be traced even with native kernels")
        try:
            loss_value, cached = traced.prepare(fixed)
            self.loss_value = float(loss_value)
            if built:
                self._check_trace(traced, cached)
        except torch.OutOfMemoryError:
            if built:
                forget_trace(self.model, key, None)  # unchecked: the next batch of this shape traces again
            return None  # this batch only: the untraced products hold fewer intermediates at once
        except _NotCheckable:
            forget_trace(self.model, key, None)
            return None
        except Exception as error:  # noqa: BLE001 - the untraced product is the same
            message = str(error) if isinstance(error, _TraceCheckFailed) else \
                f"its primal half failed ({type(error).__name__}: {str(error)[:300]})"
            if built:
                forget_trace(self.model, key, message)
            return self._trace_failed(message)
        self.trace_seconds += time.perf_counter() - clock if built else 0.0
        return traced, cached

    def _trace_failed(self, message: str) -> None:
        """Log, once per model type, that products use jvp."""
        level = logging.INFO if self.jv_method == "auto" else logging.WARNING
        _log_once(f"trace_failed:{type(self.model).__name__}:{self.curvature}", level,
                  "jv_method=%s: the %s product of %s is not traced: %s; products use jvp, which reruns the "
                  "forward pass in every product", self.jv_method, self.curvature, type(self.model).__name__,
                  message)
        return None

    def _traceable_product(self) -> Callable[..., tuple[Tensor, Tensor]]:
        """(*fixed, *tangents, μλ) ↦ (the undamped product C v + μλ·G_S v, flat; the batch loss)."""
        names, frozen_names, buffer_names = self.spec.names, tuple(self._frozen), tuple(self._buffers)
        num_params, num_buffers = len(names) + len(frozen_names), len(buffer_names)
        has_mask, structural, curvature = self.batch.mask is not None, self._structural_damping > 0, self.curvature
        loss, spec = self.loss, self.spec

        def product(*flat: Tensor) -> tuple[Tensor, Tensor]:
            params = dict(zip(names, flat[:len(names)]))
            frozen = dict(zip(frozen_names, flat[len(names):num_params]))
            buffers = dict(zip(buffer_names, flat[num_params:num_params + num_buffers]))
            rest = flat[num_params + num_buffers:]
            inputs, targets = rest[0], rest[1]
            mask = rest[2] if has_mask else None
            tangents = dict(zip(names, rest[2 + has_mask:2 + has_mask + len(names)]))
            structural_scale = rest[-1]

            def forward(params):
                return self._forward(params, inputs, buffers, frozen)

            def batch_loss(params):
                outputs = forward(params)
                return loss(outputs[0], targets, mask), outputs

            outputs, vjp_fn = vjp(forward, params)
            z = outputs[0]
            if curvature == "ggn":
                _, output_tangents = jvp(forward, (params,), (tangents,))
                cotangents = [loss.output_hessian(z, targets, mask).mv(output_tangents[0])]
                value = loss(z, targets, mask)
            else:  # the Hessian: the tangent of the gradient (forward over reverse)
                def gradient_and_outputs(params):
                    gradient, (value, outputs) = grad_and_value(batch_loss, has_aux=True)(params)
                    return gradient, outputs

                (_, _), (hessian_tangent, output_tangents) = jvp(gradient_and_outputs, (params,), (tangents,))
                cotangents = [torch.zeros_like(z)]
                value = loss(z, targets, mask)
            if structural:
                tanh_a = torch.tanh(outputs[1])
                cotangents.append(output_tangents[1] * ((1 - tanh_a * tanh_a) / z.shape[0]) * structural_scale)
            if curvature == "ggn":
                return spec.flatten(vjp_fn(tuple(cotangents))[0]), value
            flat_product = spec.flatten(hessian_tangent)
            if structural:
                flat_product = flat_product + spec.flatten(vjp_fn(tuple(cotangents))[0])
            return flat_product, value

        return product

    def _traced_product(self, traced: TracedProduct, cached: tuple[Tensor, ...], v: Tensor, damping: float) -> Tensor:
        tangents = v.view(-1).split(self.spec.numels)
        tangents = [t.view(shape) for t, shape in zip(tangents, self.spec.shapes)]
        scale = v.new_tensor(self._structural_damping * damping)
        return traced.product(cached, [*tangents, scale])

    def _check_trace(self, traced: TracedProduct, cached: tuple[Tensor, ...]) -> None:
        """Raise _TraceCheckFailed unless the traced products of probes u, w and u again (a trace whose replays
        drift fails the third) match the untraced ones within 1000·eps of their largest entry (both run the
        same aten ops; they agree to rounding). _NotCheckable where the untraced products are not finite."""
        u, w = self._probes()
        damping = 1.0
        reference = CurvatureOperator(self.model, self.loss, self.batch, damping=damping,
                                      structural_damping=self._structural_damping, curvature=self.curvature,
                                      jv_method="jvp", block=self.spec.names if self._frozen else None)
        for probe, call in ((u, "first"), (w, "second"), (u, "third")):
            got = self._traced_product(traced, cached, probe, damping)
            want = reference.mv(probe).sub_(probe, alpha=damping)
            if not bool(torch.isfinite(want).all()):
                raise _NotCheckable
            difference = _differs(want, got)
            if difference:
                raise _TraceCheckFailed(f"its {call} product differed from the untraced one {difference}")

    def _linearize(self) -> Callable | None:
        """v ↦ Jv with the primal intermediates kept, or None (then the products use jvp).

        `torch.func.linearize` replays a traced graph whose primal parts are folded into constants.
        Some kernels' forward-mode formulas write into those constants (seen with torch 2.13:
        the native kernels of `nn.RNN` and `nn.LSTM`), so the second and later products drift.
        Each trace is therefore checked before use (see `_linearized_disagrees_with_jvp`); a model
        that fails is not traced again. The trace costs one more forward pass and, on the CPU,
        about a second of Python overhead per hundred or so traced ops, growing with T for an RNN.
        """
        try:
            with warnings.catch_warnings():
                # const_fold's notice about the constants it folds out of the traced graph
                warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
                linearized = linearize(self._forward, self.params)[1]
            problem = self._linearized_disagrees_with_jvp(linearized)
        except NotImplementedError:
            if self._context is not _fused_kernels_off:
                raise  # a fused kernel without forward-mode AD: __init__ switches kernels, as for "jvp"
            problem = "tracing failed even with native kernels (NotImplementedError)"
        except torch.OutOfMemoryError:
            return None  # this batch only: products use jvp, which holds fewer intermediates
        except Exception as error:  # noqa: BLE001 - any tracing failure; jvp gives the same product
            problem = f"it could not trace the forward pass ({type(error).__name__}: {str(error)[:200]})"
        if problem is None:
            return linearized
        if problem == NON_FINITE_PROBE:
            return None  # this batch only: the outputs themselves are not finite, nothing to blame on the trace
        _log_once(f"linearize_failed:{type(self.model).__name__}", logging.WARNING,
                  "jv_method=linearize is not used for %s: %s; Jv products use jvp, which reruns the "
                  "forward pass in every product", type(self.model).__name__, problem)
        _MODELS_WITHOUT_LINEARIZE.add(self.model)
        return None

    def _linearized_disagrees_with_jvp(self, linearized: Callable) -> str | None:
        """Why `linearized` cannot be trusted, or None.

        Three traced products — of u, of w, and of u again — against jvp's product of u (`_differs`,
        `_probes`).
        """
        u, w = (self.spec.unflatten(probe) for probe in self._probes())
        expected = jvp(self._forward, (self.params,), (u,))[1]
        if not all(bool(torch.isfinite(e).all()) for e in expected):
            return NON_FINITE_PROBE
        results = [("first", linearized(u))]
        linearized(w)
        results.append(("third", linearized(u)))
        for call, actual in results:
            if any(_differs(want, got) for want, got in zip(expected, actual, strict=True)):
                return f"its {call} product differed from jvp's (a known torch issue with some kernels)"
        return None

    def _probes(self) -> tuple[Tensor, Tensor]:
        """Two flat probe vectors u, w for the checks of traced products, from a private generator, so that
        checking leaves the global RNG untouched."""
        first = next(iter(self.params.values()))
        generator = torch.Generator(device=first.device).manual_seed(PROBE_SEED)
        return tuple(torch.randn(self.num_params, generator=generator, dtype=first.dtype, device=first.device)
                     for _ in range(2))

    def gradient(self) -> Tensor:
        """∇_θ L = Jᵀ ∇_z L, through the cached vjp closure (computed once, returned as a copy)."""
        if self._gradient is None:
            with self._context():
                if self._vjp_fn is None:  # traced products keep no vjp closure: build one for the gradient
                    used = self.jv_method_used
                    self._cache_untraced()
                    self.jv_method_used = used
                self._gradient = self.spec.flatten(self._vjp_fn(self._gradient_cotangents)[0])
                if self._traced is not None:
                    self._vjp_fn = None  # the products do not need it; free its activations
        return self._gradient.clone()

    def mv(self, v: Tensor) -> Tensor:
        """(C + λI + μλ·G_S) v for a flat v."""
        try:
            with self._context():
                product = self._curvature_product(v)
        except NotImplementedError as error:
            if self._context is _fused_kernels_off:
                raise
            self._switch_to_native_kernels(error)
            with self._context():
                product = self._curvature_product(v)
        return product.add_(v, alpha=self.damping)

    def _switch_to_native_kernels(self, error: NotImplementedError) -> None:
        _log_once("fused_kernel_derivative", logging.WARNING,
                  "a fused kernel of %s lacks a derivative that curvature products need (%s); they run "
                  "with oneDNN/cuDNN disabled, which is slower", type(self.model).__name__,
                  str(error).splitlines()[0])
        _MODELS_WITHOUT_FUSED_FORWARD_AD.add(self.model)
        self._context = _fused_kernels_off
        with self._context():
            self._cache_primal()  # so the Jv and Jᵀu products come from the same kernels

    def _curvature_product(self, v: Tensor) -> Tensor:
        if self._traced is not None:
            return self._traced_product(*self._traced, v, self.damping)
        tangents = self.spec.unflatten(v)
        if self.curvature == "ggn":
            return self._ggn_product(tangents)
        return self._hessian_product(tangents)

    def _ggn_product(self, tangents: dict[str, Tensor]) -> Tensor:
        """Jᵀ H_L J v (+ μλ J_aᵀ H_S J_a v): one Jv giving both tangents, one vjp taking both cotangents."""
        if self.jv_method == "double_vjp":
            (output_tangents,) = self._jv_by_double_vjp((tangents,))
        elif self._linearized is not None:
            output_tangents = self._linearized(tangents)
        else:
            _, output_tangents = jvp(self._forward, (self.params,), (tangents,))
        cotangents = [self._loss_hessian.mv(output_tangents[0])]
        if self._structural_damping > 0:
            cotangents.append(self._structural_cotangent(output_tangents[1]))
        return self.spec.flatten(self._vjp_fn(tuple(cotangents))[0])

    def _structural_cotangent(self, preactivation_tangent: Tensor) -> Tensor:
        return (preactivation_tangent * self._tanh_hessian).mul_(self._structural_damping * self.damping)

    def _gradient_and_preactivations(self, params: dict[str, Tensor]) -> tuple:
        def loss_of_params(params):
            outputs = self._forward(params)
            return self._batch_loss(outputs[0]), outputs[1:]

        gradient, preactivations = grad(loss_of_params, has_aux=True)(params)
        return (gradient, *preactivations)

    def _hessian_product(self, tangents: dict[str, Tensor]) -> Tensor:
        """H v as the jvp of the gradient (forward-over-reverse); G_S v costs one more vjp."""
        _, (hessian_tangent, *preactivation_tangents) = jvp(
            self._gradient_and_preactivations, (self.params,), (tangents,))
        product = self.spec.flatten(hessian_tangent)
        if self._structural_damping > 0:
            z = self._gradient_cotangents[0]
            cotangents = (torch.zeros_like(z), self._structural_cotangent(preactivation_tangents[0]))
            product += self.spec.flatten(self._vjp_fn(cotangents)[0])
        return product


def per_case_gradient_squares(model: nn.Module, loss: Callable, batch: Batch) -> Tensor:
    """Σ_i g_i² (elementwise, flat), g_i the gradient of case i's term of the batch loss.

    The loss is a mean over the B cases, so g_i = ∇ℓ_i / B and Σ_i g_i = ∇L.
    Where every trainable parameter belongs to an nn.Linear that the forward pass calls once on (B, in)
    inputs (MLPs, the autoencoder), the sum comes from one backward pass (`_linear_gradient_squares`):
    case i's gradient of a layer's weight is δ_i a_iᵀ, so Σ_i g_i² = (δ²)ᵀ(a²), one matmul per layer, as
    BackPACK's SumGradSquared does. Otherwise per-case gradients come from vmap over grad, a chunk of
    cases at a time; a model that vmap cannot batch falls back to a loop over cases.
    """
    params = trainable_parameters(model)
    spec = ParamSpec(params)
    squares = _checked_linear_gradient_squares(model, loss, batch, params, spec)
    if squares is not None:
        return squares / batch.size**2
    if model not in _MODELS_WITHOUT_VMAP:
        try:
            squares = _vmapped_gradient_squares(model, loss, batch, params, spec)
        except (RuntimeError, NotImplementedError) as error:
            _log_once("vmap_per_case", logging.INFO,
                      "vmap over per-case gradients failed for %s (%s); looping over cases instead",
                      type(model).__name__, str(error).splitlines()[0])
            _MODELS_WITHOUT_VMAP.add(model)
    if model in _MODELS_WITHOUT_VMAP:
        squares = _looped_gradient_squares(model, loss, batch, params, spec)
    return squares / batch.size**2


def _single_case_loss(model: nn.Module, loss: Callable) -> Callable:
    """(params, inputs, targets, mask) of one case, without its batch dimension ↦ ℓ_i."""

    def case_loss(params, inputs, targets, mask):
        z = functional_call(model, params, (inputs.unsqueeze(0),))
        return loss(z, targets.unsqueeze(0), None if mask is None else mask.unsqueeze(0))

    return case_loss


def _zeros_like_flat(params: dict[str, Tensor], spec: ParamSpec) -> Tensor:
    first = next(iter(params.values()))
    return torch.zeros(spec.num_params, dtype=first.dtype, device=first.device)


def _vmapped_gradient_squares(model, loss, batch, params, spec) -> Tensor:
    per_case_gradient = vmap(grad(_single_case_loss(model, loss)),
                             in_dims=(None, 0, 0, None if batch.mask is None else 0))
    chunk = max(1, PER_CASE_GRADIENT_ELEMENTS // spec.num_params)
    squares = _zeros_like_flat(params, spec)
    for start in range(0, batch.size, chunk):
        cases = slice(start, start + chunk)
        mask = None if batch.mask is None else batch.mask[cases]
        gradients = per_case_gradient(params, batch.inputs[cases], batch.targets[cases], mask)
        squares += spec.flatten({name: g.square().sum(0) for name, g in gradients.items()})
    return squares


def _linear_gradient_squares(model: nn.Module, loss: Callable, batch: Batch, params: dict[str, Tensor],
                             spec: ParamSpec) -> Tensor | None:
    """Σ_i ∇ℓ_i² from one backward pass through nn.Linear layers, or None where the model is not made of
    them as the fast path needs (some parameter outside an nn.Linear, a layer called twice or on inputs that
    are not (B, in)). With δ = ∂L/∂(layer output) = ∂ℓ_i/∂z_i / B for case i and a its input,
    Σ_i ∇_W ℓ_i² = B²·(δ²)ᵀ(a²) and Σ_i ∇_b ℓ_i² = B²·Σ_i δ_i²."""
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    layers = {name.rpartition(".")[0] for name in params}
    if not all(name.rpartition(".")[0] in linears and name.rpartition(".")[2] in ("weight", "bias")
               for name in params):
        return None
    inputs: dict[str, list[Tensor]] = {layer: [] for layer in layers}
    output_gradients: dict[str, Tensor] = {}

    def record(layer: str):
        def hook(module, args, output):
            inputs[layer].append(args[0].detach())
            if output.requires_grad:
                output.register_hook(lambda gradient: output_gradients.__setitem__(layer, gradient.detach()))
        return hook

    handles = [linears[layer].register_forward_hook(record(layer)) for layer in layers]
    try:
        with torch.enable_grad():
            live = [p for p in model.parameters() if p.requires_grad]
            torch.autograd.grad(loss(model(batch.inputs), batch.targets, batch.mask), live)
    finally:
        for handle in handles:
            handle.remove()
    if not all(len(seen) == 1 and seen[0].dim() == 2 and seen[0].shape[0] == batch.size and layer in output_gradients
               for layer, seen in inputs.items()):
        return None
    scale = batch.size**2
    squares = {}
    for name in params:
        layer, _, leaf = name.rpartition(".")
        delta_squared = output_gradients[layer].square()
        squares[name] = scale * (delta_squared.T @ inputs[layer][0].square() if leaf == "weight"
                                 else delta_squared.sum(0))
    return spec.flatten(squares)


_LINEAR_SQUARES_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → bool (agrees?)
LINEAR_SQUARES_CHECK_CASES = 16


def _checked_linear_gradient_squares(model, loss, batch, params, spec) -> Tensor | None:
    """`_linear_gradient_squares`, trusted for a model once it matched the per-case gradients of vmap on the
    first cases of its first batch (a loss whose cases interact, say, would not); None means use vmap."""
    verdict = _LINEAR_SQUARES_CHECKED.get(model)
    if verdict is False:
        return None
    squares = _linear_gradient_squares(model, loss, batch, params, spec)
    if squares is None or verdict:
        _LINEAR_SQUARES_CHECKED[model] = squares is not None
        return squares
    cases = slice(0, min(batch.size, LINEAR_SQUARES_CHECK_CASES))
    head = Batch(batch.inputs[cases], batch.targets[cases], None if batch.mask is None else batch.mask[cases])
    try:
        want = _vmapped_gradient_squares(model, loss, head, params, spec)
    except (RuntimeError, NotImplementedError):
        want = _looped_gradient_squares(model, loss, head, params, spec)
    got = _linear_gradient_squares(model, loss, head, params, spec)
    agrees = got is not None and _differs(want, got) is None
    if not agrees:
        _log_once(f"linear_squares:{type(model).__name__}", logging.INFO, "the per-case gradient squares of %s "
                  "come from vmap: the one-backward-pass way through its linear layers disagreed with it",
                  type(model).__name__)
    _LINEAR_SQUARES_CHECKED[model] = agrees
    return squares if agrees else None


def _looped_gradient_squares(model, loss, batch, params, spec) -> Tensor:
    case_gradient = grad(_single_case_loss(model, loss))
    squares = _zeros_like_flat(params, spec)
    for case in range(batch.size):
        mask = None if batch.mask is None else batch.mask[case]
        squares += spec.flatten(case_gradient(params, batch.inputs[case], batch.targets[case], mask)).square()
    return squares


def martens_preconditioner(grad_squares: Tensor, damping: float, exponent: float = 0.75) -> Tensor:
    """The diagonal M = (Σ_i g_i² + λ)^α of Martens 2010, α = 0.75; CG divides the residual by it.

    Fold a weight cost into `damping` if the objective has one, as Martens does.
    """
    return (grad_squares + damping).pow(exponent)
