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

Gv costs a Jv product and one reverse pass (Jᵀu) with the vjp closure cached at
construction: of the order of one gradient (M&S 2011 §3.1). Jv comes from
  - "jvp" (default): forward-mode AD, which reruns the primal forward pass
    alongside the tangents in every product; nothing is built per batch;
  - "linearize": `torch.func.linearize` traces the forward-mode pass once per
    batch and keeps the primal intermediates, so each product runs only the
    tangent half (1.1–1.4 gradients instead of 1.7–1.9 in `make bench`). The
    trace costs about a second or more on the CPU whatever the batch size, so
    it pays off at tens of products on large batches. Every trace is checked
    against jvp; a model it cannot trace, or whose traced products disagree,
    falls back to "jvp", logged once;
  - "double_vjp": the vjp of the linear map u ↦ Jᵀu, built once per batch. On
    the CPU (torch 2.13) it is as cheap as "linearize" for feed-forward nets
    but an order of magnitude slower through a recurrence, whose per-step
    slicing has costly second derivatives.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, linearize, vjp, vmap

from hfrun.tasks.base import Batch

log = logging.getLogger(__name__)

CURVATURES = ("ggn", "hessian")
JV_METHODS = ("linearize", "jvp", "double_vjp")

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


class CurvatureOperator:
    """v ↦ (C + λI + μλ·G_S) v on one batch, at the model's parameters when constructed.

    C is the GGN Jᵀ H_L J or the Hessian H (see the module docstring). The
    primal work is done once here: outputs, the vjp closure, the loss-Hessian
    factors. `damping` (λ) may be changed between products; `structural_damping`
    (μ) is fixed, and 0 when the model has no `forward_with_preactivations`.
    `jv_method` ("jvp", "linearize" or "double_vjp") picks how the GGN gets Jv;
    `jv_method_used` says which one the products use after any fallback.
    """

    def __init__(self, model: nn.Module, loss: Callable, batch: Batch, damping: float = 0.0,
                 structural_damping: float = 0.0, curvature: str = "ggn", jv_method: str = "jvp"):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature={curvature!r} is unknown; choose one of {list(CURVATURES)}")
        if jv_method not in JV_METHODS:
            raise ValueError(f"jv_method={jv_method!r} is unknown; choose one of {list(JV_METHODS)}")
        if structural_damping < 0:
            raise ValueError(f"structural_damping must be >= 0, got {structural_damping!r}")
        self.model, self.loss, self.batch = model, loss, batch
        self.curvature, self.jv_method = curvature, jv_method
        self.damping = float(damping)
        self.params = trainable_parameters(model)
        self.spec = ParamSpec(self.params)
        self.num_params = self.spec.num_params
        self._structural_damping = self._effective_structural_damping(model, float(structural_damping))
        self._forward_module = _PreactivationForward(model) if self._structural_damping > 0 else model
        self._param_prefix = "model." if self._structural_damping > 0 else ""
        self._context = _fused_kernels_off if model in _MODELS_WITHOUT_FUSED_FORWARD_AD else contextlib.nullcontext
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

    def _forward(self, params: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """(z,) or, with structural damping, (z, a)."""
        if self._param_prefix:
            params = {self._param_prefix + name: p for name, p in params.items()}
        outputs = functional_call(self._forward_module, params, (self.batch.inputs,))
        return tuple(outputs) if self._structural_damping > 0 else (outputs,)

    def _batch_loss(self, z: Tensor) -> Tensor:
        return self.loss(z, self.batch.targets, self.batch.mask)

    def _cache_primal(self) -> None:
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
        self._gradient = None
        self._linearized = None
        if self.curvature == "ggn" and self.jv_method == "linearize" and self.model not in _MODELS_WITHOUT_LINEARIZE:
            self._linearized = self._linearize()
        self.jv_method_used = ("linearize" if self._linearized is not None else
                               "jvp" if self.jv_method == "linearize" or self.curvature == "hessian"
                               else self.jv_method)
        if self.curvature == "ggn" and self.jv_method == "double_vjp":
            # u ↦ Jᵀu is linear, so its vjp at any u maps v ↦ Jv; at u = ∇_z L its value is the gradient.
            (gradient,), self._jv_by_double_vjp = vjp(self._vjp_fn, self._gradient_cotangents)
            self._gradient = self.spec.flatten(gradient)

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

        Three traced products — of u, of w, and of u again — against jvp's product of u, within
        1000·eps of its largest entry (traced and jvp products agree to the last bit where the
        trace is sound; the drift this catches is of the order of the products themselves). The
        probes come from a private generator, so checking leaves the global RNG untouched.
        """
        first = next(iter(self.params.values()))
        generator = torch.Generator(device=first.device).manual_seed(PROBE_SEED)

        def probe():
            return {name: torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
                    for name, p in self.params.items()}

        u, w = probe(), probe()
        expected = jvp(self._forward, (self.params,), (u,))[1]
        if not all(bool(torch.isfinite(e).all()) for e in expected):
            return NON_FINITE_PROBE
        results = [("first", linearized(u))]
        linearized(w)
        results.append(("third", linearized(u)))
        for call, actual in results:
            for want, got in zip(expected, actual, strict=True):
                tolerance = 1000 * torch.finfo(want.dtype).eps * float(want.abs().max().clamp_min(1e-30))
                if not float((want - got).abs().max()) <= tolerance:
                    return f"its {call} product differed from jvp's (a known torch issue with some kernels)"
        return None

    def gradient(self) -> Tensor:
        """∇_θ L = Jᵀ ∇_z L, through the cached vjp closure (computed once, returned as a copy)."""
        if self._gradient is None:
            with self._context():
                self._gradient = self.spec.flatten(self._vjp_fn(self._gradient_cotangents)[0])
        return self._gradient.clone()

    def mv(self, v: Tensor) -> Tensor:
        """(C + λI + μλ·G_S) v for a flat v."""
        tangents = self.spec.unflatten(v)
        try:
            with self._context():
                product = self._curvature_product(tangents)
        except NotImplementedError as error:
            if self._context is _fused_kernels_off:
                raise
            self._switch_to_native_kernels(error)
            with self._context():
                product = self._curvature_product(tangents)
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

    def _curvature_product(self, tangents: dict[str, Tensor]) -> Tensor:
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
    Per-case gradients come from vmap over grad, a chunk of cases at a time;
    a model that vmap cannot batch falls back to a loop over cases.
    """
    params = trainable_parameters(model)
    spec = ParamSpec(params)
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
