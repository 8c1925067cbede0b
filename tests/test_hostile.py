"""Hostile inputs (issue 13): ``evaluate.py``, ``tables.py`` and ``fuse.py`` on a generated set of bad inputs, and
bad command lines of every command (``run.py``, ``bench.py`` and its sections included).

Every case must exit with code 2, print exactly one stderr line starting ``error:`` that names the file or
flag, print no traceback, and leave every file under the test folder as it was (nothing written, nothing
damaged). Also: checkpoints that cannot be read or written, and finishing an interrupted ``fuse.py``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import bench, evaluate, fuse, import_weights, run, tables
from experiments.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from experiments.logging_utils import OutputError

SIZE = (12, 16)


def _png(path: Path, shape=SIZE, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)).save(path)
    return path


def _good_checkpoint(path: Path) -> Path:
    from fusion.nets.registry import create_fusion_net

    torch.manual_seed(0)
    net = create_fusion_net("bdl_tiny")
    return save_checkpoint(path, {"format": FORMAT, "config": {}, "net": {"name": "bdl_tiny", "kwargs": {}},
                                  "model": net.state_dict()})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Good inputs for all three commands plus one of each kind of bad file."""
    w = tmp_path_factory.mktemp("hostile")
    for i, stem in enumerate(("a", "b")):
        _png(w / "ir" / f"{stem}.png", seed=i)
        _png(w / "vi" / f"{stem}.png", seed=10 + i)
        _png(w / "fused" / "m" / f"{stem}.png", seed=20 + i)
    _good_checkpoint(w / "good.pt")
    # bad checkpoints
    good = (w / "good.pt").read_bytes()
    (w / "ck").mkdir()
    (w / "ck" / "random.pt").write_bytes(np.random.default_rng(0).bytes(512))
    (w / "ck" / "empty.pt").write_bytes(b"")
    (w / "ck" / "truncated.pt").write_bytes(good[: len(good) // 2])
    (w / "ck" / "folder.pt").mkdir()
    with open(w / "ck" / "pickled.pt", "wb") as fh:
        pickle.dump({"format": 1, "model": {}}, fh)
    torch.save({"format": 1, "model": {}, "x": Path("p")}, w / "ck" / "object.pt")   # a zip holding a class
    torch.save({"weights": torch.ones(2)}, w / "ck" / "foreign.pt")
    # bad image folders, one defect each
    for name, defect in (("corrupt", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nnot really")),
                         ("emptyfile", lambda p: p.write_bytes(b"")),
                         ("dirfile", lambda p: p.mkdir()),
                         ("bigger", lambda p: _png(p, (SIZE[0] + 2, SIZE[1])))):
        folder = w / "bad" / name
        _png(folder / "a.png", seed=30)
        defect(folder / "b.png")
    (w / "emptydir").mkdir()
    # tables.py inputs
    (w / "res").mkdir()
    (w / "res" / "summary.csv").write_text("method,n_images,EN\nours,2,7.0\n")
    (w / "binres").mkdir()
    (w / "binres" / "summary.csv").write_bytes(b"\xff\xfe\x00\x81binary")
    (w / "tabout").mkdir()
    (w / "tabout" / "tables.md").write_text("my old table\n")
    (w / "afile").write_text("a file, not a folder\n")
    return w


# --------------------------------------------------------------------------------------------- evaluate.py
def _ev(w: Path, ir="ir", vi="vi", fused=("m=fused/m",), out="evout", extra=()) -> list[str]:
    return ["--ir", str(w / ir), "--vi", str(w / vi), "--fused",
            *(f"{s.split('=')[0]}={w / s.split('=')[1]}" if "=" in s else s for s in fused),
            "--metrics", "EN,SD", "--out", str(w / out), "--no-progress", *extra]


EVALUATE_CASES = {
    "corrupt fused image": ({"fused": ("m=bad/corrupt",)}, "bad/corrupt/b.png"),
    "empty fused image": ({"fused": ("m=bad/emptyfile",)}, "bad/emptyfile/b.png"),
    "folder instead of an image": ({"fused": ("m=bad/dirfile",)}, "bad/dirfile/b.png"),
    "wrong-size fused image": ({"fused": ("m=bad/bigger",)}, "bad/bigger/b.png"),
    "corrupt infrared image": ({"ir": "bad/corrupt"}, "bad/corrupt/b.png"),
    "empty ir folder": ({"ir": "emptydir"}, "no pair to evaluate"),
    "missing vi folder": ({"vi": "nowhere"}, "nowhere"),
    "ir folder is a file": ({"ir": "afile"}, "afile"),
    "out is a file": ({"out": "afile"}, "afile"),
    "out is a non-empty folder": ({"out": "res"}, "non-empty"),
    "out is an input folder": ({"out": "ir"}, "input folder"),
    "out inside a method folder": ({"out": "fused/m/eval"}, "input folder"),
    "duplicate method": ({"fused": ("m=fused/m", "m=fused/m")}, "'m'"),
    "malformed --fused": ({"fused": ("m",)}, "NAME=DIR"),
    "unknown metric": ({"extra": ("--metrics", "NOPE")}, "NOPE"),
    "unknown profile": ({"extra": ("--profile", "nope")}, "nope"),
}


@pytest.mark.parametrize("case", EVALUATE_CASES)
def test_evaluate_hostile(world, expect_error, case) -> None:
    kwargs, names = EVALUATE_CASES[case]
    expect_error(world, evaluate.main, _ev(world, **kwargs), names)


# ----------------------------------------------------------------------------------------------- tables.py
TABLES_CASES = {
    "missing folder": (["nowhere"], "nowhere"),
    "binary summary.csv": (["binres"], "binres/summary.csv"),
    "existing table without --overwrite": (["res", "--out", "tabout"], "tabout/tables.md"),
    "out inside a file": (["res", "--out", "afile/sub"], "afile"),
    "labels do not fit": (["res", "--labels", "x,y"], "2 labels"),
    "unknown --rank": (["res", "--rank", "nobody"], "nobody"),
    "unknown --paper": (["res", "--paper", "nope"], "nope"),
}


@pytest.mark.parametrize("case", TABLES_CASES)
def test_tables_hostile(world, expect_error, case) -> None:
    argv, names = TABLES_CASES[case]
    argv = [str(world / a) if i == 0 or (i > 0 and argv[i - 1] == "--out") else a for i, a in enumerate(argv)]
    expect_error(world, tables.main, argv, names)


def test_tables_overwrite_replaces_only_when_asked(world, tmp_path, capsys) -> None:
    out = tmp_path / "t"
    assert tables.main([str(world / "res"), "--out", str(out)]) == 0
    first = (out / "tables.md").read_text()
    (out / "tables.md").write_text("edited by hand\n")
    assert tables.main([str(world / "res"), "--out", str(out)]) == 2
    assert (out / "tables.md").read_text() == "edited by hand\n"
    assert tables.main([str(world / "res"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "tables.md").read_text() == first
    assert sorted(p.name for p in out.iterdir()) == ["tables.md", "tables.tex"]   # no temporary file left


def test_tables_escape_method_names(tmp_path, capsys) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.csv").write_text('method,n_images,EN\n"a|b_%&$#{}~^\\\\c",2,7.0\nplain,2,6.0\n')
    assert tables.main([str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "tables.md").read_text()
    assert "| a\\|b_%&$#{}~^\\\\\\\\c | **7.0000** |" in md
    tex = (tmp_path / "o" / "tables.tex").read_text()
    assert (r"a|b\_\%\&\$\#\{\}\textasciitilde{}\textasciicircum{}\textbackslash{}\textbackslash{}c & "
            r"\textbf{7.0000}") in tex


# ------------------------------------------------------------------------------------------------- fuse.py
def _fu(w: Path, ckpt="good.pt", ir="ir", vi="vi", out="fout", extra=()) -> list[str]:
    return ["--checkpoint", str(w / ckpt), "--ir", str(w / ir), "--vi", str(w / vi), "--out", str(w / out),
            *extra]


FUSE_CASES = {
    "random-bytes checkpoint": ({"ckpt": "ck/random.pt"}, "ck/random.pt"),
    "empty checkpoint": ({"ckpt": "ck/empty.pt"}, "ck/empty.pt"),
    "truncated checkpoint": ({"ckpt": "ck/truncated.pt"}, "ck/truncated.pt"),
    "folder as checkpoint": ({"ckpt": "ck/folder.pt"}, "ck/folder.pt"),
    "pickle checkpoint": ({"ckpt": "ck/pickled.pt"}, "ck/pickled.pt"),
    "checkpoint holding an object": ({"ckpt": "ck/object.pt"}, "ck/object.pt"),
    "foreign torch file": ({"ckpt": "ck/foreign.pt"}, "ck/foreign.pt"),
    "missing checkpoint": ({"ckpt": "nowhere.pt"}, "nowhere.pt"),
    "corrupt ir image": ({"ir": "bad/corrupt"}, "bad/corrupt/b.png"),
    "empty ir image": ({"ir": "bad/emptyfile"}, "bad/emptyfile"),
    "pair sizes differ": ({"ir": "bad/bigger"}, "bad/bigger/b.png"),
    "missing ir folder": ({"ir": "nowhere"}, "nowhere"),
    "empty vi folder": ({"vi": "emptydir"}, "emptydir"),
    "out is a file": ({"out": "afile"}, "afile"),
    "out is the ir folder": ({"out": "ir"}, "input folder"),
    "out is the vi folder": ({"out": "vi"}, "input folder"),
    "outputs exist": ({"out": "fused/m"}, "--skip-existing"),
    "strip target exists": ({"extra": ("--strip", "good.pt")}, "good.pt"),
    "bias on a net without it": ({"extra": ("--bias-alpha", "2")}, "TC-MoA"),
}


@pytest.mark.parametrize("case", FUSE_CASES)
def test_fuse_hostile(world, expect_error, case) -> None:
    kwargs, names = FUSE_CASES[case]
    kwargs = dict(kwargs)
    if "extra" in kwargs and kwargs["extra"][0] == "--strip":
        kwargs["extra"] = ("--strip", str(world / kwargs["extra"][1]))
    expect_error(world, fuse.main, _fu(world, **kwargs), names)


@pytest.mark.parametrize("failure", ["full disk", "read-only"])
def test_fuse_strip_write_failure_is_a_clear_error(world, expect_error, monkeypatch, failure) -> None:
    """torch.save reports both as RuntimeError; the output guard must still say which and where."""
    text = ("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: No space left on device"
            if failure == "full disk" else "File /x/strip.pt cannot be opened.")

    def broken(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise RuntimeError(text)
    monkeypatch.setattr(torch, "save", broken)
    expect_error(world, fuse.main, _fu(world, extra=("--strip", str(world / "stripped.pt"))),
                 "is full" if failure == "full disk" else "is not writable")


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name,why", [("random.pt", "not a PyTorch checkpoint"), ("empty.pt", "empty"),
                                      ("truncated.pt", "truncated or corrupt"), ("folder.pt", "folder"),
                                      ("pickled.pt", "pickle-based"), ("object.pt", "pickled Python objects"),
                                      ("foreign.pt", "not a checkpoint of this toolkit")])
def test_unreadable_checkpoints_name_the_file_and_never_suggest_unsafe_loading(world, name, why) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(world / "ck" / name)
    message = str(info.value)
    assert str(world / "ck" / name) in message and why in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert info.value.__cause__ is None          # PyTorch's text (which suggests unsafe loading) is not chained
    assert isinstance(info.value, ValueError)


def test_save_checkpoint_turns_torch_runtime_errors_into_output_errors(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, {"format": FORMAT, "model": {"w": torch.ones(1)}, "step": 1})

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OutputError, match=r"output path .*ck is full"):
        save_checkpoint(path, {"format": FORMAT, "model": {"w": torch.zeros(1)}, "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1                      # the old checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left


def test_save_checkpoint_into_a_read_only_folder(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:    # root writes anyway: make torch.save fail as it does on a read-only mount
        def read_only(obj, f, *a, **k):
            raise RuntimeError(f"File {f} cannot be opened.")
        monkeypatch.setattr(torch, "save", read_only)
    else:
        folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="is not writable"):
            save_checkpoint(folder / "x.pt", {"format": FORMAT, "model": {}})
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


def test_mismatched_weights_name_the_net_and_the_keys(world, tmp_path) -> None:
    ckpt = load_checkpoint(world / "good.pt")
    first = next(iter(ckpt["model"]))
    bad = {**ckpt, "model": {("renamed." + k if k == first else k): v for k, v in ckpt["model"].items()}}
    save_checkpoint(tmp_path / "bad.pt", bad)
    with pytest.raises(CheckpointError) as info:
        fuse.load_fusion_net(tmp_path / "bad.pt")
    message = str(info.value)
    assert "bdl_tiny" in message and str(tmp_path / "bad.pt") in message
    assert f"missing keys {first}" in message and f"unexpected keys renamed.{first}" in message


# ------------------------------------------------------------------------------- finishing an interrupted fuse
def test_interrupted_fuse_is_finished_by_skip_existing(world, tmp_path, monkeypatch, capsys) -> None:
    argv = ["--checkpoint", str(world / "good.pt"), "--ir", str(world / "ir"), "--vi", str(world / "vi")]
    assert fuse.main([*argv, "--out", str(tmp_path / "whole")]) == 0       # the oracle: an uninterrupted run

    real, calls = fuse.Fuser.__call__, []

    def dies_on_second(self, ir, vis):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, ir, vis)
    monkeypatch.setattr(fuse.Fuser, "__call__", dies_on_second)
    out = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        fuse.main([*argv, "--out", str(out)])
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]              # no half-written or temporary file
    first = (out / "a.png").stat().st_mtime_ns
    capsys.readouterr()
    assert fuse.main([*argv, "--out", str(out)]) == 2                       # without the flag: an error
    assert "--skip-existing" in capsys.readouterr().err
    assert fuse.main([*argv, "--out", str(out), "--skip-existing"]) == 0
    assert "fused 1 pairs" in capsys.readouterr().out
    assert (out / "a.png").stat().st_mtime_ns == first                      # the finished one is not redone
    for stem in ("a", "b"):
        assert (out / f"{stem}.png").read_bytes() == (tmp_path / "whole" / f"{stem}.png").read_bytes()


# ------------------------------------------------------------------------------------------- command lines
def _exit_code(main: Callable[[list[str]], object]) -> Callable[[list[str]], int]:
    """argparse ends a bad command line with SystemExit; the code is what the shell sees."""
    def call(argv: list[str]) -> int:
        try:
            return int(main(argv) or 0)
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else 1
    return call


COMMAND_LINE_CASES = {
    "run: not a number": (run.main, ["--iters", "abc"], "--iters"),
    "evaluate: missing flags": (evaluate.main, [], "--out"),
    "fuse: missing flags": (fuse.main, ["--nosuch"], "--checkpoint"),
    "tables: flag without its value": (tables.main, ["x", "--rank"], "--rank"),
    "import_weights: missing --kind": (import_weights.main, ["--src", "a", "--out", "b"], "--kind"),
    "run: no such device": (run.cli, ["--smoke", "--device", "tpu"], "train.device='tpu'"),
    "fuse: no such device": (fuse.main, ["--checkpoint", "c.pt", "--ir", "i", "--vi", "v", "--out", "o",
                                         "--device", "tpu"], "--device"),
    "evaluate: a GPU this machine lacks": (evaluate.main, ["--device", "cuda:99"], "cuda:99"),
    "bench: unknown section": (bench.main, ["nosuch"], "nosuch"),
    "bench bilevel: batch 0": (bench.main, ["bilevel", "--batch", "0"], "--batch"),
    "bench bilevel: unknown config": (bench.main, ["bilevel", "--configs", "joint,gn,gn_lower,nope"], "--configs"),
    "bench bilevel: too small for batch norm": (bench.main, ["bilevel", "--size", "16", "--batch", "1", "--iters",
                                                            "1", "--warmup", "0", "--configs", "joint,gn,gn_lower"],
                                                "--size 16x16"),
    "bench infer: negative size": (bench.main, ["infer", "--size", "-5"], "--size"),
    "bench infer: unknown config": (bench.main, ["infer", "--configs", "eager fp32,nope"], "--configs"),
    "bench infer: a CUDA-only config on the CPU": (bench.main, ["infer", "--device", "cpu", "--configs",
                                                               "eager fp32,eager bf16"], "eager bf16"),
    "bench metrics: no pairs": (bench.main, ["metrics", "--pairs", "0"], "--pairs"),
    "bench nets: zero height": (bench.main, ["nets", "--size", "0", "4"], "--size"),
    "bench train: negative iterations": (bench.main, ["train", "--iters", "-1"], "--iters"),
    "bench train: no RoadScene folder there": (bench.main, ["train", "--device", "cpu", "--data-root",
                                                           "/nonexistent/roadscene"], "/nonexistent/roadscene"),
}


@pytest.mark.parametrize("case", COMMAND_LINE_CASES)
def test_bad_command_lines(world, expect_error, case) -> None:
    main, argv, names = COMMAND_LINE_CASES[case]
    expect_error(world, _exit_code(main), argv, names)
