"""experiments/ablate.py: N seeds per variant, mean ± std per metric, the commands; bad arguments before work."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from experiments import ablate


def test_ablation_table_is_mean_and_std_of_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "abl"
    assert ablate.main(["--preset", "synthetic_seg", "--seeds", "2", "--variants", "full", "--out", str(out),
                        "--smoke"]) == 0
    with open(out / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in runs] == [("full", "0"), ("full", "1")]
    assert all("--smoke" in r["command"] and f"--seed {r['seed']}" in r["command"] for r in runs)
    en = [float(r["EN"]) for r in runs]
    assert en[0] != en[1]       # two seeds, two runs
    table = (out / "ablation.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| full |"))
    header = next(line for line in table.splitlines() if line.startswith("| variant |"))
    cell = row.split("|")[header.split("|").index(" EN ")].strip()
    mean, std = (float(x) for x in cell.split(" ± "))
    assert math.isclose(mean, statistics.mean(en), rel_tol=1e-3)
    assert math.isclose(std, statistics.stdev(en), rel_tol=0.05)
    assert "python experiments/run.py --preset synthetic_seg --seed 1" in table


@pytest.mark.parametrize("argv, key", [
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "synthetic_seg", "--seeds", "0"], "--seeds"),
    (["--preset", "synthetic_seg", "--variants", "full,other"], "--variants"),
    (["--preset", "synthetic_seg", "--vifb", "/nonexistent"], "--vifb"),
    # arguments passed through to run.py are checked as run.py checks them, before any run
    (["--preset", "synthetic_seg", "--iters", "abc"], "--iters"),
    (["--preset", "synthetic_seg", "--device", "tpu"], "train.device"),
    (["--preset", "synthetic_seg", "--set", "net.kwargs.foo=1"], "net.kwargs"),
])
def test_bad_arguments_fail_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture, argv, key) -> None:
    out = tmp_path / "abl"
    assert ablate.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and key in err[0]
    assert not out.exists()


def test_existing_output_is_never_reused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    assert ablate.main(["--preset", "synthetic_seg", "--out", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "mine.txt").read_text() == "keep"
