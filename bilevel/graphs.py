"""CUDA graphs for :class:`bilevel.BilevelStep` (``cuda_graphs=True``): lower-only iterations and hypergradients.

Under the BDL schedule nine iterations in ten are lower-only: one forward of the upper net and a forward and
backward of every constraint, about a thousand small kernels at 256 px. On a GPU their launches, not the
kernels, set the pace (profiled on an H200: 20 ms of kernels in 37 ms of wall time). A captured graph
replays the whole forward and backward with one launch. The arithmetic is the same kernels on the same
memory, so the updates do not change; the optimiser steps, the non-finite check and the DDP reduce stay
eager (they need the host). The same holds for each constraint's image-space estimator in an upper step
(``gn``: two constraint passes and a few dot products; ``unrolled``: K differentiated inner steps): a
function of the fused images, the batches and the constraint's parameters, captured by :func:`capture_call`.

A graph is captured for each *signature* (stream names, keys, tensor shapes and dtypes, and the batch's
plain scalar values such as a task name; for an estimator also its options) the third time it is seen
(:class:`Sightings`), and replayed after copying the inputs into its static buffers. The first sight runs
eagerly (the warm-up that graphs need: lazy initialisations, cached constants), the second under a
:class:`Probe`, which notes what no graph can hold: reading a tensor's value on the host (a
mixture-of-experts gate choosing its experts), copying from pageable host memory, batch entries that are
neither tensors nor plain scalars (file names, per-image box lists; the forwards may carry them as long as
they do not read them). Anything noted, or a capture that fails all the same, warns once and that kind of
work stays eager; a capture is not tried when the probe saw a reason, because a failed one can leave the
CUDA random number generator in capture mode. What a replay cannot see: a parameter or buffer replaced by
a new tensor (``module.to``; ``load_state_dict`` and the optimisers update in place).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

_SCALARS = (str, int, float, bool, type(None))
# Operators that hand a tensor's value (or a shape that depends on it) to the host.
HOST_READS = frozenset({"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_dim", "unique_consecutive",
                        "masked_select", "repeat_interleave"})
# Graphs per step: each keeps its activations' memory, so a stream of ever new shapes stays eager.
MAX_GRAPHS = 4


def signature(batch: Any) -> Any:
    """What a captured graph depends on: structure, tensor shapes, dtypes and devices, plain scalars."""
    if isinstance(batch, Tensor):
        return ("tensor", tuple(batch.shape), batch.dtype, batch.device, batch.stride())
    if isinstance(batch, Mapping):
        return ("map", tuple((k, signature(v)) for k, v in batch.items()))
    return ("value", batch) if isinstance(batch, _SCALARS) else ("other",)


def static_copy(batch: Any) -> Any:
    """The graph's input buffers: a copy of every tensor (same layout), everything else as it is."""
    if isinstance(batch, Tensor):
        return batch.detach().clone(memory_format=torch.preserve_format)
    if isinstance(batch, Mapping):
        return {k: static_copy(v) for k, v in batch.items()}
    return batch


def refill(static: Any, batch: Any) -> None:
    """Copy a batch of the same signature into the static buffers (one multi-tensor copy per device pair:
    an estimator's inputs can hold a gradient per constraint parameter)."""
    pairs: dict[tuple[torch.device, torch.device], tuple[list[Tensor], list[Tensor]]] = {}

    def collect(s: Any, b: Any) -> None:
        if isinstance(s, Tensor):
            dst, src = pairs.setdefault((s.device, b.device), ([], []))
            dst.append(s)
            src.append(b.detach())
        elif isinstance(s, Mapping):
            for k, v in s.items():
                collect(v, b[k])

    collect(static, batch)
    with torch.no_grad():
        for dst, src in pairs.values():
            torch._foreach_copy_(dst, src)


class Sightings:
    """One kind of captured work (``what``, for the warning) by signature, with the rule of when to capture.

    :meth:`sight` says what to do with the work of a signature this time: ``"replay"`` (its captured graphs),
    ``"plain"`` (eagerly: a first sight, too many signatures, graphs off), ``"probe"`` (eagerly, under the
    returned :class:`Probe`) or ``"capture"``; :meth:`lookup` acts on it.
    """

    def __init__(self, what: str, enabled: bool = True):
        self.what, self.enabled = what, enabled
        self.captured: dict[Any, Any] = {}
        self._probes: dict[Any, Probe | None] = {}   # signature → its probe (None: seen once)

    def sight(self, key: Any) -> tuple[str, Any]:
        if not self.enabled:
            return "plain", None
        if key in self.captured:
            return "replay", self.captured[key]
        if key not in self._probes:
            if len(self._probes) < MAX_GRAPHS:
                self._probes[key] = None
            return "plain", None
        probe = self._probes[key]
        if probe is None:
            self._probes[key] = probe = Probe()
            return "probe", probe
        if probe.reasons:
            self.off(f"it cannot be captured: {'; '.join(sorted(probe.reasons))}")
            return "plain", None
        return "capture", None

    def lookup(self, key: Any, build: Callable[[], Any]) -> tuple[Any, Probe | None]:
        """(graphs to replay, None), (None, a probe to run the work eagerly under) or (None, None): eagerly.
        When due, ``build()`` captures the graphs; should it raise, a warning and eager from then on."""
        mode, found = self.sight(key)
        if mode == "capture":
            try:
                found = self.captured[key] = build()
            except Exception as err:  # noqa: BLE001 — any failure of the capture means: stay eager
                self.off(f"its capture failed ({type(err).__name__}: {err}); should CUDA random numbers fail "
                         "from now on, run without cuda_graphs")
                return None, None
            return found, None
        return (found, None) if mode == "replay" else (None, found)

    def off(self, why: str) -> None:
        """Eager from now on, with one warning."""
        self.enabled = False
        self.captured.clear()
        warnings.warn(f"cuda_graphs: {self.what} stays eager, {why}", RuntimeWarning, stacklevel=4)


class Probe(TorchDispatchMode):
    """Runs eager work once and notes in :attr:`reasons` what a graph of it could not hold."""

    def __init__(self):
        super().__init__()
        self.reasons: set[str] = set()
        self._unusable: set[str] = set()

    def wrap(self, batches: Mapping[str, Any], streams: list[str]) -> dict[str, Any]:
        """``batches`` with the streams' batches recording the entries read (see :class:`Recording`)."""
        return {s: Recording(b, self._unusable, f"{s}:") if s in streams else b for s, b in batches.items()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        kwargs = kwargs or {}
        if name in HOST_READS:
            self.reasons.add(f"a value read on the host (aten.{name})")
        elif name == "lift_fresh" and args[0].dim() > 0:
            self.reasons.add("a tensor made from Python data (a copy from the host)")
        elif name in ("_to_copy", "copy_"):
            src, dst = (args[1], args[0].device) if name == "copy_" else (args[0], kwargs.get("device"))
            if torch.device(dst or src.device).type == "cuda" and src.device.type == "cpu" and not src.is_pinned():
                self.reasons.add(f"a copy from pageable host memory (aten.{name})")
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        self.reasons.update(f"batch entry {k!r} read (not a tensor or plain scalar)" for k in self._unusable)
        return super().__exit__(*exc)


class Recording(Mapping):
    """A batch that notes the entries read (nested batches too) that no graph can hold."""

    def __init__(self, batch: Mapping, unusable: set[str], path: str = ""):
        self._batch, self._unusable, self._path = batch, unusable, path

    def __getitem__(self, key):
        value = self._batch[key]
        if isinstance(value, Mapping):
            return Recording(value, self._unusable, f"{self._path}{key}.")
        if not isinstance(value, (Tensor, *_SCALARS)):
            self._unusable.add(f"{self._path}{key}")
        return value

    def __iter__(self) -> Iterator:
        return iter(self._batch)

    def __len__(self) -> int:
        return len(self._batch)


@dataclass
class Captured:
    """One graph per inner LL step, sharing a memory pool (they are always replayed in capture order)."""

    static: dict[str, Any]                     # stream → static batch
    graphs: list[torch.cuda.CUDAGraph]
    losses: list[Tensor]                       # per inner step: the active constraints' stacked losses
    grads: list[list[tuple[Tensor, Tensor]]]   # per inner step: (parameter, its static gradient)
    shared: Any = None                         # outputs one graph leaves for the next (the fused images)

    def run(self, s: int) -> Tensor:
        """Replay inner step ``s``; its gradients are in the parameters' ``.grad`` afterwards."""
        self.graphs[s].replay()
        for p, g in self.grads[s]:
            p.grad = g
        return self.losses[s]


def capture(static: dict[str, Any], steps: list[Callable[[], Tensor]], params: list[list[Tensor]],
            shared: Any = None) -> Captured:
    """Capture ``steps[s]()`` (forwards and backwards that return the stacked losses) one graph each.

    ``params[s]``: the parameters whose ``.grad`` step ``s`` writes; they are set to None first, so each
    graph allocates its own static gradients instead of accumulating into whatever was there. ``shared``
    holds what later steps read of earlier ones; it is kept alive with the graphs.
    """
    pool = torch.cuda.graph_pool_handle()
    graphs, losses, grads = [], [], []
    for step, ps in zip(steps, params):
        for p in ps:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data loader's thread may pin memory meanwhile (the default mode forbids it globally).
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            losses.append(step())
        graphs.append(graph)
        grads.append([(p, p.grad) for p in ps if p.grad is not None])
    return Captured(static, graphs, losses, grads, shared)


@dataclass
class CapturedCall:
    """``fn(static)`` captured once; calling it copies new inputs into ``static`` and replays the graph. Its
    outputs are the same tensors every time, overwritten by the next call."""

    static: Any
    graph: torch.cuda.CUDAGraph
    out: Any

    def __call__(self, inputs: Any) -> Any:
        refill(self.static, inputs)
        self.graph.replay()
        return self.out


def capture_call(fn: Callable[[Any], Any], static: Any) -> CapturedCall:
    """Capture ``fn(static)`` (forwards and backwards whose inputs are the tensors of ``static``) in a graph of
    its own memory pool; nothing runs until the first call."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn(static)
    return CapturedCall(static, graph, out)
