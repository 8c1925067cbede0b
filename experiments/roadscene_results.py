"""Regenerate ``results/`` from the committed RoadScene checkpoints (issue 7), on CPU in fp32.

    python experiments/roadscene_results.py --data $DATA --out results --overwrite

For each checkpoint (default: the three of ``checkpoints/``, named by file stem) this runs the commands a user
would run by hand — ``experiments/fuse.py`` on the 21 VIFB pairs and on the held-out RoadScene test split
(``data.holdout=10``: every 10th pair by sorted name, the split the runs never trained on), then
``experiments/evaluate.py --profile reference`` (VIFB: against the 25 published methods' outputs in
``vifb/fused``) and ``experiments/tables.py --rank`` — and writes under ``--out``:

* ``vifb/tables.md`` (+ ``.tex``): the 25 methods + ours, means over 21 pairs, best in bold, and each of
  our checkpoints' rank among the 25 published methods plus itself;
* ``roadscene/tables.md`` (+ ``.tex``): our checkpoints on the RoadScene test split;
* ``*/summary.csv`` and ``*/per_image.csv``: the numbers behind the tables.

Fused images go to a scratch folder (``--work``, default a new temporary folder) so nothing is overwritten.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from experiments import evaluate, fuse, tables
from experiments.cli import ArgumentParser
from experiments.data import holdout_indices

__all__ = ["DEFAULT_CHECKPOINTS", "METRICS", "main", "roadscene_test_folder"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINTS = tuple(ROOT / "checkpoints" / f"{name}.pt" for name in (
    "bdl_roadscene_seg", "bdl_roadscene_seg_hg_none", "bdl_roadscene_critic_only"))
METRICS = "EN,SD,SF,AG,MI,SCD,VIF,Qabf,SSIM"
HOLDOUT = 10


def roadscene_test_folder(roadscene: Path, work: Path, every: int = HOLDOUT) -> Path:
    """Link the held-out test pairs of ``data.holdout=every`` into ``work/roadscene_test/{ir,vi}``."""
    from fusion.data import create_dataset

    base = create_dataset("roadscene", roadscene, split="all")
    folder = work / "roadscene_test"
    for sub in ("ir", "vi"):
        (folder / sub).mkdir(parents=True)
    for i in holdout_indices(len(base), "test", every):
        record = base.records[i]
        (folder / "ir" / record.ir.name).symlink_to(record.ir.resolve())
        (folder / "vi" / record.vis.name).symlink_to(record.vis.resolve())
    return folder


def _run(step: str, fn, argv: list[str]) -> None:
    print(f"\n== {step}: {' '.join(argv)}", flush=True)
    if fn(argv) != 0:
        raise SystemExit(f"error: {step} failed")


def _outputs(out: Path) -> list[Path]:
    return [out / n for n in ("tables.md", "tables.tex", "summary.csv", "per_image.csv")]


def _publish(eval_dir: Path, out: Path, ranked: Sequence[str]) -> None:
    """Tables and CSVs of ``eval_dir`` into ``out``, replacing those there (``main`` checked --overwrite)."""
    out.mkdir(parents=True, exist_ok=True)
    rank = ["--rank", ",".join(ranked)] if ranked else []
    _run("tables", tables.main, [str(eval_dir), "--metrics", METRICS, *rank, "--out", str(out), "--overwrite"])
    for name in ("summary.csv", "per_image.csv"):
        shutil.copyfile(eval_dir / name, out / name)


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder holding vifb/ and roadscene/ (e.g. $DATA, the folder that holds your datasets)")
    p.add_argument("--checkpoints", nargs="+", default=[str(c) for c in DEFAULT_CHECKPOINTS],
                   help="checkpoints to evaluate (method name = file stem)")
    p.add_argument("--out", default=str(ROOT / "results"), help="where the tables go")
    p.add_argument("--work", help="scratch folder for fused images (default: a new temporary folder)")
    p.add_argument("--overwrite", action="store_true", help="replace existing tables under --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    for sub in ("vifb/ir", "vifb/vi", "vifb/fused", "roadscene/ir", "roadscene/vi"):
        if not (data / sub).is_dir():
            print(f"error: {data / sub} is missing (--data must hold vifb/ and roadscene/)", file=sys.stderr)
            return 2
    checkpoints = [Path(c) for c in args.checkpoints]
    missing = [c for c in checkpoints if not c.is_file()]
    if missing:
        print(f"error: checkpoint {missing[0]} not found", file=sys.stderr)
        return 2
    existing = [t for set_name in ("vifb", "roadscene") for t in _outputs(out / set_name) if t.exists()]
    if existing and not args.overwrite:
        print(f"error: {existing[0]} exists; pass --overwrite to regenerate the results", file=sys.stderr)
        return 2
    names = [c.stem for c in checkpoints]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="roadscene_results_"))
    work.mkdir(parents=True, exist_ok=True)
    test = roadscene_test_folder(data / "roadscene", work)
    sets = {"vifb": (data / "vifb" / "ir", data / "vifb" / "vi"), "roadscene": (test / "ir", test / "vi")}
    for set_name, (ir, vi) in sets.items():
        fused = []
        for ckpt, name in zip(checkpoints, names):
            target = work / "fused" / set_name / name
            _run(f"fuse {set_name} with {name}", fuse.main,
                 ["--checkpoint", str(ckpt), "--ir", str(ir), "--vi", str(vi), "--out", str(target)])
            fused.append(f"{name}={target}")
        published = ["--fused-root", str(data / "vifb" / "fused")] if set_name == "vifb" else []
        eval_dir = work / "eval" / set_name
        _run(f"evaluate {set_name}", evaluate.main,
             ["--ir", str(ir), "--vi", str(vi), *published, "--fused", *fused, "--profile", "reference",
              "--metrics", METRICS, "--device", "cpu", "--out", str(eval_dir), "--no-progress"])
        _publish(eval_dir, out / set_name, names if published else [])
    print(f"\nwrote {out / 'vifb'} and {out / 'roadscene'} (fused images and raw outputs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
