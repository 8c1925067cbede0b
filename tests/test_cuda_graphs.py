"""``train.cuda_graphs`` at the runner's level: the main job's lower-only iteration can be captured (on the
CPU: no host reads and no batch entry a graph cannot hold, seen through a dispatch mode and the capture's
recording batch), and on a GPU the runner trains with it as it does without."""

from __future__ import annotations

import warnings

import pytest
import torch

from bilevel import graphs
from experiments.bench_train import experiment
from fusion.nets import create_fusion_net
from tests.test_presets import write_m3fd, write_mfnet


def _experiment(device: str, cuda_graphs: bool, preset: str = "synthetic_seg", data_root: str | None = None):
    """``preset`` without warm-up or evaluation, for the 8 iterations the tests step by hand."""
    overrides = [f"train.cuda_graphs={cuda_graphs}"]
    if preset == "synthetic_seg":
        overrides += ["bilevel.ul_every=2", "data.length=32", "data.ul_length=16"]
    return experiment(preset, 4, device, data_root, overrides)


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


def test_main_job_estimator_can_be_captured(monkeypatch):
    """The main job's upper step: its estimators (``gn`` on each constraint) are probed at the second upper
    step (the CPU standing in for a GPU) and nothing is found that a graph could not hold."""
    exp = _experiment("cpu", cuda_graphs=True)
    monkeypatch.setattr(type(exp.step), "_on_gpu", lambda self: True)
    exp.step._lower_graphs.enabled = False
    for _ in range(4):                        # upper steps at iterations 1 and 3
        batches = exp.streams.next()
        exp.train_mode()
        assert exp.step.step(batches)["nonfinite"] == 0.0
    probes = list(exp.step._estimator_graphs._probes.values())
    assert len(probes) == len(exp.step.constraints) >= 1
    assert all(p is not None and p.reasons == set() for p in probes)


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
    probe = graphs.Probe()
    wrapped = probe.wrap({"ll": {"ir": torch.zeros(1), "boxes": [torch.zeros(1, 4)]}, "ul": {"x": [1]}}, ["ll"])
    with probe:
        wrapped["ll"]["ir"], wrapped["ll"]["boxes"], wrapped["ul"]["x"]
    assert probe.reasons == {"batch entry 'll:boxes' read (not a tensor or plain scalar)"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("preset, fixture, captures", [
    # upper steps at 1, 3, 5, 7 (estimator: plain, probed, captured, replayed); lower-only 0 plain, 2 probed,
    # 4 and 6 replayed
    ("synthetic_seg", None, True),
    ("bdl_mfnet_seg", write_mfnet, True),   # real sizes: 384 px crops, batch 2, SegFormer MiT-B3
    ("bdl_m3fd_det", write_m3fd, False),    # the detector's loss reads box lists and values on the host
])
def test_runner_trains_with_cuda_graphs(tmp_path, preset, fixture, captures):
    """Through the runner's data and losses: every loss follows the eager run's; a preset whose lower step
    cannot be captured warns once and trains eagerly."""
    root = str(fixture(tmp_path / "data")) if fixture else None
    runs = []
    for cuda_graphs in (False, True):
        exp = _experiment("cuda", cuda_graphs, preset, root)
        diags = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(8):
                torch.manual_seed(i)
                batches = exp.streams.next()
                exp.train_mode()
                diags.append(exp.step.step(batches))
        ours = [w for w in caught if str(w.message).startswith("cuda_graphs:")]
        lower, estimators = exp.step._lower_graphs, exp.step._estimator_graphs
        runs.append((diags, len(lower.captured), lower.enabled, len(ours), len(estimators.captured)))
    (eager, none, _, _, _), (graphed, captured, still_on, warned, estimators) = runs
    assert none == 0 and (captured, still_on, warned) == ((1, True, 0) if captures else (0, False, 1))
    # one estimator graph per constraint; the other presets' first upper step is the 10th
    assert estimators == (len(exp.step.constraints) if preset == "synthetic_seg" else 0)
    for a, b in zip(graphed, eager):
        assert a["nonfinite"] == b["nonfinite"] == 0.0
        for k in (k for k in a if k.startswith("loss/")):
            assert a[k] == pytest.approx(b[k], rel=1e-2, abs=1e-4), k
