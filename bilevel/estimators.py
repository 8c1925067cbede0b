"""Hypergradient estimators: one row dΦ/dx per constraint, from an upper objective F and a lower one f.

The bi-level problem per constraint is ``min_x F(x, y*(x))`` with ``y*(x) ∈ argmin_y f(x, y)``. Every
estimator here is a pure function of two closures ``upper(x, y) -> scalar`` and ``lower(x, y) -> scalar`` and
of the current point (x, y), given as sequences of tensors; it returns a tuple of detached tensors shaped like
``x``. Formulas (H = ∇²_yy f, J = ∇²_xy f, all at the given (x, y) unless stated):

- ``none`` (1st order): ∇ₓF, the implicit term dropped (alternating / first-order training).
- ``gn`` (1st order): ∇ₓF − (⟨∇_yF, ∇_yf⟩ / (‖∇_yf‖² + eps)) ∇ₓf (Gauss–Newton; LwCL, BOAT ``IGA``).
- ``fd`` (1st order, DARTS): y' = y − ξ∇_yf; ∇ₓF(x, y') − ξ[∇ₓf(x, y⁺) − ∇ₓf(x, y⁻)]/(2δ), y± = y ± δv,
  v = ∇_{y'}F(x, y'), δ = r/‖v‖ (J evaluated at the pre-step y, as BOAT ``FD``).
- ``unrolled`` (2nd order): d/dx F(x, y_K(x)), y_{t+1} = y_t − lr ∇_yf(x, y_t), y_0 = y (BOAT ``RAD``).
- ``cg`` (2nd order): ∇ₓF − J v, (H + ridge·I) v = ∇_yF by ``iters`` conjugate-gradient steps.
- ``neumann`` (2nd order): ∇ₓF − J v, v = α Σ_{j=0..iters} (I − αH)ʲ ∇_yF (``iters`` HVPs, iters+1 terms).
- ``bdl_code`` (1st order), REPRODUCTION ONLY — the released BDL update: ∇ₓF + η (⟨∇_yF, ∇_yf⟩ /
  (‖∇_yf‖² + eps)) ∇ₓh (sign flipped, scaled by the LL learning rate η; see ``docs/method.md``).

Hessian- and mixed-vector products are double-backward products (``autograd.grad`` of ``∇_y f`` with
``grad_outputs``), never forward-mode, because many operators lack forward-mode AD. Working copies of x and y
are made with ``detach()`` (no data copy), so the caller's tensors are never mutated nor written into, whether
or not they are leaves that require grad.

DDP: every estimator takes ``reduce`` (e.g. an all-reduce-mean). It is applied to the y-space vectors (∇_yF,
∇_yf, Hessian-vector products), so the gn scalars and the CG/Neumann solves use the global batch; the returned
x-row is per-rank and must still be reduced by the caller. ``unrolled`` runs its inner loop per rank.

References: ``docs/method.md``; BOAT (``callous-youth/BOAT``), Betty
(``leopard-ai/betty``), LwCL (Liu et al., TPAMI 2024), DARTS (Liu et al., ICLR 2019).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from .convgrad import first_order_conv_backward
from .registry import lookup

Objective = Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]
Reduce = Callable[[Tensor], Tensor]

_REGISTRY: dict[str, Callable[..., tuple[Tensor, ...]]] = {}
# Estimators whose row has a term in ∇ₓf (the lower objective's x-gradient). ``none`` only differentiates F,
# which lets the image-space path of BilevelStep skip the LL batch's vector-Jacobian product.
USES_LOWER_X: dict[str, bool] = {}
# Estimators that differentiate through ∇_y f (double backward through the constraint net).
SECOND_ORDER: set[str] = set()


def register_hypergrad(name: str, *, uses_lower_x: bool = True, second_order: bool = False):
    """Decorator recording an estimator function under ``name``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"hypergradient estimator {name!r} registered twice")
        _REGISTRY[name] = fn
        USES_LOWER_X[name] = uses_lower_x
        if second_order:
            SECOND_ORDER.add(name)
        return fn

    return wrap


def list_hypergrads() -> list[str]:
    """Names accepted by :func:`hypergrad`."""
    return sorted(_REGISTRY)


def hypergrad_parameters(method: str) -> list[inspect.Parameter]:
    """Keyword options of ``method`` with defaults and resolved type annotations (configs derive from them)."""
    fn = _get(method)
    hints = typing.get_type_hints(fn)
    return [p.replace(annotation=hints.get(p.name, p.annotation))
            for p in list(inspect.signature(fn).parameters.values())[4:]]


def hypergrad_options(method: str) -> dict[str, object]:
    """Keyword options of ``method`` mapped to their defaults (``inspect.Parameter.empty`` when required)."""
    return {p.name: p.default for p in hypergrad_parameters(method)}


def check_hypergrad_options(method: str, options: dict, *, provided: Sequence[str] = ()) -> None:
    """Raise a ``TypeError`` naming the valid options if ``options`` has unknown or missing keys.

    Args:
        method: estimator name.
        options: keyword options the caller will pass.
        provided: option names the caller fills in later (e.g. a default lr), not counted as missing.
    """
    valid = hypergrad_options(method)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"hypergradient {method!r} got unknown option(s) {unknown}; valid: {sorted(valid)}")
    missing = [
        k for k, v in valid.items() if v is inspect.Parameter.empty and k not in options and k not in provided
    ]
    if missing:
        raise TypeError(f"hypergradient {method!r} needs option(s) {missing}")


def hypergrad(
    method: str,
    upper: Objective,
    lower: Objective | None,
    x: Sequence[Tensor],
    y: Sequence[Tensor],
    **options,
) -> tuple[Tensor, ...]:
    """Hypergradient dΦ/dx of one constraint by a named estimator (see the module docstring for formulas).

    Args:
        method: one of :func:`list_hypergrads`.
        upper: ``upper(x, y)`` → scalar UL objective F (e.g. the task loss on the UL batch).
        lower: ``lower(x, y)`` → scalar LL objective f (e.g. the task loss on the LL batch); may be None only
            for ``none``.
        x: upper variables (tensors; need not require grad).
        y: lower variables at the current point, taken as ≈ y*(x) by ``gn``/``cg``/``neumann``.
        **options: the estimator's keyword options, e.g. ``cg(iters=10, ridge=0.0)``; ``reduce`` for DDP.

    Returns:
        Tuple of detached tensors shaped like ``x`` (zeros where x does not influence the objectives).

    Example:
        >>> x = (torch.tensor([1.0]),); y = (torch.tensor([1.0]),)
        >>> f = lambda x, y: 0.5 * (y[0] - x[0]).pow(2).sum()      # y*(x) = x
        >>> F = lambda x, y: 0.5 * y[0].pow(2).sum()                # Φ(x) = ½x², dΦ/dx = x
        >>> hypergrad("cg", F, f, x, y, iters=1)[0]                 # −J H⁻¹ ∇_yF = −(−1)(1)(1)
        tensor([1.])
    """
    fn = _get(method)
    check_hypergrad_options(method, options)
    if lower is None and method != "none":
        raise ValueError(f"hypergradient {method!r} needs a lower objective")
    xs = tuple(t.detach().requires_grad_(True) for t in x)
    ys = tuple(t.detach() for t in y)
    try:
        rows = fn(upper, lower, xs, ys, **options)
    except (RuntimeError, NotImplementedError) as err:
        if method in SECOND_ORDER and _lacks_double_backward(err):
            raise RuntimeError(
                f"hypergradient {method!r} needs double backward through the lower objective, and an "
                f"operator in it has none (e.g. torchvision RoIAlign in Faster R-CNN). Use 'none', 'gn' or "
                f"'fd', or a model without that operator (FCOS/RetinaNet). Original error: {err}"
            ) from err
        raise
    return tuple(g.detach() for g in rows)


def _get(method: str) -> Callable[..., tuple[Tensor, ...]]:
    return lookup(_REGISTRY, "hypergradient estimator", method)


# ----------------------------------------------------------------------------------------------- helpers


def _scalar(value, what: str) -> Tensor:
    if isinstance(value, dict):  # tasks return {"loss": …, parts}
        value = value["loss"]
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"the {what} objective must return a scalar tensor, got {type(value).__name__}")
    return value.reshape(())


def _grad(
    out: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor] | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> tuple[Tensor, ...]:
    """``autograd.grad`` with zeros for unused inputs and tolerance of outputs that carry no graph."""
    outs = [out] if isinstance(out, Tensor) else list(out)
    gos = None if grad_outputs is None else list(grad_outputs)
    keep = [i for i, o in enumerate(outs) if o.requires_grad]
    if not keep or not inputs:
        return tuple(torch.zeros_like(t) for t in inputs)
    outs = [outs[i] for i in keep]
    gos = None if gos is None else [gos[i] for i in keep]
    need = [i for i, t in enumerate(inputs) if t.requires_grad]
    grads = torch.autograd.grad(
        outs,
        [inputs[i] for i in need],
        grad_outputs=gos,
        allow_unused=True,
        create_graph=create_graph,
        retain_graph=retain_graph,
    )
    # zeros only where no gradient came back: zero-filling every input first cost 5 % of a CPU bi-level
    # iteration (a ResNet-18's parameters, twice per constraint)
    found = dict(zip(need, grads))
    return tuple(g if (g := found.get(i)) is not None else torch.zeros_like(t) for i, t in enumerate(inputs))


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ ⟨a_i, b_i⟩ in float64 for float64 inputs, else float32 (bf16 gradients stay accurate).

    One ``torch.dot`` per tensor: it reads both once and allocates nothing, where ``(p * q).sum()`` first
    writes a parameter-sized product (8× slower on the CPU for a ResNet-18's gradients). In float32 its
    round-off is about 1e-5 relative for millions of entries, far below minibatch gradient noise."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in a) else torch.float32
    if not a:
        return torch.zeros((), dtype=acc)
    return torch.stack([torch.dot(p.reshape(-1).to(acc), q.reshape(-1).to(acc)) for p, q in zip(a, b)]).sum()


def _axpy(alpha, a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """b + alpha·a, per tensor (alpha a Python number or 0-d tensor)."""
    return tuple(
        q + (alpha * p).to(q.dtype) if isinstance(alpha, Tensor) else q + alpha * p for p, q in zip(a, b)
    )


def _scale(alpha, a: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple((alpha * p).to(p.dtype) if isinstance(alpha, Tensor) else alpha * p for p in a)


def _reduce_all(vectors: Sequence[Tensor], reduce: Reduce | None) -> tuple[Tensor, ...]:
    """Apply ``reduce`` once to the concatenation of ``vectors`` (one collective, not one per tensor)."""
    if reduce is None or not vectors:
        return tuple(vectors)
    flat = reduce(torch.cat([v.reshape(-1) for v in vectors]))
    out, i = [], 0
    for v in vectors:
        out.append(flat[i : i + v.numel()].view_as(v))
        i += v.numel()
    return tuple(out)


def _requires(ts: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(t.detach().requires_grad_(True) for t in ts)


def _ul_grads(upper, xs, ys, reduce) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(∇ₓF, ∇_yF) from one backward over both groups."""
    yg = _requires(ys)
    g = _grad(_scalar(upper(xs, yg), "upper"), xs + yg)
    return g[: len(xs)], _reduce_all(g[len(xs) :], reduce)


def _lacks_double_backward(err: Exception) -> bool:
    msg = str(err).lower()
    return any(k in msg for k in ("not implemented", "twice", "double backward", "once_differentiable"))


# ----------------------------------------------------------------------------------------------- estimators


@register_hypergrad("none", uses_lower_x=False)
def _none(upper, lower, xs, ys, *, reduce: Reduce | None = None):
    """∇ₓF: the implicit term dropped. ``reduce`` is accepted for a uniform interface (the row is linear)."""
    return _grad(_scalar(upper(xs, ys), "upper"), xs)


def _gn_parts(upper, lower, xs, ys, eps, reduce):
    gFx, gFy = _ul_grads(upper, xs, ys, reduce)
    yg = _requires(ys)
    g = _grad(_scalar(lower(xs, yg), "lower"), xs + yg)
    gfx, gfy = g[: len(xs)], _reduce_all(g[len(xs) :], reduce)
    ratio = _dot(gFy, gfy) / (_dot(gfy, gfy) + eps)
    return gFx, gfx, ratio


@register_hypergrad("gn")
def _gn(upper, lower, xs, ys, *, eps: float = 1e-12, reduce: Reduce | None = None):
    """Gauss–Newton: H ≈ ∇_yf∇_yfᵀ, J ≈ ∇ₓf∇_yfᵀ, so J H⁺ ∇_yF collapses to (a/b)∇ₓf (no create_graph)."""
    gFx, gfx, ratio = _gn_parts(upper, lower, xs, ys, eps, reduce)
    return _axpy(-ratio, gfx, gFx)


@register_hypergrad("bdl_code")
def _bdl_code(
    upper,
    lower,
    xs,
    ys,
    *,
    eta: float,
    eps: float = 1e-12,
    correction: Objective | None = None,
    reduce: Reduce | None = None,
):
    """REPRODUCTION ONLY — the update of the released BDL code: ∇ₓF + η(a/b)∇ₓh, h = ``correction`` or f.

    The sign is flipped relative to Gauss–Newton and the term is scaled by the LL learning rate η, so in
    practice g ≈ ∇ₓF (see ``docs/method.md``). Do not use it for new results.
    """
    gFx, gfx, ratio = _gn_parts(upper, lower, xs, ys, eps, reduce)
    if correction is not None:
        gfx = _grad(_scalar(correction(xs, ys), "correction"), xs)
    return _axpy(eta * ratio, gfx, gFx)


@register_hypergrad("fd")
def _fd(upper, lower, xs, ys, *, xi: float, r: float = 0.01, reduce: Reduce | None = None):
    """DARTS: one virtual LL step of size ξ, then a central difference for the mixed product J v."""
    yg = _requires(ys)
    x_const = tuple(t.detach() for t in xs)
    gfy = _reduce_all(_grad(_scalar(lower(x_const, yg), "lower"), yg), reduce)
    y_virtual = tuple((p - xi * g).detach() for p, g in zip(ys, gfy))
    gFx, v = _ul_grads(upper, xs, y_virtual, reduce)
    norm = _dot(v, v).sqrt()
    delta = r / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    y_plus = _axpy(delta, v, ys)
    y_minus = _axpy(-delta, v, ys)
    g_plus = _grad(_scalar(lower(xs, y_plus), "lower"), xs)
    g_minus = _grad(_scalar(lower(xs, y_minus), "lower"), xs)
    coef = -xi / (2 * delta)
    return tuple(gx + (coef * (gp - gm)).to(gx.dtype) for gx, gp, gm in zip(gFx, g_plus, g_minus))


@register_hypergrad("unrolled", second_order=True)
def _unrolled(
    upper,
    lower,
    xs,
    ys,
    *,
    steps: int = 1,
    lr: float,
    backend: str = "func",
    truncate: int | None = None,
    reduce: Reduce | None = None,
):
    """Reverse mode through ``steps`` SGD steps of size ``lr`` from y (``truncate``: only the last T steps).

    ``backend="func"`` passes the inner iterates functionally (plain autograd with ``create_graph``);
    ``backend="higher"`` uses ``higher.innerloop_ctx`` with a differentiable SGD, as an independent check.
    ``reduce`` is accepted but not applied: the inner loop runs on each rank's own batch.
    """
    if steps < 1:
        raise ValueError(f"unrolled needs steps >= 1, got {steps}")
    if truncate is not None and not 1 <= truncate <= steps:
        raise ValueError(f"truncate must be in [1, steps={steps}], got {truncate}")
    if backend == "func":
        y_t = _requires(ys)
        for t in range(steps):
            keep = truncate is None or t >= steps - truncate
            with first_order_conv_backward() if keep else nullcontext():   # ∇_y f is differentiated again
                value = _scalar(lower(xs, y_t), "lower")
            g = _grad(value, y_t, create_graph=keep)
            y_next = tuple(p - lr * q for p, q in zip(y_t, g))
            y_t = y_next if keep else _requires(y_next)
        return _grad(_scalar(upper(xs, y_t), "upper"), xs)
    if backend == "higher":
        if truncate is not None:
            raise ValueError("truncate is only supported by backend='func'")
        return _unrolled_higher(upper, lower, xs, ys, steps, lr)
    raise ValueError(f"unknown unrolled backend {backend!r}; choose from func, higher")


class _Holder(nn.Module):
    """The lower variables as a module for ``higher.innerloop_ctx`` (it cannot patch a bare ``nn.Module``)."""

    def __init__(self, ys: Sequence[Tensor]):
        super().__init__()
        self.ys = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in ys])


def _unrolled_higher(upper, lower, xs, ys, steps, lr):
    try:
        import higher
    except ImportError as err:  # pragma: no cover - higher is a declared dependency
        raise ImportError("backend='higher' needs the 'higher' package (pip install higher==0.2.1)") from err
    holder = _Holder(ys)
    opt = torch.optim.SGD(holder.parameters(), lr=lr)
    with higher.innerloop_ctx(holder, opt, copy_initial_weights=True, track_higher_grads=True) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            diffopt.step(_scalar(lower(xs, tuple(fmodel.parameters())), "lower"))
        return _grad(_scalar(upper(xs, tuple(fmodel.parameters())), "upper"), xs)


class _HVP:
    """(H + ridge·I)·v by double backward through one graph of ∇_y f; also the mixed product J v."""

    def __init__(self, lower, xs, ys, ridge: float, reduce: Reduce | None):
        self.xs, self.ys = xs, _requires(ys)
        with first_order_conv_backward():   # ∇_y f is differentiated again
            value = _scalar(lower(xs, self.ys), "lower")
        self.gfy = _grad(value, self.ys, create_graph=True)
        self.ridge, self.reduce = ridge, reduce

    def __call__(self, v: Sequence[Tensor]) -> tuple[Tensor, ...]:
        hv = _reduce_all(_grad(self.gfy, self.ys, v, retain_graph=True), self.reduce)
        return _axpy(self.ridge, v, hv) if self.ridge else hv

    def mixed(self, v: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """J v = ∇ₓ⟨∇_y f, v⟩ (frees the graph)."""
        return _grad(self.gfy, self.xs, v)


def _implicit(upper, lower, xs, ys, reduce, ridge, solve):
    gFx, gFy = _ul_grads(upper, xs, ys, reduce)
    hvp = _HVP(lower, xs, ys, ridge, reduce)
    jv = hvp.mixed(solve(hvp, gFy))
    return tuple(g - j.to(g.dtype) for g, j in zip(gFx, jv))


@register_hypergrad("cg", second_order=True)
def _cg(
    upper,
    lower,
    xs,
    ys,
    *,
    iters: int = 10,
    ridge: float = 0.0,
    tol: float = 1e-12,
    reduce: Reduce | None = None,
):
    """IFT with (H + ridge·I) v = ∇_yF solved by at most ``iters`` CG iterations from v = 0.

    Stops early when ‖r‖ ≤ tol·‖∇_yF‖, or when a direction of non-positive curvature appears (H is indefinite
    for neural nets; add a ridge). The direction update uses the *new* residual, p ← r_{new} + β p (a known
    Betty release used the stale one).
    """

    def solve(hvp, b):
        v = tuple(torch.zeros_like(t) for t in b)
        r = tuple(t.clone() for t in b)
        p = r
        rr = _dot(r, r)
        stop = (tol**2) * float(rr)
        for _ in range(iters):
            if float(rr) <= stop or float(rr) == 0.0:
                break
            ap = hvp(p)
            pap = _dot(p, ap)
            if float(pap) <= 0.0:
                break
            alpha = rr / pap
            v = _axpy(alpha, p, v)
            r = _axpy(-alpha, ap, r)
            rr_new = _dot(r, r)
            p = _axpy(rr_new / rr, p, r)
            rr = rr_new
        return v

    return _implicit(upper, lower, xs, ys, reduce, ridge, solve)


@register_hypergrad("neumann", second_order=True)
def _neumann(upper, lower, xs, ys, *, iters: int = 10, alpha: float, reduce: Reduce | None = None):
    """IFT with H⁻¹ ≈ α Σ_{j=0..iters} (I − αH)ʲ; converges when α < 2/λ_max(H) (usual choice: the LL lr)."""

    def solve(hvp, b):
        p = b
        acc = tuple(t.clone() for t in b)
        for _ in range(iters):
            p = _axpy(-alpha, hvp(p), p)
            acc = tuple(a + q for a, q in zip(acc, p))
        return _scale(alpha, acc)

    return _implicit(upper, lower, xs, ys, reduce, 0.0, solve)
