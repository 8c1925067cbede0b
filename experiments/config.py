"""Typed run configuration: frozen dataclasses, one per concern, with strict dotted overrides.

A run is described by one :class:`RunConfig`. It is built in a fixed order, each layer overriding the last:
a named preset (``experiments/presets.py``) → an optional YAML file (``--config``) → ``--smoke`` → the
command-line flags → repeated ``--set section.key=value`` overrides. The resolved config is printed at the
start of a run and saved as ``config.yaml`` in the run directory and in every checkpoint.

Overrides are strict (nanoGPT-style, but without ``exec``): the value is parsed with ``ast.literal_eval``
and coerced by the dataclass field type; an unknown key or a value of the wrong type raises
:class:`ConfigError` listing the valid keys. Strings may be given unquoted (``--set bilevel.hypergrad=cg``).
Fields typed ``dict`` (e.g. ``net.kwargs``) accept a whole dict or a single sub-key
(``--set net.kwargs.channels=32``); those keys are checked by the factory that receives them.

Each hypergradient estimator and aggregator has its own nested dataclass (``bilevel.cg.iters``,
``bilevel.dwa.T``), so no section carries the fields of every method.
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from bilevel.aggregate import aggregator_parameters, list_aggregators
from bilevel.estimators import hypergrad_parameters, list_hypergrads
from bilevel.step import REUSES_LOWER_GRADS, can_reuse_lower_grads

__all__ = [
    "TASK_CHOICES",
    "TASK_CONSTRAINTS",
    "BilevelConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "LossConfig",
    "NetConfig",
    "OptimConfig",
    "RunConfig",
    "TaskConfig",
    "TasksConfig",
    "TrainConfig",
    "apply_dict",
    "apply_overrides",
    "from_dict",
    "load_yaml",
    "to_dict",
    "to_yaml",
    "valid_keys",
]

# --task → the lower-level constraints it trains (method.md §1: D = critic, S = segmentation/detection).
TASK_CONSTRAINTS: dict[str, tuple[str, ...]] = {
    "seg": ("critic", "seg"),
    "det": ("critic", "det"),
    "critic": ("critic",),
    "fusion": (),
    "all": ("critic", "seg", "det"),
}
TASK_CHOICES = tuple(TASK_CONSTRAINTS)


class ConfigError(ValueError):
    """A user error in the configuration (unknown key, wrong type, invalid choice)."""


def _check_choice(what: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{what}={value!r} is not valid; choose from {', '.join(map(repr, choices))}")


def _at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}")


# --------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """The run's dataset: training pairs, the held-out upper-level split and the test split.

    ``root`` comes from ``--data-root`` or the ``FUSION_DATA_ROOT`` environment variable, never from a
    default path. The synthetic scenes need no root.
    """

    name: str = "synthetic"
    root: str | None = None
    crop: int = 96                    # training crop side in px (synthetic: the scene size)
    train_split: str = "train"        # lower-level (and warm-up) batches
    ul_split: str = "val"             # upper-level batches: held out from train (method.md §5.8)
    test_split: str = "test"          # evaluation
    length: int | None = None         # synthetic: number of training scenes (None = dataset default)
    ul_length: int | None = None      # synthetic: number of upper-level scenes
    test_length: int | None = None    # synthetic: number of test scenes
    scene: int | None = None          # synthetic scene side (None = crop); training takes random crops of it
    test_size: int | None = None      # synthetic test scene side (None = scene); real data: full images
    holdout: int = 0                  # datasets without splits: every N-th pair → test, N-th+N//2 → ul (0 = off)
    kwargs: dict = field(default_factory=dict)   # extra keyword arguments of create_dataset
    num_workers: int | None = None    # loader processes; None = none for data held in memory, else cores - 1 (≤ 8)
    cache_gb: float = 8.0             # memory budget for decoding training streams once (0 = read from disk)
    fill_workers: int | None = None   # processes loading in-memory streams ahead; None = cores - 1 (≤ 8) on GPU, else 0

    def __post_init__(self) -> None:
        if self.crop < 8:
            raise ConfigError(f"data.crop={self.crop} is too small; use at least 8 px")
        if self.num_workers is not None:
            _at_least("data.num_workers", self.num_workers, 0)
        if self.fill_workers is not None:
            _at_least("data.fill_workers", self.fill_workers, 0)
        if self.cache_gb < 0:
            raise ConfigError(f"data.cache_gb={self.cache_gb} must be >= 0 (0 reads training data from disk)")


@dataclass(frozen=True)
class NetConfig:
    """The fusion net (upper-level variable x): a registry name and its constructor kwargs."""

    name: str = "bdl"
    kwargs: dict = field(default_factory=dict)
    init: str | None = None           # optional warm-start checkpoint (strict load of its "model")


@dataclass(frozen=True)
class LossConfig:
    """The fusion loss: a ``fusion.losses.create_fusion_loss`` preset name and its kwargs.

    A ``tc_moa_*`` preset follows the data's fusion task (``tc_moa_vif``/``_mef``/``_mff``); ``kwargs`` belong to
    the preset named here, the other tasks' presets keep their defaults. ``task_weights`` weighs each task's
    loss in a multi-task run (``data.name="vifb+mef+mff"``; a task not listed weighs 1, the paper's sum).
    """

    name: str = "bdl"
    kwargs: dict = field(default_factory=dict)
    task_weights: dict = field(default_factory=dict)   # fusion task ("vif", "mef", "mff") → weight ≥ 0

    def __post_init__(self) -> None:
        for task, weight in self.task_weights.items():
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"loss.task_weights.{task}={weight!r} must be a number >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """An optimiser and its learning-rate schedule (one per level / constraint)."""

    name: str = "adam"                # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9             # sgd only
    betas: tuple[float, float] = (0.9, 0.999)   # adam/adamw only
    schedule: str = "constant"        # constant | cosine | step
    warmup_steps: int = 0             # linear warm-up from 0 (BDL: 1000 LL steps)
    milestones: tuple[int, ...] = ()  # step schedule
    gamma: float = 0.1                # step schedule factor

    def __post_init__(self) -> None:
        _check_choice("optim.name", self.name, ("adam", "adamw", "sgd"))
        _check_choice("optim.schedule", self.schedule, ("constant", "cosine", "step"))
        if self.lr < 0:
            raise ConfigError(f"optim.lr={self.lr} must be >= 0")


@dataclass(frozen=True)
class TaskConfig:
    """One lower-level constraint (a task of ``tasks.create_task``) and its own data and optimiser.

    ``data`` overrides the run's dataset for this constraint only (e.g. the critic on real RoadScene pairs
    and the segmenter on labelled synthetic scenes: ``--set tasks.seg.data=synthetic``).
    """

    name: str | None = None           # registry name (None = the constraint's name; e.g. "seg_tiny")
    kwargs: dict = field(default_factory=dict)
    data: str | None = None
    data_root: str | None = None
    data_kwargs: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lower_steps: int = 1
    batch: int | None = None          # lower-level batch (None = train.batch)
    ul_batch: int | None = None       # upper-level batch (None = train.ul_batch)


@dataclass(frozen=True)
class TasksConfig:
    """Per-constraint settings; which of them run is chosen by ``RunConfig.task``."""

    critic: TaskConfig = field(default_factory=TaskConfig)
    seg: TaskConfig = field(default_factory=TaskConfig)
    det: TaskConfig = field(default_factory=TaskConfig)


# ----------------------------------------------------------------------- estimator and aggregator options
# Defined once, by the functions themselves: one section per registered estimator / aggregator with options,
# generated from its signature (names, types, defaults), so ``--set bilevel.cg.tol=1e-9`` reaches
# ``bilevel.estimators`` exactly as declared there. Options without a default are left unset (None) here and
# filled at run time: the learning-rate-like ξ, lr, α, η by the step (the constraint's current LL learning
# rate), ``fixed.weights`` (empty) by the runner (all ones); any ``seed`` is the run seed when unset. Callables
# (``reduce``, ``bdl_code.correction``) can only be passed from Python.
FILLED_BY_STEP = ("xi", "lr", "alpha", "eta")


def _config_type(tp: Any) -> Any | None:
    """The config field type of an option annotation; None for options a config file cannot hold."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [_config_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return None if None in inner or len(inner) != 1 else inner[0] | None
    if origin in (collections.abc.Sequence, list, tuple):
        (arg, *_) = typing.get_args(tp) or (float,)
        return tuple[arg, ...]
    return tp if tp in (bool, int, float, str) else None


def _options_section(kind: str, name: str, params: list[inspect.Parameter]) -> type | None:
    """A frozen dataclass of the settable options of estimator/aggregator ``name`` (None if it has none)."""
    fields = []
    for p in params:
        tp = _config_type(p.annotation)
        if tp is None:
            continue
        unset = p.default is inspect.Parameter.empty or p.name == "seed"
        if unset and typing.get_origin(tp) is tuple:      # an unset sequence is empty, not None
            fields.append((p.name, tp, field(default=())))
        else:
            fields.append((p.name, tp | None if unset else tp, field(default=None if unset else p.default)))
    if not fields:
        return None
    cls = dataclasses.make_dataclass(f"{name.title().replace('_', '')}Options", fields, frozen=True,
                                     namespace={"__module__": __name__})
    cls.__doc__ = f"Options of the {kind} {name!r} (generated from its signature)."
    return cls


ESTIMATOR_SECTIONS = {m: c for m in list_hypergrads()
                      if (c := _options_section("estimator", m, hypergrad_parameters(m))) is not None}
AGGREGATOR_SECTIONS = {m: c for m in list_aggregators()
                       if (c := _options_section("aggregator", m, aggregator_parameters(m))) is not None}


class _BilevelBase:
    """Methods of :class:`BilevelConfig` (its fields are generated from the registries)."""

    def __post_init__(self) -> None:
        _check_choice("bilevel.path", self.path, ("image", "param"))
        if self.ul_every < 1:
            raise ConfigError(f"bilevel.ul_every={self.ul_every} must be >= 1")
        if self.reuse_lower_grads and not can_reuse_lower_grads(self.hypergrad, self.path):
            raise ConfigError(f"bilevel.reuse_lower_grads=true needs bilevel.hypergrad in {list(REUSES_LOWER_GRADS)} "
                              f"and bilevel.path=image; got {self.hypergrad!r} on the {self.path} path")

    def _options(self, name: str) -> dict[str, Any]:
        section = getattr(self, name, None)
        if section is None or not dataclasses.is_dataclass(section):
            return {}
        return {k: v for k, v in dataclasses.asdict(section).items() if v is not None}

    def estimator_options(self) -> dict[str, Any]:
        """The options of the chosen estimator, unset entries dropped (the step fills LL-lr defaults)."""
        return self._options(self.hypergrad)

    def aggregator_options(self) -> dict[str, Any]:
        """The options of the chosen aggregator, unset entries dropped (empty for parameter-free rules)."""
        return self._options(self.aggregate)

    def filled_by_step(self) -> tuple[str, ...]:
        """Options the step fills when unset (the constraint's learning rate)."""
        return FILLED_BY_STEP

    def option_names(self, name: str) -> tuple[str, ...]:
        """Configurable option names of estimator or aggregator ``name``."""
        section = ESTIMATOR_SECTIONS.get(name) or AGGREGATOR_SECTIONS.get(name)
        return tuple(f.name for f in dataclasses.fields(section)) if section else ()


BilevelConfig = dataclasses.make_dataclass(
    "BilevelConfig",
    [("hypergrad", str, field(default="gn")),          # none | gn | fd | unrolled | cg | neumann | bdl_code
     ("aggregate", str, field(default="gradnorm_softmax")),
     ("ul_every", int, field(default=1)),               # an upper step every N iterations (BDL: 10)
     ("path", str, field(default="image")),             # image | param
     ("grad_clip", float | None, field(default=None)),
     ("fusion_row", bool, field(default=True)),         # the fusion loss as a standalone upper row
     ("row_stats", bool | None, field(default=None)),   # per-row norms/cosines; None: when the rule reads them
     ("reuse_lower_grads", bool, field(default=False)),  # gn/bdl_code: ∇f from the LL step (pre-step y)
     *[(name, cls, field(default_factory=cls)) for name, cls in {**ESTIMATOR_SECTIONS,
                                                                   **AGGREGATOR_SECTIONS}.items()]],
    bases=(_BilevelBase,), frozen=True, namespace={"__module__": __name__})
BilevelConfig.__doc__ = ("The bi-level step: estimator, aggregator, schedule, and one options section per "
                         "estimator/aggregator (``bilevel.cg.iters``), generated from ``bilevel``'s signatures.")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, batches, upper optimiser, precision, fault handling, seeding."""

    iters: int = 600                  # total iterations (warm-up included)
    epochs: float | None = None       # if set, iters = ceil(epochs * len(train) / batch)
    warmup_iters: int = 150           # fusion-loss-only upper steps (lower levels still train)
    batch: int = 8                    # lower-level / warm-up batch
    ul_batch: int = 8                 # upper-level batch
    upper_optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3))
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    amp: str | None = None            # None | bf16
    seed: int = 0
    deterministic: bool = False
    channels_last: bool = False       # NHWC nets: cuDNN's bf16 convolutions then need no layout transposes
    cudnn_benchmark: bool = False     # cuDNN times its algorithms per input shape (fixed crops; not deterministic)
    cuda_graphs: bool = False         # lower-only iterations, estimators replayed as CUDA graphs (GPU)
    max_nonfinite: int = 10           # stop after this many skipped non-finite steps
    ckpt_every: int = 0               # also write checkpoints/last.pt every N iterations (0 = end only)
    threads: int | None = None        # torch.set_num_threads (None = leave as is)

    def __post_init__(self) -> None:
        _check_choice("train.amp", self.amp, (None, "bf16"))
        if self.iters < 0 or self.warmup_iters < 0:
            raise ConfigError("train.iters and train.warmup_iters must be >= 0")
        if self.batch < 1 or self.ul_batch < 1:
            raise ConfigError("train.batch and train.ul_batch must be >= 1")
        _at_least("train.seed", self.seed, 0)
        if self.cudnn_benchmark and self.deterministic:
            raise ConfigError("train.cudnn_benchmark picks kernels by timing them: it cannot be combined with "
                              "train.deterministic")
        _at_least("train.max_nonfinite", self.max_nonfinite, 0)
        _at_least("train.ckpt_every", self.ckpt_every, 0)
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"train.epochs={self.epochs} must be > 0 (or unset, to use train.iters)")
        if self.threads is not None:
            _at_least("train.threads", self.threads, 1)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on the held-out test split: fusion metrics (with their profile) and the task metrics."""

    enabled: bool = True
    metrics: tuple[str, ...] = ("EN", "SD", "SF", "AG", "MI", "VIF", "Qabf", "SSIM")
    profile: str = "reference"
    batch: int = 4
    max_images: int | None = None
    val_every: int = 0                # held-out fusion loss every N iterations → best.pt (0 = off)
    val_batches: int = 2

    def __post_init__(self) -> None:
        _at_least("eval.batch", self.batch, 1)
        if self.max_images is not None:
            _at_least("eval.max_images", self.max_images, 1)
        _at_least("eval.val_every", self.val_every, 0)
        _at_least("eval.val_batches", self.val_batches, 1)
        if not self.metrics:
            raise ConfigError("eval.metrics is empty; name at least one metric (or set eval.enabled=False)")


@dataclass(frozen=True)
class LogConfig:
    """Where results go and how they are reported."""

    out: str = "outputs"
    wandb: str | None = None          # online | offline | disabled; None = WANDB_MODE, else offline w/o key
    project: str = "bilevel-fusion"
    log_every: int = 10               # scalars to metrics.csv / wandb
    image_every: int = 200            # image panels IR | visible | fused | task output (0 = never)
    progress: bool = True

    def __post_init__(self) -> None:
        _check_choice("log.wandb", self.wandb, (None, "online", "offline", "disabled"))
        _at_least("log.log_every", self.log_every, 1)
        _at_least("log.image_every", self.image_every, 0)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; ``name`` names the output folder (``outputs/<name>/...``)."""

    name: str = "seg"
    task: str = "seg"                 # seg | det | critic | fusion | all
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    bilevel: BilevelConfig = field(default_factory=BilevelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASK_CHOICES)
        for k in ("critic", "seg", "det"):
            t = getattr(self.tasks, k)
            _at_least(f"tasks.{k}.lower_steps", t.lower_steps, 1)
            for key, value in (("batch", t.batch), ("ul_batch", t.ul_batch)):
                if value is not None:
                    _at_least(f"tasks.{k}.{key}", value, 1)
        if not self.bilevel.fusion_row and self.train.warmup_iters > 0:
            raise ConfigError(f"train.warmup_iters={self.train.warmup_iters} trains the fusion loss, which "
                              "bilevel.fusion_row=False leaves out; set train.warmup_iters=0 or fusion_row=True")

    @property
    def constraints(self) -> tuple[str, ...]:
        """The lower-level constraints of ``task`` in their fixed order."""
        return TASK_CONSTRAINTS[self.task]


# ------------------------------------------------------------------------------------------ machinery
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config class (what ``--set`` accepts), for error messages."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, raw: str | None = None) -> Any:
    """Coerce ``value`` to the field type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, raw)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; give a dict, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key} expects a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key} expects an int, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} expects a float, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None:                       # e.g. --set data.name=123 → "123"
            return raw
        raise ConfigError(f"{key} expects a string, got {value!r}")
    if origin is tuple or tp is tuple:
        variadic = bool(args) and args[-1] is Ellipsis
        if variadic and isinstance(value, str):   # --set eval.metrics=EN,SD → ("EN", "SD")
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif variadic and isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a tuple {_type_name(tp)}, got {value!r}")
        if variadic:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key} expects {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))) if args \
            else tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a dict, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _unknown(key: str, cls: type, prefix: str) -> ConfigError:
    keys = valid_keys(cls, prefix)
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(keys)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build ``cls`` from a (possibly partial) nested dict, strictly: unknown keys raise."""
    return apply_dict(cls(), data, prefix)


def apply_dict(cfg: Any, data: dict, prefix: str = "") -> Any:
    """Return ``cfg`` with the nested dict ``data`` applied on top (strict; YAML files use this)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    cls = type(cfg)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for name, value in data.items():
        if name not in names:
            raise _unknown(f"{prefix}{name}", cls, prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            changes[name] = apply_dict(getattr(cfg, name), value, f"{prefix}{name}.")
        else:
            changes[name] = _coerce(value, tp, f"{prefix}{name}")
    return dataclasses.replace(cfg, **changes)


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text                              # unquoted string


def _set_path(cfg: Any, parts: list[str], value: Any, raw: str, done: str) -> Any:
    cls = type(cfg)
    name = parts[0]
    names = {f.name for f in dataclasses.fields(cls)}
    full = done + name
    if name not in names:
        raise _unknown(done + ".".join(parts), cls, done)
    tp = _hints(cls)[name]
    current = getattr(cfg, name)
    if len(parts) == 1:
        new = _coerce(value, tp, full, raw)
    elif dataclasses.is_dataclass(tp):
        new = _set_path(current, parts[1:], value, raw, full + ".")
    elif tp is dict or typing.get_origin(tp) is dict:
        new = _set_dict_key(dict(current), parts[1:], value)
    else:
        raise ConfigError(f"{full} is a {_type_name(tp)}, not a section; cannot set {done + '.'.join(parts)}")
    return dataclasses.replace(cfg, **{name: new})


def _set_dict_key(d: dict, parts: list[str], value: Any) -> dict:
    if len(parts) == 1:
        d[parts[0]] = value
    else:
        sub = d.get(parts[0])
        d[parts[0]] = _set_dict_key(dict(sub) if isinstance(sub, dict) else {}, parts[1:], value)
    return d


def apply_overrides(cfg: RunConfig, overrides: typing.Iterable[str]) -> RunConfig:
    """Apply ``section.key=value`` strings in order (``--set``), strictly.

    Raises:
        ConfigError: malformed item, unknown key (the message lists the valid keys) or type mismatch.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            cfg = _set_path(cfg, key.split("."), _parse_value(raw.strip()), raw.strip(), "")
        except ConfigError as err:
            raise ConfigError(f"--set {item}: {err}") from None
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain nested dict (tuples become lists) for YAML, wandb and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``--print-config`` shows and ``config.yaml`` holds)."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def load_yaml(path: str, base: RunConfig) -> RunConfig:
    """Apply a YAML file (a full or partial nested mapping) on top of ``base``, strictly."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a text file (YAML expected)") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"--config {path}: YAML syntax error{line}: {getattr(err, 'problem', err)}") from None
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    try:
        return apply_dict(base, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
