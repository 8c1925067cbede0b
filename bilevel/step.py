"""The bi-level step: lower-level updates, per-constraint hypergradients, aggregation, one upper update.

Streams. Batches arrive by stream name: :meth:`BilevelStep.step` and :meth:`BilevelStep.warmup` take a
mapping stream → batch. Constraint k reads its LL batch from ``ll_stream`` (default ``"<k>/ll"``) and its UL
batch from ``ul_stream`` (default ``"<k>/ul"``); the standalone upper row ``"fusion"`` reads ``upper_stream``.
The upper net is forwarded at most once per stream and iteration (again only when a graph becomes due), so
constraints that name the same stream share one forward. A missing stream raises a ``KeyError`` naming it
and its users.

Upper output. ``forward(upper, batch)`` returns a tensor or an :class:`UpperOutput` ``(value, aux)``: the
constraints see ``value``; ``aux`` are the upper net's own scalar losses (e.g. a mixture-of-experts balance
term), already weighted. They enter only the standalone row, which is ``upper_loss(value, batch) + Σ aux`` of
the ``upper_stream`` forward. Without ``upper_loss`` that row is ``Σ aux`` alone when the forward has aux (so
they never vanish silently; the upper stream is then looked at only once a forward of the iteration returned
aux), and a step with neither has no such row (the row count K may therefore depend on the net).

One call of :meth:`BilevelStep.step` is one iteration t of the method (see ``docs/method.md``):

1. Forward the upper net once per distinct LL stream (``no_grad``, unless an upper step follows on the image
   path, where the graph is kept for the rows' vector–Jacobian product).
2. For each constraint k: ``lower_steps`` optimiser steps on f_k(sg z, LL batch). The fused image is detached,
   so LL backward passes never write into the upper parameters' ``.grad``.
3. If (t + 1) mod ``ul_every`` = 0: each constraint's hypergradient on its UL batch by the chosen estimator,
   the standalone row's plain gradient, aggregation, ``.grad`` of the upper parameters, optional clipping, one
   upper optimiser step.

``reuse_lower_grads=True`` (``gn`` and ``bdl_code`` on the image path; off by default because it changes the
hypergradient) takes ∇ₓf_k and ∇_y f_k from the backward of constraint k's last LL step in step 2, i.e. at y
before that step, instead of a further forward and backward of the constraint at the updated y in step 3: one
constraint pass less per constraint and upper step, with ∇_y F and ∇_y f one LL step apart. The LL step's
forward runs in the constraint's training mode (``constraint_eval`` does not apply to it).

``cuda_graphs=True`` (GPU only) replays steps 1–2 of lower-only iterations, and in step 3 each constraint's
estimator on the images (image path), as captured CUDA graphs, one per batch shape (and estimator options),
after a plain and a probed eager run (``bilevel.graphs``): the same updates with one launch instead of
hundreds; whatever the probe finds that a graph cannot hold keeps that part eager. Estimators stay eager
with ``reduce`` (a collective inside them).

:meth:`BilevelStep.warmup` is the engine's warm-up phase: the same LL phase, then one upper update from the
standalone row alone (its plain gradient, no hypergradients, no aggregator) through the same update code
(DDP reduce, clipping, scheduler, non-finite skip). It ignores ``ul_every`` and does not advance
``iteration``. Its forward order (upper stream with a graph first, then the LL streams in constraint order)
and its ``upper_loss`` evaluated outside autocast reproduce the runner's former hand-written warm-up.

Two ways to get the hypergradients (``path``); both end with the same K exact parameter-space rows g_k, so
every aggregator runs on either path with the same inputs (its weights read the rows' Gramian
M_ij = ⟨g_i, g_j⟩, the losses and its state) and the update is Σ_k w_k g_k, written into ``.grad``:

* ``"image"`` (default, fast). Every constraint sees the upper parameters x only through fused images z_s
  (one per distinct stream s), so each row is g_k = Σ_s J_sᵀ u_{k,s}, J_s = ∂z_s/∂x. The image-space
  gradients u_{k,s} come from running the estimator with the images as the upper variables
  (``hypergrad(method, F̃_k, f̃_k, (z_UL, z_LL), y_k)``); only the constraint nets are differentiated. Then
  one vector–Jacobian product per row maps u_k through the graphs of the streams it lives on (retained until
  the last row); the standalone row's also carries 1 on Σ aux of the upper stream. The update Σ_k w_k g_k is
  a combination of those rows: no further backward pass. Cost: one backward pass through the upper net per
  row (K in all) and K rows of |x| floats. Rules whose weights ignore the rows (``sum``, ``mean``, ``fixed``,
  ``bdl_released``, ``rlw``, ``dwa``, ``uw``: ``Aggregator.uses_gramian`` is False) skip them: their weights
  come first and one VJP of Σ_k w_k u_k gives the same update (J is linear) for one backward pass instead
  of K. ``row_stats=True`` forms the rows anyway, for their diagnostics.
* ``"param"``. Each row is ``hypergrad(method, F_k, f_k, x, y_k)`` with the upper net called functionally
  (``torch.func.functional_call``), one backward through the upper net per row and term; the standalone
  row's re-forward returns the aux too. Slower (upper-net passes per row); an independent check of the
  image path.

For the same inputs both paths give the same rows, weights, diagnostics and update (tested in float64 for
every estimator and every aggregator). Diagnostics ``hypergrad/norm/<k>`` = ‖g_k‖ and
``hypergrad/cos/<a>-<b>`` for every pair of rows are parameter-space statistics on both paths, reported when
the rows are formed (``row_stats``).

Batch-norm and other running buffers: in :meth:`~BilevelStep.step` the upper net's buffers are updated only by
the LL-stream forwards of step 1; every other forward (UL streams, the param path's re-forwards) and all
estimator forwards of the constraint nets run in the modules' current mode and their buffers are restored
afterwards (pass ``constraint_eval=True`` to evaluate the constraint nets in eval mode instead). The warm-up's
upper-stream forward moves them too, as a plain training step does.

Mixed precision: ``amp_dtype=torch.bfloat16`` runs forwards and losses under ``torch.autocast`` (CPU and
CUDA); the constraints receive fused images cast to float32, image-space gradients are cast back.

Non-finite values: the LL losses of all constraints are checked before any LL optimiser step; a NaN/Inf skips
the whole iteration (no LL and no UL update, ``nonfinite=1``). With ``lower_steps > 1`` the check runs at each
inner step, so earlier inner steps stay. A non-finite UL loss, hypergradient or combined gradient skips the
upper update (the LL steps of that iteration, whose losses were finite, stay) and also reports
``nonfinite=1``. The warm-up follows the same rules.

DDP: pass the plain (unwrapped) modules and ``reduce`` = an all-reduce-mean. It is applied to (1) each
constraint's LL gradients before its optimiser step, (2) the y-space vectors inside the estimators (see
``bilevel.estimators``), (3) the UL losses and aux values, and (4) the stacked parameter-space rows of
either path (so every rule sees the global rows; the image-space u's are per-sample and never reduced), or
the warm-up's parameter gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import graphs
from .aggregate import combine, create_aggregator, gramian
from .estimators import USES_LOWER_X, check_hypergrad_options, hypergrad

# Options that default to the constraint optimiser's current learning rate (ξ, α, η = LL lr).
_LR_DEFAULTS = {"fd": "xi", "unrolled": "lr", "neumann": "alpha", "bdl_code": "eta"}
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_ROW = "fusion"  # name of the standalone upper row
# Estimators that read the lower objective only through its first derivatives at the current point, so the
# last LL step's backward can supply them (``reuse_lower_grads``).
REUSES_LOWER_GRADS = ("gn", "bdl_code")


def can_reuse_lower_grads(hypergrad: str, path: str) -> bool:
    """Whether ``reuse_lower_grads`` applies: one of :data:`REUSES_LOWER_GRADS`, on the image path (the
    parameter path differentiates f through the upper net, which the LL step's backward does not)."""
    return hypergrad in REUSES_LOWER_GRADS and path == "image"


@dataclass(frozen=True)
class UpperOutput:
    """What ``forward(upper, batch)`` may return instead of a bare tensor.

    Attributes:
        value: what the constraints see (e.g. the fused image).
        aux: the upper net's own scalar losses, already weighted by the caller; only the standalone upper
            row adds them (see the module docstring).
    """

    value: Tensor
    aux: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass
class Constraint:
    """One lower level: its parameters y_k (``module``), optimiser, the two objectives and their streams.

    Attributes:
        name: the row's name in the diagnostics.
        module: the lower-level net (e.g. a task); its trainable parameters are y_k.
        optimizer: optimiser over ``module``'s parameters (LL steps).
        lower_loss: f_k(z, ll_batch) → scalar; called on the detached fused image for LL steps and on the
            differentiable one for hypergradients. May return a dict with key ``"loss"``.
        upper_loss: F_k(z, ul_batch) → scalar (differentiable in z and y_k); may return a dict with
            ``"loss"``.
        scheduler: stepped after every LL optimiser step.
        lower_steps: LL optimiser steps per iteration.
        ll_stream: stream of the LL batch; None means ``f"{name}/ll"``.
        ul_stream: stream of the UL batch; None means ``f"{name}/ul"``.
    """

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    lower_loss: Callable[[Tensor, Any], Tensor]
    upper_loss: Callable[[Tensor, Any], Tensor]
    scheduler: Any = None
    lower_steps: int = 1
    ll_stream: str | None = None
    ul_stream: str | None = None


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
    """The K parameter-space rows of one upper step (DDP-reduced), their losses and the row objectives' aux.

    ``reached[i]`` is False for an upper parameter that no row depends on: it keeps ``.grad = None``, so the
    optimiser skips it (no weight decay or momentum on, e.g., a router that this batch never used).
    """

    names: list[str]
    losses: Tensor  # (K,) float64
    rows: list[tuple[Tensor, ...]]
    params: list[Tensor]
    reached: list[bool]
    aux: dict[str, float]  # the standalone row's aux terms (reduced), for the diagnostics


@dataclass
class _Cotangents:
    """The image path before its VJP: per row the image-space gradients by stream, the (unreduced) losses,
    the standalone row's aux values and Σ aux with its graph, and the upper parameters."""

    names: list[str]
    u_rows: list[dict[str, Tensor]]
    losses: list[Tensor]
    aux: dict[str, Tensor]
    aux_sum: Tensor | None
    params: list[Tensor]


class _Buffers:
    """Snapshot of modules' buffers, restored on exit (estimator forwards must not move running stats).

    Copies with one multi-tensor kernel per device and dtype: a U-Net segmenter has ~100 small buffers, and
    one copy each took ~15 ms of CPU time per upper iteration on an H100 (profiled; three snapshots or
    restores per iteration), time in which the GPU waits.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for m in modules:
            for b in m.buffers():
                groups.setdefault((b.device, b.dtype), []).append(b.detach())
        self.groups = [(live, [torch.empty_like(b) for b in live]) for live in groups.values()]
        for live, saved in self.groups:
            torch._foreach_copy_(saved, live)

    def restore(self) -> None:
        with torch.no_grad():
            for live, saved in self.groups:
                torch._foreach_copy_(live, saved)


def _loss(value, what: str) -> Tensor:
    if isinstance(value, Mapping):
        value = value["loss"]
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            f"{what} must return a scalar tensor (or a dict with 'loss'), got {type(value).__name__}"
        )
    return value.reshape(())


def _as_output(out: Any) -> UpperOutput:
    """``forward``'s result as an :class:`UpperOutput` (a bare tensor has no aux)."""
    if isinstance(out, Tensor):
        return UpperOutput(out)
    if isinstance(out, UpperOutput) and isinstance(out.value, Tensor):
        for name, v in out.aux.items():
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise ValueError(f"aux loss {name!r} of forward(upper, batch) must be a scalar tensor")
        return out
    raise TypeError(f"forward(upper, batch) must return a tensor or an UpperOutput, got {type(out).__name__}")


def _row_total(loss: Tensor | None, aux: Mapping[str, Tensor]) -> Tensor | None:
    """The standalone row's objective: ``upper_loss`` (None when unset) plus every aux term."""
    total = loss
    for v in aux.values():
        total = v.reshape(()) if total is None else total + v.reshape(())
    return total


def _stack64(values: Sequence[Tensor]) -> Tensor:
    return torch.stack([v.reshape(()).double() for v in values])


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
        forward: ``forward(upper, batch) -> Tensor | UpperOutput`` (what the constraints see, and the upper
            net's weighted aux losses).
        constraints: the lower levels; names must be unique (``"fusion"`` is reserved).
        upper_loss: optional standalone UL loss on the ``upper_stream`` batch (row ``"fusion"``, its plain
            gradient, plus the aux of that forward). With no constraints this is single-level training.
        upper_stream: the stream of the standalone row.
        hypergrad: estimator name (``bilevel.list_hypergrads()``).
        hypergrad_options: its options; ``xi``/``lr``/``alpha``/``eta`` of fd/unrolled/neumann/bdl_code
            default to each constraint optimiser's current learning rate.
        aggregate: aggregator name (``bilevel.list_aggregators()``).
        aggregate_options: its options.
        ul_every: upper step when (iteration + 1) % ul_every == 0 (BDL: 10).
        path: ``"image"`` (image-space estimators, then one VJP per row through the upper net) or ``"param"``
            (estimators on the upper parameters); both give the exact rows and accept every aggregator.
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None.
        grad_clip: max total norm of the upper gradient, or None.
        reduce: all-reduce-mean for DDP (see module docstring), or None.
        upper_scheduler: stepped after every upper step (warm-up included).
        constraint_eval: evaluate the constraint nets in eval mode during hypergradients.
        row_stats: form the K parameter-space rows and report their norms and cosines. None (default): only
            when the aggregator reads them (``uses_gramian``); otherwise the image path applies the same
            update from one backward pass through the upper net instead of K.
        reuse_lower_grads: ``gn``/``bdl_code`` on the image path take ∇f from the last LL step's backward (at
            the pre-step y) instead of a further constraint pass at the updated y (see module docstring).
        cuda_graphs: replay the forwards and backwards of lower-only iterations, and the image path's
            estimators, as captured CUDA graphs (``bilevel.graphs``; same updates, fewer launches). Ignored
            unless the upper net is on a GPU.

    Example:
        >>> seg = Constraint("seg", seg_net, seg_opt, seg_loss, seg_loss, ll_stream="train", ul_stream="val")
        >>> step = BilevelStep(net, opt, lambda m, b: m(b["ir"], b["vis"]), [seg], upper_loss=fusion_loss,
        ...                    upper_stream="train", ul_every=10)  # doctest: +SKIP
        >>> diag = step.step({"train": b1, "val": b2})  # doctest: +SKIP
    """

    def __init__(
        self,
        upper: nn.Module,
        upper_optimizer: torch.optim.Optimizer,
        forward: Callable[[nn.Module, Any], Tensor | UpperOutput],
        constraints: Sequence[Constraint],
        *,
        upper_loss: Callable[[Tensor, Any], Tensor] | None = None,
        upper_stream: str = "upper",
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
        row_stats: bool | None = None,
        reuse_lower_grads: bool = False,
        cuda_graphs: bool = False,
    ):
        self.constraints = list(constraints)
        names = [c.name for c in self.constraints]
        if len(set(names)) != len(names):
            raise ValueError(f"constraint names must be unique, got {names}")
        if _ROW in names:
            raise ValueError(f"the name {_ROW!r} is reserved for the standalone upper row")
        if not self.constraints and upper_loss is None:
            raise ValueError("give at least one constraint or an upper_loss")
        if ul_every < 1:
            raise ValueError(f"ul_every must be >= 1, got {ul_every}")
        if path not in ("image", "param"):
            raise ValueError(f"path must be 'image' or 'param', got {path!r}")
        for c in self.constraints:
            if c.lower_steps < 1:
                raise ValueError(f"constraint {c.name!r}: lower_steps must be >= 1")
        if reuse_lower_grads and not can_reuse_lower_grads(hypergrad, path):
            raise ValueError(f"reuse_lower_grads needs hypergrad in {REUSES_LOWER_GRADS} on the image path, got "
                             f"hypergrad={hypergrad!r}, path={path!r}")
        self.hypergrad_options = dict(hypergrad_options or {})
        lr_key = _LR_DEFAULTS.get(hypergrad)
        check_hypergrad_options(hypergrad, self.hypergrad_options, provided=[lr_key] if lr_key else [])
        self.aggregator = create_aggregator(aggregate, **(aggregate_options or {}))
        self._check_row_count(len(names), upper_loss is not None)
        self.upper, self.upper_optimizer, self.forward = upper, upper_optimizer, forward
        self.upper_loss, self.upper_scheduler, self.upper_stream = upper_loss, upper_scheduler, upper_stream
        self.method, self.ul_every, self.path = hypergrad, int(ul_every), path
        self.amp_dtype, self.grad_clip, self.reduce = amp_dtype, grad_clip, reduce
        self.constraint_eval, self.reuse_lower_grads = constraint_eval, bool(reuse_lower_grads)
        self.row_stats = self.aggregator.uses_gramian if row_stats is None else bool(row_stats)
        self.cuda_graphs = bool(cuda_graphs)
        self._lower_graphs = graphs.Sightings("the lower-only iteration", self.cuda_graphs)
        # In-graph DDP collectives are not attempted: the estimators reduce y-space vectors inside.
        self._estimator_graphs = graphs.Sightings("each constraint's hypergradient estimator",
                                                  self.cuda_graphs and reduce is None)
        self.streams: dict[str, tuple[str, str]] = {
            c.name: (
                f"{c.name}/ll" if c.ll_stream is None else c.ll_stream,
                f"{c.name}/ul" if c.ul_stream is None else c.ul_stream,
            )
            for c in self.constraints
        }
        self.state: dict = {}
        self.iteration = 0
        self._upper_call = _Bound(upper, lambda batch: forward(upper, batch))
        self._bound = {
            c.name: (_Bound(c.module, c.lower_loss), _Bound(c.module, c.upper_loss)) for c in self.constraints
        }

    def _check_row_count(self, k: int, has_upper_loss: bool) -> None:
        """Options tied to the row count (e.g. fixed weights) fail here rather than at the first upper step.

        Without ``upper_loss`` the standalone row exists only when ``forward`` returns aux, so K or K + 1.
        """
        counts = [k + 1] if has_upper_loss else [k, k + 1]
        first: ValueError | None = None
        for n in counts:
            try:
                self.aggregator.weights(torch.eye(n, dtype=torch.float64), torch.ones(n), {})
                return
            except ValueError as err:
                first = first or err
        raise first

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

    def step(self, batches: Mapping[str, Any]) -> dict[str, float]:
        """One iteration: LL steps for every constraint, then an upper step if the schedule says so.

        Args:
            batches: stream name → batch. Always read: every constraint's ``ll_stream``; on upper steps also
                every ``ul_stream`` and, with ``upper_loss`` (or aux from ``forward``), ``upper_stream``.

        Returns:
            Diagnostics (floats): ``loss/lower/<k>``, ``upper_step``, ``nonfinite``, and on upper steps
            ``loss/upper/<k>`` (``loss/upper/fusion``: upper_loss + Σ aux), ``loss/aux/<name>``,
            ``hypergrad/norm/<k>``, ``hypergrad/cos/<a>-<b>``, ``agg/weight/<k>``, ``agg/norm`` (norm of the
            applied upper gradient before clipping).
        """
        upper_step = (self.iteration + 1) % self.ul_every == 0
        self._require(batches, ul=upper_step, upper_row=upper_step and self.upper_loss is not None)
        diag: dict[str, float] = {"upper_step": 0.0, "nonfinite": 0.0}
        cache: dict[str, UpperOutput] = {}
        # Running stats move in the forwards below; a non-finite LL loss must leave them untouched too.
        buffers = _Buffers([self.upper, *(c.module for c in self.constraints)])
        captured, probe = (None, None) if upper_step else self._graph_for(batches)
        if captured is not None:
            self.iteration += 1
            self._lower_phase({}, captured.static, buffers, diag, captured=captured)
            return diag
        ll_batches = batches if probe is None else probe.wrap(batches, self._ll_streams())
        # On the image path the LL-stream graph is kept for the rows' VJP when the estimator uses ∇ₓf.
        with (torch.set_grad_enabled(upper_step and self.path == "image" and USES_LOWER_X[self.method]),
              probe or contextlib.nullcontext()):
            for c in self.constraints:
                self._fused(cache, ll_batches, self.streams[c.name][0])
        if upper_step and self.upper_loss is None and any(out.aux for out in cache.values()):
            self._require(batches, ul=False, upper_row=True)  # those aux must reach the upper row
        self.iteration += 1
        # constraint → (∇_z f, ∇_y f) of its last LL step, when the upper step reuses them
        lower_grads: dict[str, tuple[Tensor, list[Tensor]]] | None = (
            {} if upper_step and self.reuse_lower_grads else None)
        if not self._lower_phase(cache, ll_batches, buffers, diag, lower_grads, probe=probe):
            return diag
        del buffers
        if upper_step:
            ok = self._upper_phase(cache, batches, diag, lower_grads)
            diag["upper_step"] = float(ok)
            diag["nonfinite"] = float(not ok)
        return diag

    def warmup(self, batches: Mapping[str, Any]) -> dict[str, float]:
        """LL steps as in :meth:`step`, then one upper update from the standalone row alone.

        The row is ``upper_loss + Σ aux`` of the ``upper_stream`` forward and its plain gradient is applied
        through the same update as :meth:`step` (DDP reduce, ``grad_clip``, ``upper_scheduler``, non-finite
        skip); no hypergradient, no aggregator. Runs on every call, ignores ``ul_every`` and does not advance
        ``iteration``. Needs a standalone row: ``upper_loss`` set, or aux returned by ``forward``.

        Args:
            batches: stream name → batch: ``upper_stream`` and every constraint's ``ll_stream``.

        Returns:
            Diagnostics: ``loss/lower/<k>``, ``loss/upper/fusion``, ``loss/aux/<name>``, ``upper_step``
            (0.0 when skipped), ``nonfinite``, ``agg/norm``.
        """
        self._require(batches, ul=False, upper_row=True)
        diag: dict[str, float] = {"upper_step": 0.0, "nonfinite": 0.0}
        cache: dict[str, UpperOutput] = {}
        buffers = _Buffers([self.upper, *(c.module for c in self.constraints)])
        with torch.enable_grad():
            out = self._fused(cache, batches, self.upper_stream)
        if self.upper_loss is None and not out.aux:
            buffers.restore()
            raise ValueError("warmup needs an upper row: set upper_loss or let forward return aux losses")
        # A constraint on the upper stream reuses its forward (detached in the LL phase).
        with torch.no_grad():
            for c in self.constraints:
                self._fused(cache, batches, self.streams[c.name][0])
        if not self._lower_phase(cache, batches, buffers, diag):
            return diag
        del buffers
        for p in self.upper.parameters():
            p.grad = None
        batch = batches[self.upper_stream]
        with torch.enable_grad():
            loss = None
            if self.upper_loss is not None:
                loss = _loss(self.upper_loss(_as_input(out.value), batch), "upper_loss")
            total = _row_total(loss, out.aux)
        values = _stack64([total.detach(), *(v.detach() for v in out.aux.values())])
        if self.reduce is not None:
            values = self.reduce(values)
        diag[f"loss/upper/{_ROW}"] = float(values[0])
        for name, v in zip(out.aux, values[1:].tolist()):
            diag[f"loss/aux/{name}"] = v
        ok = bool(torch.isfinite(values[0]))
        if ok:
            total.backward()
            ok = self._update(diag, reduce_grads=True)
        diag["upper_step"] = float(ok)
        diag["nonfinite"] = float(not ok)
        return diag

    # ------------------------------------------------------------------------------------------ phases

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device = next(self.upper.parameters()).device.type
        # A graph capture must not keep autocast's cast weights: they would outlive it in its memory pool.
        capturing = device == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(device_type=device, dtype=self.amp_dtype, cache_enabled=not capturing)

    def _ll_streams(self) -> list[str]:
        return list(dict.fromkeys(self.streams[c.name][0] for c in self.constraints))

    def _on_gpu(self) -> bool:
        return next(self.upper.parameters()).device.type == "cuda"

    def _graph_for(self, batches: Mapping[str, Any]) -> tuple[graphs.Captured | None, graphs.Probe | None]:
        """For a lower-only iteration: its graphs, refilled with ``batches``, or a probe to run it eagerly
        under (see :class:`graphs.Sightings`). (None, None): eager."""
        if not self._lower_graphs.enabled or not self._on_gpu():
            return None, None
        ll = self._ll_streams()
        key = tuple((s, graphs.signature(batches[s])) for s in ll)
        found, probe = self._lower_graphs.lookup(key, lambda: self._capture(batches, ll))
        if found is not None:
            for s in ll:
                graphs.refill(found.static[s], batches[s])
        return found, probe

    def _capture(self, batches: Mapping[str, Any], streams: list[str]) -> graphs.Captured:
        static = {s: graphs.static_copy(batches[s]) for s in streams}
        steps, params = [], []
        cache: dict[str, UpperOutput] = {}
        for s in range(max((c.lower_steps for c in self.constraints), default=0)):
            active = [c for c in self.constraints if s < c.lower_steps]

            def step(s=s, active=active) -> Tensor:
                if s == 0:
                    with torch.no_grad():
                        for stream in static:
                            self._fused(cache, static, stream)
                return self._lower_losses(active, cache, static, s)

            steps.append(step)
            params.append([p for c in active for p in c.module.parameters()])
        try:
            return graphs.capture(static, steps, params, shared=cache)
        except Exception:
            for c in self.constraints:   # no half-written gradients left for the eager step
                c.optimizer.zero_grad(set_to_none=True)
            raise

    def _require(self, batches: Mapping[str, Any], *, ul: bool, upper_row: bool) -> None:
        """KeyError naming every missing stream and who needs it."""
        needs: dict[str, list[str]] = {}
        for c in self.constraints:
            ll_s, ul_s = self.streams[c.name]
            needs.setdefault(ll_s, []).append(f"constraint {c.name!r} (LL)")
            if ul:
                needs.setdefault(ul_s, []).append(f"constraint {c.name!r} (UL)")
        if upper_row:
            needs.setdefault(self.upper_stream, []).append(f"the upper row {_ROW!r}")
        missing = [f"{s!r} (needed by {', '.join(users)})" for s, users in needs.items() if s not in batches]
        if missing:
            raise KeyError(f"batches lack stream(s) {'; '.join(missing)}; given: {sorted(batches)}")

    def _fused(self, cache: dict[str, UpperOutput], batches: Mapping[str, Any], stream: str) -> UpperOutput:
        """The upper net's output on ``stream``: one forward per stream and iteration (again if a graph is
        due)."""
        out = cache.get(stream)
        if out is None or (torch.is_grad_enabled() and out.value.grad_fn is None):
            with self._autocast():
                out = _as_output(self.forward(self.upper, batches[stream]))
            cache[stream] = out
        return out

    def _has_upper_row(self, cache: dict[str, UpperOutput], batches: Mapping[str, Any]) -> bool:
        """Whether this upper step has the standalone row (``upper_loss`` set, or aux on the upper stream).

        Without ``upper_loss`` the upper stream is forwarded only when a forward of this iteration returned
        aux, so a net without aux costs no extra forward.
        """
        if self.upper_loss is not None:
            return True
        if not any(out.aux for out in cache.values()):
            return False
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.path == "image"):
            return bool(self._fused(cache, batches, self.upper_stream).aux)

    def _lower_losses(self, active: list[Constraint], cache, batches, s: int = 0, lower_grads=None) -> Tensor:
        """Forward and backward of inner LL step ``s`` of the ``active`` constraints; their stacked losses.
        ``lower_grads`` (a dict) receives (∇_z f, ∇_y f) of the constraints whose last step this is."""
        losses = []
        for c in active:
            c.optimizer.zero_grad(set_to_none=True)
            stream = self.streams[c.name][0]
            keep = lower_grads is not None and s == c.lower_steps - 1
            z = _as_input(cache[stream].value).detach().requires_grad_(keep)
            with self._autocast():
                loss = _loss(c.lower_loss(z, batches[stream]), f"{c.name}.lower_loss")
            loss.backward()
            if keep:
                ys = _trainable(c.module)[1]
                lower_grads[c.name] = (
                    torch.zeros_like(z) if z.grad is None else z.grad,
                    [torch.zeros_like(y) if y.grad is None else y.grad.clone() for y in ys],
                )
            losses.append(loss.detach().float())
        return torch.stack(losses)

    def _lower_phase(self, cache, batches, buffers: _Buffers, diag,
                     lower_grads: dict[str, tuple[Tensor, list[Tensor]]] | None = None,
                     captured: graphs.Captured | None = None, probe: graphs.Probe | None = None) -> bool:
        """LL steps. False when a non-finite loss stopped them (``nonfinite=1``; buffers restored if at the
        first inner step). ``lower_grads`` (a dict) receives each constraint's (∇_z f, ∇_y f) of its last
        step, before any DDP reduce (the estimator reduces ∇_y f as it does its own). ``captured``: replay
        its graphs for the forwards and backwards instead; ``probe``: run those under it."""
        for s in range(max((c.lower_steps for c in self.constraints), default=0)):
            active = [c for c in self.constraints if s < c.lower_steps]
            if captured is not None:
                stacked = captured.run(s)
            else:
                with probe or contextlib.nullcontext():
                    stacked = self._lower_losses(active, cache, batches, s, lower_grads)
            for c, v in zip(active, stacked.tolist()):
                diag[f"loss/lower/{c.name}"] = v
            if not bool(torch.isfinite(stacked).all()):
                for c in active:
                    c.optimizer.zero_grad(set_to_none=True)
                cache.clear()
                if s == 0:
                    buffers.restore()
                diag["nonfinite"] = 1.0
                return False
            for c in active:
                if self.reduce is not None:
                    grads = [p.grad for p in c.module.parameters() if p.grad is not None]
                    if grads:
                        for g, r in zip(grads, _reduce_flat(grads, self.reduce)):
                            g.copy_(r)
                c.optimizer.step()
                if c.scheduler is not None:
                    c.scheduler.step()
        return True

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

    def _upper_phase(self, cache, batches, diag, lower_grads=None) -> bool:
        for p in self.upper.parameters():
            p.grad = None
        modules = [c.module for c in self.constraints]
        # Restored only after the rows' VJP: copying into a buffer that a pending graph saved (BN running
        # stats) would trip autograd's version check.
        guard = _Buffers([self.upper, *modules])
        modes = [(m, m.training) for mod in modules for m in mod.modules()] if self.constraint_eval else []
        for m, _ in modes:
            m.eval()
        try:
            with self._autocast():
                if self.path == "param":
                    return self._apply(self._param_rows(cache, batches), diag)
                parts = self._image_cotangents(cache, batches, lower_grads)
                if not self.row_stats:
                    return self._apply_combined(cache, parts, diag)
                rows, reached = self._vjp_rows(cache, parts.u_rows, parts.aux_sum, parts.params)
            return self._apply(self._rows(parts.names, rows, parts.losses, parts.aux, parts.params, reached), diag)
        finally:
            guard.restore()
            for m, mode in modes:
                m.train(mode)

    def _apply(self, rows: _Rows, diag: dict[str, float]) -> bool:
        """Statistics and weights from the rows' Gramian, then ``.grad`` = Σ_k w_k g_k and the update."""
        gram = gramian(rows.rows).cpu()
        self._log_losses(rows.names, rows.losses, rows.aux, diag)
        if self.row_stats:
            for i, name in enumerate(rows.names):
                diag[f"hypergrad/norm/{name}"] = math.sqrt(max(float(gram[i, i]), 0.0))
            for i in range(len(rows.names)):
                for j in range(i + 1, len(rows.names)):
                    den = math.sqrt(max(float(gram[i, i]) * float(gram[j, j]), 0.0))
                    cos = float(gram[i, j]) / den if den > 0 else 0.0
                    diag[f"hypergrad/cos/{rows.names[i]}-{rows.names[j]}"] = cos
        if not (bool(torch.isfinite(rows.losses).all()) and bool(torch.isfinite(gram).all())):
            return False
        weights = self._weights(rows.names, gram, rows.losses, diag)
        for p, g, reached in zip(rows.params, combine(rows.rows, weights), rows.reached):
            p.grad = g.to(p.dtype) if reached else None
        return self._update(diag, reduce_grads=False)  # the rows were reduced already

    def _apply_combined(self, cache: dict[str, UpperOutput], parts: _Cotangents, diag: dict[str, float]) -> bool:
        """Rules that ignore the rows: weights from the losses, then ``.grad`` = Jᵀ Σ_k w_k u_k in one VJP
        (Σ aux enters with the standalone row's weight) — the same update as :meth:`_apply`'s Σ_k w_k g_k."""
        loss_t = _stack64(parts.losses + list(parts.aux.values()))
        if self.reduce is not None:
            loss_t = self.reduce(loss_t)
        k = len(parts.names)
        losses = loss_t[:k]
        self._log_losses(parts.names, losses, dict(zip(parts.aux, loss_t[k:].tolist())), diag)
        if not bool(torch.isfinite(losses).all()):
            return False
        unread = torch.full((k, k), math.nan, dtype=torch.float64)   # these rules read only its size
        weights = self._weights(parts.names, unread, losses, diag).tolist()
        combined: dict[str, Tensor] = {}
        for w, row in zip(weights, parts.u_rows):
            for b, u in row.items():
                term = w * u.to(torch.float64)
                combined[b] = combined[b] + term if b in combined else term
        aux = None if parts.aux_sum is None else parts.aux_sum * weights[-1]
        rows, reached = self._reduce_rows(*self._vjp_rows(cache, [combined], aux, parts.params))
        for p, g, r in zip(parts.params, rows[0], reached):
            p.grad = g.to(p.dtype) if r else None
        return self._update(diag, reduce_grads=False)

    @staticmethod
    def _log_losses(names: list[str], losses: Tensor, aux: Mapping[str, float], diag: dict[str, float]) -> None:
        for i, name in enumerate(names):
            diag[f"loss/upper/{name}"] = float(losses[i])
        for name, v in aux.items():
            diag[f"loss/aux/{name}"] = v

    def _weights(self, names: list[str], gram: Tensor, losses: Tensor, diag: dict[str, float]) -> Tensor:
        weights = self.aggregator.weights(gram, losses, self.state)
        for i, name in enumerate(names):
            diag[f"agg/weight/{name}"] = float(weights[i])
        return weights

    def _update(self, diag: dict[str, float], *, reduce_grads: bool) -> bool:
        """The upper optimiser step of :meth:`step` and :meth:`warmup` from the ``.grad`` already written:
        DDP reduce (unless the rows were reduced already), norm, non-finite skip, clipping, scheduler."""
        params = [p for p in self.upper.parameters() if p.grad is not None]
        if not params:
            return False
        if self.reduce is not None and reduce_grads:
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

    def _rows(self, names: list[str], rows: list[tuple[Tensor, ...]], losses: list[Tensor],
              aux: dict[str, Tensor], params: list[Tensor], reached: list[bool]) -> _Rows:
        """Both paths end here: the stacked rows (:meth:`_reduce_rows`) and the losses are DDP-reduced (global
        rows, so the Gramian rules see the global batch), then packed."""
        loss_t = _stack64(losses + list(aux.values()))
        rows, reached = self._reduce_rows(rows, reached)
        if self.reduce is not None:
            loss_t = self.reduce(loss_t)
        k = len(rows)
        return _Rows(names, loss_t[:k], rows, params, reached, dict(zip(aux, loss_t[k:].tolist())))

    def _reduce_rows(self, rows: list[tuple[Tensor, ...]], reached: list[bool]
                     ) -> tuple[list[tuple[Tensor, ...]], list[bool]]:
        """DDP: the stacked rows reduced in one collective; a parameter counts as reached if a row of any rank
        reaches it, so every rank updates the same parameters. Unchanged without ``reduce``."""
        if self.reduce is None:
            return rows, reached
        flat = self.reduce(torch.stack([torch.cat([t.reshape(-1) for t in row]) for row in rows]))
        hit = self.reduce(torch.tensor(reached, dtype=flat.dtype, device=flat.device))
        return [_split(flat[i], row) for i, row in enumerate(rows)], (hit > 0).tolist()

    def _image_cotangents(self, cache, batches, lower_grads=None) -> _Cotangents:
        """Per row, the image-space gradients u_{k,s} on the streams it lives on (estimators on the images).

        With ``lower_grads`` the lower objective is the linear function whose gradients are the LL step's
        (∇_z f, ∇_y f): the estimator sees exactly those first derivatives, and no constraint pass runs."""
        u_rows: list[dict[str, Tensor]] = []
        losses: list[Tensor] = []
        for c in self.constraints:
            ll_s, ul_s = self.streams[c.name]
            self._fused(cache, batches, ul_s)
            keys = [ul_s]
            if USES_LOWER_X[self.method] and ll_s not in keys:
                keys.append(ll_s)
            inputs = {"images": {k: _as_input(cache[k].value) for k in keys},
                      "batches": {s: batches[s] for s in (ul_s, ll_s)}}
            if lower_grads is not None:
                gz, gys = lower_grads[c.name]
                inputs["lower_grads"] = {"z": gz, "y": dict(enumerate(gys))}
            u, loss = self._estimate(c, inputs)
            u_rows.append(dict(zip(keys, u)))
            losses.append(loss)
        names = [c.name for c in self.constraints]
        aux: dict[str, Tensor] = {}
        aux_sum: Tensor | None = None  # Σ aux with its graph: enters the standalone row's VJP
        if self._has_upper_row(cache, batches):
            out = self._fused(cache, batches, self.upper_stream)
            row: dict[str, Tensor] = {}
            loss = None
            if self.upper_loss is not None:
                z = _as_input(out.value).detach().requires_grad_(True)
                value = _loss(self.upper_loss(z, batches[self.upper_stream]), "upper_loss")
                (u,) = torch.autograd.grad(value, z, allow_unused=True)
                row[self.upper_stream] = torch.zeros_like(z) if u is None else u
                loss = value.detach()
            aux = {k: v.detach() for k, v in out.aux.items()}
            aux_sum = _row_total(None, out.aux)
            u_rows.append(row)
            losses.append(_row_total(loss, aux))
            names.append(_ROW)

        return _Cotangents(names, u_rows, losses, aux, aux_sum, _trainable(self.upper)[1])

    def _estimate(self, c: Constraint, inputs: dict[str, Any]) -> tuple[tuple[Tensor, ...], Tensor]:
        """Constraint ``c``'s estimator on the images: u per image of ``inputs["images"]`` (in that order) and
        its upper loss. On a GPU with ``cuda_graphs``, replayed from a graph per signature once captured."""
        options = self._options(c)
        ll_s, ul_s = self.streams[c.name]
        params = _trainable(c.module)[1]

        def run(inputs: dict[str, Any]) -> tuple[tuple[Tensor, ...], Tensor]:
            record: dict[str, Tensor] = {}
            ulb, llb = inputs["batches"][ul_s], inputs["batches"][ll_s]
            images = list(inputs["images"].values())
            il = list(inputs["images"]).index(ll_s) if ll_s in inputs["images"] else 0

            def upper(xs, ys):
                record["loss"] = value = self._call(c, 1, ys, xs[0], ulb)
                return value

            if "lower_grads" not in inputs:
                def lower(xs, ys):
                    return self._call(c, 0, ys, xs[il], llb)
            else:
                gz, gys = inputs["lower_grads"]["z"], list(inputs["lower_grads"]["y"].values())

                def lower(xs, ys):
                    return sum(((y * g).sum() for y, g in zip(ys, gys)), (xs[il] * gz).sum())

            with self._autocast():   # again inside a capture: without autocast's cache there
                u = hypergrad(self.method, upper, lower, images, params, **options)
            return tuple(u), record["loss"].detach()

        if not self._estimator_graphs.enabled or not self._on_gpu():
            return run(inputs)
        key = (c.name, c.module.training, graphs.signature(inputs), tuple(sorted(options.items())))
        try:
            hash(key)
        except TypeError:   # an option no signature can hold (e.g. a list): this estimator stays eager
            return run(inputs)

        def capture() -> graphs.CapturedCall:
            static = graphs.static_copy(inputs)
            for z in static["images"].values():
                z.requires_grad_(True)
            return graphs.capture_call(run, static)

        found, probe = self._estimator_graphs.lookup(key, capture)
        if found is not None:
            return found(inputs)
        if probe is not None:
            with probe:
                return run(dict(inputs, batches=probe.wrap(inputs["batches"], list(inputs["batches"]))))
        return run(inputs)

    def _vjp_rows(
        self, cache: dict[str, UpperOutput], u_rows: list[dict[str, Tensor]], aux_sum: Tensor | None,
        x: list[Tensor],
    ) -> tuple[list[tuple[Tensor, ...]], list[bool]]:
        """The exact parameter-space rows g_k = Σ_b J_bᵀ u_{k,b}; the last row also gets ∇ₓ Σ aux when
        ``aux_sum`` is given (the standalone row).

        One vector–Jacobian product per row over the retained graphs, each only through the streams the row
        lives on. Against one vmap-batched product (``is_grads_batched=True``) on BDL's net this was faster on
        an H200 (6–23 % for K = 3, 0.9 GiB less) and is as fast on the CPU (K = 2, within 1–4 %), needs no
        batching rule for any operator, and holds one row's intermediate gradients at a time. Returns the rows
        and, per parameter, whether any row reaches it.
        """
        rows: list[tuple[Tensor, ...]] = []
        reached = [False] * len(x)
        for i, row in enumerate(u_rows):
            outputs, cotangents = [], []
            for b, u in row.items():
                z = cache[b].value
                if z.requires_grad:
                    outputs.append(z)
                    cotangents.append(u.to(z.dtype))
            if i == len(u_rows) - 1 and aux_sum is not None and aux_sum.requires_grad:
                outputs.append(aux_sum)
                cotangents.append(torch.ones_like(aux_sum))
            grads: Sequence[Tensor | None] = [None] * len(x)
            if outputs and x:
                last = i == len(u_rows) - 1
                grads = torch.autograd.grad(outputs, x, cotangents, retain_graph=not last, allow_unused=True)
            reached = [r or g is not None for r, g in zip(reached, grads)]
            rows.append(tuple(torch.zeros_like(p) if g is None else g for p, g in zip(x, grads)))
        return rows, reached

    def _param_rows(self, cache, batches) -> _Rows:
        names, x = _trainable(self.upper)

        def fused(xs, batch) -> UpperOutput:
            params = {f"module.{n}": v for n, v in zip(names, xs)}
            return _as_output(torch.func.functional_call(self._upper_call, params, (batch,)))

        rows: list[tuple[Tensor, ...]] = []
        losses: list[Tensor] = []
        for c in self.constraints:
            ll_s, ul_s = self.streams[c.name]
            ulb, llb = batches[ul_s], batches[ll_s]
            record: dict[str, Tensor] = {}

            def upper(xs, ys, c=c, ulb=ulb, record=record):
                record["loss"] = value = self._call(c, 1, ys, _as_input(fused(xs, ulb).value), ulb)
                return value

            def lower(xs, ys, c=c, llb=llb):
                return self._call(c, 0, ys, _as_input(fused(xs, llb).value), llb)

            rows.append(hypergrad(self.method, upper, lower, x, _trainable(c.module)[1], **self._options(c)))
            losses.append(record["loss"].detach())
        row_names = [c.name for c in self.constraints]
        aux: dict[str, Tensor] = {}
        if self._has_upper_row(cache, batches):
            batch = batches[self.upper_stream]
            record = {}

            def fusion(xs, ys, record=record):
                out = fused(xs, batch)
                loss = None
                if self.upper_loss is not None:
                    loss = _loss(self.upper_loss(_as_input(out.value), batch), "upper_loss")
                record["aux"] = {k: v.detach() for k, v in out.aux.items()}
                record["loss"] = value = _row_total(loss, out.aux)
                return value

            rows.append(hypergrad("none", fusion, None, x, ()))
            losses.append(record["loss"].detach())
            aux = record["aux"]
            row_names.append(_ROW)
        return self._rows(row_names, rows, losses, aux, x, [True] * len(x))
