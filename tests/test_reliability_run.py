"""Issue 13, items 2 and 7 (runner): unknown ``net.kwargs``/``loss.kwargs``/``tasks.<k>.kwargs`` keys, values
that the net, loss or task refuses, and flags
that contradict the checkpoint of ``--resume … --eval-only`` (or ``--preset`` with ``--resume``).

Each is exit code 2 with one ``error:`` line naming the key or flag, no traceback, and no run folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import run


def _expect_error(capsys, argv: list[str], out: Path, *names: str) -> None:
    assert run.cli([*argv, "--wandb", "disabled", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    for name in names:
        assert name in errors[0], errors[0]
    assert "Traceback" not in captured.out + captured.err
    assert not out.exists(), "nothing may be written before the config is accepted"


@pytest.mark.parametrize("override, names", [
    ("net.kwargs={'featurs': 16}", ("net.kwargs", "'featurs'", "did you mean 'features'", "bdl_tiny")),
    ("net.kwargs.grwth=4", ("net.kwargs", "'grwth'", "did you mean 'growth'")),
    ("loss.kwargs={'ssimm': 1.0}", ("loss.kwargs", "'ssimm'", "did you mean 'ssim'")),
    ("loss.kwargs={'detial': 1.0}", ("loss.kwargs", "did you mean 'detail'")),     # FusionLoss's own keys
    ("tasks.critic.kwargs={'ndff': 8}", ("tasks.critic.kwargs", "'ndff'", "did you mean 'ndf'", "critic_tiny")),
])
def test_unknown_kwargs_keys_fail_before_any_work(capsys, tmp_path, override, names) -> None:
    _expect_error(capsys, ["--task", "seg", "--smoke", "--set", override], tmp_path / "out", *names)


@pytest.mark.parametrize("task, override, names", [
    ("seg", "tasks.seg.kwargs.arch=Foo", ("tasks.seg.kwargs", "Foo")),                # smp's own refusal
    ("det", "tasks.det.kwargs.norm=foo", ("tasks.det.kwargs", "'foo'", "frozen")),
    ("det", "tasks.det.kwargs.fcos_decode=log", ("tasks.det.kwargs", "fcos_decode", "'log'")),
    ("seg", "loss.kwargs.detail=-1", ("loss.kwargs", "detail=-1")),                  # a negative weight
    ("seg", "loss.kwargs.l1=1e999", ("loss.kwargs", "l1=inf")),          # parses as float inf
])
def test_values_a_constructor_refuses_fail_before_any_work(capsys, tmp_path, task, override, names) -> None:
    """Keys pass the signature check; the values are refused by the net, task or loss being built."""
    _expect_error(capsys, ["--task", task, "--smoke", "--device", "cpu", "--set", override], tmp_path / "out", *names)


def test_valid_kwargs_pass_the_check() -> None:
    args = run.get_args_parser().parse_args(
        ["--task", "seg", "--smoke", "--set", "net.kwargs={'features': 8}", "--set", "loss.kwargs={'detail': 1.0}",
         "--set", "tasks.critic.kwargs={'ndf': 8}", "--set", "tasks.seg.kwargs={'decoder_channels': [8, 8, 8]}"])
    run.check_kwargs(run.resolve_config(args))        # no error: every key is a constructor argument


@pytest.fixture(scope="module")
def critic_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("critic")
    result = run.main(["--task", "critic", "--smoke", "--wandb", "disabled", "--set", "train.iters=1",
                       "--set", "eval.enabled=False", "--out", str(out)])
    return result.run_dir / "checkpoints" / "last.pt"


@pytest.mark.parametrize("flags, names", [
    (["--task", "seg"], ("--task", "'seg'", "task='critic'")),
    (["--fusion-net", "moe_fusion_tiny"], ("--fusion-net", "'moe_fusion_tiny'", "net.name='bdl_tiny'")),
    (["--set", "tasks.critic.kwargs={'ndf': 8}"], ("--set tasks.critic.kwargs",)),
    (["--set", "net.kwargs.features=4"], ("--set net.kwargs",)),
    (["--preset", "synthetic_critic"], ("--preset synthetic_critic", "drop --preset")),
])
def test_eval_only_refuses_flags_that_contradict_the_checkpoint(critic_checkpoint, capsys, tmp_path, flags,
                                                                names) -> None:
    _expect_error(capsys, ["--resume", str(critic_checkpoint), "--eval-only", *flags], tmp_path / "out", *names)


def test_resume_refuses_preset(critic_checkpoint, capsys, tmp_path) -> None:
    """Before, ``--preset`` with ``--resume`` was ignored with a log line: now it is an error."""
    _expect_error(capsys, ["--resume", str(critic_checkpoint), "--preset", "synthetic_seg"], tmp_path / "out",
                  "--preset synthetic_seg")


def test_eval_only_may_change_data_evaluation_and_logging(critic_checkpoint, tmp_path) -> None:
    result = run.main(["--resume", str(critic_checkpoint), "--eval-only", "--wandb", "disabled", "--task", "critic",
                       "--out", str(tmp_path), "--set", "eval.enabled=True", "--set", "eval.max_images=1",
                       "--set", "eval.metrics=EN,SD",
                       "--set", "log.progress=False"])
    assert set(result.metrics) >= {"eval/EN", "eval/SD"} and result.steps == 0
