"""Ctrl-C mid-run + `--resume` ends with exactly the weights of an uninterrupted run (CPU, same seed)."""

from __future__ import annotations

import csv
import os
import signal

import pytest
import torch

from experiments import engine, run

BASE = ["--task", "seg", "--smoke", "--aggregate", "rlw", "--wandb", "disabled", "--set", "train.iters=5",
        "--set", "eval.enabled=False", "--set", "log.image_every=0"]


def _state(result: run.RunResult) -> dict[str, torch.Tensor]:
    exp = result.experiment
    state = {f"net.{k}": v for k, v in exp.net.state_dict().items()}
    for name, task in exp.tasks.items():
        state.update({f"{name}.{k}": v for k, v in task.state_dict().items()})
    return state


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, monkeypatch) -> None:
    full = run.main([*BASE, "--out", str(tmp_path / "full")])
    assert full.steps == 5

    def ctrl_c_at_3(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)   # the real Ctrl-C path: handler → flag → save → exit

    monkeypatch.setattr(engine, "after_step", ctrl_c_at_3)
    with pytest.raises(run.RunInterrupted) as err:
        run.main([*BASE, "--out", str(tmp_path / "part")])
    assert err.value.step == 3 and err.value.checkpoint.name == "last.pt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored
    ckpt = torch.load(err.value.checkpoint, weights_only=True)
    assert ckpt["step"] == 3 and ckpt["aggregator_state"]["iteration"] == 2   # 1 warm-up + 2 bi-level steps
    monkeypatch.setattr(engine, "after_step", lambda step: None)

    resumed = run.main(["--resume", str(err.value.checkpoint), "--wandb", "disabled", "--out",
                        str(tmp_path / "resumed")])
    assert resumed.steps == 5
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"
    # optimiser and aggregator states continue too
    last_full = torch.load(full.run_dir / "checkpoints" / "last.pt", weights_only=True)
    last_resumed = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last_full["aggregator_state"]["iteration"] == last_resumed["aggregator_state"]["iteration"]
    for k, v in last_full["aggregator_state"]["aggregator_state"].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(last_resumed["aggregator_state"]["aggregator_state"][k]))
    # the new run directory carries the history up to the checkpoint, then its own rows
    with open(resumed.run_dir / "metrics.csv", newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("loss/lower/seg")]
    assert steps == [1, 2, 3, 4, 5]
    assert (resumed.run_dir / "env.json").read_text().count("resumed_from") == 1


def test_checkpoint_rng_states_roundtrip() -> None:
    import random

    import numpy as np

    from experiments.checkpoint import rng_state, set_rng_state

    state = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(2)
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


@pytest.mark.parametrize("flags, key", [
    (["--set", "train.upper_optim.lr=0.5"], "train.upper_optim.lr"),   # the optimiser state would overwrite it
    (["--task", "critic"], "task"),
    (["--hypergrad", "none"], "bilevel.hypergrad"),
])
def test_resume_refuses_changes_it_cannot_honour(tmp_path, flags, key) -> None:
    first = run.main([*BASE, "--set", "train.iters=1", "--out", str(tmp_path / "a")])
    ckpt = first.run_dir / "checkpoints" / "last.pt"
    with pytest.raises(run.ConfigError, match=key):
        run.main(["--resume", str(ckpt), "--wandb", "disabled", "--out", str(tmp_path / "b"), *flags])
    assert not (tmp_path / "b").exists(), "nothing may be written before the config is accepted"
    # what a resumed run may change is applied (a longer run, other outputs)
    more = run.main(["--resume", str(ckpt), "--wandb", "disabled", "--out", str(tmp_path / "c"), "--iters", "2"])
    assert more.steps == 2
