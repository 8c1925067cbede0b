"""Training plots of a run directory, drawn from its ``metrics.csv`` (matplotlib, Agg backend: no display).

    python experiments/plots.py outputs/seg/20261123-101500-s0

writes ``plots/losses.png`` (every ``loss/*`` curve: lower, upper, validation), ``plots/agg_weights.png`` (the
aggregation-weight trajectory ``agg/weight/*``), ``plots/hypergrad.png`` (per-constraint hypergradient norms
and pairwise cosines) and ``plots/lr.png``. A figure whose keys never appear in the CSV is skipped. The runner
calls :func:`make_plots` at the end of every run.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.cli import ArgumentParser

__all__ = ["main", "make_plots", "read_metrics"]

FIGURES = {
    "losses.png": ("Losses", ("loss/",), True),
    "agg_weights.png": ("Aggregation weights", ("agg/weight/",), False),
    "hypergrad.png": ("Hypergradient norms and cosines", ("hypergrad/norm/", "hypergrad/cos/"), True),
    "lr.png": ("Learning rates", ("lr/",), True),
}


def read_metrics(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``metrics.csv`` → {key: (steps, values)} with empty and non-finite cells left out."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row["step"]))
            for key, cell in row.items():
                if key == "step" or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(step)
                    values.append(value)
    return series


def _plot(series, keys: Sequence[str], title: str, out: Path, split_axes: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[str]] = {}
    for key in keys:   # one panel per family (e.g. loss/lower, loss/upper, hypergrad/norm) when split
        family = key.rsplit("/", 1)[0] if split_axes else title
        groups.setdefault(family, []).append(key)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.0 * len(groups), 3.6), squeeze=False)
    for ax, (family, members) in zip(axes[0], groups.items()):
        for key in members:
            steps, values = series[key]
            ax.plot(steps, values, label=key.rsplit("/", 1)[-1], marker="." if len(steps) < 30 else None)
        if split_axes:
            ax.set_title(family)
        ax.set_xlabel("iteration")
        positive = all(v > 0 for k in members for v in series[k][1])
        spread = [v for k in members for v in series[k][1]]
        if family.startswith(("loss", "hypergrad/norm", "lr")) and positive and spread and \
                max(spread) / max(min(spread), 1e-30) > 50:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def make_plots(run_dir: str | Path) -> list[Path]:
    """Draw every figure whose keys appear in ``<run_dir>/metrics.csv``; returns the written files."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    series = read_metrics(path)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, (title, prefixes, split_axes) in FIGURES.items():
        keys = [k for k in series if k.startswith(prefixes)]
        if keys:
            _plot(series, keys, title, out_dir / name, split_axes)
            written.append(out_dir / name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description="Plot training curves of run directories (metrics.csv).")
    parser.add_argument("run_dirs", nargs="+", help="run directories")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        written = make_plots(run_dir)
        if not written:
            print(f"{run_dir}: no metrics.csv with plottable keys", file=sys.stderr)
            status = 1
        for p in written:
            print(p)
    return status


if __name__ == "__main__":
    sys.exit(main())
