"""Evaluate fused images against their source pairs with the fusion metrics.

    python experiments/evaluate.py --ir $DATA/vifb/ir --vi $DATA/vifb/vi \\
        --fused ADF=$DATA/vifb/fused/ADF CNN=$DATA/vifb/fused/CNN \\
        --profile vifb --out outputs/eval_vifb
    python experiments/evaluate.py --ir IR --vi VI --fused-root FUSED_ROOT --metrics EN,SD,MI,SSIM --out OUT
    python experiments/evaluate.py --pairs MEF_PAIRS --fused-root FUSED_ROOT --profile mefb --out OUT

Files are matched by stem across the IR folder, the visible folder and every method folder. Source files
without a partner, fused images without a source pair and pairs whose IR and visible sizes differ are left
out and reported (stderr and ``meta.json``). All methods' outputs of one source pair are stacked and
evaluated as one batch. Writes (contracts.md "Metrics"): ``per_image.csv`` (``image,method,<metric>...``),
``summary.csv`` (``method,n_images,<metric>...``, means over images), ``meta.json`` (profile, metrics,
directions, versions, unmatched files), ``table.md`` and ``table.tex`` (``n`` and the mean per method, best
per metric in bold by the metric's direction), and prints the markdown table.

Methods are only ranked on the same pairs: a method that lacks a fused image for any evaluated pair is an
error (exit 2, naming the method and how many pairs it lacks), never a mean over fewer images bolded
against full ones. Add the missing images, or leave those pairs out of ``--ir``/``--vi``.

Everything is checked before the first metric is computed: ``--out`` (absent or an empty folder, writable,
not one of the input folders nor inside one; it is never overwritten), the folders, the method names (a
duplicate ``--fused`` name, or one equal to a ``--fused-root`` sub-folder, is an error), every image header
and size (a fused image whose size differs from its sources, an image over ``fusion.image_io.MAX_PIXELS``,
or one smaller than the largest window of the chosen metrics, :func:`min_image_side`, is an error naming
the file), and that at least one pair matches. A bad input exits with code 2 and one line ``error: ...`` on
stderr, and nothing is written. ``--stretch-16bit`` stretches each 16-bit image's min-max to [0, 1] (raw
sensor counts; see ``fusion.image_io.read_image``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import platform
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.cli import ArgumentParser, device_name
from experiments.config import ConfigError
from experiments.logging_utils import OutputError, check_writable, output_guard
from experiments.tables import md_escape, tex_escape
from fusion.image_io import ImagePairError, image_size
from fusion.metrics import compute_metrics, get_metric, get_profile, list_metrics

__all__ = [
    "STANDARD_METRICS",
    "EvaluationResult",
    "check_min_side",
    "check_run_sizes",
    "evaluate_folders",
    "evaluate_run",
    "latex_table",
    "main",
    "markdown_table",
    "min_image_side",
    "score_images",
    "summarise",
    "write_csv",
    "write_outputs",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# The smallest image side on which each metric can be computed: its largest window, or the coarsest scale of
# its pyramid (below it the metric raises or gives NaN). Metrics not listed work on a single pixel;
# tests/test_reliability_images.py checks every entry against the metrics themselves, in both directions.
MIN_SIDE = {"SF": 2, "AG": 2, "NMI": 2, "SCD": 2, "CC": 2, "Qabf": 2, "Nabf": 2, "Qcb": 2, "Qcv": 2,
            "FMI": 3, "FMI_pixel": 3, "FMI_dct": 3, "Qp": 6, "Q0": 8, "Qw": 8, "Qe": 8,
            "SSIM": 11, "Qy": 11, "Qc": 11, "MEF_SSIM": 44, "VIF": 65, "VIFF": 65, "MS_SSIM": 161}
_MIN_SIDE_BY_PROFILE = {("SF", "vifb"): 1, ("SF", "mefb"): 1, ("AG", "cddfuse"): 1, ("SSIM", "cddfuse"): 7,
                        ("Qw", "mefb"): 11, ("Qncie", "mefb"): 2, ("TE", "mefb"): 2}


def min_image_side(metric: str, profile: str) -> int:
    """The smallest image side (pixels) on which ``metric`` can be computed under ``profile``."""
    name, prof = get_metric(metric).name, get_profile(profile).name
    return _MIN_SIDE_BY_PROFILE.get((name, prof), MIN_SIDE.get(name, 1))


@dataclass
class EvaluationResult:
    """Everything an evaluation produced.

    Attributes:
        profile: metric profile used.
        metrics: canonical metric names, in table order.
        rows: one dict per (image, method): ``image``, ``method`` and one float per metric.
        summary: ``{method: {"n_images": int, metric: mean}}`` (NaN values are left out of the means).
        unmatched: human-readable descriptions of files that could not be paired.
        failures: ``{metric: reason}`` for metrics that could not be computed on some images (NaN there).
    """

    profile: str
    metrics: list[str]
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, dict] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


def _index(folder: Path, what: str) -> dict[str, Path]:
    """``{stem: file}`` of the images directly in ``folder`` (the ``what`` folder, for messages)."""
    if not folder.exists():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{what} folder {folder} is a file, not a folder")
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith("."):
            continue
        if not p.is_file():
            raise ValueError(f"{p} is a folder, not an image ({what} folder)")
        if p.stem in files:
            raise ValueError(f"two images with stem {p.stem!r} in {folder}: {files[p.stem].name}, {p.name}")
        files[p.stem] = p
    return files


def index_ab_pairs(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """``({scene: A}, {scene: B})`` of a multi-exposure / multi-focus folder ``root/<scene>/<scene>_{A,B}.*``
    (the MEFB / MFIFB input layout); a scene folder without both images is reported by the caller."""
    if not root.is_dir():
        raise FileNotFoundError(f"--pairs folder {root} does not exist or is not a folder")
    a, b = {}, {}
    for scene in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        files = _index(scene, f"pair ({scene.name})")
        for side, index in (("A", a), ("B", b)):
            if f"{scene.name}_{side}" in files:
                index[scene.name] = files[f"{scene.name}_{side}"]
    return a, b


def _read(path: Path, device: torch.device, stretch16: bool) -> torch.Tensor:
    from fusion.image_io import read_image

    return read_image(path, stretch16=stretch16).to(device=device, dtype=torch.float64)


def check_min_side(sizes: Mapping[Any, tuple[int, int]], names: Sequence[str], profile: str,
                   key: str = "--metrics") -> None:
    """Every image must be large enough for the windows of every chosen metric (checked before any work).

    Raises:
        ImagePairError: naming the first image that is too small, the metric and its minimum side.
    """
    need, metric = max((min_image_side(n, profile), n) for n in names)
    small = [(path, hw) for path, hw in sizes.items() if min(hw) < need]
    if small:
        path, (h, w) = small[0]
        more = f" (and {len(small) - 1} more image(s))" if len(small) > 1 else ""
        raise ImagePairError(
            f"image {path} is {w}x{h} (WxH){more}, smaller than the minimum side of {need} pixels that metric "
            f"{metric} (profile {profile}) needs; leave such images out or drop {metric} from {key}")


# The default of a profile without a toolbox order: the metrics IVF papers tabulate (VIFB's 13 and the nine of
# most papers), all fast. The information/phase-congruency metrics (FMI, Qp, TE, ...) cost up to seconds per
# pair and are asked for by name, by ``--metrics all`` or by the ``mefb`` profile.
STANDARD_METRICS = ("EN", "SD", "SF", "AG", "EI", "MI", "SCD", "CC", "PSNR", "MSE", "RMSE", "CE", "VIF", "Qabf",
                    "Nabf", "SSIM", "MS_SSIM", "Qcb", "Qcv")


def _resolve_metrics(metrics: Sequence[str] | str | None, profile: str) -> list[str]:
    if metrics is None or metrics == "all":
        available = list_metrics(profile)
        if metrics == "all" or get_profile(profile).order:
            return available
        return [m for m in STANDARD_METRICS if m in available]
    if isinstance(metrics, str):
        metrics = [m for m in (s.strip() for s in metrics.split(",")) if m]
    names = [get_metric(m).name for m in metrics]
    bad = [n for n in names if n not in list_metrics(profile)]
    if bad:
        raise ValueError(
            f"metrics {bad} are not available under profile {profile!r}; available: {', '.join(list_metrics(profile))}"
        )
    return names


def evaluate_folders(
    ir_dir: str | Path | None,
    vi_dir: str | Path | None,
    fused: Mapping[str, str | Path],
    *,
    pairs: str | Path | None = None,
    profile: str = "reference",
    metrics: Sequence[str] | str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stretch16: bool = False,
) -> EvaluationResult:
    """Compute metrics for every matched (image, method); the core of ``evaluate.py``.

    Args:
        ir_dir: folder of infrared images.
        vi_dir: folder of visible images (same stems).
        fused: ``{method name: folder of fused images}``.
        pairs: instead of ``ir_dir``/``vi_dir``, a folder of A/B source pairs ``<scene>/<scene>_{A,B}.*``
            (multi-exposure, multi-focus); fused images are named ``<scene>.*``. A plays the infrared role.
        profile: metric profile (``reference``, ``vifb``, ``tang``, ``tang_legacy``, ``cddfuse``).
        metrics: names (case-insensitive) or a comma-separated string; default: all metrics of the profile.
        device: where to compute.
        progress: show a tqdm progress bar.
        stretch16: stretch each 16-bit image's min-max to [0, 1] (see ``fusion.image_io.read_image``).

    Returns:
        An :class:`EvaluationResult` (use :func:`write_outputs` to save it).
    """
    profile = get_profile(profile).name
    names = _resolve_metrics(metrics, profile)
    if not fused:
        raise ValueError("no fused-image folders given")
    device = torch.device(device)
    if pairs is not None:
        ir, vi = index_ab_pairs(Path(pairs))
    else:
        ir, vi = _index(Path(ir_dir), "infrared"), _index(Path(vi_dir), "visible")
    methods = {m: _index(Path(d), f"fused ({m})") for m, d in fused.items()}
    result = EvaluationResult(profile=profile, metrics=names)
    for stem in sorted(set(ir) - set(vi)):
        result.unmatched.append(f"{stem}: infrared image without a visible image")
    for stem in sorted(set(vi) - set(ir)):
        result.unmatched.append(f"{stem}: visible image without an infrared image")
    stems, sizes = [], {}
    for stem in sorted(set(ir) & set(vi)):
        hw_ir, hw_vi = image_size(ir[stem]), image_size(vi[stem])
        if hw_ir != hw_vi:
            result.unmatched.append(f"{stem}: infrared {hw_ir} and visible {hw_vi} sizes differ")
        else:
            stems.append(stem)
            sizes[ir[stem]] = hw_ir
    if not stems:
        raise ValueError(f"no pair to evaluate: no stem has an infrared image in {ir_dir} and a visible image "
                         f"of the same size in {vi_dir} ({len(ir)} infrared, {len(vi)} visible image(s); "
                         f"{len(result.unmatched)} left out)")
    for m, files in methods.items():
        for stem in sorted(set(files) - set(stems)):
            result.unmatched.append(f"{stem}: fused image of {m} without a source pair")
        lacking = [stem for stem in stems if stem not in files]
        if lacking:
            raise ValueError(f"method {m!r} lacks {len(lacking)} of the {len(stems)} pairs (e.g. {lacking[0]!r} "
                             f"in {fused[m]}); methods are only ranked on the same pairs: add the missing "
                             "images or leave those pairs out")
        for stem in stems:
            hw, hw_src = image_size(files[stem]), image_size(ir[stem])
            if hw != hw_src:
                raise ValueError(f"fused image {files[stem]} of {m!r} is {hw} (H, W), its sources are {hw_src}")
    check_min_side(sizes, names, profile)

    from tqdm import tqdm

    for stem in tqdm(stems, desc=f"evaluate ({profile})", unit="pair", disable=not progress):
        a, b = _read(ir[stem], device, stretch16)[None], _read(vi[stem], device, stretch16)[None]
        images = [_read(methods[m][stem], device, stretch16) for m in methods]
        channels = max(x.shape[0] for x in images)
        batch = torch.stack([x.expand(channels, -1, -1) for x in images])
        values = score_images(batch, a, b, names, profile, result.failures)
        for i, m in enumerate(methods):
            result.rows.append({"image": stem, "method": m, **{n: float(values[n][i]) for n in names}})

    result.summary = summarise(result.rows, list(methods), names)
    return result


def summarise(rows: Sequence[Mapping], methods: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
    """``{method: {"n_images": int, metric: mean}}`` over ``rows``; NaN values are left out of the means."""
    summary = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        entry: dict = {"n_images": len(mine)}
        for n in names:
            vals = np.array([r[n] for r in mine], dtype=np.float64)
            finite = vals[np.isfinite(vals)]
            entry[n] = float(finite.mean()) if finite.size else math.nan
        summary[m] = entry
    return summary


def score_images(batch: torch.Tensor, a: torch.Tensor, b: torch.Tensor, names: Sequence[str], profile: str,
                 failures: dict[str, str]) -> dict[str, torch.Tensor]:
    """Each metric of ``names`` on fused ``batch`` (N, C, H, W) against sources ``a``, ``b``, returned on the CPU; a
    metric that cannot run on these images (e.g. windows larger than the image) gives NaN, a warning and a note
    in ``failures``."""
    known = set(failures)
    values = compute_metrics(batch, a, b, names, profile, failures=failures)
    for n in [n for n in failures if n not in known]:
        warnings.warn(f"{n}: {failures[n]}; writing NaN", stacklevel=2)
    return {n: v.cpu() for n, v in values.items()}


def _fmt(v: float, digits: int = 4) -> str:
    if not math.isfinite(v):
        return "–"
    return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.1f}"


def _best(result: EvaluationResult) -> dict[str, float]:
    best = {}
    for n in result.metrics:
        vals = [s[n] for s in result.summary.values() if math.isfinite(s[n])]
        if vals:
            best[n] = max(vals) if get_metric(n).higher_is_better else min(vals)
    return best


def _arrow(name: str) -> str:
    return "↑" if get_metric(name).higher_is_better else "↓"


def markdown_table(result: EvaluationResult, digits: int = 4) -> str:
    """``n`` (images) and mean per method; the best value of each metric (by its direction) in bold."""
    best = _best(result)
    head = "| Method | n | " + " | ".join(f"{n} {_arrow(n)}" for n in result.metrics) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(result.metrics)]
    for m, s in result.summary.items():
        cells = []
        for n in result.metrics:
            text = _fmt(s[n], digits)
            cells.append(f"**{text}**" if n in best and s[n] == best[n] else text)
        lines.append(f"| {md_escape(m)} | {s['n_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latex_table(result: EvaluationResult, digits: int = 4) -> str:
    """booktabs tabular of ``n`` and the means, best per metric in ``\\textbf``."""
    best = _best(result)
    cols = "lr" + "r" * len(result.metrics)
    head = " & ".join(["Method", "$n$"] + [tex_escape(f"{n} {_arrow(n)}") for n in result.metrics])
    lines = [f"\\begin{{tabular}}{{{cols}}}", "\\toprule", head + " \\\\", "\\midrule"]
    for m, s in result.summary.items():
        cells = [tex_escape(m), str(s["n_images"])]
        for n in result.metrics:
            text = _fmt(s[n], digits).replace("–", "--")
            cells.append(f"\\textbf{{{text}}}" if n in best and s[n] == best[n] else text)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import PIL

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
    }


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """One CSV of the evaluation outputs; floats at full precision (``repr``)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for row in rows:
            w.writerow([repr(v) if isinstance(v, float) else v for v in row])


def _check_out(out: Path, inputs: Sequence[str | Path] = ()) -> Path:
    """``--out`` must be absent or an empty folder, writable, and neither one of the ``inputs`` folders nor
    inside one (its files would become inputs, or a method, of the next evaluation): checked before any
    metric is computed."""
    resolved = out.resolve()
    for folder in inputs:
        if resolved.is_relative_to(Path(folder).resolve()):
            where = "is" if resolved == Path(folder).resolve() else "is inside"
            raise ValueError(f"--out {out} {where} the input folder {folder}; choose a folder outside the inputs")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"refusing to overwrite the non-empty folder {out}; choose another --out")
    return check_writable(out)


def write_outputs(result: EvaluationResult, out_dir: str | Path, *, inputs: Mapping | None = None) -> Path:
    """Write the five files of contracts.md into ``out_dir`` (which must be absent or empty).

    A write failure (read-only, full) raises :class:`OutputError` and removes what this call wrote, so
    the folder never holds a partial result.
    """
    out = _check_out(Path(out_dir))
    meta = {
        "profile": result.profile,
        "profile_description": get_profile(result.profile).description,
        "metrics": result.metrics,
        "higher_is_better": {n: get_metric(n).higher_is_better for n in result.metrics},
        "n_rows": len(result.rows),
        "methods": list(result.summary),
        "unmatched": result.unmatched,
        "failures": result.failures,
        "inputs": {k: str(v) for k, v in (inputs or {}).items()},
        "versions": _versions(),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    created = not out.exists()
    written: list[Path] = []
    try:
        with output_guard(out):
            out.mkdir(parents=True, exist_ok=True)
            for name, write in (
                ("per_image.csv", lambda p: write_csv(p, ["image", "method", *result.metrics],
                                                      [[r["image"], r["method"], *(r[n] for n in result.metrics)]
                                                       for r in result.rows])),
                ("summary.csv", lambda p: write_csv(p, ["method", "n_images", *result.metrics],
                                                    [[m, s["n_images"], *(s[n] for n in result.metrics)]
                                                     for m, s in result.summary.items()])),
                ("meta.json", lambda p: p.write_text(json.dumps(meta, indent=2), encoding="utf-8")),
                ("table.md", lambda p: p.write_text(markdown_table(result), encoding="utf-8")),
                ("table.tex", lambda p: p.write_text(latex_table(result), encoding="utf-8")),
            ):
                written.append(out / name)
                write(out / name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return out


def check_run_sizes(cfg, test_set) -> None:
    """Before training: the run's test images must fit the windows of ``eval.metrics`` (a result with NaN
    columns after hours of training is worse than an error now)."""
    from experiments.data import image_files, is_generated

    if not cfg.eval.enabled or not len(test_set):
        return
    names = _resolve_metrics(list(cfg.eval.metrics), cfg.eval.profile)
    files = image_files(test_set)
    if files is None and is_generated(cfg.data.name):   # rendered scenes, all of one size: the dataset says which
        sizes = {f"{cfg.data.name} test scenes": tuple(test_set.load(0)["ir"].shape[-2:])}
    else:
        files = files or []
        n = len(files) if cfg.eval.max_images is None else min(len(files), cfg.eval.max_images)
        sizes = {path: image_size(path) for path in files[:n]}
    try:
        check_min_side(sizes, names, cfg.eval.profile, key="eval.metrics")
    except ImagePairError as err:
        raise ConfigError(str(err)) from None


def evaluate_run(exp, run_dir: Path, method: str | None = None) -> dict[str, float]:
    """The runner's evaluation of an :class:`experiments.experiment.Experiment` on its held-out test split(s).

    Fuses the test images (batches of equal size, so mixed sizes work at any ``eval.batch``), scores them as
    8-bit images with the same code as the folder evaluation, runs each constraint's task metrics on the fused
    images, writes ``eval/`` and prints a table.

    Returns:
        ``eval/<metric>`` → value (fusion-metric means, task headline metrics).
    """
    from tqdm import tqdm

    from experiments.data import size_batches, to_device
    from experiments.logging_utils import output_guard

    cfg = exp.cfg
    method = method or cfg.name
    names = _resolve_metrics(list(cfg.eval.metrics), cfg.eval.profile)
    eval_dir = Path(run_dir) / "eval"
    with output_guard(run_dir):
        eval_dir.mkdir(exist_ok=True)

    def fused_test(dataset) -> list[tuple[torch.Tensor, dict]]:
        n = len(dataset) if cfg.eval.max_images is None else min(len(dataset), cfg.eval.max_images)
        batches = size_batches(dataset, n, cfg.eval.batch)
        return [(exp.fuse(b), b) for b in (to_device(b, exp.device) for b in
                                              tqdm(batches, desc="fuse test", unit="batch",
                                                   disable=not cfg.log.progress, leave=False))]

    fused_sets = {"run": fused_test(exp.test_sets["run"])}
    rows: list[dict] = []
    failures: dict[str, str] = {}
    for fused, batch in fused_sets["run"]:
        # Scored as saved: the 8-bit image fuse.py writes, so these values equal fuse.py + evaluate.py's.
        saved = torch.round(fused.clamp(0.0, 1.0) * 255.0) / 255.0
        values = score_images(saved, batch["ir"], batch["vis"], names, cfg.eval.profile, failures)
        rows += [{"image": image, "method": method, **{n: float(values[n][i]) for n in names}}
                 for i, image in enumerate(batch["name"])]
    summary = summarise(rows, [method], names).get(method, {"n_images": 0})
    results: dict[str, float] = {n: summary.get(n, math.nan) for n in names}
    with output_guard(eval_dir):
        write_csv(eval_dir / "per_image.csv", ["image", "method", *names],
                  [[r["image"], r["method"], *(r[n] for n in names)] for r in rows])

    task_results: dict[str, dict[str, float]] = {}
    for k, task in exp.tasks.items():
        if k in exp.untrained:    # an untrained constraint net's scores would be silently meaningless
            print(f"note: the checkpoint holds no weights for constraint {k!r} (inference-only); its task "
                  "metrics are not computed", flush=True)
            continue
        key = "run" if exp.specs[k] == exp.specs["run"] else k
        if key not in fused_sets:
            fused_sets[key] = fused_test(exp.test_sets[k])
        task_results[k] = task.evaluate(iter(fused_sets[key]))
    with output_guard(eval_dir):
        if "seg" in task_results:
            r = task_results["seg"]
            classes = [c[len("IoU/"):] for c in r if c.startswith("IoU/")]
            write_csv(eval_dir / "seg_per_class.csv", ["class", "Acc", "IoU"],
                      [[c, r[f"Acc/{c}"], r[f"IoU/{c}"]] for c in classes])
            results.update({k: r[k] for k in ("mIoU", "mAcc", "aAcc") if k in r})
        if "det" in task_results:
            r = task_results["det"]
            classes = [c[len("AP50/"):] for c in r if c.startswith("AP50/")]
            write_csv(eval_dir / "det_per_class.csv", ["class", "AP50", "coco_AP"],
                      [[c, r[f"AP50/{c}"], r.get(f"coco/AP/{c}", math.nan)] for c in classes])
            results.update({k: r[k] for k in ("mAP50", "coco/mAP", "coco/AP50", "coco/AP75") if k in r})
        if "critic" in task_results:
            results.update({f"critic/{k}": v for k, v in task_results["critic"].items()})
        write_csv(eval_dir / "summary.csv", ["method", "n_images", *results],
                  [[method, len(rows), *results.values()]])
        meta = {"profile": cfg.eval.profile, "metrics": names, "failures": failures, "split": cfg.data.test_split,
                "n_images": len(rows), "method": method,
                "seg_convention": "MFNet confusion matrix over all test pixels; mIoU/mAcc = mean over all classes "
                                  "(unlabelled included), classes absent from ground truth and prediction left out",
                "det_convention": "VOC AP@0.5 all-point interpolation (mAP50); COCO mAP@[.5:.95] via pycocotools",
                "task_data": {k: exp.specs[k].name for k in exp.tasks}, "run_data": exp.specs["run"].name,
                "untrained_constraints": list(exp.untrained)}
        (eval_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    keys = list(results)
    print(f"\nEvaluation on the held-out {cfg.data.name} '{cfg.data.test_split}' split "
          f"(fusion metrics: profile '{cfg.eval.profile}'):\n"
          f"| method | n | {' | '.join(keys)} |\n|---|---|{'---|' * len(keys)}\n"
          f"| {method} | {len(rows)} | {' | '.join(_fmt(results[k]) for k in keys)} |\n")
    return {f"eval/{k}": v for k, v in results.items()}


def _parse_fused(specs: Sequence[str], root: str | None) -> dict[str, Path]:
    """``{method: folder}`` from ``--fused NAME=DIR ...`` and the sub-folders of ``--fused-root``.

    Raises:
        ValueError: a malformed or duplicate name (a method is never silently dropped), or no method.
        FileNotFoundError: ``--fused-root`` does not exist.
    """
    fused: dict[str, Path] = {}
    if root:
        root_dir = Path(root)
        if not root_dir.is_dir():
            raise (ValueError if root_dir.exists() else FileNotFoundError)(
                f"--fused-root {root_dir} {'is not a folder' if root_dir.exists() else 'does not exist'}")
        for d in sorted(root_dir.iterdir()):
            if d.is_dir():
                fused[d.name] = d
    for spec in specs or []:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--fused expects NAME=DIR, got {spec!r}")
        if name in fused:
            where = "given twice in --fused" if not (root and fused[name].parent == Path(root)) else \
                f"also a sub-folder of --fused-root {root}"
            raise ValueError(f"method name {name!r} is {where}; every method needs its own name")
        fused[name] = Path(folder)
    if not fused:
        raise ValueError("no methods: give --fused NAME=DIR ... and/or --fused-root DIR (with sub-folders)")
    return fused


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    sources = p.add_mutually_exclusive_group(required=True)
    sources.add_argument("--ir", help="folder of infrared images (with --vi)")
    sources.add_argument("--pairs", help="folder of A/B source pairs <scene>/<scene>_A.*, _B.* (MEF, MFF)")
    p.add_argument("--vi", help="folder of visible images (with --ir)")
    p.add_argument("--fused", nargs="+", default=[], metavar="NAME=DIR", help="method name and its folder")
    p.add_argument("--fused-root", help="folder whose sub-folders are methods")
    p.add_argument("--profile", default="reference",
                   help="reference | vifb | mefb | tang | tang_legacy | cddfuse")
    p.add_argument("--metrics", default=None, help="comma-separated names, or 'all' (default: the profile's toolbox order, else the "
                        "standard IVF metrics: " + ",".join(STANDARD_METRICS) + ")")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--out", required=True, help="output folder (must be absent or empty)")
    p.add_argument("--stretch-16bit", action="store_true",
                   help="stretch each 16-bit image's min-max to [0, 1] (raw sensor counts) instead of /65535")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command: exit 0, or 2 with one ``error:`` line and nothing written (see the module docstring)."""
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if (args.ir is None) != (args.vi is None):
            raise ValueError("--ir and --vi go together (or give --pairs for A/B source pairs)")
        fused = _parse_fused(args.fused, args.fused_root)
        inputs = [f for f in (args.ir, args.vi, args.pairs, args.fused_root, *fused.values()) if f is not None]
        _check_out(out, inputs)
        result = evaluate_folders(
            args.ir, args.vi, fused, pairs=args.pairs, profile=args.profile, metrics=args.metrics,
            device=args.device, progress=not args.no_progress, stretch16=args.stretch_16bit,
        )
        sources = {"pairs": args.pairs} if args.pairs else {"ir": args.ir, "vi": args.vi}
        inputs = {**sources, **{f"fused/{k}": v for k, v in fused.items()}}
        write_outputs(result, out, inputs=inputs)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, OutputError) as err:
        message = str(err.args[0]) if type(err) is KeyError and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    if result.unmatched:
        print(f"{len(result.unmatched)} unmatched file(s):", file=sys.stderr)
        for line in result.unmatched:
            print(f"  {line}", file=sys.stderr)
    print(f"profile {result.profile}: {len(result.rows)} (image, method) rows → {out}")
    print(markdown_table(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
