"""``train.cuda_graphs`` at the runner's level: the main job's lower-only iteration can be captured (on the
CPU: no host reads and no batch entry a graph cannot hold, seen through a dispatch mode and the capture's
recording batch), and on a GPU the runner trains with it as it does without."""

from __future__ import annotations

import pytest
import torch

from bilevel import graphs
from experiments.config import apply_overrides
from experiments.experiment import build
from experiments.presets import get_preset
from fusion.nets import create_fusion_net


def _experiment(device: str, cuda_graphs: bool, iters: int = 8):
    cfg = get_preset("synthetic_seg")
    return build(apply_overrides(cfg, [
        f"train.iters={iters}", "train.warmup_iters=0", "bilevel.ul_every=2", "eval.enabled=False",
        "eval.val_every=0", "log.image_every=0", "log.progress=False", f"train.device={device!r}",
        "log.wandb='disabled'", f"train.cuda_graphs={cuda_graphs}", "data.length=32", "data.ul_length=16"]))


def _probe(exp, batches) -> set[str]:
    """The forwards and backwards a capture would record, run eagerly under the step's probe."""
    step, probe = exp.step, graphs.Probe()
    ll = step._ll_streams()
    wrapped, cache = probe.wrap(batches, ll), {}
    with torch.no_grad(), probe:
        for s in ll:
            step._fused(cache, wrapped, s)
    with probe:
        step._lower_losses(step.constraints, cache, wrapped)
    return probe.reasons


def test_main_job_lower_iteration_can_be_captured():
    exp = _experiment("cpu", cuda_graphs=True)
    batches = exp.streams.next()
    exp.train_mode()
    _probe(exp, batches)                     # the step's plain first sight: cached constants are made
    assert _probe(exp, batches) == set()
    assert any(isinstance(v, list) for b in batches.values() for v in b.values())   # names, boxes: not read


def test_capture_checks_can_fail():
    """Negative controls: a mixture-of-experts gate reads its choice on the host; constants made from Python
    data; a loss reading a list."""
    net = create_fusion_net("moe_fusion_tiny")
    with torch.no_grad(), graphs.Probe() as probe:
        net(torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32))
    assert any("read on the host" in r for r in probe.reasons)
    with graphs.Probe() as probe:
        torch.rand(2, 3) * torch.tensor([1.0, 2.0, 3.0])
    assert probe.reasons == {"a tensor made from Python data (a copy from the host)"}
    unusable: set[str] = set()
    batch = graphs.Recording({"ir": torch.zeros(1), "task": "ivf", "name": ["a.png"], "group": {"b": [1]}},
                             unusable)
    batch["ir"], batch["task"], batch["name"], batch["group"]["b"]
    assert unusable == {"name", "group.b"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_runner_trains_with_cuda_graphs():
    """synthetic_seg with an upper step every 2 iterations: lower-only iterations 0 (plain) and 2 (probed)
    run eagerly, 4 is captured and replayed, 6 replayed; every loss follows the eager run's."""
    runs = []
    for cuda_graphs in (False, True):
        exp = _experiment("cuda", cuda_graphs)
        diags = []
        for i in range(8):
            torch.manual_seed(i)
            batches = exp.streams.next()
            exp.train_mode()
            diags.append(exp.step.step(batches))
        runs.append((diags, len(exp.step._graphs), exp.step.cuda_graphs))
    (eager, none, _), (graphed, captured, still_on) = runs
    assert none == 0 and captured == 1 and still_on
    for a, b in zip(graphed, eager):
        assert a["nonfinite"] == b["nonfinite"] == 0.0
        for k in (k for k in a if k.startswith("loss/")):
            assert a[k] == pytest.approx(b[k], rel=1e-2, abs=1e-4), k
