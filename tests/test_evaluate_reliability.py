"""``evaluate.py`` never gives a silently wrong result (issue 13, items 1, 5 and 8): methods are ranked only on
the same pairs, no match is an error, names are never dropped, ``--out`` is checked before any metric runs,
and a write failure leaves no partial folder."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import evaluate as ev

SIZE = (12, 14)     # EN/SD need no windows: tiny images keep these tests fast


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    for stem in ("p1", "p2", "p3"):
        _save(tmp_path / "ir" / f"{stem}.png", rng.integers(0, 256, SIZE))
        _save(tmp_path / "vi" / f"{stem}.png", rng.integers(0, 256, SIZE))
        _save(tmp_path / "fused" / "good" / f"{stem}.png", rng.integers(0, 256, SIZE))
        if stem != "p3":
            _save(tmp_path / "fused" / "partial" / f"{stem}.png", rng.integers(0, 256, SIZE))
    return tmp_path


def _args(d: Path, *fused: str, out: Path | None = None) -> list[str]:
    return ["--ir", str(d / "ir"), "--vi", str(d / "vi"), "--fused", *fused, "--metrics", "EN,SD",
            "--out", str(out or d / "out"), "--no-progress"]


def _error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


@pytest.fixture
def no_metrics(monkeypatch):
    """Fails the test if any metric is computed: validation must come first."""
    def boom(*a, **k):
        raise AssertionError("a metric ran before the inputs were validated")
    monkeypatch.setattr(ev, "score_images", boom)


def test_a_method_with_fewer_pairs_is_refused_not_ranked(data, capsys, no_metrics) -> None:
    d = data
    rc = ev.main(_args(d, f"good={d / 'fused' / 'good'}", f"partial={d / 'fused' / 'partial'}"))
    assert rc == 2
    line = _error(capsys)
    assert "'partial'" in line and "lacks 1 of the 3 pairs" in line and "p3" in line
    assert not (d / "out").exists()


def test_common_pairs_give_n_per_method(data, capsys) -> None:
    """Leaving the unmatched pair out of --ir/--vi (the documented fix) ranks both on the same 2 pairs."""
    d = data
    for sub in ("ir", "vi"):
        (d / sub / "p3.png").unlink()
    assert ev.main(_args(d, f"good={d / 'fused' / 'good'}", f"partial={d / 'fused' / 'partial'}")) == 0
    md = (d / "out" / "table.md").read_text()
    assert "| good | 2 |" in md and "| partial | 2 |" in md
    assert "p3: fused image of good without a source pair" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["stem_mismatch", "empty_folders", "ir_vi_size_mismatch"])
def test_no_matching_pair_is_an_error(tmp_path, capsys, case, no_metrics) -> None:
    rng = np.random.default_rng(0)
    for sub in ("ir", "vi", "f"):
        (tmp_path / sub).mkdir()
    if case == "stem_mismatch":
        _save(tmp_path / "ir" / "a.png", rng.integers(0, 256, SIZE))
        _save(tmp_path / "vi" / "b.png", rng.integers(0, 256, SIZE))
        _save(tmp_path / "f" / "a.png", rng.integers(0, 256, SIZE))
    elif case == "ir_vi_size_mismatch":
        _save(tmp_path / "ir" / "a.png", rng.integers(0, 256, SIZE))
        _save(tmp_path / "vi" / "a.png", rng.integers(0, 256, (SIZE[0] + 1, SIZE[1])))
        _save(tmp_path / "f" / "a.png", rng.integers(0, 256, SIZE))
    assert ev.main(_args(tmp_path, f"m={tmp_path / 'f'}")) == 2
    assert "no pair to evaluate" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_wrong_size_fused_image_is_an_error_naming_it(data, capsys, no_metrics) -> None:
    d = data
    bad = d / "fused" / "good" / "p2.png"
    _save(bad, np.zeros((SIZE[0], SIZE[1] + 3)))
    assert ev.main(_args(d, f"good={d / 'fused' / 'good'}")) == 2
    line = _error(capsys)
    assert str(bad) in line and f"{(SIZE[0], SIZE[1] + 3)}" in line
    assert not (d / "out").exists()


def test_duplicate_method_names_are_errors(data, capsys, no_metrics) -> None:
    d = data
    good = d / "fused" / "good"
    assert ev.main(_args(d, f"x={good}", f"x={good}")) == 2
    assert "'x' is given twice" in _error(capsys)
    argv = _args(d, f"good={good}") + ["--fused-root", str(d / "fused")]
    assert ev.main(argv) == 2
    assert "'good' is also a sub-folder of --fused-root" in _error(capsys)
    assert not (d / "out").exists()


@pytest.mark.parametrize("flag", ["--ir", "--vi", "--fused-root"])
def test_missing_folder_is_an_error(data, capsys, flag) -> None:
    d = data
    argv = ["--ir", str(d / "ir"), "--vi", str(d / "vi"), "--fused-root", str(d / "fused"),
            "--out", str(d / "out"), "--no-progress"]
    argv[argv.index(flag) + 1] = str(d / "nowhere")
    assert ev.main(argv) == 2
    line = _error(capsys)
    assert str(d / "nowhere") in line and "does not exist" in line
    assert not (d / "out").exists()


def test_out_that_is_a_file_is_refused_before_any_metric(data, capsys, no_metrics) -> None:
    d = data
    target = d / "out.txt"
    target.write_text("mine")
    assert ev.main(_args(d, f"good={d / 'fused' / 'good'}", out=target)) == 2
    assert str(target) in _error(capsys)
    assert target.read_text() == "mine"
    assert ev.main(_args(d, f"good={d / 'fused' / 'good'}", out=target / "sub")) == 2
    assert f"inside the file {target}" in _error(capsys)


def test_read_only_out_is_refused_before_any_metric(data, capsys, monkeypatch, no_metrics) -> None:
    d = data
    parent = d / "locked"
    parent.mkdir()
    if os.geteuid() == 0:      # root ignores permissions: make the probe see a read-only file system
        import tempfile

        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    else:
        parent.chmod(0o500)
    try:
        assert ev.main(_args(d, f"good={d / 'fused' / 'good'}", out=parent / "out")) == 2
    finally:
        parent.chmod(0o700)
    line = _error(capsys)
    assert str(parent / "out") in line and "not writable" in line
    assert list(parent.iterdir()) == []


def test_a_full_disk_while_writing_leaves_no_partial_folder(data, capsys, monkeypatch) -> None:
    d = data
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == "table.md":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "write_text", full)
    assert ev.main(_args(d, f"good={d / 'fused' / 'good'}")) == 2
    assert "is full" in _error(capsys)
    assert not (d / "out").exists()


def test_method_names_are_escaped_in_both_tables(data) -> None:
    d = data
    name = "a|b_c&d%e$f#g{h}i~j^k\\l"
    res = ev.evaluate_folders(d / "ir", d / "vi", {name: d / "fused" / "good"}, metrics="EN", progress=False)
    md_row = ev.markdown_table(res).splitlines()[2]
    assert md_row.startswith("| a\\|b_c&d%e$f#g{h}i~j^k\\\\l | 3 |")
    assert md_row.count(" | ") == 2           # the | in the name does not open a column
    tex = ev.latex_table(res)
    assert (r"a|b\_c\&d\%e\$f\#g\{h\}i\textasciitilde{}j\textasciicircum{}k\textbackslash{}l & 3 & "
            in tex)
