"""DDP: two gloo processes on CPU train on different batches and end with identical parameters."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, results: str, repo: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), WANDB_MODE="disabled")
    sys.path.insert(0, repo)
    torch.set_num_threads(1)
    from experiments import run

    result = run.main(["--task", "seg", "--smoke", "--aggregate", "rlw", "--device", "cpu", "--out", out,
                       "--set", "train.iters=4", "--set", "eval.enabled=False", "--set", "log.image_every=0"])
    exp = result.experiment
    state = {f"net.{k}": v for k, v in exp.net.named_parameters()}
    for name, task in exp.tasks.items():
        state.update({f"{name}.{k}": v for k, v in task.named_parameters()})
    first = next(iter(exp.streams.loaders))
    torch.save({"params": {k: v.detach().clone() for k, v in state.items()},
                "sampler_seed": exp.streams.loaders[first]._index_sampler.seed},
               Path(results) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_parameters(tmp_path) -> None:
    repo = str(Path(__file__).resolve().parents[1])
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "out"), str(results), repo), nprocs=2, join=True)
    r0, r1 = (torch.load(results / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["params"].keys() == r1["params"].keys()
    different = [k for k in r0["params"] if not torch.equal(r0["params"][k], r1["params"][k])]
    assert not different, f"ranks diverged in {different[:5]}"
    assert r0["sampler_seed"] != r1["sampler_seed"], "each rank must draw its own batches"
    # only rank 0 writes a run directory
    runs = list((tmp_path / "out" / "seg").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.pt").is_file()
    # and training moved the weights away from the common initialisation
    from fusion.nets.registry import create_fusion_net

    torch.manual_seed(0)
    init = dict(create_fusion_net("bdl_tiny").named_parameters())
    assert any(not torch.equal(init[k[len("net."):]], v) for k, v in r0["params"].items() if k.startswith("net."))
