"""End-to-end `--smoke` runs of experiments/run.py: results on disk, finite metrics, wandb calls, fuse.py."""

from __future__ import annotations

import csv
import math
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from experiments import fuse, run
from experiments.checkpoint import INFERENCE_KEYS, strip_checkpoint

CONTRACT_CKPT_KEYS = {"format", "config", "net", "model", "lower", "upper_optim", "aggregator_state", "step", "rng"}


class FakeWandb(types.ModuleType):
    """Records what the runner sends to wandb (CI runs with WANDB_MODE=disabled, so no real wandb here)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0
        self.summary: dict = {}
        fake = self

        class Settings:
            def __init__(self, **kw):
                self.kw = kw

        class Image:
            def __init__(self, data, caption=None):
                self.data, self.caption = data, caption

        class Run:
            summary = fake.summary

            def log(self, data, step=None):
                fake.logged.append((dict(data), step))

            def finish(self):
                fake.finished += 1

        self.Settings, self.Image, self._Run = Settings, Image, Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self._Run()

    def keys(self) -> set[str]:
        return {k for data, _ in self.logged for k in data}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _finite(cell: str) -> bool:
    return cell not in ("", None) and math.isfinite(float(cell))


def _check_outputs(run_dir: Path, task: str) -> None:
    for name in ("config.yaml", "env.json", "metrics.csv", "eval/summary.csv", "eval/per_image.csv",
                 "eval/meta.json", "checkpoints/last.pt", "checkpoints/best.pt", "plots/losses.png"):
        assert (run_dir / name).is_file(), name
    summary = _rows(run_dir / "eval" / "summary.csv")
    assert len(summary) == 1 and int(summary[0]["n_images"]) > 0
    for metric in ("EN", "SD", "SSIM"):
        assert _finite(summary[0][metric]), (metric, summary[0][metric])
    per_image = _rows(run_dir / "eval" / "per_image.csv")
    assert len(per_image) == int(summary[0]["n_images"]) and list(per_image[0])[:2] == ["image", "method"]
    if task in ("seg", "all"):
        assert 0.0 <= float(summary[0]["mIoU"]) <= 1.0
        classes = _rows(run_dir / "eval" / "seg_per_class.csv")
        assert [r["class"] for r in classes][:3] == ["unlabelled", "car", "person"]
    if task in ("det", "all"):
        assert 0.0 <= float(summary[0]["mAP50"]) <= 1.0
        assert len(_rows(run_dir / "eval" / "det_per_class.csv")) == 6
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert CONTRACT_CKPT_KEYS <= set(ckpt)
    assert set(ckpt["rng"]) == {"torch", "cuda", "python", "numpy"}
    from fusion.nets.registry import create_fusion_net

    net = create_fusion_net(ckpt["net"]["name"], **ckpt["net"]["kwargs"])
    net.load_state_dict(ckpt["model"], strict=True)
    metrics = _rows(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in metrics if _finite(r.get("loss/upper/fusion", ""))], "fusion loss logged"


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """One smoke seg run shared by several tests, with a fake wandb module in offline mode."""
    fake = FakeWandb()
    saved = sys.modules.get("wandb")
    sys.modules["wandb"] = fake
    try:
        out = tmp_path_factory.mktemp("seg")
        result = run.main(["--task", "seg", "--smoke", "--wandb", "offline", "--out", str(out)])
    finally:
        if saved is None:
            sys.modules.pop("wandb", None)
        else:
            sys.modules["wandb"] = saved
    return result, fake


def test_seg_smoke_writes_results(seg_run) -> None:
    result, _ = seg_run
    assert result.run_dir.parent.name == "seg" and result.run_dir.name.endswith("-s0")
    _check_outputs(result.run_dir, "seg")
    assert math.isfinite(result.metrics["eval/mIoU"])
    assert (result.run_dir / "plots" / "agg_weights.png").is_file()
    assert list((result.run_dir / "plots" / "panels").glob("*.png"))


def test_logged_keys_of_contracts_reach_wandb(seg_run) -> None:
    result, fake = seg_run
    assert len(fake.inits) == 1 and fake.inits[0]["mode"] == "offline"
    assert fake.inits[0]["config"]["task"] == "seg" and "bilevel" in fake.inits[0]["config"]
    assert fake.inits[0]["dir"] == str(result.run_dir)
    keys = fake.keys()
    expected = {"loss/lower/critic", "loss/lower/seg", "loss/upper/critic", "loss/upper/seg", "loss/upper/fusion",
                "hypergrad/norm/critic", "hypergrad/norm/seg", "hypergrad/cos/critic-seg", "agg/weight/critic",
                "agg/weight/seg", "agg/weight/fusion", "lr/upper", "lr/seg", "lr/critic",
                "throughput/pairs_per_s", "eval/mIoU", "eval/EN", "eval/SSIM"}
    assert expected <= keys, expected - keys
    images = [v for data, _ in fake.logged for v in data.values() if isinstance(v, fake.Image)]
    assert images and images[0].data.ndim == 3 and images[0].data.shape[2] == 3
    assert all(step is not None for _, step in fake.logged)
    assert "eval/mIoU" in fake.summary and fake.finished == 1
    # the same scalars are in metrics.csv, so nothing depends on wandb
    header = set(_rows(result.run_dir / "metrics.csv")[0])
    assert {k for k in expected} <= header


@pytest.mark.parametrize("argv, task", [
    (["--task", "det"], "det"),
    (["--task", "fusion"], "fusion"),
    (["--task", "seg", "--fusion-net", "moe_fusion_tiny", "--hypergrad", "gn"], "seg"),
    (["--task", "seg", "--fusion-net", "tc_moa_tiny", "--hypergrad", "gn"], "seg"),
    (["--task", "seg", "--fusion-net", "bdl_tiny", "--hypergrad", "unrolled",          # NHWC nets, 2nd order
      "--set", "train.channels_last=true", "--set", "train.cudnn_benchmark=true"], "seg"),
    (["--task", "seg", "--hypergrad", "cg", "--aggregate", "mgda"], "seg"),     # parameter-space rows
    (["--task", "seg", "--set", "bilevel.reuse_lower_grads=true"], "seg"),     # ∇f from the LL step
])
def test_smoke_variants(argv, task, tmp_path) -> None:
    result = run.main([*argv, "--smoke", "--wandb", "disabled", "--out", str(tmp_path)])
    _check_outputs(result.run_dir, task)
    rows = _rows(result.run_dir / "metrics.csv")
    if task != "fusion":
        assert any(_finite(r.get(f"hypergrad/norm/{task}", "")) for r in rows)
    else:
        assert not any(k.startswith("loss/lower/") for k in rows[0])


def test_fuse_folder_and_strip(seg_run, tmp_path) -> None:
    from fusion.image_io import save_image

    result, _ = seg_run
    ir_dir, vi_dir = tmp_path / "ir", tmp_path / "vi"
    for i in range(2):
        save_image(torch.rand(1, 20, 24), ir_dir / f"p{i}.png")
        save_image(torch.rand(3, 20, 24), vi_dir / f"p{i}.jpg")
    ckpt = result.run_dir / "checkpoints" / "best.pt"
    out = tmp_path / "fused"
    stripped = tmp_path / "model.pt"
    assert fuse.main(["--checkpoint", str(ckpt), "--ir", str(ir_dir), "--vi", str(vi_dir), "--out", str(out),
                      "--strip", str(stripped)]) == 0
    from fusion.image_io import read_image

    fused = read_image(out / "p0.png")
    assert fused.shape == (3, 20, 24)
    small = torch.load(stripped, weights_only=True)
    assert set(small) == set(INFERENCE_KEYS) == set(strip_checkpoint(torch.load(ckpt, weights_only=True)))
    # the stripped checkpoint fuses the same image; existing outputs are never overwritten
    again = tmp_path / "again"
    assert fuse.main(["--checkpoint", str(stripped), "--ir", str(ir_dir), "--vi", str(vi_dir),
                      "--out", str(again)]) == 0
    assert torch.equal(read_image(again / "p1.png"), read_image(out / "p1.png"))
    assert fuse.main(["--checkpoint", str(stripped), "--ir", str(ir_dir), "--vi", str(vi_dir),
                      "--out", str(out)]) == 2


def _unlabelled_folder(root: Path, n: int = 6) -> None:
    from fusion.image_io import save_image

    for i in range(n):
        save_image(torch.rand(1, 40, 48), root / "ir" / f"{i:02d}.png")
        save_image(torch.rand(3, 40, 48), root / "vi" / f"{i:02d}.png")


def test_task_without_labels_fails_before_training(tmp_path, capsys) -> None:
    _unlabelled_folder(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(run.DataError) as err:
        run.main(["--task", "seg", "--data", "roadscene", "--data-root", str(tmp_path / "data"), "--smoke",
                  "--set", "data.holdout=3", "--out", str(out)])
    msg = str(err.value)
    assert "segmentation masks" in msg and "tasks.seg.data=synthetic" in msg and "roadscene" in msg
    assert not out.exists()
    assert run.cli(["--task", "det", "--data", "roadscene", "--data-root", str(tmp_path / "data"), "--smoke",
                    "--set", "data.holdout=3", "--out", str(out)]) == 2
    assert "bounding boxes" in capsys.readouterr().err
    with pytest.raises(run.DataError, match="--data-root"):
        run.main(["--task", "critic", "--data", "roadscene", "--smoke", "--out", str(out)])


def test_per_constraint_data_critic_on_real_pairs(tmp_path) -> None:
    """`--set tasks.seg.data=synthetic`: the critic sees the unlabelled folder, the segmenter synthetic scenes."""
    _unlabelled_folder(tmp_path / "data")
    result = run.main(["--task", "seg", "--data", "roadscene", "--data-root", str(tmp_path / "data"), "--smoke",
                       "--set", "data.holdout=3", "--set", "tasks.seg.data=synthetic", "--wandb", "disabled",
                       "--out", str(tmp_path / "out")])
    summary = _rows(result.run_dir / "eval" / "summary.csv")[0]
    assert int(summary["n_images"]) == 2           # holdout=3 of 6 pairs: positions 0 and 3 are test
    assert math.isfinite(float(summary["mIoU"]))   # evaluated on the synthetic test split


def test_nonfinite_losses_skip_steps_then_stop(tmp_path, monkeypatch) -> None:
    import fusion.losses

    monkeypatch.setattr(fusion.losses.BDLLoss, "terms",
                        lambda self, fused, ir, vis, mask: {"l1": fused.mean() * float("nan"),
                                                            "ssim": fused.mean() * 0})
    with pytest.raises(run.NonFiniteError, match="max_nonfinite=2") as err:
        run.main(["--task", "fusion", "--smoke", "--wandb", "disabled", "--set", "train.max_nonfinite=2",
                  "--set", "train.iters=5", "--out", str(tmp_path)])
    run_dir = next((tmp_path / "fusion").iterdir())
    assert "last.pt" in str(err.value)
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["extra"]["nonfinite_total"] == 2
    rows = _rows(run_dir / "metrics.csv")
    assert [float(r["nonfinite"]) for r in rows if r["nonfinite"]] == [1.0, 1.0]
    # skipped steps update nothing: the saved weights are the initial ones
    from fusion.nets.registry import create_fusion_net

    torch.manual_seed(0)
    initial = create_fusion_net("bdl_tiny").state_dict()
    assert all(torch.equal(initial[k], v) for k, v in ckpt["model"].items())


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_falls_back_to_float32_where_it_would_be_emulated(tmp_path, monkeypatch, caplog, native):
    """``train.amp=bf16`` autocasts where the device computes bf16 natively; elsewhere (an AVX2-only CPU:
    scalar bf16 loops, 7-46x slower than float32) the run trains in float32, says so once, and keeps
    ``bf16`` in its saved config (a checkpoint resumed on a GPU autocasts again)."""
    from experiments import experiment

    monkeypatch.setattr(experiment, "native_bf16", lambda device: native)
    autocast = []   # whether each training forward of the fusion net ran under bf16 autocast
    forward = experiment.Experiment.forward

    def recording(self, net, batch):
        autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, net, batch)

    monkeypatch.setattr(experiment.Experiment, "forward", recording)
    result = run.main(["--task", "seg", "--smoke", "--wandb", "disabled", "--set", "train.amp='bf16'",
                       "--set", "train.iters=2", "--out", str(tmp_path)])
    exp = result.experiment
    assert exp.cfg.train.amp == "bf16" and exp.step.amp_dtype == exp.amp_dtype
    warnings = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    if native:
        assert exp.amp_dtype == torch.bfloat16 and not warnings
    else:
        assert exp.amp_dtype is None and len(warnings) == 1
    assert autocast and set(autocast) == {native}
    assert all(math.isfinite(v) for v in result.metrics.values())


def test_output_folder_problems_get_clear_messages(tmp_path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run.cli(["--smoke", "--task", "fusion", "--out", str(blocker)]) == 2
    assert "not a directory" in capsys.readouterr().err

    import errno

    def read_only(self, *a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert run.cli(["--smoke", "--task", "fusion", "--out", str(tmp_path / "ro")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_lower_level_divergence_is_caught_through_its_buffers(tmp_path) -> None:
    """A lower level whose lr explodes can keep finite losses while its weights / BatchNorm statistics turn
    inf: the run must stop with NonFiniteError, not finish with a results table."""
    with pytest.raises(run.NonFiniteError, match="critic"):
        run.main(["--task", "critic", "--smoke", "--wandb", "disabled", "--out", str(tmp_path),
                  "--set", "tasks.critic.optim.name=sgd", "--set", "tasks.critic.optim.lr=1e10",
                  "--set", "train.iters=6", "--set", "log.image_every=0"])


_FAULTS = """
import resource, sys, torch
from experiments.cli import retain_freed_memory
kept = retain_freed_memory() if sys.argv[1] == "call" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mb in range(17, 27):  # growing sizes: glibc's adaptive threshold never catches up, so each is mmapped
    blocks = [torch.ones(mb << 18) for _ in range(3)]
    del blocks
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retain_freed_memory_stops_the_page_faults_of_reallocated_blocks() -> None:
    """Each case in a fresh process (the setting is process-wide): the page faults of three blocks of 17,
    18, …, 26 MB allocated and freed in turn — with glibc's defaults every page of every block (165,000),
    with the call only the heap's growth (about 24,000), with the call under a user's MALLOC_* variable as
    with the defaults (left alone: the call reports False)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["THP_MEM_ALLOC_ENABLE"] = "0"   # glibc's setting alone (huge pages are the next test's)

    def faults(mode: str, **extra: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env={**env, **extra}, capture_output=True,
                             text=True, check=True)
        kept, count = out.stdout.split()
        return kept, int(count)

    kept, default = faults("skip")
    assert kept == "None"
    kept, retained = faults("call")
    assert kept == "True" and 4 * retained < default, (retained, default)
    kept, user = faults("call", MALLOC_ARENA_MAX="2")
    assert kept == "False" and 4 * retained < user, (retained, user)


_LARGE_FAULTS = """
import resource, sys, torch
from experiments.cli import huge_pages_for_tensors
asked = huge_pages_for_tensors() if sys.argv[1] == "call" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # 64 MB: above glibc's 32 MiB ceiling, mmapped and unmapped every time
    block = torch.ones(16 << 20)
    del block
print(asked, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _transparent_huge_pages() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _transparent_huge_pages(), reason="the kernel offers no transparent huge pages")
def test_huge_pages_for_tensors_cut_the_page_faults_of_large_blocks() -> None:
    """Fresh processes: five 64 MB tensors allocated and freed in turn fault in every 4 KB page (about 82,000
    faults) by default, and a few hundred with 2 MB pages; a value the user set is left alone."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def faults(mode: str, **extra: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _LARGE_FAULTS, mode], env={**env, **extra},
                             capture_output=True, text=True, check=True)
        asked, count = out.stdout.split()
        return asked, int(count)

    asked, default = faults("skip")
    assert asked == "None" and default > 5 * (64 << 20) // 4096 * 0.9, default
    asked, huge = faults("call")
    assert asked == "True" and 20 * huge < default, (huge, default)
    asked, user = faults("call", THP_MEM_ALLOC_ENABLE="0")
    assert asked == "False" and 20 * huge < user, (huge, user)


def test_train_benchmark_runs_its_preset_on_the_cpu(capsys) -> None:
    """``bench.py train`` builds synthetic_seg, times loader, bare step and runner, and prints one row."""
    from experiments import bench_train

    (row,) = bench_train.main(["--iters", "1", "--device", "cpu"])
    assert row["preset"] == "synthetic_seg" and row["device"] == "cpu"
    assert all(row[k] > 0 for k in ("loader_s", "bare_s", "runner_s", "pairs"))
    assert "| synthetic_seg | cpu |" in capsys.readouterr().out


def test_cache_filler_leaves_every_batch_as_it_was() -> None:
    """``data.fill_workers`` (on by default on a GPU) loads the in-memory streams ahead in worker processes;
    the batches of every stream stay those of a run without it, and the streams end up fully held."""
    from experiments.config import apply_overrides
    from experiments.data import fill_worker_count
    from experiments.experiment import build
    from experiments.presets import get_preset, smoke

    def draw(fill_workers: int) -> tuple[list[dict], object, list[list[int]]]:
        exp = build(apply_overrides(smoke(get_preset("synthetic_seg")), [f"data.fill_workers={fill_workers}"]))
        streams = exp.streams
        batches = [streams.next()]          # starts the filler; the later batches mostly come from what it stored
        filler = streams._filler
        assert filler is None or filler.wait(timeout=60), "the cache filler did not finish"
        held = [d.missing() for d in streams.datasets.values()]
        batches += [streams.next() for _ in range(4)]
        streams.close()
        return batches, filler, held

    plain, none, _ = draw(0)
    filled, filler, held = draw(2)
    assert none is None and filler is not None and held == [[]] * len(held)
    for a, b in zip(plain, filled):
        assert a.keys() == b.keys()
        for name in a:
            assert all(torch.equal(a[name][k], b[name][k]) for k in ("ir", "vis", "mask") if k in a[name]), name
    assert fill_worker_count(None, torch.device("cpu")) == 0 and fill_worker_count(3, torch.device("cpu")) == 3
    assert 1 <= fill_worker_count(None, torch.device("cuda")) <= 8
