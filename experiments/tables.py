"""Paper-style tables (markdown and LaTeX) from run directories and ``evaluate.py`` outputs.

    python experiments/tables.py outputs/seg/20261123-*-s0 outputs/fusion/20261123-*-s0
    python experiments/tables.py RUN_A RUN_B --paper bdl_mfnet_seg --out results/   # writes tables.md/.tex

Each argument is a run directory (results in ``eval/``) or a folder written by
``experiments/evaluate.py --out`` (``summary.csv`` with one row per method). Three tables are built from
whatever the folders hold:

* **fusion metrics**: methods × metrics (``summary.csv`` means), the best value of each column in bold
  according to the metric's direction (lower is better for CE, MSE, RMSE, Nabf, Qcv);
* **segmentation** in the layout of BDL's Table 3: per class Acc and IoU, then mAcc and mIoU, in percent
  (from ``seg_per_class.csv``; the "unlabelled" class is listed only with ``--seg-classes all``, but the
  means are the run's own, over all classes as evaluated);
* **detection**: per-class AP@0.5 and mAP@0.5 (from ``det_per_class.csv``);
* with ``--rank NAME``: the rank of NAME on each fusion metric among the other methods plus itself.

``--paper PRESET`` adds the published rows of ``experiments/paper_values/PRESET.csv``, alone or next to
run folders (``python experiments/tables.py --paper bdl_mfnet_seg`` prints the paper's table). The CSV has one
row per number: ``method, metric, value, source, citation``, where ``metric`` is ``mIoU``, ``mAcc``,
``mAP50``, ``IoU/<class>``, ``Acc/<class>`` or ``AP50/<class>``, ``value`` a fraction (empty when the number
could not be found: the cell shows "–"), ``source`` the paper and table the number comes from (required on
every row) and ``citation`` the method's own paper. Each table with published rows lists these citations
under it. Markdown goes to stdout (``--format tex`` for LaTeX);
``--out DIR`` writes both ``tables.md`` and ``tables.tex`` (an existing table is replaced only with
``--overwrite``, and atomically). Method names are escaped in both formats (``|`` in markdown; all of
``\\ & % $ # _ { } ~ ^`` in LaTeX). A bad input exits with code 2 and one ``error:`` line.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.cli import ArgumentParser

__all__ = [
    "Source",
    "det_table",
    "fusion_table",
    "load_sources",
    "main",
    "md_escape",
    "paper_sources",
    "rank_table",
    "render",
    "seg_table",
    "tex_escape",
]

PAPER_DIR = Path(__file__).resolve().parent / "paper_values"
LOWER_IS_BETTER = {"CE", "MSE", "RMSE", "Nabf", "Qcv"}    # contracts.md
NOT_FUSION = {"method", "n_images", "mIoU", "mAcc", "aAcc", "mAP50"}
DASH = "–"


@dataclass
class Source:
    """One method's results: fusion-metric means and optional per-class task results."""

    method: str
    path: Path
    metrics: dict[str, float] = field(default_factory=dict)
    seg: dict[str, tuple[float, float]] | None = None        # class → (Acc, IoU), fractions
    det: dict[str, float] | None = None                      # class → AP50, fraction
    paper: bool = False
    citation: str = ""                                       # published rows: the method's own paper
    provenance: list[str] = field(default_factory=list)      # published rows: where the numbers come from


def _float(cell: str | None) -> float:
    try:
        return float(cell) if cell not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _read_rows(path: Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """The rows of a CSV; a file that is not UTF-8 CSV or lacks a ``required`` column names itself."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a readable CSV file ({err})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}")
    return rows


def load_sources(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[Source]:
    """Read run directories / evaluate.py folders into :class:`Source` rows (one per method).

    Raises:
        FileNotFoundError: a folder holds neither ``eval/summary.csv`` nor ``summary.csv``.
    """
    sources: list[Source] = []
    for path in map(Path, paths):
        eval_dir = path / "eval" if (path / "eval" / "summary.csv").is_file() else path
        summary = eval_dir / "summary.csv"
        if not summary.is_file():
            raise FileNotFoundError(f"{path}: no eval/summary.csv (run directory) or summary.csv "
                                    "(evaluate.py --out folder)")
        rows = _read_rows(summary)
        seg = det = None
        if (eval_dir / "seg_per_class.csv").is_file():
            seg = {r["class"]: (_float(r["Acc"]), _float(r["IoU"]))
                   for r in _read_rows(eval_dir / "seg_per_class.csv", ("class", "Acc", "IoU"))}
        if (eval_dir / "det_per_class.csv").is_file():
            det = {r["class"]: _float(r["AP50"]) for r in _read_rows(eval_dir / "det_per_class.csv", ("class", "AP50"))}
        for row in rows:
            metrics = {k: _float(v) for k, v in row.items() if k not in ("method", "n_images")}
            sources.append(Source(row.get("method") or path.name, path, metrics,
                                  seg if len(rows) == 1 else None, det if len(rows) == 1 else None))
    if labels:
        if len(labels) != len(sources):
            raise ValueError(f"{len(labels)} labels for {len(sources)} methods")
        for s, label in zip(sources, labels):
            s.method = label
    seen: dict[str, int] = {}
    for s in sources:   # the same run name twice (e.g. two seeds): add the folder name
        seen[s.method] = seen.get(s.method, 0) + 1
    for s in sources:
        if seen[s.method] > 1:
            s.method = f"{s.method} ({s.path.name})"
    return sources


def paper_sources(preset: str) -> list[Source]:
    """Published rows of ``paper_values/<preset>.csv`` (fractions, like our results), one per method.

    Summary metrics go to ``metrics``, ``IoU/<class>``/``Acc/<class>`` to ``seg`` and ``AP50/<class>`` to
    ``det``; an empty ``value`` is a number the paper has but we could not find (NaN, shown as "–").

    Raises:
        FileNotFoundError: no such preset.
        ValueError: a row without a source, a value that is not a number, an unknown metric name.
    """
    path = PAPER_DIR / f"{preset}.csv"
    if not path.is_file():
        valid = sorted(p.stem for p in PAPER_DIR.glob("*.csv"))
        raise FileNotFoundError(f"no published values for {preset!r}; available: {', '.join(valid)}")
    by_method: dict[str, Source] = {}
    for line, row in enumerate(_read_rows(path, ("method", "metric", "value", "source")), start=2):
        if not (row.get("source") or "").strip():
            raise ValueError(f"{path}:{line}: every published value needs a source (paper and table)")
        try:
            value = float(row["value"]) if row["value"].strip() else math.nan
        except ValueError:
            raise ValueError(f"{path}:{line}: value {row['value']!r} is not a number") from None
        src = by_method.setdefault(row["method"], Source(f"{row['method']} (paper)", path, paper=True))
        src.citation = src.citation or (row.get("citation") or "").strip()
        if row["source"] not in src.provenance:
            src.provenance.append(row["source"])
        kind, _, cls = row["metric"].partition("/")
        if kind in ("IoU", "Acc") and cls:
            acc, iou = (src.seg or {}).get(cls, (math.nan, math.nan))
            src.seg = {**(src.seg or {}), cls: (value, iou) if kind == "Acc" else (acc, value)}
        elif kind == "AP50" and cls:
            src.det = {**(src.det or {}), cls: value}
        elif not cls and row["metric"] in ("mIoU", "mAcc", "aAcc", "mAP50"):
            src.metrics[row["metric"]] = value
        else:
            raise ValueError(f"{path}:{line}: unknown metric {row['metric']!r} (mIoU, mAcc, aAcc, mAP50, "
                             "IoU/<class>, Acc/<class> or AP50/<class>)")
    return list(by_method.values())


def _citations(sources: Sequence[Source]) -> list[str]:
    """One line per published row shown: the method's paper and where its numbers come from."""
    lines = []
    for s in sources:
        if s.paper:
            values = [*s.metrics.values(), *(v for pair in (s.seg or {}).values() for v in pair),
                      *(s.det or {}).values()]
            gaps = "; – = a number of that table we could not find" if any(math.isnan(v) for v in values) else ""
            lines.append(f"{s.method}: {s.citation or 'citation not given'}; numbers from "
                         f"{' and '.join(s.provenance)}{gaps}")
    return lines


def _direction(metric: str) -> bool:
    """True when higher is better (the metric registry decides; contracts.md's list as a fallback)."""
    try:
        from fusion.metrics.registry import higher_is_better

        return higher_is_better(metric)
    except (ImportError, KeyError):
        return metric not in LOWER_IS_BETTER


def _canonical_order() -> list[str]:
    try:
        from fusion.metrics.registry import CANONICAL_ORDER

        return list(CANONICAL_ORDER)
    except ImportError:
        return []


@dataclass
class Table:
    """A rendered-agnostic table: header rows, body rows of (text, bold) cells, caption."""

    caption: str
    header: list[str]
    rows: list[list[tuple[str, bool]]]
    groups: list[tuple[str, int]] | None = None    # optional spanning header: (label, n columns)
    notes: list[str] = field(default_factory=list)  # lines under the table (citations of published rows)


def _best(values: list[float], higher: bool) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if higher else min(finite)


def fusion_table(sources: Sequence[Source], metrics: Sequence[str] | None = None, digits: int = 4) -> Table | None:
    """Methods × fusion metrics, best per column in bold."""
    present = [m for s in sources for m in s.metrics if m not in NOT_FUSION and "/" not in m]
    if metrics:
        lookup = {m.lower(): m for m in present}
        cols = [lookup[m.lower()] for m in metrics if m.lower() in lookup]
    else:
        order = {m: i for i, m in enumerate(_canonical_order())}
        cols = sorted(dict.fromkeys(present), key=lambda m: order.get(m, len(order)))
    if not cols:
        return None
    best = {m: _best([s.metrics.get(m, math.nan) for s in sources], _direction(m)) for m in cols}
    rows = []
    for s in sources:
        cells = [(s.method, False)]
        for m in cols:
            v = s.metrics.get(m, math.nan)
            cells.append((f"{v:.{digits}f}" if math.isfinite(v) else DASH, best[m] is not None and v == best[m]))
        rows.append(cells)
    arrows = [f"{m} {'↑' if _direction(m) else '↓'}" for m in cols]
    return Table("Fusion metrics (means over the test images; best in bold)", ["Method", *arrows], rows)


def rank_table(sources: Sequence[Source], ranked: Sequence[str], metrics: Sequence[str] | None = None) -> Table | None:
    """Rank (1 = best) of each method in ``ranked`` among the *other* methods plus itself, per metric.

    Why "plus itself": a paper ranks its model among the published ones; our own variants (e.g. ablations)
    must not push one another down. Ties share the better rank; a missing value has no rank.
    """
    base = fusion_table(sources, metrics)
    if base is None or not ranked:
        return None
    cols = [h.rsplit(" ", 1)[0] for h in base.header[1:]]
    by_name = {s.method: s for s in sources}
    unknown = [m for m in ranked if m not in by_name]
    if unknown:
        raise ValueError(f"--rank: no method named {', '.join(unknown)}; methods: {', '.join(by_name)}")
    others = [s for s in sources if s.method not in ranked]
    rows = []
    for name in ranked:
        cells = [(name, False)]
        for m in cols:
            v = by_name[name].metrics.get(m, math.nan)
            field_ = [o.metrics.get(m, math.nan) for o in others]
            if not math.isfinite(v):
                cells.append((DASH, False))
                continue
            better = sum(1 for o in field_ if math.isfinite(o) and (o > v if _direction(m) else o < v))
            cells.append((str(1 + better), better == 0))
        rows.append(cells)
    return Table(f"Rank among the {len(others)} other methods plus itself (1 = best)",
                 ["Method", *(f"{m} {'↑' if _direction(m) else '↓'}" for m in cols)], rows)


def seg_table(sources: Sequence[Source], include_unlabelled: bool = False) -> Table | None:
    """BDL Table 3 layout: per class Acc / IoU, then mAcc / mIoU (percent)."""
    with_seg = [s for s in sources if s.seg is not None or "mIoU" in s.metrics]
    if not any(s.seg for s in with_seg) and not any(s.paper for s in with_seg):
        return None
    ours = [s for s in with_seg if not s.paper]   # published rows fill our columns; alone, they set them
    classes = list(dict.fromkeys(c for s in (ours if any(s.seg for s in ours) else with_seg) if s.seg
                                 for c in s.seg))
    if not include_unlabelled:
        classes = [c for c in classes if c.lower() != "unlabelled"]
    columns: list[list[float]] = []
    rows_values = []
    for s in with_seg:
        values = []
        for c in classes:
            acc, iou = (s.seg or {}).get(c, (math.nan, math.nan))
            values += [acc, iou]
        values += [s.metrics.get("mAcc", math.nan), s.metrics.get("mIoU", math.nan)]
        rows_values.append(values)
    columns = [list(col) for col in zip(*rows_values)]
    best = [_best(col, True) for col in columns]
    rows = []
    for s, values in zip(with_seg, rows_values):
        rows.append([(s.method, False)] + [(f"{100 * v:.1f}" if math.isfinite(v) else DASH,
                                            b is not None and v == b) for v, b in zip(values, best)])
    header = ["Method"] + [x for _ in classes for x in ("Acc", "IoU")] + ["mAcc", "mIoU"]
    groups = [("", 1)] + [(c, 2) for c in classes] + [("", 2)]
    return Table("Segmentation (%, MFNet protocol: means over all evaluated classes; best in bold)", header, rows,
                 groups, _citations(with_seg))


def det_table(sources: Sequence[Source]) -> Table | None:
    """Per-class AP@0.5 and mAP@0.5."""
    with_det = [s for s in sources if s.det is not None or "mAP50" in s.metrics]
    if not any(s.det for s in with_det) and not any(s.paper for s in with_det):
        return None
    ours = [s for s in with_det if not s.paper]
    classes = list(dict.fromkeys(c for s in (ours if any(s.det for s in ours) else with_det) if s.det
                                 for c in s.det))
    rows_values = [[(s.det or {}).get(c, math.nan) for c in classes] + [s.metrics.get("mAP50", math.nan)]
                   for s in with_det]
    best = [_best(list(col), True) for col in zip(*rows_values)]
    rows = [[(s.method, False)] + [(f"{v:.3f}" if math.isfinite(v) else DASH, b is not None and v == b)
                                   for v, b in zip(values, best)] for s, values in zip(with_det, rows_values)]
    return Table("Detection (VOC AP@0.5; best in bold)", ["Method", *classes, "mAP"], rows,
                 notes=_citations(with_det))


def _md(table: Table) -> str:
    header = list(table.header)
    if table.groups:   # markdown has no spanning cells: prefix the class to each of its columns
        header, i = [], 0
        for label, span in table.groups:
            for j in range(span):
                header.append(f"{label} {table.header[i + j]}".strip())
            i += span
    lines = [f"**{table.caption}**", "", "| " + " | ".join(md_escape(h) for h in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.rows:
        lines.append("| " + " | ".join(f"**{md_escape(t)}**" if b else md_escape(t) for t, b in row) + " |")
    if table.notes:
        lines += ["", *(f"- {note}" for note in table.notes)]
    return "\n".join(lines) + "\n"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "↑": r"$\uparrow$", "↓": r"$\downarrow$", DASH: "--"}


def tex_escape(text: str) -> str:
    """``text`` as literal LaTeX: every special character (\\ & % $ # _ { } ~ ^) escaped in one pass, so a
    method name can never break the tabular or inject a command."""
    return "".join(_TEX_SPECIAL.get(c, c) for c in text)


def md_escape(text: str) -> str:
    """``text`` as one markdown table cell: a ``|`` would start a new column, a newline a new row."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _tex(table: Table) -> str:
    n = len(table.header)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(table.caption)}}}",
             r"\resizebox{\linewidth}{!}{%", rf"\begin{{tabular}}{{l{'c' * (n - 1)}}}", r"\toprule"]
    if table.groups:
        cells, rules, col = [], [], 1
        for label, span in table.groups:
            cells.append(rf"\multicolumn{{{span}}}{{c}}{{{tex_escape(label)}}}" if span > 1 else tex_escape(label))
            if label:
                rules.append(rf"\cmidrule(lr){{{col}-{col + span - 1}}}")
            col += span
        lines.append(" & ".join(cells) + r" \\")
        lines.append(" ".join(rules))
    lines.append(" & ".join(tex_escape(h) for h in table.header) + r" \\")
    lines.append(r"\midrule")
    for row in table.rows:
        lines.append(" & ".join(rf"\textbf{{{tex_escape(t)}}}" if b else tex_escape(t) for t, b in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}"]
    if table.notes:
        lines += [r"\par\footnotesize", *(tex_escape(note) + r"\\" for note in table.notes)]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def render(tables: Sequence[Table], fmt: str) -> str:
    """All tables as markdown (``md``) or LaTeX (``tex``)."""
    fn = _md if fmt == "md" else _tex
    return "\n".join(fn(t) for t in tables)


def build_tables(sources: Sequence[Source], metrics: Sequence[str] | None = None,
                 include_unlabelled: bool = False, ranked: Sequence[str] = ()) -> list[Table]:
    fusion_sources = [s for s in sources if not s.paper]
    tables = [fusion_table(fusion_sources, metrics), rank_table(fusion_sources, ranked, metrics),
              seg_table(sources, include_unlabelled), det_table(sources)]
    return [t for t in tables if t is not None]


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Paper-style tables from run directories / evaluate.py outputs.")
    p.add_argument("dirs", nargs="*", help="run directories or evaluate.py --out folders (none: --paper alone)")
    p.add_argument("--labels", help="comma-separated method names, one per method row")
    p.add_argument("--metrics", help="comma-separated fusion metrics to show (default: all present)")
    p.add_argument("--paper", action="append", default=[], help="add published rows of paper_values/NAME.csv")
    p.add_argument("--seg-classes", choices=("labelled", "all"), default="labelled",
                   help="'all' also lists the unlabelled class")
    p.add_argument("--rank", action="append", default=[],
                   help="also rank this method among the others (repeatable; comma-separated names allowed)")
    p.add_argument("--format", choices=("md", "tex"), default="md", help="what to print")
    p.add_argument("--out", help="also write tables.md and tables.tex into this folder")
    p.add_argument("--overwrite", action="store_true", help="with --out: replace existing tables.md/tables.tex")
    return p


def _check_out(out: Path, overwrite: bool) -> list[Path]:
    """``tables.md``/``tables.tex`` under ``out``, checked before any work: never replaced without
    ``--overwrite``, never a folder in their place, and the folder must be writable."""
    from experiments.logging_utils import check_writable

    targets = [out / "tables.md", out / "tables.tex"]
    for t in targets:
        if t.exists() and not t.is_file():
            raise FileExistsError(f"{t} is a folder; choose another --out")
        if t.exists() and not overwrite:
            raise FileExistsError(f"{t} exists; pass --overwrite to replace it, or choose another --out")
    check_writable(out)
    return targets


def _write(targets: Sequence[Path], texts: Sequence[str]) -> None:
    """Each file via a temporary name and ``os.replace``: an existing table is either kept or fully replaced."""
    import os

    from experiments.logging_utils import output_guard

    with output_guard(targets[0].parent):
        targets[0].parent.mkdir(parents=True, exist_ok=True)
        for path, text in zip(targets, texts):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The command: exit 0, or 2 with one ``error:`` line (bad folder, label, preset, published CSV, --rank or
    --out)."""
    from experiments.logging_utils import OutputError

    args = get_args_parser().parse_args(argv)
    try:
        if not args.dirs and not args.paper:
            raise ValueError("give run directories or evaluate.py folders, or --paper NAME (or both)")
        targets = _check_out(Path(args.out), args.overwrite) if args.out else []
        sources = load_sources(args.dirs, args.labels.split(",") if args.labels else None)
        for preset in args.paper:
            sources += paper_sources(preset)
        ranked = [name for spec in args.rank for name in spec.split(",") if name]
        tables = build_tables(sources, args.metrics.split(",") if args.metrics else None,
                              args.seg_classes == "all", ranked)
        if not tables:
            raise ValueError("no results to tabulate")
        if targets:
            _write(targets, [render(tables, "md"), render(tables, "tex")])
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render(tables, args.format), end="")
    if targets:
        print(f"wrote {targets[0]} and {targets[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
