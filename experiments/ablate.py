"""Does the bi-level coupling help? A preset and its ablations over N seeds, at equal budget, in one table.

    python experiments/ablate.py --preset recipe_roadscene_seg --data-root $DATA/roadscene \\
        --vifb $DATA/vifb --seeds 3 --out ablations/recipe

Variants (each a plain ``run.py`` command, printed in the table so every row can be reproduced by hand):

* ``full``: the preset as it is;
* ``hypergrad_none``: ``--hypergrad none`` (constraints train on the fused images, but no hypergradient
  reaches the fusion net: only the fusion loss moves it);
* ``critic_only``: ``--task critic`` (the semantic constraint removed);
* ``fusion_only``: ``--task fusion`` (single-level training on the fusion loss).

Every variant runs the preset's iterations, so the budget is equal in iterations. Each run evaluates on its
own held-out test split (``run.py``'s ``eval/summary.csv``); with ``--vifb`` each final checkpoint also fuses
the VIFB pairs, scored with ``evaluate.py``'s code. ``ablation.md`` holds mean ± std over seeds per metric,
``runs.csv`` every run's values and its command.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bilevel.registry import UnknownNameError
from experiments import fuse
from experiments.cli import ArgumentParser, resolve_device
from experiments.config import ConfigError
from experiments.evaluate import evaluate_folders
from experiments.experiment import check_names
from experiments.presets import list_presets

__all__ = ["VARIANTS", "main"]

RUN = Path(__file__).resolve().with_name("run.py")
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "hypergrad_none": ["--hypergrad", "none"],
    "critic_only": ["--task", "critic"],
    "fusion_only": ["--task", "fusion"],
}
VIFB_METRICS = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")


class AblationError(ValueError):
    """Bad arguments, found before any run starts."""


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="experiments/ablate.py", description=__doc__.split("\n\n")[0],
                       epilog="Any further arguments (e.g. --iters 500 --set train.batch=8 --device cuda) "
                              "are passed to every run.py command.")
    p.add_argument("--preset", required=True, help="preset to ablate")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 … N-1 per variant (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--vifb", help="VIFB folder (ir/, vi/): also score every final checkpoint on its 21 pairs")
    p.add_argument("--out", required=True, help="output folder (must be absent or empty)")
    return p


def _check(args: argparse.Namespace) -> list[str]:
    if args.preset not in list_presets():
        raise AblationError(f"unknown preset {args.preset!r}; choose from {', '.join(list_presets())}")
    if args.seeds < 1:
        raise AblationError(f"--seeds={args.seeds} must be >= 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise AblationError(f"--variants: unknown {unknown or 'empty list'}; choose from {', '.join(VARIANTS)}")
    if args.vifb and not all((Path(args.vifb) / sub).is_dir() for sub in ("ir", "vi")):
        raise AblationError(f"--vifb {args.vifb} must hold ir/ and vi/ folders")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AblationError(f"--out {out} exists and is not an empty folder; choose a new one")
    return variants


def _check_run_arguments(preset: str, extra: list[str]) -> None:
    """What run.py checks before building anything, for one variant's command: a bad passed-through argument
    fails here, before the output folder or any run exists."""
    from experiments import run

    cfg = run.resolve_config(run.get_args_parser().parse_args(["--preset", preset, *extra]))
    check_names(cfg)
    run.check_kwargs(cfg)
    resolve_device(cfg.train.device)


def _summary(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "eval" / "summary.csv", newline="", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    return {k: float(v) for k, v in row.items() if k not in ("method", "n_images")}


def _vifb(checkpoint: Path, vifb: Path, work: Path) -> dict[str, float]:
    """Fuse the VIFB pairs with ``checkpoint`` and score them (reference profile)."""
    target = work / "fused"
    code = fuse.main(["--checkpoint", str(checkpoint), "--ir", str(vifb / "ir"), "--vi", str(vifb / "vi"),
                      "--out", str(target)])
    if code != 0:
        raise RuntimeError(f"fuse.py failed on {checkpoint}")
    result = evaluate_folders(vifb / "ir", vifb / "vi", {"run": target}, metrics=list(VIFB_METRICS),
                              progress=False)
    return {f"vifb/{m}": result.summary["run"][m] for m in VIFB_METRICS}


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4g}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4g} ± {std:.2g}"


def write_table(rows: Sequence[dict], out: Path, preset: str) -> Path:
    """``ablation.md``: per variant and metric, mean ± sample std over seeds, then the commands."""
    metrics = list(dict.fromkeys(k for r in rows for k in r["values"]))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [f"# Ablation of `{preset}` (mean ± std over seeds)", "",
             "| variant | seeds | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        cells = [_mean_std([r["values"].get(m, math.nan) for r in mine]) for m in metrics]
        lines.append(f"| {v} | {len(mine)} | " + " | ".join(cells) + " |")
    lines += ["", "`vifb/*`: the 21 VIFB pairs; the others: the run's own held-out test split.", "",
              "Commands:", ""]
    lines += [f"- `{r['command']}`" for r in rows]
    path = out / "ablation.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args, passthrough = get_args_parser().parse_known_args(argv)
    try:
        variants = _check(args)
        for variant in variants:
            _check_run_arguments(args.preset, [*VARIANTS[variant], *passthrough])
    except (AblationError, ConfigError, UnknownNameError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as stop:   # run.py's command line refused them (its error line is printed)
        return stop.code if isinstance(stop.code, int) else 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in variants:
        for seed in range(args.seeds):
            runs = out / "runs" / variant
            cmd = [sys.executable, str(RUN), "--preset", args.preset, "--seed", str(seed), "--out", str(runs),
                   "--wandb", "disabled", *VARIANTS[variant], *passthrough]
            shown = shlex.join(["python", "experiments/run.py", *cmd[2:]])
            print(f"== {variant}, seed {seed}: {shown}", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                (out / f"{variant}_seed{seed}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"error: run {variant} seed {seed} failed: {last} (log: {out / f'{variant}_seed{seed}.log'})",
                      file=sys.stderr)
                return 2 if done.returncode == 2 else 1
            run_dir = Path(next(line.split("results: ", 1)[1] for line in done.stdout.splitlines()
                                if line.startswith("results: ")))
            values = _summary(run_dir)
            if args.vifb:
                with tempfile.TemporaryDirectory() as tmp:
                    values.update(_vifb(run_dir / "checkpoints" / "last.pt", Path(args.vifb), Path(tmp)))
            rows.append({"variant": variant, "seed": seed, "run_dir": str(run_dir), "command": shown,
                         "values": values})
    metrics = list(dict.fromkeys(k for r in rows for k in r["values"]))
    with open(out / "runs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", *metrics, "run_dir", "command"])
        for r in rows:
            writer.writerow([r["variant"], r["seed"], *(r["values"].get(m, math.nan) for m in metrics),
                             r["run_dir"], r["command"]])
    print(f"wrote {write_table(rows, out, args.preset)} and {out / 'runs.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
