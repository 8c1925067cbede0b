"""Aggregators: combine K per-constraint hypergradient rows g_1..g_K into one update d = Σ_k w_k g_k.

Every rule here is a *weighting*: it maps the Gramian M = G Gᵀ (K×K), the UL losses and a checkpointable
``state`` dict to K coefficients w, and the update is d = Σ_k w_k g_k (for PCGrad and CAGrad, w are the
effective coefficients of the projected / corrected combination, which lies in the span of the rows). This is
the torchjd split (``Weighting(gramian) → weights``, ``Aggregator(matrix) → vector``):
:class:`bilevel.step.BilevelStep` builds the exact parameter-space rows on both of its paths and calls
:meth:`Aggregator.weights` on their Gramian, so every rule gets the same inputs on either path. The column
"reads" says which part of the inputs a rule looks at.

=====================  ======================================================================  =============
name                   weights                                                                 reads
=====================  ======================================================================  =============
``sum``                w = 1                                                                   —
``mean``               w = 1/K                                                                 —
``fixed``              w = ``weights``                                                         —
``bdl_released``       w = ½ (what the released BDL code applies: its random weights cancel    —
                       through a ``.grad`` aliasing bug, docs/method.md)
``rlw``                w = scale·softmax(z), z ~ N(0, I_K) from a seeded generator in ``state``  —
``gradnorm_softmax``   n_k = ‖g_k‖/mean_j‖g_j‖, w = softmax(−n/τ); ``unit=True``:                  diag(M)
                       w_k ← w_k·mean_j‖g_j‖/‖g_k‖ (d = mean‖g‖·Σ w_k g_k/‖g_k‖). Our design.
``dwa``                r_k = L_k(t−1)/L_k(t−2), w = K·softmax(r/T); w = 1 for the first two calls    losses
``uw``                 w = ½e^{−s_k}; s_k ← s_k − lr·½(1 − e^{−s_k}L_k) (learned log-variances)     losses
``mgda``               min-norm point of the convex hull (closed form K = 2, Frank–Wolfe K > 2)    M
``pcgrad``             d = Σ_i g_i', g_i' projected off each conflicting g_j in a seeded order     M
``cagrad``             d = (g_0 + √φ/‖g_w‖ g_w)/(1+c²), w* = argmin_Δ g_wᵀg_0 + √φ‖g_w‖, φ=c²‖g_0‖²   M
=====================  ======================================================================  =============

All K-space problems are solved in float64 torch on the CPU (one K×K transfer; no scipy). ``state`` holds only
tensors and numbers, so it round-trips through ``torch.load(weights_only=True)``.

References: ``docs/method.md``; LibMTL (``median-research-group/LibMTL``) for DWA/UW/MGDA/CAGrad defaults;
Yu et al.
2020 (PCGrad); Sener & Koltun 2018 (MGDA); Liu et al. 2021 (CAGrad); Lin et al. 2022 (RLW).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence

import torch
from torch import Tensor

from .registry import lookup

Row = Sequence[Tensor]

_REGISTRY: dict[str, type[Aggregator]] = {}


def register_aggregator(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator recording an aggregator under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"aggregator {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_aggregators() -> list[str]:
    """Names accepted by :func:`aggregate` and :func:`create_aggregator`."""
    return sorted(_REGISTRY)


def aggregator_parameters(name: str) -> list[inspect.Parameter]:
    """Constructor options of aggregator ``name`` with defaults and resolved type annotations."""
    init = _REGISTRY[name].__init__
    hints = typing.get_type_hints(init) if init is not object.__init__ else {}
    return [p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(init).parameters.values()
            if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]


def create_aggregator(name: str, **options) -> Aggregator:
    """Build an aggregator by name; unknown names or options raise with the valid ones listed."""
    cls = lookup(_REGISTRY, "aggregator", name)
    valid = [p.name for p in aggregator_parameters(name)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"aggregator {name!r} got unknown option(s) {unknown}; valid: {valid}")
    return cls(**options)


def aggregate(
    method: str,
    rows: Sequence[Row],
    losses: Sequence[float] | Tensor | None = None,
    state: dict | None = None,
    **options,
) -> tuple[tuple[Tensor, ...], Tensor]:
    """Combine K hypergradient rows with a named rule.

    Args:
        method: one of :func:`list_aggregators`.
        rows: K rows, each a sequence of tensors shaped like the upper variables x.
        losses: the K UL losses (needed by ``dwa``, ``uw`` and ``mgda(normalize="loss")``).
        state: dict updated in place by stateful rules (``rlw``/``pcgrad`` generator, ``dwa`` history,
            ``uw`` log-variances). Without it a stateful rule starts afresh at every call.
        **options: the rule's options, e.g. ``fixed(weights=[0.3, 0.7])``, ``gradnorm_softmax(tau=1.0)``.

    Returns:
        ``(combined, weights)``: one tuple shaped like x, and the K coefficients (float64, CPU) with
        combined = Σ_k weights_k · rows_k.

    Example:
        >>> rows = [(torch.tensor([1.0, 0.0]),), (torch.tensor([0.0, 1.0]),)]
        >>> aggregate("mgda", rows)[1]
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    return create_aggregator(method, **options)(rows, losses, state)


def gramian(rows: Sequence[Row]) -> Tensor:
    """M_ij = Σ_tensors ⟨row_i, row_j⟩ as a float64 K×K tensor on the rows' device."""
    flat = torch.stack([torch.cat([t.reshape(-1).to(torch.float64) for t in row]) for row in rows])
    return flat @ flat.T


def combine(rows: Sequence[Row], weights: Tensor) -> tuple[Tensor, ...]:
    """Σ_k weights_k · rows_k, per tensor, in the rows' dtype and device."""
    out = []
    for i, ref in enumerate(rows[0]):
        w = weights.to(device=ref.device, dtype=torch.float64)
        acc = sum(w[k] * rows[k][i].to(torch.float64) for k in range(len(rows)))
        out.append(acc.to(ref.dtype))
    return tuple(out)


class Aggregator:
    """Base class: input checks, ``weights`` from (Gramian, losses, state), and ``__call__`` on rows.

    Subclasses implement ``_weights(gramian, losses, state)`` (gramian and losses float64 on the CPU).

    Attributes:
        name: registry name.
        needs_losses: True when ``losses`` is required.
        uses_gramian: False for rules whose weights ignore the rows (they read only the Gramian's size K):
            a caller may then skip forming the rows and apply Σ_k w_k g_k in one pass.
    """

    name: str = ""
    needs_losses: bool = False
    uses_gramian: bool = True

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def weights(
        self, gramian: Tensor, losses: Sequence[float] | Tensor | None = None, state: dict | None = None
    ) -> Tensor:
        """K coefficients from the Gramian M = G Gᵀ of the K rows, the losses and the state."""
        if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] < 1:
            raise ValueError(
                f"{self.name}: the Gramian must be a non-empty K×K matrix, got {tuple(gramian.shape)}"
            )
        k = gramian.shape[0]
        gram = gramian.detach().to("cpu", torch.float64)
        if losses is not None:
            losses = torch.as_tensor(
                [float(v) for v in losses] if not isinstance(losses, Tensor) else losses.detach().cpu(),
                dtype=torch.float64,
            ).reshape(-1)
            if losses.numel() != k:
                raise ValueError(f"{self.name}: got {losses.numel()} losses for {k} rows")
        elif self.needs_losses:
            raise ValueError(f"aggregator {self.name!r} needs the UL losses")
        w = self._weights(gram, losses, {} if state is None else state)
        return w.to(torch.float64).reshape(k)

    def __call__(
        self, rows: Sequence[Row], losses: Sequence[float] | Tensor | None = None, state: dict | None = None
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        _check_rows(rows, self.name)
        w = self.weights(gramian(rows), losses, state)
        return combine(rows, w), w

    def _weights(self, gram: Tensor, losses: Tensor | None, state: dict) -> Tensor:
        raise NotImplementedError


def _check_rows(rows: Sequence[Row], name: str) -> None:
    if len(rows) == 0:
        raise ValueError(f"{name}: need at least one row")
    shapes = [tuple(t.shape) for t in rows[0]]
    if not shapes:
        raise ValueError(f"{name}: rows must hold at least one tensor")
    for k, row in enumerate(rows):
        if [tuple(t.shape) for t in row] != shapes:
            raise ValueError(
                f"{name}: row {k} has shapes {[tuple(t.shape) for t in row]}, row 0 has {shapes}"
            )


def _generator(state: dict, key: str, seed: int) -> torch.Generator:
    gen = torch.Generator()
    if key in state:
        gen.set_state(state[key])
    else:
        gen.manual_seed(seed)
    return gen


# --------------------------------------------------------------------------------------- static weightings


@register_aggregator
class Sum(Aggregator):
    """d = Σ_k g_k."""

    name = "sum"
    uses_gramian = False

    def _weights(self, gram, losses, state):
        return torch.ones(gram.shape[0], dtype=torch.float64)


@register_aggregator
class Mean(Aggregator):
    """d = (1/K) Σ_k g_k."""

    name = "mean"
    uses_gramian = False

    def _weights(self, gram, losses, state):
        k = gram.shape[0]
        return torch.full((k,), 1.0 / k, dtype=torch.float64)


@register_aggregator
class Fixed(Aggregator):
    """d = Σ_k w_k g_k with given weights (e.g. a hand-tuned trade-off)."""

    name = "fixed"
    uses_gramian = False

    def __init__(self, weights: Sequence[float]):
        self.fixed = [float(w) for w in weights]

    def __repr__(self) -> str:
        return f"Fixed(weights={self.fixed!r})"

    def _weights(self, gram, losses, state):
        if len(self.fixed) != gram.shape[0]:
            raise ValueError(f"fixed: {len(self.fixed)} weights for {gram.shape[0]} rows")
        return torch.tensor(self.fixed, dtype=torch.float64)


@register_aggregator
class BDLReleased(Aggregator):
    """d = ½ Σ_k g_k: what BDL's released code applies (its softmax weights cancel, docs/method.md)."""

    name = "bdl_released"
    uses_gramian = False

    def _weights(self, gram, losses, state):
        return torch.full((gram.shape[0],), 0.5, dtype=torch.float64)


@register_aggregator
class RLW(Aggregator):
    """Random loss weighting: w = scale·softmax(z), z ~ N(0, I_K) redrawn every call (BDL's intended rule).

    The generator state lives in ``state["rng"]`` so a resumed run draws the same sequence; ``scale=0.5``
    gives the BDL scale d = ½ Σ w_k g_k.
    """

    name = "rlw"
    uses_gramian = False

    def __init__(self, scale: float = 1.0, seed: int = 0):
        self.scale, self.seed = float(scale), int(seed)

    def _weights(self, gram, losses, state):
        gen = _generator(state, "rng", self.seed)
        z = torch.randn(gram.shape[0], generator=gen, dtype=torch.float64)
        state["rng"] = gen.get_state()
        return self.scale * torch.softmax(z, 0)


# ---------------------------------------------------------------------------------------- dynamic weightings


@register_aggregator
class GradNormSoftmax(Aggregator):
    """Down-weights rows with large norms: n_k = ‖g_k‖/mean_j‖g_j‖, w = softmax(−n/τ) (toolkit design).

    With ``unit=True`` the rows are first scaled to unit norm and the result to the mean norm:
    d = mean_j‖g_j‖ · Σ_k w_k g_k/‖g_k‖. Zero rows get zero weight in that mode.
    """

    name = "gradnorm_softmax"

    def __init__(self, tau: float = 1.0, unit: bool = False, eps: float = 1e-12):
        if tau <= 0:
            raise ValueError(f"gradnorm_softmax: tau must be > 0, got {tau}")
        self.tau, self.unit, self.eps = float(tau), bool(unit), float(eps)

    def _weights(self, gram, losses, state):
        norms = gram.diagonal().clamp_min(0).sqrt()
        mean = norms.mean()
        n = norms / mean if mean > self.eps else torch.zeros_like(norms)
        w = torch.softmax(-n / self.tau, 0)
        if self.unit:
            w = torch.where(norms > self.eps, w * mean / norms.clamp_min(self.eps), torch.zeros_like(w))
        return w


@register_aggregator
class DWA(Aggregator):
    """Dynamic weight average (Liu et al. 2019): w = K·softmax(r/T), r_k = L_k(t−1)/L_k(t−2).

    ``losses`` of the current call enter the history used by later calls; the first two calls give w = 1.
    T = 2 is the LibMTL default; SegMiF uses T = 1000 (w ≈ 1).
    """

    name = "dwa"
    uses_gramian = False
    needs_losses = True

    def __init__(self, T: float = 2.0):
        self.T = float(T)

    def _weights(self, gram, losses, state):
        k = gram.shape[0]
        if "dwa_prev" in state and "dwa_prev2" in state:
            r = state["dwa_prev"].to(torch.float64) / state["dwa_prev2"].to(torch.float64)
            if r.numel() != k:
                raise ValueError(f"dwa: the loss history holds {r.numel()} rows, got {k}")
            w = k * torch.softmax(r / self.T, 0)
        else:
            w = torch.ones(k, dtype=torch.float64)
        if "dwa_prev" in state:
            state["dwa_prev2"] = state["dwa_prev"]
        state["dwa_prev"] = losses.clone()
        return w


@register_aggregator
class UW(Aggregator):
    """Uncertainty weighting (Kendall et al. 2018): minimise Σ(½e^{−s_k}L_k + ½s_k) over s = log σ².

    w = ½e^{−s_k} with the current s; then one gradient step of size ``lr`` on s:
    ∂/∂s_k = ½(1 − e^{−s_k}L_k). s lives in ``state["uw_log_var"]``.
    """

    name = "uw"
    uses_gramian = False
    needs_losses = True

    def __init__(self, lr: float = 0.01, init: float = 0.0):
        self.lr, self.init = float(lr), float(init)

    def _weights(self, gram, losses, state):
        s = state.get("uw_log_var")
        s = torch.full((gram.shape[0],), self.init, dtype=torch.float64) if s is None else s.to(torch.float64)
        w = 0.5 * torch.exp(-s)
        state["uw_log_var"] = s - self.lr * 0.5 * (1 - torch.exp(-s) * losses)
        return w


# ------------------------------------------------------------------------------------- Gramian-based rules


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto {w ≥ 0, Σw = 1} (sort-based, Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / idx > 0).max())
    return (v - css[rho] / (rho + 1)).clamp_min(0)


def min_norm_weights(gram: Tensor, iters: int = 250, tol: float = 1e-6) -> Tensor:
    """α* = argmin_{α ∈ Δ_K} αᵀMα: closed form for K ≤ 2, Frank–Wolfe with exact line search beyond.

    K = 2: γ = clip(⟨g_2 − g_1, g_2⟩/‖g_1 − g_2‖², 0, 1), α = (γ, 1 − γ). Frank–Wolfe (docs/method.md) starts
    at α = 1/K and stops when the step γ < tol or after ``iters`` iterations.
    """
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=gram.dtype)
    if k == 2:
        den = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        gamma = (
            ((gram[1, 1] - gram[0, 1]) / den).clamp(0, 1) if den > 0 else torch.tensor(0.5, dtype=gram.dtype)
        )
        return torch.stack([gamma, 1 - gamma])
    alpha = torch.full((k,), 1.0 / k, dtype=gram.dtype)
    for _ in range(iters):
        m_alpha = gram @ alpha
        t = int(torch.argmin(m_alpha))
        a_m_a = alpha @ m_alpha
        den = a_m_a + gram[t, t] - 2 * m_alpha[t]
        if den <= 0:
            break
        gamma = float(((a_m_a - m_alpha[t]) / den).clamp(0, 1))
        alpha = (1 - gamma) * alpha
        alpha[t] += gamma
        if gamma < tol:
            break
    return alpha


@register_aggregator
class MGDA(Aggregator):
    """Multiple-gradient descent: d = Σ α_k ĝ_k at the min-norm point α* of the hull of the (normalised) rows.

    ``normalize``: ``none`` (default), ``l2`` (ĝ = g/‖g‖), ``loss`` (g/L), ``loss+`` (g/(L‖g‖)); as in LibMTL
    the weights apply to the normalised rows, so the returned coefficients are α_k/s_k.
    """

    name = "mgda"

    def __init__(self, normalize: str = "none", iters: int = 250, tol: float = 1e-6):
        if normalize not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"mgda: normalize must be one of none, l2, loss, loss+; got {normalize!r}")
        self.normalize, self.iters, self.tol = normalize, int(iters), float(tol)

    def _weights(self, gram, losses, state):
        k = gram.shape[0]
        norms = gram.diagonal().clamp_min(0).sqrt()
        if self.normalize in ("loss", "loss+") and losses is None:
            raise ValueError(f"mgda(normalize={self.normalize!r}) needs the UL losses")
        scale = {"none": torch.ones(k, dtype=torch.float64), "l2": norms}.get(self.normalize)
        if scale is None:
            scale = losses if self.normalize == "loss" else losses * norms
        scale = torch.where(scale.abs() > 1e-12, scale, torch.ones_like(scale))
        alpha = min_norm_weights(gram / torch.outer(scale, scale), self.iters, self.tol)
        return alpha / scale


@register_aggregator
class PCGrad(Aggregator):
    """Gradient surgery (Yu et al. 2020): each g_i is projected off every conflicting g_j, in a random order.

    Computed in K-space: g_i' = Σ_j C_ij g_j, ⟨g_i', g_j⟩ = (C M)_ij, and d = Σ_i g_i' has coefficients
    w = Cᵀ𝟙. The order is drawn per row from a seeded generator kept in ``state["rng"]``.
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def _weights(self, gram, losses, state):
        k = gram.shape[0]
        gen = _generator(state, "rng", self.seed)
        coef = torch.eye(k, dtype=torch.float64)
        for i in range(k):
            others = [j for j in torch.randperm(k, generator=gen).tolist() if j != i]
            for j in others:
                inner = coef[i] @ gram[:, j]
                if inner < 0 and gram[j, j] > 0:
                    coef[i, j] -= inner / gram[j, j]
        state["rng"] = gen.get_state()
        return coef.sum(0)


@register_aggregator
class CAGrad(Aggregator):
    """Conflict-averse gradient (Liu et al. 2021), solved in K-space through the Gramian.

    w* = argmin_{w∈Δ} wᵀM𝟙/K + √φ·√(wᵀMw), φ = c²‖g_0‖², g_0 = mean_k g_k (projected gradient descent with
    backtracking, float64). d = g_0 + (√φ/‖g_w‖) g_w, divided by 1 + c² (``rescale=1``, LibMTL default),
    by 1 + c (``rescale=2``) or not at all (``rescale=0``).
    """

    name = "cagrad"

    def __init__(self, c: float = 0.5, rescale: int = 1, iters: int = 500):
        if rescale not in (0, 1, 2):
            raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}")
        self.c, self.rescale, self.iters = float(c), int(rescale), int(iters)

    def solve(self, gram: Tensor) -> Tensor:
        """The inner simplex problem's minimiser w*."""
        k = gram.shape[0]
        b = gram.sum(1) / k
        sqrt_phi = self.c * (gram.sum() / k**2).clamp_min(0).sqrt()

        def objective(w):
            return w @ b + sqrt_phi * (w @ gram @ w).clamp_min(0).add(1e-20).sqrt()

        w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        h = objective(w)
        step = 1.0 / max(float(gram.diagonal().max()), 1e-30)
        for _ in range(self.iters):
            grad = b + sqrt_phi * (gram @ w) / (w @ gram @ w).clamp_min(0).add(1e-20).sqrt()
            while True:  # backtracking: the objective is convex but only locally smooth
                w_new = _project_simplex(w - step * grad)
                h_new = objective(w_new)
                if h_new <= h - 1e-4 * (grad @ (w - w_new)) or step < 1e-30:
                    break
                step *= 0.5
            converged = float((w_new - w).abs().max()) < 1e-14
            w, h = w_new, h_new
            step *= 2.0
            if converged:
                break
        return w

    def _weights(self, gram, losses, state):
        k = gram.shape[0]
        sqrt_phi = self.c * (gram.sum() / k**2).clamp_min(0).sqrt()
        w = self.solve(gram)
        gw_norm = (w @ gram @ w).clamp_min(0).sqrt()
        coef = torch.full((k,), 1.0 / k, dtype=torch.float64)
        if gw_norm > 1e-30:
            coef = coef + sqrt_phi / gw_norm * w
        return coef / {0: 1.0, 1: 1 + self.c**2, 2: 1 + self.c}[self.rescale]
