"""The bi-level step: lower-level updates, per-constraint hypergradients, aggregation, one upper update.

One call of :meth:`BilevelStep.step` is one iteration t of method.md §1:

1. Forward the upper net once per distinct LL batch (``no_grad``, unless an upper step follows on the image
   path, where the graph is kept for the final vector–Jacobian product).
2. For each constraint k: ``lower_steps`` optimiser steps on f_k(sg z, LL batch). The fused image is detached,
   so LL backward passes never write into the upper parameters' ``.grad`` (method.md §5.7).
3. If (t + 1) mod ``ul_every`` = 0: each constraint's hypergradient on its UL batch by the chosen estimator,
   aggregation, ``.grad`` of the upper parameters, optional clipping, one upper optimiser step.

Two ways to get the hypergradients (``path``):

* ``"image"`` (default, fast). Every constraint sees the upper parameters x only through fused images z_b
  (one per distinct batch b), so each row is g_k = Σ_b J_bᵀ u_{k,b}, J_b = ∂z_b/∂x. The image-space
  gradients u_{k,b} come from running the estimator with the images as the upper variables
  (``hypergrad(method, F̃_k, f̃_k, (z_UL, z_LL), y_k)``); only the constraint nets are differentiated. The
  weights come from image-space statistics (‖u_k‖, losses), then ONE backward pass applies
  Σ_b J_bᵀ(Σ_k w_k u_{k,b}) for all distinct batches at once. Rules that need the parameter-space Gramian
  (``mgda``, ``pcgrad``, ``cagrad``) cannot run here; asking for them switches to ``"param"`` with a warning.
  Diagnostics on this path: ``hypergrad/norm/<k>`` is the image-space norm ‖u_k‖, and
  ``hypergrad/cos/<a>-<b>`` is reported only for pairs whose rows live on the same batches.
  ``gradnorm_softmax`` therefore weighs by image-space norms, a proxy for the parameter-space norms (same
  rule, different statistic).
* ``"param"`` (exact rows). Each row is ``hypergrad(method, F_k, f_k, x, y_k)`` with the upper net called
  functionally (``torch.func.functional_call``), one backward through the upper net per row and term. All
  aggregators; diagnostics are parameter-space norms and cosines.

For the same weights both paths give the same update (tested in float64).

Batch-norm and other running buffers: the upper net's buffers are updated only by the LL-batch forwards of
step 1; every other forward (UL batches, the param path's re-forwards) and all estimator forwards of the
constraint nets run in the modules' current mode and their buffers are restored afterwards (pass
``constraint_eval=True`` to evaluate the constraint nets in eval mode instead).

Mixed precision: ``amp_dtype=torch.bfloat16`` runs forwards and losses under ``torch.autocast`` (CPU and
CUDA); the constraints receive fused images cast to float32, image-space gradients are cast back.

Non-finite values: the LL losses of all constraints are checked before any LL optimiser step; a NaN/Inf skips
the whole iteration (no LL and no UL update, ``nonfinite=1``). With ``lower_steps > 1`` the check runs at each
inner step, so earlier inner steps stay. A non-finite UL loss, hypergradient or combined gradient skips the
upper update (the LL steps of that iteration, whose losses were finite, stay) and also reports
``nonfinite=1``.

DDP: pass the plain (unwrapped) modules and ``reduce`` = an all-reduce-mean. It is applied to (1) each
constraint's LL gradients before its optimiser step, (2) the y-space vectors inside the estimators (see
``bilevel.estimators``), (3) the per-constraint statistics used by the weights (losses, squared norms, dot
products), and (4) the final parameter gradient on the image path — the image-space u's are per-sample and
never reduced — or the stacked parameter-space rows on the param path (so Gramian rules see global rows).
On the image path, ``gradnorm_softmax(unit=True)`` then scales by the rank-mean image norm.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .aggregate import combine, create_aggregator, gramian
from .estimators import USES_LOWER_X, check_hypergrad_options, hypergrad

# Options that default to the constraint optimiser's current learning rate (method.md §2: ξ, α, η = LL lr).
_LR_DEFAULTS = {"fd": "xi", "unrolled": "lr", "neumann": "alpha", "bdl_code": "eta"}
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class Constraint:
    """One lower level: its parameters y_k (``module``), optimiser and the two objectives.

    Attributes:
        name: key in the batch mappings and in the diagnostics.
        module: the lower-level net (e.g. a task); its trainable parameters are y_k.
        optimizer: optimiser over ``module``'s parameters (LL steps).
        lower_loss: f_k(z, ll_batch) → scalar; called on the detached fused image for LL steps and on the
            differentiable one for hypergradients. May return a dict with key ``"loss"``.
        upper_loss: F_k(z, ul_batch) → scalar (differentiable in z and y_k); may return a dict with
            ``"loss"``.
        scheduler: stepped after every LL optimiser step.
        lower_steps: LL optimiser steps per iteration.
    """

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    lower_loss: Callable[[Tensor, Any], Tensor]
    upper_loss: Callable[[Tensor, Any], Tensor]
    scheduler: Any = None
    lower_steps: int = 1


class _Bound(nn.Module):
    """Makes a closure over ``module`` callable through ``functional_call`` (parameters swapped in place)."""

    def __init__(self, module: nn.Module, fn: Callable):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@dataclass
class _Rows:
    """Per-row statistics of one upper step, and a callable writing Σ_k w_k g_k into the upper ``.grad``."""

    losses: Tensor  # (K,) float64
    sq_norms: Tensor  # (K,) squared norms (image space on the image path)
    cos: dict[tuple[int, int], float]
    gram: Tensor | None  # (K, K) parameter-space Gramian; None on the image path
    apply: Callable[[Tensor], None]


class _Buffers:
    """Snapshot of modules' buffers, restored on exit (estimator forwards must not move running stats)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, s in self.saved:
                b.copy_(s)


def _loss(value, what: str) -> Tensor:
    if isinstance(value, Mapping):
        value = value["loss"]
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            f"{what} must return a scalar tensor (or a dict with 'loss'), got {type(value).__name__}"
        )
    return value.reshape(())


def _as_input(z: Tensor) -> Tensor:
    """The image handed to constraints: float32 when the upper net ran in reduced precision."""
    return z.float() if z.dtype in _LOW_PRECISION else z


def _trainable(module: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def _split(flat: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Inverse of ``torch.cat([t.reshape(-1) for t in like])``."""
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return tuple(out)


def _reduce_flat(tensors: Sequence[Tensor], reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, ...]:
    """``reduce`` applied once to the concatenation of ``tensors`` (one collective)."""
    return _split(reduce(torch.cat([t.reshape(-1) for t in tensors])), tensors)


class BilevelStep:
    """Bi-level training step for one upper net and any number of named lower levels (see module docstring).

    Args:
        upper: the upper-level net (parameters x, e.g. the fusion net).
        upper_optimizer: optimiser over ``upper``'s parameters.
        forward: ``forward(upper, batch) -> z`` (the fused image the constraints see).
        constraints: the lower levels; names must be unique.
        upper_loss: optional standalone UL loss on ``upper_batch`` (row ``"fusion"``, its plain gradient).
            With no constraints this is single-level training.
        hypergrad: estimator name (``bilevel.list_hypergrads()``).
        hypergrad_options: its options; ``xi``/``lr``/``alpha``/``eta`` of fd/unrolled/neumann/bdl_code
            default to each constraint optimiser's current learning rate.
        aggregate: aggregator name (``bilevel.list_aggregators()``).
        aggregate_options: its options.
        ul_every: upper step when (iteration + 1) % ul_every == 0 (BDL: 10).
        path: ``"image"`` (one VJP through the upper net) or ``"param"`` (exact parameter-space rows).
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None.
        grad_clip: max total norm of the upper gradient, or None.
        reduce: all-reduce-mean for DDP (see module docstring), or None.
        upper_scheduler: stepped after every upper step.
        constraint_eval: evaluate the constraint nets in eval mode during hypergradients.

    Example:
        >>> step = BilevelStep(net, opt, lambda m, b: m(b["ir"], b["vis"]), [seg, critic], ul_every=10)
        >>> diag = step.step({"seg": b1, "critic": b2}, {"seg": v1, "critic": v2})  # doctest: +SKIP
    """

    def __init__(
        self,
        upper: nn.Module,
        upper_optimizer: torch.optim.Optimizer,
        forward: Callable[[nn.Module, Any], Tensor],
        constraints: Sequence[Constraint],
        *,
        upper_loss: Callable[[Tensor, Any], Tensor] | None = None,
        hypergrad: str = "gn",
        hypergrad_options: dict | None = None,
        aggregate: str = "gradnorm_softmax",
        aggregate_options: dict | None = None,
        ul_every: int = 1,
        path: str = "image",
        amp_dtype: torch.dtype | None = None,
        grad_clip: float | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        upper_scheduler: Any = None,
        constraint_eval: bool = False,
    ):
        self.constraints = list(constraints)
        names = [c.name for c in self.constraints]
        if len(set(names)) != len(names):
            raise ValueError(f"constraint names must be unique, got {names}")
        if upper_loss is not None and "fusion" in names:
            raise ValueError("the name 'fusion' is reserved for the standalone upper loss row")
        if not self.constraints and upper_loss is None:
            raise ValueError("give at least one constraint or an upper_loss")
        if ul_every < 1:
            raise ValueError(f"ul_every must be >= 1, got {ul_every}")
        if path not in ("image", "param"):
            raise ValueError(f"path must be 'image' or 'param', got {path!r}")
        for c in self.constraints:
            if c.lower_steps < 1:
                raise ValueError(f"constraint {c.name!r}: lower_steps must be >= 1")
        self.hypergrad_options = dict(hypergrad_options or {})
        lr_key = _LR_DEFAULTS.get(hypergrad)
        check_hypergrad_options(hypergrad, self.hypergrad_options, provided=[lr_key] if lr_key else [])
        self.aggregator = create_aggregator(aggregate, **(aggregate_options or {}))
        if path == "image" and self.aggregator.uses_gramian:
            warnings.warn(
                f"aggregator {aggregate!r} needs parameter-space rows; using path='param'", stacklevel=2
            )
            path = "param"
        k = len(names) + (upper_loss is not None)
        self.aggregator.weights(
            torch.eye(k, dtype=torch.float64), torch.ones(k), {}
        )  # e.g. fixed weights vs K
        self.upper, self.upper_optimizer, self.forward = upper, upper_optimizer, forward
        self.upper_loss, self.upper_scheduler = upper_loss, upper_scheduler
        self.method, self.ul_every, self.path = hypergrad, int(ul_every), path
        self.amp_dtype, self.grad_clip, self.reduce = amp_dtype, grad_clip, reduce
        self.constraint_eval = constraint_eval
        self.row_names = names + (["fusion"] if upper_loss is not None else [])
        self.state: dict = {}
        self.iteration = 0
        self._upper_call = _Bound(upper, lambda batch: forward(upper, batch))
        self._bound = {
            c.name: (_Bound(c.module, c.lower_loss), _Bound(c.module, c.upper_loss)) for c in self.constraints
        }

    # ------------------------------------------------------------------------------------------ public

    def state_dict(self) -> dict:
        """Iteration counter and aggregator state (tensors and numbers only: ``weights_only``-loadable)."""
        return {
            "iteration": self.iteration,
            "aggregator_state": {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.state.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.iteration = int(state["iteration"])
        self.state = {
            k: v.clone() if isinstance(v, Tensor) else v for k, v in state["aggregator_state"].items()
        }

    def step(
        self, ll_batches: Mapping[str, Any], ul_batches: Mapping[str, Any], upper_batch: Any = None
    ) -> dict[str, float]:
        """One iteration: LL steps for every constraint, then an upper step if the schedule says so.

        Args:
            ll_batches: constraint name → LL batch (f_k and the LL steps).
            ul_batches: constraint name → UL batch (F_k); only read on upper steps.
            upper_batch: batch of the standalone ``upper_loss`` (required on upper steps when it is set).

        Returns:
            Diagnostics (floats): ``loss/lower/<k>``, ``upper_step``, ``nonfinite``, and on upper steps
            ``loss/upper/<k>``, ``hypergrad/norm/<k>``, ``hypergrad/cos/<a>-<b>``, ``agg/weight/<k>``,
            ``agg/norm`` (norm of the applied upper gradient before clipping).
        """
        upper_step = (self.iteration + 1) % self.ul_every == 0
        self._check_batches(ll_batches, ul_batches, upper_batch, upper_step)
        self.iteration += 1
        diag: dict[str, float] = {"upper_step": 0.0, "nonfinite": 0.0}
        cache: dict[int, Tensor] = {}
        # Running stats move in the forwards below; a non-finite LL loss must leave them untouched too.
        buffers = _Buffers([self.upper, *(c.module for c in self.constraints)])
        # On the image path the LL-batch graph is kept for the final VJP when the estimator uses ∇ₓf.
        with torch.set_grad_enabled(upper_step and self.path == "image" and USES_LOWER_X[self.method]):
            for c in self.constraints:
                self._fused(cache, ll_batches[c.name])
        failed_at = self._lower_phase(cache, ll_batches, diag)
        if failed_at is not None:
            cache.clear()
            if failed_at == 0:
                buffers.restore()
            diag["nonfinite"] = 1.0
            return diag
        del buffers
        if upper_step:
            ok = self._upper_phase(cache, ll_batches, ul_batches, upper_batch, diag)
            diag["upper_step"] = float(ok)
            diag["nonfinite"] = float(not ok)
        return diag

    # ------------------------------------------------------------------------------------------ phases

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device = next(self.upper.parameters()).device.type
        return torch.autocast(device_type=device, dtype=self.amp_dtype)

    def _check_batches(self, ll, ul, upper_batch, upper_step: bool) -> None:
        for what, mapping in (("ll_batches", ll), ("ul_batches", ul if upper_step else ll)):
            missing = [c.name for c in self.constraints if c.name not in mapping]
            if missing:
                raise KeyError(f"{what} lacks batches for constraint(s) {missing}")
        if upper_step and upper_batch is None and self.upper_loss is not None:
            raise ValueError("upper_loss is set: pass upper_batch on upper steps")

    def _fused(self, cache: dict[int, Tensor], batch: Any) -> Tensor:
        """z for ``batch``: one forward per distinct batch object per iteration (again if a graph is due)."""
        key = id(batch)
        if key not in cache or (torch.is_grad_enabled() and cache[key].grad_fn is None):
            with self._autocast():
                z = self.forward(self.upper, batch)
            if not isinstance(z, Tensor):
                raise TypeError(f"forward(upper, batch) must return a tensor, got {type(z).__name__}")
            cache[key] = z
        return cache[key]

    def _lower_phase(self, cache, ll_batches, diag) -> int | None:
        """LL steps; returns the inner step at which a non-finite loss stopped them, else None."""
        for s in range(max((c.lower_steps for c in self.constraints), default=0)):
            active = [c for c in self.constraints if s < c.lower_steps]
            losses = []
            for c in active:
                c.optimizer.zero_grad(set_to_none=True)
                batch = ll_batches[c.name]
                with self._autocast():
                    loss = _loss(
                        c.lower_loss(_as_input(cache[id(batch)]).detach(), batch), f"{c.name}.lower_loss"
                    )
                loss.backward()
                losses.append(loss.detach().float())
            stacked = torch.stack(losses)
            for c, v in zip(active, stacked.tolist()):
                diag[f"loss/lower/{c.name}"] = v
            if not bool(torch.isfinite(stacked).all()):
                for c in active:
                    c.optimizer.zero_grad(set_to_none=True)
                return s
            for c in active:
                if self.reduce is not None:
                    grads = [p.grad for p in c.module.parameters() if p.grad is not None]
                    if grads:
                        for g, r in zip(grads, _reduce_flat(grads, self.reduce)):
                            g.copy_(r)
                c.optimizer.step()
                if c.scheduler is not None:
                    c.scheduler.step()
        return None

    def _options(self, c: Constraint) -> dict:
        opts = dict(self.hypergrad_options)
        lr_key = _LR_DEFAULTS.get(self.method)
        if lr_key and lr_key not in opts:
            opts[lr_key] = float(c.optimizer.param_groups[0]["lr"])
        if self.reduce is not None:
            opts["reduce"] = self.reduce
        return opts

    def _call(self, c: Constraint, which: int, ys: Sequence[Tensor], z: Tensor, batch: Any) -> Tensor:
        """Constraint objective (0: lower, 1: upper) with its parameters replaced by ``ys``."""
        names, _ = _trainable(c.module)
        params = {f"module.{n}": y for n, y in zip(names, ys)}
        out = torch.func.functional_call(self._bound[c.name][which], params, (z, batch))
        return _loss(out, f"{c.name}.{'upper' if which else 'lower'}_loss")

    def _upper_phase(self, cache, ll_batches, ul_batches, upper_batch, diag) -> bool:
        for p in self.upper.parameters():
            p.grad = None
        modules = [c.module for c in self.constraints]
        # Restored only after the final backward: copying into a buffer that a pending graph saved (BN running
        # stats) would trip autograd's version check.
        guard = _Buffers([self.upper, *modules])
        modes = [(m, m.training) for mod in modules for m in mod.modules()] if self.constraint_eval else []
        for m, _ in modes:
            m.eval()
        try:
            with self._autocast():
                if self.path == "image":
                    rows = self._image_rows(cache, ll_batches, ul_batches, upper_batch)
                else:
                    rows = self._param_rows(ll_batches, ul_batches, upper_batch)
            return self._apply(rows, diag)
        finally:
            guard.restore()
            for m, mode in modes:
                m.train(mode)

    def _apply(self, rows: _Rows, diag: dict[str, float]) -> bool:
        for i, name in enumerate(self.row_names):
            diag[f"loss/upper/{name}"] = float(rows.losses[i])
            diag[f"hypergrad/norm/{name}"] = math.sqrt(max(float(rows.sq_norms[i]), 0.0))
        for (i, j), v in rows.cos.items():
            diag[f"hypergrad/cos/{self.row_names[i]}-{self.row_names[j]}"] = v
        if not (bool(torch.isfinite(rows.losses).all()) and bool(torch.isfinite(rows.sq_norms).all())):
            return False
        gram = torch.diag(rows.sq_norms) if rows.gram is None else rows.gram
        weights = self.aggregator.weights(gram, rows.losses, self.state)
        for i, name in enumerate(self.row_names):
            diag[f"agg/weight/{name}"] = float(weights[i])
        rows.apply(weights)
        params = [p for p in self.upper.parameters() if p.grad is not None]
        if not params:
            return False
        if self.reduce is not None and self.path == "image":
            for p, r in zip(params, _reduce_flat([p.grad for p in params], self.reduce)):
                p.grad.copy_(r)
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])
        )
        diag["agg/norm"] = float(total)
        if not math.isfinite(diag["agg/norm"]):
            for p in params:
                p.grad = None
            return False
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.upper_optimizer.step()
        if self.upper_scheduler is not None:
            self.upper_scheduler.step()
        return True

    def _statistics(self, losses: Tensor, extra: Tensor) -> tuple[Tensor, Tensor]:
        """Reduce (losses, statistics) together in one collective."""
        if self.reduce is None:
            return losses, extra
        flat = self.reduce(torch.cat([losses.to(extra), extra.reshape(-1)]))
        return flat[: losses.numel()], flat[losses.numel() :].view_as(extra)

    def _image_rows(self, cache, ll_batches, ul_batches, upper_batch) -> _Rows:
        u_rows: list[dict[int, Tensor]] = []
        losses: list[Tensor] = []
        for c in self.constraints:
            ulb, llb = ul_batches[c.name], ll_batches[c.name]
            self._fused(cache, ulb)
            keys = [id(ulb)]
            if USES_LOWER_X[self.method] and id(llb) not in keys:
                keys.append(id(llb))
            il = keys.index(id(llb)) if id(llb) in keys else 0
            record: dict[str, Tensor] = {}

            def upper(xs, ys, c=c, ulb=ulb, record=record):
                record["loss"] = value = self._call(c, 1, ys, xs[0], ulb)
                return value

            def lower(xs, ys, c=c, llb=llb, il=il):
                return self._call(c, 0, ys, xs[il], llb)

            u = hypergrad(
                self.method,
                upper,
                lower,
                [_as_input(cache[k]) for k in keys],
                _trainable(c.module)[1],
                **self._options(c),
            )
            u_rows.append(dict(zip(keys, u)))
            losses.append(record["loss"].detach())
        if self.upper_loss is not None:
            z = _as_input(self._fused(cache, upper_batch)).detach().requires_grad_(True)
            value = _loss(self.upper_loss(z, upper_batch), "upper_loss")
            (u,) = torch.autograd.grad(value, z, allow_unused=True)
            u_rows.append({id(upper_batch): torch.zeros_like(z) if u is None else u})
            losses.append(value.detach())

        k = len(u_rows)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k) if set(u_rows[i]) == set(u_rows[j])]
        dots = [
            sum((u_rows[i][b].double() * u_rows[j][b].double()).sum() for b in u_rows[i]) for i, j in pairs
        ]
        sq = [sum(u.double().pow(2).sum() for u in row.values()) for row in u_rows]
        loss_t, stats = self._statistics(torch.stack([v.double() for v in losses]), torch.stack(sq + dots))
        sq_norms = stats[:k]
        cos = {}
        for (i, j), d in zip(pairs, stats[k:].tolist()):
            den = math.sqrt(max(float(sq_norms[i]) * float(sq_norms[j]), 0.0))
            cos[(i, j)] = d / den if den > 0 else 0.0

        def apply(weights: Tensor) -> None:
            w = weights.tolist()
            keys = list(dict.fromkeys(b for row in u_rows for b in row))
            outputs, grads = [], []
            for b in keys:
                z = cache[b]
                if not z.requires_grad:
                    continue
                acc = sum(w[i] * row[b] for i, row in enumerate(u_rows) if b in row)
                outputs.append(z)
                grads.append(acc.to(z.dtype))
            if outputs:
                torch.autograd.backward(outputs, grads)

        return _Rows(loss_t, sq_norms, cos, None, apply)

    def _param_rows(self, ll_batches, ul_batches, upper_batch) -> _Rows:
        names, x = _trainable(self.upper)

        def fused(xs, batch):
            params = {f"module.{n}": v for n, v in zip(names, xs)}
            return _as_input(torch.func.functional_call(self._upper_call, params, (batch,)))

        rows: list[tuple[Tensor, ...]] = []
        losses: list[Tensor] = []
        for c in self.constraints:
            ulb, llb = ul_batches[c.name], ll_batches[c.name]
            record: dict[str, Tensor] = {}

            def upper(xs, ys, c=c, ulb=ulb, record=record):
                record["loss"] = value = self._call(c, 1, ys, fused(xs, ulb), ulb)
                return value

            def lower(xs, ys, c=c, llb=llb):
                return self._call(c, 0, ys, fused(xs, llb), llb)

            rows.append(hypergrad(self.method, upper, lower, x, _trainable(c.module)[1], **self._options(c)))
            losses.append(record["loss"].detach())
        if self.upper_loss is not None:
            record = {}

            def fusion(xs, ys, record=record):
                record["loss"] = value = _loss(
                    self.upper_loss(fused(xs, upper_batch), upper_batch), "upper_loss"
                )
                return value

            rows.append(hypergrad("none", fusion, None, x, ()))
            losses.append(record["loss"].detach())
        loss_t = torch.stack([v.double() for v in losses])
        if self.reduce is not None:
            flat = self.reduce(torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows]))
            rows = [_split(flat[i], row) for i, row in enumerate(rows)]
            loss_t = self.reduce(loss_t)
        gram = gramian(rows)
        sq_norms = gram.diagonal().clone()
        k = len(rows)
        cos = {}
        for i in range(k):
            for j in range(i + 1, k):
                den = math.sqrt(max(float(gram[i, i]) * float(gram[j, j]), 0.0))
                cos[(i, j)] = float(gram[i, j]) / den if den > 0 else 0.0

        def apply(weights: Tensor) -> None:
            for p, g in zip(x, combine(rows, weights)):
                p.grad = g.to(p.dtype)

        return _Rows(loss_t, sq_norms, cos, gram, apply)
