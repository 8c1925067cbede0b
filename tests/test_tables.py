"""experiments/tables.py on hand-written result folders: best-by-direction bolding, Table-3 layout, LaTeX."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from experiments import tables


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    a, b = tmp_path / "runA", tmp_path / "runB"
    _write(a / "eval" / "summary.csv", ["method", "n_images", "EN", "RMSE", "mIoU", "mAcc"],
           [["ours", 4, 7.0, 0.20, 0.50, 0.70]])
    _write(a / "eval" / "seg_per_class.csv", ["class", "Acc", "IoU"],
           [["unlabelled", 0.9, 0.8], ["car", 0.6, 0.4], ["person", 0.5, 0.3]])
    _write(b / "eval" / "summary.csv", ["method", "n_images", "EN", "RMSE", "mIoU", "mAcc", "mAP50"],
           [["ablation", 4, 6.5, 0.10, 0.40, 0.72, 0.25]])
    _write(b / "eval" / "seg_per_class.csv", ["class", "Acc", "IoU"],
           [["unlabelled", 0.9, 0.7], ["car", 0.7, 0.35], ["person", 0.4, 0.3]])
    _write(b / "eval" / "det_per_class.csv", ["class", "AP50", "coco_AP"], [["People", 0.3, 0.1], ["Car", 0.2, 0.1]])
    # an evaluate.py folder: several methods in one summary.csv
    c = tmp_path / "vifb"
    _write(c / "summary.csv", ["method", "n_images", "EN", "RMSE"],
           [["IFCNN", 21, 6.9, 0.05], ["U2Fusion", 21, 7.1, 0.3]])
    return [a, b, c]


def test_fusion_table_bolds_best_by_direction(runs) -> None:
    sources = tables.load_sources(runs)
    assert [s.method for s in sources] == ["ours", "ablation", "IFCNN", "U2Fusion"]
    t = tables.fusion_table(sources)
    assert t.header == ["Method", "EN ↑", "RMSE ↓"]
    cells = {row[0][0]: row[1:] for row in t.rows}
    assert cells["U2Fusion"][0] == ("7.1000", True)        # EN: higher is better
    assert cells["ours"][0] == ("7.0000", False)
    assert cells["IFCNN"][1] == ("0.0500", True)           # RMSE: lower is better
    assert cells["U2Fusion"][1] == ("0.3000", False)


def test_seg_table_follows_bdl_table3_layout(runs) -> None:
    sources = tables.load_sources(runs[:2]) + tables.paper_sources("bdl_mfnet_seg")
    t = tables.seg_table(sources)
    assert t.header == ["Method", "Acc", "IoU", "Acc", "IoU", "mAcc", "mIoU"]
    assert t.groups == [("", 1), ("car", 2), ("person", 2), ("", 2)]     # unlabelled left out of the layout
    rows = {r[0][0]: r[1:] for r in t.rows}
    assert rows["ours"] == [("60.0", False), ("40.0", True), ("50.0", True), ("30.0", True), ("70.0", False),
                            ("50.0", False)]
    assert rows["BDL (paper)"][-2:] == [("73.6", True), ("55.4", True)]  # published Table 3 values
    assert rows["BDL (paper)"][0] == (tables.DASH, False)
    assert tables.seg_table(sources, include_unlabelled=True).groups[1] == ("unlabelled", 2)


def test_det_table_and_paper_rows(runs) -> None:
    sources = tables.load_sources(runs[:2]) + tables.paper_sources("bdl_m3fd_det")
    t = tables.det_table(sources)
    assert t.header == ["Method", "People", "Car", "mAP"]
    rows = {r[0][0]: r[1:] for r in t.rows}
    assert rows["ablation"] == [("0.300", True), ("0.200", True), ("0.250", False)]
    assert rows["BDL (paper)"][-1] == ("0.531", True)
    assert "TarDAL (paper)" in rows and "ours" not in rows


def test_markdown_and_latex_rendering(runs, tmp_path, capsys) -> None:
    out = tmp_path / "tables"
    assert tables.main([*map(str, runs), "--paper", "bdl_mfnet_seg", "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert "| **U2Fusion** |" not in md and "| U2Fusion | **7.1000** |" in md
    assert "car Acc" in md and "**55.4**" in md
    tex = (out / "tables.tex").read_text()
    assert r"\textbf{7.1000}" in tex and r"\multicolumn{2}{c}{car}" in tex and r"$\downarrow$" in tex
    assert tex.count(r"\begin{table}") == 3 and (out / "tables.md").read_text() == md


def test_errors_and_labels(runs, tmp_path, capsys) -> None:
    assert tables.main([str(tmp_path / "missing")]) == 2
    assert "summary.csv" in capsys.readouterr().err
    assert tables.main([str(runs[0]), "--paper", "nope"]) == 2
    assert "bdl_mfnet_seg" in capsys.readouterr().err
    sources = tables.load_sources([runs[0], runs[0]])
    assert sources[0].method == "ours (runA)" and sources[1].method == "ours (runA)"
    assert [s.method for s in tables.load_sources(runs[:2], ["x", "y"])] == ["x", "y"]


def test_paper_values_are_the_published_numbers() -> None:
    """method.md §4: MFNet mIoU 55.4 / mAcc 73.6 (Table 3); M3FD mAP 0.531 vs U2Fusion 0.465, TarDAL 0.404."""
    seg = {s.method: s.metrics for s in tables.paper_sources("bdl_mfnet_seg")}
    det = {s.method: s.metrics for s in tables.paper_sources("bdl_m3fd_det")}
    assert seg["BDL (paper)"] == {"mIoU": 0.554, "mAcc": 0.736}
    assert det == {"BDL (paper)": {"mAP50": 0.531}, "U2Fusion (paper)": {"mAP50": 0.465},
                   "TarDAL (paper)": {"mAP50": 0.404}}


def test_rank_table_ranks_each_variant_among_the_others(runs, capsys) -> None:
    sources = tables.load_sources(runs)
    t = tables.rank_table(sources, ["ours", "ablation"])
    ranks = {row[0][0]: [text for text, _ in row[1:]] for row in t.rows}
    # EN (higher better): others are IFCNN 6.9, U2Fusion 7.1 -> ours 7.0 is 2nd, ablation 6.5 is 3rd
    # RMSE (lower better): IFCNN 0.05, U2Fusion 0.3 -> ours 0.20 is 2nd, ablation 0.10 is 2nd
    assert ranks == {"ours": ["2", "2"], "ablation": ["3", "2"]}
    assert "2 other methods" in t.caption
    assert tables.main([str(p) for p in runs] + ["--rank", "ours,nobody"]) == 2
    assert "no method named nobody" in capsys.readouterr().err


def test_no_folders_and_no_paper_is_an_error_line(capsys) -> None:
    assert tables.main([]) == 2
    assert capsys.readouterr().err.startswith("error: give run directories")


def _results_layout(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    for sub in ("vifb/ir", "vifb/vi", "vifb/fused", "roadscene/ir", "roadscene/vi"):
        (data / sub).mkdir(parents=True)
    ckpt = tmp_path / "mine.pt"
    ckpt.write_bytes(b"")
    return data, ckpt


def test_results_regeneration_refuses_existing_tables_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    """Without --overwrite: one error line naming the file, exit 2, before any fusing; the file is kept."""
    from experiments import roadscene_results

    data, ckpt = _results_layout(tmp_path)
    mine = tmp_path / "results" / "roadscene" / "tables.md"
    mine.parent.mkdir(parents=True)
    mine.write_text("my table")
    monkeypatch.setattr(roadscene_results.fuse, "main", lambda argv: pytest.fail("fused before the check"))
    argv = ["--data", str(data), "--checkpoints", str(ckpt), "--out", str(tmp_path / "results"),
            "--work", str(tmp_path / "work")]
    assert roadscene_results.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(mine) in err[0] and "--overwrite" in err[0]
    assert mine.read_text() == "my table" and not (tmp_path / "work").exists()


def test_results_regeneration_with_overwrite_replaces_the_tables(tmp_path) -> None:
    """--overwrite reaches tables.py: tables and CSVs already under --out are replaced (it failed there)."""
    from experiments import roadscene_results

    out = tmp_path / "published"
    out.mkdir()
    for target in roadscene_results._outputs(out):
        target.write_text("old")
    eval_dir = tmp_path / "eval"
    _write(eval_dir / "summary.csv", ["method", "n", "EN"], [["a", 2, 6.5], ["b", 2, 6.9]])
    _write(eval_dir / "per_image.csv", ["method", "image", "EN"], [["a", "x", 6.5], ["b", "x", 6.9]])
    roadscene_results._publish(eval_dir, out, [])
    assert all(t.read_text() != "old" for t in roadscene_results._outputs(out))
    assert "6.9" in (out / "tables.md").read_text()
