"""Run configuration: strict overrides, YAML round trips, presets, precedence, names checked early."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from bilevel.registry import UnknownNameError
from experiments import run
from experiments.config import (
    AGGREGATOR_SECTIONS,
    ESTIMATOR_SECTIONS,
    BilevelConfig,
    ConfigError,
    RunConfig,
    apply_dict,
    apply_overrides,
    load_yaml,
    to_dict,
    to_yaml,
    valid_keys,
)
from experiments.presets import default_preset, get_preset, list_presets, smoke

REQUIRED_PRESETS = {"bdl_mfnet_seg", "bdl_m3fd_det", "bdl_roadscene_seg", "synthetic_seg", "synthetic_det",
                    "synthetic_critic", "synthetic_fusion", "synthetic_all"}


def test_overrides_coerce_by_field_type() -> None:
    cfg = apply_overrides(RunConfig(), [
        "bilevel.cg.iters=5",                 # int
        "train.upper_optim.lr=1",             # int literal into a float field
        "bilevel.hypergrad=cg",               # unquoted string
        "data.name='roadscene'",              # quoted string
        "data.root=None",                     # Optional
        "train.amp=bf16",
        "eval.metrics=EN,SD,Qabf",            # comma list into tuple[str, ...]
        "bilevel.fixed.weights=[1, 2.5]",     # list into tuple[float, ...]
        "tasks.critic.optim.betas=(0.5, 0.9)",
        "net.kwargs.features=16",             # a single key of a dict field
        "tasks.seg.kwargs={'arch': 'FPN'}",
        "bilevel.gradnorm_softmax.unit=true",
    ])
    assert cfg.bilevel.cg.iters == 5 and isinstance(cfg.bilevel.cg.iters, int)
    assert cfg.train.upper_optim.lr == 1.0 and isinstance(cfg.train.upper_optim.lr, float)
    assert cfg.bilevel.hypergrad == "cg" and cfg.data.name == "roadscene" and cfg.data.root is None
    assert cfg.train.amp == "bf16"
    assert cfg.eval.metrics == ("EN", "SD", "Qabf")
    assert cfg.bilevel.fixed.weights == (1.0, 2.5)
    assert cfg.tasks.critic.optim.betas == (0.5, 0.9)
    assert cfg.net.kwargs == {"features": 16}
    assert cfg.tasks.seg.kwargs == {"arch": "FPN"}
    assert cfg.bilevel.gradnorm_softmax.unit is True
    # frozen: the original is untouched
    assert RunConfig().bilevel.cg.iters == 10


@pytest.mark.parametrize("item, fragment", [
    ("train.iters=1.5", "expects an int"),
    ("train.iters=abc", "expects an int"),
    ("train.upper_optim.lr=fast", "expects a float"),
    ("train.deterministic=maybe", "expects a bool"),
    ("bilevel=3", "is a section"),
    ("train.iters.x=3", "not a section"),
    ("train.amp=fp16", "not valid"),
    ("train.upper_optim.name=lbfgs", "not valid"),
    ("tasks.critic.optim.betas=(1, 2, 3)", "expects 2 values"),
    ("train.iters", "expects key=value"),
])
def test_override_errors(item: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(RunConfig(), [item])


def test_cudnn_benchmark_excludes_deterministic_kernels() -> None:
    assert apply_overrides(RunConfig(), ["train.cudnn_benchmark=true"]).train.cudnn_benchmark
    with pytest.raises(ConfigError, match="train.cudnn_benchmark.*train.deterministic"):
        apply_overrides(RunConfig(), ["train.cudnn_benchmark=true", "train.deterministic=true"])


def test_unknown_key_lists_valid_keys_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), ["bilevel.cg.iter=3"])
    msg = str(err.value)
    assert "bilevel.cg.iter" in msg and "did you mean bilevel.cg.iters" in msg
    assert "bilevel.cg.ridge" in msg
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), ["nope=1"])
    assert "train.iters" in str(err.value) and "bilevel.hypergrad" in str(err.value)


def test_valid_keys_cover_nested_sections() -> None:
    keys = valid_keys()
    assert {"bilevel.cg.iters", "bilevel.dwa.T", "tasks.seg.optim.lr", "train.upper_optim.lr",
            "data.root", "log.wandb"} <= set(keys)
    assert "bilevel.cg" not in keys      # sections are not leaves


@pytest.mark.parametrize("name", sorted(REQUIRED_PRESETS))
def test_presets_roundtrip_through_yaml(name: str, tmp_path) -> None:
    cfg = get_preset(name)
    assert isinstance(cfg, RunConfig) and cfg.name
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_yaml(str(path), RunConfig()) == cfg
    assert apply_dict(RunConfig(), yaml.safe_load(to_yaml(cfg))) == cfg


def test_required_presets_registered_and_unknown_lists_them() -> None:
    assert REQUIRED_PRESETS <= set(list_presets())
    with pytest.raises(UnknownNameError) as err:
        get_preset("bdl_nope")
    assert all(n in str(err.value) for n in REQUIRED_PRESETS)
    assert default_preset("det") == "synthetic_det"
    with pytest.raises(ConfigError, match="seg"):
        default_preset("segmentation")


def test_paper_presets_follow_the_published_recipe() -> None:
    """method.md §4: LL batch 2 / UL batch 4, SGD 2e-4, an upper step every 10 iterations."""
    for name in ("bdl_mfnet_seg", "bdl_m3fd_det"):
        cfg = get_preset(name)
        assert (cfg.train.batch, cfg.train.ul_batch, cfg.bilevel.ul_every) == (2, 4, 10)
        assert cfg.tasks.critic.optim.name == "sgd" and cfg.tasks.critic.optim.lr == pytest.approx(2e-4)
        assert cfg.net.name == "bdl" and cfg.train.seed == 0
    rs = get_preset("bdl_roadscene_seg")
    assert rs.task == "seg" and rs.data.name == "roadscene" and rs.tasks.seg.data == "synthetic"
    assert rs.bilevel.hypergrad == "gn" and rs.train.amp == "bf16" and rs.data.holdout > 0


def test_smoke_keeps_method_and_shrinks_everything() -> None:
    cfg = apply_overrides(get_preset("synthetic_det"), ["bilevel.hypergrad=cg", "bilevel.aggregate=dwa"])
    s = smoke(cfg)
    assert (s.task, s.bilevel.hypergrad, s.bilevel.aggregate) == ("det", "cg", "dwa")
    assert s.net.name == "bdl_tiny" and s.tasks.det.name == "det_tiny" and s.tasks.seg.name == "seg_tiny"
    assert s.data.crop <= 64 and s.train.iters <= 5 and s.train.device == "cpu"


def test_precedence_preset_yaml_flags_set(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: {iters: 77, batch: 3}\nbilevel: {cg: {iters: 4}}\n")
    args = run.get_args_parser().parse_args(
        ["--task", "det", "--config", str(path), "--iters", "55", "--set", "train.iters=33",
         "--hypergrad", "cg", "--data-root", "/x"])
    cfg = run.resolve_config(args)
    assert cfg.task == "det" and cfg.name == "det"
    assert cfg.train.iters == 33          # --set beats the flag, which beats the file
    assert cfg.train.batch == 3 and cfg.bilevel.cg.iters == 4
    assert cfg.bilevel.hypergrad == "cg" and cfg.data.root == "/x"
    # --batch sets both levels; --amp none clears bf16; a new --fusion-net drops the preset's net kwargs
    args = run.get_args_parser().parse_args(["--preset", "bdl_roadscene_seg", "--batch", "5", "--amp", "none",
                                             "--fusion-net", "moe_fusion"])
    cfg = run.resolve_config(args)
    assert (cfg.train.batch, cfg.train.ul_batch, cfg.train.amp, cfg.name) == (5, 5, None, "bdl_roadscene_seg")
    assert cfg.net.name == "moe_fusion" and cfg.net.kwargs == {}


def test_bad_yaml_key_names_the_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train: {iterz: 3}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*train.iterz"):
        load_yaml(str(path), RunConfig())


def test_print_config_prints_loadable_yaml(capsys) -> None:
    result = run.main(["--task", "critic", "--print-config", "--set", "bilevel.cg.iters=7"])
    assert result.run_dir is None
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = apply_dict(RunConfig(), printed)
    assert cfg.task == "critic" and cfg.bilevel.cg.iters == 7


def test_estimator_sections_match_bilevel_options() -> None:
    """Every nested estimator config holds exactly options that bilevel's estimator accepts."""
    from bilevel.estimators import check_hypergrad_options, hypergrad_options

    cfg = BilevelConfig()
    for name in ESTIMATOR_SECTIONS:
        section = getattr(cfg, name)
        fields = {f.name for f in dataclasses.fields(section)}
        assert fields <= set(hypergrad_options(name)) - {"reduce", "correction"}, name
        opts = dataclasses.replace(cfg, hypergrad=name).estimator_options()
        lr_like = [k for k, v in hypergrad_options(name).items() if v is inspect.Parameter.empty]
        check_hypergrad_options(name, opts, provided=lr_like)


def test_reuse_lower_grads_is_refused_where_the_step_cannot_reuse_them() -> None:
    assert apply_overrides(RunConfig(), ["bilevel.reuse_lower_grads=true"]).bilevel.reuse_lower_grads
    for overrides in (["bilevel.hypergrad=cg"], ["bilevel.path=param"]):
        with pytest.raises(ConfigError, match="bilevel.reuse_lower_grads=true needs"):
            apply_overrides(RunConfig(), [*overrides, "bilevel.reuse_lower_grads=true"])


def test_aggregator_sections_build_aggregators() -> None:
    from bilevel.aggregate import create_aggregator

    for name in AGGREGATOR_SECTIONS:
        cfg = BilevelConfig(aggregate=name)
        opts = cfg.aggregator_options()
        if name == "fixed":
            opts["weights"] = [1.0, 1.0]
        if name in ("rlw", "pcgrad"):      # the runner fills the run seed
            opts.setdefault("seed", 0)
        create_aggregator(name, **opts)


@pytest.mark.parametrize("flag, value, valid", [
    ("--fusion-net", "nope", "bdl"),
    ("--hypergrad", "magic", "neumann"),
    ("--aggregate", "vote", "gradnorm_softmax"),
    ("--data", "imagenet", "synthetic"),
    ("--preset", "bdl_tno", "bdl_mfnet_seg"),
])
def test_unknown_names_fail_early_listing_valid_ones(flag: str, value: str, valid: str, tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        run.main([flag, value, "--smoke", "--out", str(tmp_path)])
    assert value in str(err.value) and valid in str(err.value)
    assert not any(tmp_path.iterdir()), "nothing may be written before the names are checked"


def test_unknown_task_name_lists_tasks(tmp_path) -> None:
    with pytest.raises(ConfigError, match="seg_tiny"):
        run.main(["--smoke", "--set", "tasks.seg.name=segformer", "--out", str(tmp_path)])


def test_cli_turns_config_errors_into_exit_code_2(capsys) -> None:
    assert run.cli(["--set", "train.iters=many", "--print-config"]) == 2
    assert "train.iters expects an int" in capsys.readouterr().err


def test_to_dict_is_plain() -> None:
    d = to_dict(get_preset("bdl_m3fd_det"))
    assert isinstance(d["bilevel"]["fixed"]["weights"], list)
    yaml.safe_dump(d)  # only plain types
