"""Import released weights into this toolkit's nets through key maps from the released code's parameter names.

    python experiments/import_weights.py --kind bdl_fusion --src model_meta_50.pth --out bdl_released.pt
    python experiments/fuse.py --checkpoint bdl_released.pt --ir IR --vi VI --out OUT
    python experiments/import_weights.py --kind bdl_fcos --src model_meta_50.pth --out fcos_m3fd.pt
    python experiments/run.py --task det --set tasks.det.kwargs.weights=fcos_m3fd.pt ...
    python experiments/import_weights.py --kind tc_moa --src TC-MoA.pth --out tc_moa_released.pt

Kinds (nothing is downloaded: ``--src`` is a local file):

* ``bdl_fusion``: the DRDB fusion net of BDL (``LiuZhu-CV/BDLFusion``, ``Fusion_Network_IJ``) into
  :class:`fusion.nets.bdl.BDLFusionNet`. A whole ``Network_IJCAI`` checkpoint (keys ``enhance_net.*``,
  ``denoise_net.*``, ``discriminator.*``) or the bare fusion net's state dict both work. Writes a checkpoint
  that ``fuse.py --checkpoint`` and ``run.py --set net.init=`` load.
* ``bdl_fcos``: BDL's FCOS detector (``denoise_net.fcos_body.*``: ResNet, FPN ``prj_*``/``conv_*``, head
  ``cls_conv``/``reg_conv``) into torchvision's FCOS inside :class:`tasks.det.DetTask`. The released head
  scores its classes in the order of its dataset (Lamp, Car, Bus, Motorcycle, Truck, People; 80 channels of
  which the first 6 are used); the rows are reordered to the task's ``class_names`` and torchvision's
  background row (class 0, which the task drops) is set to the prior bias. The released head decodes
  distances as exp(s_l·t) with a learned scale per level (``scale_exp``) from cell centres at
  x·stride + ⌊stride/2⌋, so the task must be built with ``fcos_decode="exp"`` (this command does); the scales
  load into it. The released detector reads un-normalised [0, 1] images: build the task with
  ``input_norm="none"``. Writes the
  detector's plain state dict, which ``DetTask(weights=...)`` loads strictly.
* ``tc_moa``: a TC-MoA checkpoint (``YangSun22/TC-MoA``, ``{"model": state}``; the old names that its
  ``main_predict_oldckp.py`` translates are translated the same way) into :class:`fusion.nets.tc_moa.TCMoANet`.
  The released routers are one ``w_gate`` (tasks, C/4, experts) per module and one ``Alpha_encoder``/
  ``Alpha_decoder`` vector per stage; they are split into this net's per-task routers and per-module α. The
  released source embeddings live in a plain Python list, so they are not in the checkpoint: reported as
  missing and left at this net's initialisation. The net is built with the released code's options
  (``shift_mask=False``, ``combine="logspace"``; ``--net-kwargs`` overrides them), ``tc_moa`` or
  ``tc_moa_large`` by the released patch-embedding width. Writes a fusion checkpoint as ``bdl_fusion`` does.

Policy: a shape mismatch (another architecture or width) is an error that lists every mismatched key; keys of
this net that the file does not fill are reported as missing and keep their initialisation; released keys that
map to nothing are reported as unexpected, and those with no counterpart by design (position tables rebuilt
here, index buffers, other parts of a whole-model checkpoint) as ignored. A file with no key of the chosen
layout is an error. The command exits 2 with one ``error:`` line on bad input, and never replaces ``--out``
without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from bilevel.registry import lookup
from experiments.cli import ArgumentParser

__all__ = [
    "KINDS",
    "RELEASED_M3FD_CLASSES",
    "ImportReport",
    "WeightImportError",
    "import_weights",
    "main",
    "read_released",
    "released_state_dict",
]

#: Class order of the released BDL detector's logits (its dataset's ids 1..6; channel = id − 1).
RELEASED_M3FD_CLASSES = ("Lamp", "Car", "Bus", "Motorcycle", "Truck", "People")
_PRIOR_BIAS = -4.59511985013459   # −log((1 − 0.01)/0.01): FCOS's prior for a class never seen


class WeightImportError(ValueError):
    """Released weights that cannot be imported: shapes that do not fit, or no key of the layout."""


@dataclass
class _Rule:
    """Released keys ↔ our keys, with the tensor transforms both ways (identity for a rename)."""

    released: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[[list[Tensor]], list[Tensor]] = list
    to_released: Callable[[list[Tensor]], list[Tensor]] = list
    synthesised: str = ""     # set when part of our tensor is computed, not copied: what that part is


def _rename(released: str, ours: str) -> _Rule:
    return _Rule((released,), (ours,))


def _split(released: str, ours: Sequence[str]) -> _Rule:
    """One released tensor stacked along dim 0 ↔ one of our tensors per index."""
    return _Rule((released,), tuple(ours), lambda t: list(t[0].unbind(0)), lambda t: [torch.stack(t)])


@dataclass
class ImportReport:
    """What an import did; :meth:`lines` is what the command prints."""

    kind: str
    source: str
    loaded: list[str] = field(default_factory=list)         # our keys filled from the file
    missing: list[str] = field(default_factory=list)        # our keys the file does not fill (initialisation kept)
    unexpected: list[str] = field(default_factory=list)     # released keys of the layout that map to nothing
    ignored: list[str] = field(default_factory=list)        # released keys with no counterpart by design
    synthesised: list[str] = field(default_factory=list)    # our keys computed, not copied (e.g. a background row)

    def lines(self) -> list[str]:
        def collapse(keys: list[str]) -> str:
            names = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", k) for k in keys})
            return ", ".join(names[:8]) + (f", … ({len(names)} patterns)" if len(names) > 8 else "")

        out = [f"{self.kind}: imported {len(self.loaded)} tensors from {self.source}"]
        for label, keys in (("missing (kept at initialisation)", self.missing), ("unexpected", self.unexpected),
                            ("ignored (no counterpart)", self.ignored), ("synthesised", self.synthesised)):
            if keys:
                out.append(f"  {label}: {len(keys)}: {collapse(keys)}")
        return out


# ------------------------------------------------------------------------------------------------- reading
def read_released(path: str | Path) -> dict[str, Tensor]:
    """A released checkpoint's state dict: ``{"model": …}``/``{"state_dict": …}`` unwrapped, ``module.`` stripped.

    Loaded with ``weights_only=True``; ``argparse.Namespace`` (the ``args`` that MAE-style trainers save next to
    the weights) is the one class allowed besides tensors and containers.

    Raises:
        FileNotFoundError: no such file.
        WeightImportError: not a loadable checkpoint, or no tensors in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch raises on a bad file, one clear line
        raise WeightImportError(f"{path} cannot be read as a weights-only PyTorch checkpoint "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise WeightImportError(f"{path} holds a {type(state).__name__}, not a state dict")
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightImportError(f"{path} holds no tensors")
    return tensors


def _select(state: dict[str, Tensor], prefixes: Sequence[str], probe: str) -> tuple[dict[str, Tensor], list[str]]:
    """The part of ``state`` under the first prefix whose ``probe`` key exists (stripped), and the other keys."""
    for prefix in prefixes:
        if prefix + probe in state:
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return part, [k for k in state if not k.startswith(prefix)]
    return {}, list(state)


# ------------------------------------------------------------------------------------------------ key maps
def _bdl_fusion_rules(net: nn.Module) -> list[_Rule]:
    """``Fusion_Network_IJ``: conv1, DRDB<b>.Dcov<l>, DRDB<b>.conv, conv2, conv21, relu (one shared PReLU)."""
    rules = [_rename(f"conv1.{p}", f"head.{p}") for p in ("weight", "bias")]
    for b, block in enumerate(net.blocks):
        for i in range(len(block.layers)):
            rules += [_rename(f"DRDB{b + 1}.Dcov{i + 1}.{p}", f"blocks.{b}.layers.{i}.{p}") for p in ("weight", "bias")]
        rules += [_rename(f"DRDB{b + 1}.conv.{p}", f"blocks.{b}.fuse.{p}") for p in ("weight", "bias")]
    rules += [_rename(f"conv2.{p}", f"tail1.{p}") for p in ("weight", "bias")]
    rules += [_rename(f"conv21.{p}", f"tail2.{p}") for p in ("weight", "bias")]
    return rules + [_rename("relu.weight", "act.weight")]


def _fcos_cls_rule(class_names: Sequence[str], param: str) -> _Rule:
    """Released logits rows (:data:`RELEASED_M3FD_CLASSES` order) ↔ torchvision's background row + our classes."""
    unknown = [c for c in class_names if c not in RELEASED_M3FD_CLASSES]
    if unknown:
        raise WeightImportError(f"the released BDL detector knows {RELEASED_M3FD_CLASSES}; the task's classes "
                                f"{unknown} have no row in it")
    rows = [RELEASED_M3FD_CLASSES.index(c) for c in class_names]
    fill = _PRIOR_BIAS if param == "bias" else 0.0

    def to_ours(t: list[Tensor]) -> list[Tensor]:
        w = t[0]
        if w.shape[0] <= max(rows):
            raise WeightImportError(f"head.cls_logits.{param}: {w.shape[0]} class rows, the class order "
                                    f"{RELEASED_M3FD_CLASSES} needs at least {max(rows) + 1}")
        return [torch.cat((torch.full_like(w[:1], fill), w[rows]))]

    def to_released(t: list[Tensor]) -> list[Tensor]:
        w = t[0]
        out = torch.full((len(RELEASED_M3FD_CLASSES), *w.shape[1:]), fill, dtype=w.dtype)
        out[rows] = w[1:]
        return [out]

    return _Rule((f"head.cls_logits.{param}",), (f"head.classification_head.cls_logits.{param}",), to_ours,
                 to_released, "background row set to the prior")


def _bdl_fcos_rules(own: dict[str, Tensor], class_names: Sequence[str]) -> list[_Rule]:
    """``FCOS`` of ``model/fcos_fusion.py``: ``backbone`` (torchvision ResNet names), ``fpn`` and ``head``."""
    rules = []
    fpn = {"inner_blocks": "prj", "layer_blocks": "conv"}
    for key in own:
        if key.startswith("backbone.body."):
            rules.append(_rename("backbone." + key[len("backbone.body."):], key))
        elif m := re.fullmatch(r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d)\.0\.(weight|bias)", key):
            rules.append(_rename(f"fpn.{fpn[m[1]]}_{int(m[2]) + 3}.{m[3]}", key))
        elif m := re.fullmatch(r"backbone\.fpn\.extra_blocks\.p([67])\.(weight|bias)", key):
            rules.append(_rename(f"fpn.conv_out{m[1]}.{m[2]}", key))
        elif m := re.fullmatch(r"head\.(classification|regression)_head\.conv\.(\d+)\.(weight|bias)", key):
            rules.append(_rename(f"head.{'cls' if m[1] == 'classification' else 'reg'}_conv.{m[2]}.{m[3]}", key))
        elif m := re.fullmatch(r"head\.regression_head\.(bbox_reg|bbox_ctrness)\.(weight|bias)", key):
            rules.append(_rename(f"head.{'reg_pred' if m[1] == 'bbox_reg' else 'cnt_logits'}.{m[2]}", key))
        elif m := re.fullmatch(r"head\.classification_head\.cls_logits\.(weight|bias)", key):
            rules.append(_fcos_cls_rule(class_names, m[1]))
        elif m := re.fullmatch(r"head\.regression_head\.scale_exp\.(\d)", key):
            rules.append(_rename(f"head.scale_exp.{m[1]}.scale", key))
    return rules


#: the names TC-MoA's ``main_predict_oldckp.py`` renames in checkpoints of its first release
_TC_MOA_OLD_NAMES = (("blocks_SSF_rgb", "blocks_MoA"), ("en_projAdapter", "FusionLayer"),
                     ("de_projAdapter", "de_FusionLayer"))
_TC_MOA_OLD_INSIDE = (("mlp", "MoA"), ("SE_en_linear", "dimReduction"), ("SSF_beta", "modal_shifts"))


def _tc_moa_new_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old TC-MoA names → current ones (the renames of the released ``modelTrans``)."""
    out = {}
    for key, value in state.items():
        new = key
        if "blocks_SSF" in key:
            for old, cur in _TC_MOA_OLD_INSIDE:
                new = new.replace(old, cur)
        for old, cur in _TC_MOA_OLD_NAMES:
            new = new.replace(old, cur)
        out[new] = value
    return out


def _tc_moa_rules(net: nn.Module, own: dict[str, Tensor]) -> list[_Rule]:
    """``MaskedAutoencoderViT`` of ``model/ViT_MAE.py``: MAE names for the backbone, ``en_/de_relative_position``,
    ``blocks_MoA``/``decoder_blocks_MoA`` (``BiMixtureOfAdapters``), ``FusionLayer``/``de_FusionLayer``,
    ``Alpha_encoder``/``Alpha_decoder``. Module g of a stage is the g-th TC-MoA position, as in the code."""
    rules = [_rename(k[len("backbone."):], k) for k in own if k.startswith("backbone.")]
    for ours, released in (("rel_pos", "en_relative_position"), ("decoder_rel_pos", "de_relative_position")):
        rules += [_rename(f"{released}.{k}.relative_position_bias_table", f"{ours}.{k}")
                  for k in range(len(getattr(net, ours)))]
    for ours, moa, conv, alpha in (("moa", "blocks_MoA", "FusionLayer", "Alpha_encoder"),
                                   ("decoder_moa", "decoder_blocks_MoA", "de_FusionLayer", "Alpha_decoder")):
        modules = getattr(net, ours)
        keys = sorted(modules, key=int)
        for g, key in enumerate(keys):
            mod, o, r = modules[key], f"{ours}.{key}", f"{moa}.{g}"
            for our_name, released_name in (("norm_in", "norm1"), ("norm_out", "norm2")):
                rules += [_rename(f"{r}.{released_name}.{p}", f"{o}.{our_name}.{p}") for p in ("weight", "bias")]
            rules.append(_rename(f"{r}.dimReduction.weight", f"{o}.reduce.weight"))
            for e in range(len(mod.adapters)):
                for layer, fc in ((0, "fc1"), (2, "fc2")):
                    rules += [_rename(f"{r}.MoA.experts.{e}.{fc}.{p}", f"{o}.adapters.{e}.{layer}.{p}")
                              for p in ("weight", "bias")]
            for w in ("w_gate", "w_noise"):
                rules.append(_split(f"{r}.MoA.{w}", [f"{o}.routers.{t}.{w}" for t in range(len(mod.routers))]))
            rules += [_rename(f"{conv}.{g}.conv{i + 1}.weight", f"{o}.conv_fusion.{i}.weight") for i in range(3)]
        rules.append(_split(alpha, [f"{ours}.{k}.alpha" for k in keys]))
    return rules


_TC_MOA_IGNORED = re.compile(r"(cls_token|mask_token|pos_embed|decoder_pos_embed|.*\.relative_position_index"
                             r"|.*\.MoA\.(mean|std))$")


@dataclass(frozen=True)
class _Kind:
    """How one kind finds its part of a checkpoint, the module it fills and its rules."""

    prefixes: tuple[str, ...]
    probe: str
    target: Callable[[nn.Module], nn.Module]
    rules: Callable[[nn.Module, dict[str, Tensor]], list[_Rule]]
    ignored: Callable[[str, dict[str, Tensor]], bool]
    rename: Callable[[dict[str, Tensor]], dict[str, Tensor]] = dict
    check: Callable[[dict[str, Tensor], dict[str, Tensor]], None] = lambda state, own: None


def _fcos_target(task: nn.Module) -> nn.Module:
    model = getattr(getattr(task, "detector", None), "model", None)
    if model is None or type(model).__name__ != "FCOS":
        raise WeightImportError("bdl_fcos imports into a DetTask with a torchvision FCOS model "
                                "(e.g. DetTask('fcos_resnet50_fpn', backend='torchvision'))")
    return model


def _fcos_check(state: dict[str, Tensor], own: dict[str, Tensor]) -> None:
    """BatchNorm statistics cannot go into a GroupNorm backbone; learned scales need the exp decoding."""
    if "head.scale_exp.0.scale" in state and "head.regression_head.scale_exp.0" not in own:
        raise WeightImportError("the released detector decodes boxes as exp(s·t) with learned per-level scales; "
                                "build the DetTask with fcos_decode='exp'")
    if "backbone.bn1.running_mean" in state and "backbone.body.bn1.running_mean" not in own:
        raise WeightImportError("the released detector's backbone has BatchNorm statistics; build the DetTask "
                                "with norm='batch' or 'frozen', not 'group'")


def _fcos_ignored(key: str, own: dict[str, Tensor]) -> bool:
    """BatchNorm counters of a frozen-BN backbone."""
    return key.endswith("num_batches_tracked") and "backbone.body." + key[len("backbone."):] not in own


KINDS: dict[str, _Kind] = {
    "bdl_fusion": _Kind(("enhance_net.", ""), "conv1.weight", lambda net: net,
                        lambda net, own: _bdl_fusion_rules(net), lambda key, own: False),
    "bdl_fcos": _Kind(("denoise_net.fcos_body.", "fcos_body.", ""), "head.cls_logits.weight", _fcos_target,
                      lambda task, own: _bdl_fcos_rules(own, task.class_names), _fcos_ignored, dict, _fcos_check),
    "tc_moa": _Kind(("",), "decoder_pred.weight", lambda net: net, _tc_moa_rules,
                    lambda key, own: bool(_TC_MOA_IGNORED.fullmatch(key)), _tc_moa_new_names),
}


def released_state_dict(kind: str, net: nn.Module) -> dict[str, Tensor]:
    """``net``'s weights under the released code's names (the inverse map; the FCOS background row and the
    layout's other parts are left out). Tests round-trip through it; it also shows the layout expected."""
    spec = lookup(KINDS, "weight import kind", kind)
    own = spec.target(net).state_dict()
    out: dict[str, Tensor] = {}
    for rule in spec.rules(net, own):
        if all(k in own for k in rule.ours):
            out.update(zip(rule.released, rule.to_released([own[k].detach().clone() for k in rule.ours])))
    return out


def import_weights(kind: str, path: str | Path, net: nn.Module) -> ImportReport:
    """Load the released checkpoint ``path`` of ``kind`` into ``net`` by key map (see the module docstring).

    ``net``: a :class:`~fusion.nets.bdl.BDLFusionNet` (``bdl_fusion``), a :class:`~tasks.det.DetTask` with a
    torchvision FCOS (``bdl_fcos``) or a :class:`~fusion.nets.tc_moa.TCMoANet` (``tc_moa``). Our keys that the
    file does not fill keep their values.

    Raises:
        UnknownNameError: unknown ``kind``.
        FileNotFoundError: no file at ``path``.
        WeightImportError: an unreadable file, no key of the layout, or shape mismatches (all listed).
    """
    spec = lookup(KINDS, "weight import kind", kind)
    target = spec.target(net)
    state, others = _select(spec.rename(read_released(path)), spec.prefixes, spec.probe)
    if not state:
        raise WeightImportError(f"{path} holds no {kind} weights (no key {spec.probe!r} under any of the prefixes "
                                f"{[p or '(none)' for p in spec.prefixes]})")
    own = target.state_dict()
    spec.check(state, own)
    report = ImportReport(kind, str(path), ignored=sorted(others))
    mapped: dict[str, Tensor] = {}
    mismatched: list[str] = []
    used: set[str] = set()
    for rule in spec.rules(net, own):
        if not all(k in state for k in rule.released):
            continue
        used.update(rule.released)
        try:
            tensors = rule.to_ours([state[k] for k in rule.released])
        except (RuntimeError, IndexError) as err:
            mismatched.append(f"{', '.join(rule.released)}: {err}")
            continue
        if len(tensors) != len(rule.ours):
            mismatched.append(f"{rule.released[0]}: {len(tensors)} slices, this net has {len(rule.ours)}")
            continue
        for key, tensor in zip(rule.ours, tensors):
            if tuple(tensor.shape) != tuple(own[key].shape):
                mismatched.append(f"{' + '.join(rule.released)} {tuple(tensor.shape)} → {key} {tuple(own[key].shape)}")
            else:
                mapped[key] = tensor.to(own[key].dtype)
        if rule.synthesised:
            report.synthesised += [f"{k} ({rule.synthesised})" for k in rule.ours]
    if mismatched:
        raise WeightImportError(f"{path}: {len(mismatched)} shape mismatch(es) with this {kind} net: "
                                + "; ".join(mismatched))
    for key in state:
        if key not in used:
            (report.ignored if spec.ignored(key, own) else report.unexpected).append(key)
    report.ignored.sort()
    report.loaded = sorted(mapped)
    report.missing = [k for k in own if k not in mapped]
    target.load_state_dict({**own, **mapped}, strict=True)
    return report


# --------------------------------------------------------------------------------------------------- command
def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Import released BDL / TC-MoA weights into this toolkit's nets.")
    p.add_argument("--kind", required=True, help=f"one of {', '.join(KINDS)}")
    p.add_argument("--src", required=True, help="the released checkpoint (a local file)")
    p.add_argument("--out", required=True, help="where to write our checkpoint (a fusion checkpoint; for "
                   "bdl_fcos the detector's state dict)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--net", help="fusion net name (default: bdl; tc_moa or tc_moa_large from the released width)")
    p.add_argument("--net-kwargs", default="{}", help="JSON keyword arguments of the fusion net")
    p.add_argument("--det-model", default="fcos_resnet50_fpn", help="bdl_fcos: torchvision detector name")
    p.add_argument("--det-norm", default="batch", help="bdl_fcos: backbone norm, 'batch' or 'frozen'")
    return p


#: TC-MoA options that reproduce the released code (the module docstring of fusion.nets.tc_moa)
_TC_MOA_RELEASED = {"shift_mask": False, "combine": "logspace"}


def _build(args: argparse.Namespace) -> tuple[nn.Module, dict | None]:
    """The net to fill and, for fusion nets, its ``{"name", "kwargs"}``."""
    try:
        kwargs = json.loads(args.net_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--net-kwargs is not JSON ({err})") from None
    if not isinstance(kwargs, dict):
        raise TypeError("--net-kwargs must be a JSON object")
    if args.kind == "bdl_fcos":
        from tasks.det import M3FD_CLASSES, DetTask

        kwargs = {"fcos_decode": "exp", **kwargs}
        return DetTask(args.det_model, class_names=M3FD_CLASSES, norm=args.det_norm, **kwargs), None
    from fusion.nets import create_fusion_net

    name = args.net
    if args.kind == "tc_moa":
        kwargs = {**_TC_MOA_RELEASED, **kwargs}
        if name is None:
            width = read_released(args.src).get("patch_embed.proj.weight")
            name = {768: "tc_moa", 1024: "tc_moa_large"}.get(None if width is None else width.shape[0])
            if name is None:
                raise ValueError("cannot tell the TC-MoA variant from the released patch embedding; pass --net")
    name = name or "bdl"
    with warnings.catch_warnings():   # TC-MoA warns about its random backbone: the import fills it
        warnings.simplefilter("ignore", UserWarning)
        net = create_fusion_net(name, **kwargs)
    return net, {"name": name, "kwargs": kwargs}


def main(argv: Sequence[str] | None = None) -> int:
    """The command: exit 0, or 2 with one ``error:`` line."""
    from experiments.checkpoint import FORMAT, CheckpointError, save_checkpoint
    from experiments.config import NetConfig, RunConfig, to_dict
    from experiments.logging_utils import OutputError

    args = get_args_parser().parse_args(argv)
    try:
        lookup(KINDS, "weight import kind", args.kind)
        out = Path(args.out)
        if out.exists() and (out.is_dir() or not args.overwrite):
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out"
                                  if not out.is_dir() else f"{out} is a folder; --out must be a file path")
        if not Path(args.src).is_file():
            raise FileNotFoundError(f"released checkpoint {args.src} does not exist")
        net, spec = _build(args)
        report = import_weights(args.kind, args.src, net)
        if spec is None:
            save_checkpoint(out, net.detector.model.state_dict())
        else:
            cfg = RunConfig(net=NetConfig(name=spec["name"], kwargs=spec["kwargs"]))
            save_checkpoint(out, {"format": FORMAT, "config": to_dict(cfg), "net": spec,
                                  "model": net.state_dict()})
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, KeyError, CheckpointError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
