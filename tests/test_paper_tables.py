"""Published rows of experiments/paper_values/*.csv: every cell sourced, Table 3's columns, citations printed."""

from __future__ import annotations

import csv
import math

import pytest

from experiments import tables
from fusion.data.labels import MSRS_CLASSES


@pytest.mark.parametrize("path", sorted(tables.PAPER_DIR.glob("*.csv")), ids=lambda p: p.stem)
def test_every_published_row_names_its_source_and_citation(path) -> None:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    for row in rows:
        assert row["source"].strip() and row["citation"].strip(), row
        if row["value"]:
            assert 0.0 <= float(row["value"]) <= 1.0, row    # fractions, like our results


def test_bdl_table3_has_every_mfnet_class_and_the_means(capsys) -> None:
    (bdl,) = tables.paper_sources("bdl_mfnet_seg")
    assert list(bdl.seg) == list(MSRS_CLASSES)
    assert bdl.metrics == {"mIoU": 0.554, "mAcc": 0.736}
    assert all(math.isnan(v) for pair in bdl.seg.values() for v in pair)   # not found: shown as "–"
    assert tables.main(["--paper", "bdl_mfnet_seg"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| Method"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["Method", *(f"{c} {m}" for c in MSRS_CLASSES[1:] for m in ("Acc", "IoU")), "mAcc", "mIoU"]
    assert "| BDL (paper) |" in out and "**73.6** | **55.4** |" in out
    assert "- BDL (paper): Z. Liu" in out and "Table 3" in out and "could not find" in out


def test_detection_figure_rows_cite_each_method(capsys) -> None:
    assert tables.main(["--paper", "bdl_m3fd_det", "--format", "tex"]) == 0
    out = capsys.readouterr().out
    for method, value, cited in (("BDL", "0.531", "IJCAI 2023"), ("U2Fusion", "0.465", "TPAMI"),
                                 ("TarDAL", "0.404", "CVPR 2022")):
        assert f"{method} (paper) & " in out and value in out
        assert cited in next(line for line in out.splitlines() if line.startswith(f"{method} (paper): "))
    assert "Fig. 1" in out and r"\par\footnotesize" in out


def test_paper_rows_align_with_our_classes(tmp_path) -> None:
    run = tmp_path / "run" / "eval"
    run.mkdir(parents=True)
    (run / "summary.csv").write_text("method,n_images,mIoU,mAcc\nours,4,0.3,0.4\n")
    (run / "seg_per_class.csv").write_text("class,Acc,IoU\n" + "".join(f"{c},0.5,0.25\n" for c in MSRS_CLASSES))
    table = tables.seg_table(tables.load_sources([run.parent]) + tables.paper_sources("bdl_mfnet_seg"))
    assert len(table.header) == 1 + 2 * (len(MSRS_CLASSES) - 1) + 2      # no column added by the paper rows
    ours, paper = table.rows
    assert ours[1] == ("50.0", True) and paper[1] == (tables.DASH, False)
    assert paper[-1] == ("55.4", True) and ours[-1] == ("30.0", False)
    (run / "seg_per_class.csv").write_text("class,Acc,IoU\ncar,0.5,0.25\n")   # a run with one class: its columns
    run_car = tables.seg_table(tables.load_sources([run.parent]) + tables.paper_sources("bdl_mfnet_seg"))
    assert run_car.header == ["Method", "Acc", "IoU", "mAcc", "mIoU"]


@pytest.mark.parametrize("line, message", [
    ("BDL,mIoU,0.5,,c", "needs a source"),
    ("BDL,mIoU,abc,Table 3,c", "is not a number"),
    ("BDL,F1/car,0.5,Table 3,c", "unknown metric"),
])
def test_bad_published_csv_is_an_error_line(tmp_path, monkeypatch, capsys, line, message) -> None:
    (tmp_path / "bad.csv").write_text(f"method,metric,value,source,citation\n{line}\n")
    monkeypatch.setattr(tables, "PAPER_DIR", tmp_path)
    assert tables.main(["--paper", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "bad.csv:2" in err
