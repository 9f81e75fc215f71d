"""Run configs and the DeepSpeed config merge, in-process (no ranks launched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import aim_ds
from aim_ds.config import ConfigError, load_config
from aim_ds.model.aim import Block
from aim_ds.model.registry import PAPER_RECIPE, get_model_spec
from aim_ds.train.config import (
    BatchConfigError,
    OptimSection,
    PretrainConfig,
    TrainSection,
    resolve_plan,
    resolved_config,
)
from aim_ds.train.engine import (
    AUTO_BUCKET_FLOOR,
    build_ds_config,
    check_runs_here,
    load_ds_config,
    model_hidden_size,
    model_parameters,
    optimizer_offloaded,
    trunk_block_parameters,
    zero_stage,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "run" / "configs"
DS_CONFIGS = ROOT / "ds_configs"
RUN_CONFIGS = ["aim-nano", "aim-test", "aim-tiny", "aim-mini", "aim-0.6B", "aim-1B", "aim-3B", "aim-7B"]


def _model_cfg(cfg: PretrainConfig) -> aim_ds.AIMConfig:
    return aim_ds.get_model_spec(cfg.model.name).config


def _plan(cfg: PretrainConfig, world: int):
    model_cfg = aim_ds.get_model_spec(cfg.model.name).config
    return resolve_plan(cfg, world, model_cfg.image_size, model_cfg.num_patches)


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_run_config_loads_and_fits_every_ds_config(name: str) -> None:
    cfg = load_config(PretrainConfig, CONFIGS / f"{name}.yaml")
    assert cfg.model.name == name
    world = 2 if name in ("aim-nano", "aim-test", "aim-tiny", "aim-mini") else 8
    plan = _plan(cfg, world)
    assert plan.micro_batch_size * plan.grad_accum_steps * world == cfg.train.batch_size
    for ds_file in DS_CONFIGS.glob("*.json"):
        ds, _ = build_ds_config(load_ds_config(ds_file), cfg, plan, _model_cfg(cfg))
        assert ds["train_batch_size"] == cfg.train.batch_size


@pytest.mark.parametrize("name", ["aim-0.6B", "aim-1B", "aim-3B", "aim-7B"])
def test_table10_recipe(name: str) -> None:
    """Table 10 (docs/recipe.md, "Readings"): 1,250,000 iterations for 1B/3B/7B, 488,281 (2B images) for
    0.6B, warmup 2.5% of the run, in the registry and in the size's YAML alike."""
    cfg = load_config(PretrainConfig, CONFIGS / f"{name}.yaml")
    plan = _plan(cfg, 8)
    expected = (488_281, 12_207) if name == "aim-0.6B" else (1_250_000, 31_250)
    assert cfg.train.batch_size == 4096
    assert cfg.optim.peak_lr == 1e-3 and cfg.optim.min_lr == 0.0
    assert tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.optim.eps == 1e-8
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.grad_clip == 1.0
    assert cfg.optim.warmup_steps == -1 and cfg.optim.warmup_fraction == 0.025  # a fraction, never a count
    assert (plan.total_steps, plan.warmup_steps) == expected
    assert {s.prob for s in cfg.data.sources} == {0.8, 0.2}
    recipe, num_patches = get_model_spec(name).recipe, get_model_spec(name).config.num_patches
    assert (recipe.total_steps(num_patches), recipe.total_warmup_steps(num_patches)) == expected
    assert (recipe.peak_lr, recipe.batch_size, recipe.weight_decay, recipe.betas) == (1e-3, 4096, 0.05, (0.9, 0.95))
    assert (recipe.min_lr, recipe.grad_clip) == (0.0, 1.0)


@pytest.mark.parametrize("name", ["aim-0.6B", "aim-1B", "aim-3B", "aim-7B"])
def test_shorter_runs_of_paper_yamls_warm_up_over_their_own_fraction(name: str) -> None:
    """A 100k-step ablation warms up 2.5% of 100k; a run shorter than 31,250 steps works; a fixed
    count still overrides, and one longer than the run is a ConfigError naming both knobs."""
    path = CONFIGS / f"{name}.yaml"
    assert _plan(load_config(PretrainConfig, path, overrides=["train.steps=100000"]), 8).warmup_steps == 2_500
    assert _plan(load_config(PretrainConfig, path, overrides=["train.steps=1000"]), 8).warmup_steps == 25
    fixed = load_config(PretrainConfig, path, overrides=["train.steps=1000", "optim.warmup_steps=100"])
    assert _plan(fixed, 8).warmup_steps == 100
    too_long = load_config(PretrainConfig, path, overrides=["train.steps=1000", "optim.warmup_steps=31250"])
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps=31250 exceeds train\.steps=1000.*warmup_fraction"):
        _plan(too_long, 8)


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_run_config_agrees_with_its_registry_recipe(name: str) -> None:
    """Every run/configs/aim-<size>.yaml states its size's registry recipe (docs/recipe.md, Table 1
    and Table 10 for the paper's sizes), so the YAMLs and the registry cannot drift apart."""
    cfg = load_config(PretrainConfig, CONFIGS / f"{name}.yaml")
    spec = get_model_spec(name)
    recipe = spec.recipe
    assert cfg.train.batch_size == recipe.batch_size
    assert cfg.optim.peak_lr == recipe.peak_lr and cfg.optim.min_lr == recipe.min_lr
    assert cfg.optim.warmup_fraction == recipe.warmup_fraction
    assert cfg.optim.weight_decay == recipe.weight_decay
    assert tuple(cfg.optim.betas) == recipe.betas
    assert cfg.optim.grad_clip == recipe.grad_clip
    world = 2 if name in ("aim-nano", "aim-test", "aim-tiny", "aim-mini") else 8
    plan = _plan(cfg, world)
    assert plan.total_steps == recipe.total_steps(spec.config.num_patches)
    assert plan.warmup_steps == recipe.total_warmup_steps(spec.config.num_patches)


def test_defaults_are_the_paper_recipe() -> None:
    """The run config's defaults are the paper's recipe, taken from the registry (not restated)."""
    train, optim = TrainSection(), OptimSection()
    assert (train.batch_size, optim.peak_lr, optim.min_lr) == (4096, 1e-3, 0.0)
    assert (optim.warmup_fraction, optim.weight_decay, tuple(optim.betas), optim.grad_clip) == (
        0.025,
        0.05,
        (0.9, 0.95),
        1.0,
    )
    assert train.batch_size == PAPER_RECIPE.batch_size and optim.peak_lr == PAPER_RECIPE.peak_lr


def test_unknown_key_names_it_and_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"train\.setps.*train\.steps"):
        load_config(PretrainConfig, CONFIGS / "aim-test.yaml", overrides=["train.setps=3"])
    with pytest.raises(ConfigError, match=r"optim\.peak_l"):
        load_config(PretrainConfig, CONFIGS / "aim-test.yaml", overrides=["optim.peak_l=1"])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match="batch_sise.*batch_size"):
        load_config(PretrainConfig, bad)


def test_overrides_are_typed() -> None:
    cfg = load_config(
        PretrainConfig,
        CONFIGS / "aim-test.yaml",
        overrides=["train.steps=7", "optim.peak_lr=3e-4", "data.scale=[0.2, 1.0]", "model.overrides={depth: 2}"],
    )
    assert cfg.train.steps == 7 and cfg.optim.peak_lr == 3e-4
    assert tuple(cfg.data.scale) == (0.2, 1.0)
    mixed = load_config(
        PretrainConfig,
        CONFIGS / "aim-0.6B.yaml",
        overrides=["data.sources=[{path: a.beton, prob: 0.7}, {path: 'shards/*.beton', prob: 0.3}]"],
    )
    assert [(s.path, s.prob) for s in mixed.data.sources] == [("a.beton", 0.7), ("shards/*.beton", 0.3)]
    assert cfg.model.overrides == {"depth": 2}
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(PretrainConfig, CONFIGS / "aim-test.yaml", overrides=["train.steps=many"])


def test_batch_not_divisible_names_the_knobs() -> None:
    cfg = load_config(
        PretrainConfig, CONFIGS / "aim-test.yaml", overrides=["train.batch_size=20", "train.micro_batch_size=8"]
    )
    with pytest.raises(BatchConfigError, match=r"train\.batch_size=20 does not split evenly over world size 3"):
        _plan(cfg, 3)
    # A micro-batch that does not divide the per-rank batch follows the world size (10 per rank: 5).
    plan = _plan(cfg, 2)
    assert (plan.micro_batch_size, plan.grad_accum_steps) == (5, 2)
    assert "train.micro_batch_size=8 does not divide the 10 images per rank" in plan.micro_batch_note


def test_micro_batch_defaults_to_batch_over_world() -> None:
    cfg = load_config(PretrainConfig, CONFIGS / "aim-test.yaml", overrides=["train.micro_batch_size=0"])
    plan = _plan(cfg, 4)
    assert (plan.micro_batch_size, plan.grad_accum_steps) == (4, 1)
    assert resolved_config(cfg, plan).train.micro_batch_size == 4


def test_ds_json_disagreeing_with_run_config() -> None:
    cfg = load_config(PretrainConfig, CONFIGS / "aim-test.yaml")  # batch 16, micro 8
    plan = _plan(cfg, 2)
    base = load_ds_config(DS_CONFIGS / "zero3.json")
    with pytest.raises(BatchConfigError, match=r"train_micro_batch_size_per_gpu=4.*train\.micro_batch_size"):
        build_ds_config({**base, "train_micro_batch_size_per_gpu": 4}, cfg, plan, _model_cfg(cfg))
    with pytest.raises(BatchConfigError, match=r"train_batch_size=32.*train\.batch_size"):
        build_ds_config({**base, "train_batch_size": 32}, cfg, plan, _model_cfg(cfg))
    with pytest.raises(BatchConfigError, match=r"gradient_clipping=0.5.*optim\.grad_clip"):
        build_ds_config({**base, "gradient_clipping": 0.5}, cfg, plan, _model_cfg(cfg))
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config({**base, "optimizer": {"type": "Adam"}}, cfg, plan, _model_cfg(cfg))
    # Agreeing values and "auto" pass.
    ds, _ = build_ds_config(
        {**base, "train_batch_size": 16, "gradient_accumulation_steps": "auto"}, cfg, plan, _model_cfg(cfg)
    )
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16,
        8,
        1,
    )
    assert ds["gradient_clipping"] == 1.0


def test_precision_and_offload_run_as_the_config_says() -> None:
    """No device turns bf16 or offload off: the merged config asks for what the JSON asks for."""
    cfg = load_config(PretrainConfig, CONFIGS / "aim-test.yaml")
    plan = _plan(cfg, 2)
    base = load_ds_config(DS_CONFIGS / "zero3_offload.json")
    assert optimizer_offloaded(base)
    ds, notes = build_ds_config(base, cfg, plan, _model_cfg(cfg))
    assert ds["bf16"]["enabled"] is True and optimizer_offloaded(ds)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not any("bf16" in n or "offload" in n for n in notes)
    assert base["zero_optimization"]["reduce_bucket_size"] == "auto"  # the caller's dict is not modified
    fp32, _ = build_ds_config(load_ds_config(DS_CONFIGS / "zero3_fp32.json"), cfg, plan, _model_cfg(cfg))
    assert fp32["bf16"]["enabled"] is False


def test_a_precision_the_device_lacks_is_an_error_saying_why() -> None:
    cfg = load_config(PretrainConfig, CONFIGS / "aim-test.yaml")
    ds, _ = build_ds_config(load_ds_config(DS_CONFIGS / "zero3.json"), cfg, _plan(cfg, 2), _model_cfg(cfg))
    check_runs_here(ds, "cpu", [torch.float32, torch.bfloat16])  # DeepSpeed's CPU accelerator: fine
    with pytest.raises(ConfigError, match=r"enables bf16 but DeepSpeed's npu accelerator does not support.*zero3_fp32"):
        check_runs_here(ds, "npu", [torch.float32, torch.float16])
    with pytest.raises(ConfigError, match="enables fp16"):
        check_runs_here({"fp16": {"enabled": True}}, "cpu", [torch.float32, torch.bfloat16])


@pytest.mark.parametrize("ds_file", sorted(p.name for p in DS_CONFIGS.glob("*.json")))
def test_every_shipped_config_accumulates_and_reduces_in_fp32(ds_file: str) -> None:
    ds = load_ds_config(DS_CONFIGS / ds_file)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"


def test_half_precision_config_without_accumulation_dtype_gets_fp32() -> None:
    cfg = load_config(PretrainConfig, CONFIGS / "aim-test.yaml")
    bare = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    ds, notes = build_ds_config(bare, cfg, _plan(cfg, 2), _model_cfg(cfg))
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    assert any("accumulate in fp32" in n for n in notes) and any("reduced in fp32" in n for n in notes)
    # ZeRO off + bf16: DeepSpeed cannot accumulate in fp32 there, so nothing is added.
    ds0, _ = build_ds_config({"bf16": {"enabled": True}}, cfg, _plan(cfg, 2), _model_cfg(cfg))
    assert "data_types" not in ds0


@pytest.mark.parametrize("name", ["aim-test", "aim-0.6B", "aim-1B", "aim-3B", "aim-7B"])
def test_auto_knobs_resolve_from_the_width(name: str) -> None:
    """ "auto" -> hidden^2 and 10 hidden (Transformers' DeepSpeed integration), hidden being the wider
    of trunk and head; the prefetch bucket holds one whole trunk block; both buckets at least
    AUTO_BUCKET_FLOOR elements or the whole model (tests/test_zero_knobs.py)."""
    cfg = load_config(PretrainConfig, CONFIGS / f"{name}.yaml")
    model_cfg = _model_cfg(cfg)
    hidden = max(model_cfg.width, model_cfg.head_width)
    assert model_hidden_size(model_cfg) == hidden
    world = 2 if name == "aim-test" else 8
    for ds_file in ("zero3.json", "zero3_offload.json", "zero3_fp32.json", "zero2.json"):
        ds, notes = build_ds_config(load_ds_config(DS_CONFIGS / ds_file), cfg, _plan(cfg, world), model_cfg)
        zero = ds["zero_optimization"]
        floor = min(AUTO_BUCKET_FLOOR, model_parameters(model_cfg))
        reduce = max(hidden * hidden, floor)
        assert zero["reduce_bucket_size"] == reduce
        if zero_stage(ds) == 3:
            # One trunk block, counted from the built module (meta device: no memory).
            with torch.device("meta"):
                block = Block(model_cfg)
            assert zero["stage3_prefetch_bucket_size"] == max(sum(p.numel() for p in block.parameters()), floor)
            assert zero["stage3_param_persistence_threshold"] == 10 * hidden
        assert "auto" not in json.dumps(ds)
        assert any(f"reduce_bucket_size=auto -> {reduce}" in n for n in notes)
    if name == "aim-7B":  # the next block fits the prefetch bucket (the old 1e8 did not: 201M)
        assert trunk_block_parameters(model_cfg) == 201_342_976
    # A number in the JSON is kept as it is.
    fixed = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 12345}}
    assert (
        build_ds_config(fixed, cfg, _plan(cfg, world), model_cfg)[0]["zero_optimization"]["reduce_bucket_size"] == 12345
    )


def test_zero3_buckets_keep_norms_whole_and_shard_matrices() -> None:
    """The persistence threshold "auto" resolves (10 x width) above every 1-D parameter and below
    every matrix of the Table 1 models, so norms and biases stay gathered and all matrices are sharded."""
    for ds_file in ("zero3.json", "zero3_offload.json"):
        base = json.loads((DS_CONFIGS / ds_file).read_text())
        assert zero_stage(base) == 3 and base["bf16"]["enabled"]
        for name in ("aim-0.6B", "aim-1B", "aim-3B", "aim-7B"):
            cfg = load_config(PretrainConfig, CONFIGS / f"{name}.yaml")
            ds, _ = build_ds_config(base, cfg, _plan(cfg, 8), _model_cfg(cfg))
            zero = ds["zero_optimization"]
            assert zero["overlap_comm"] and zero["contiguous_gradients"]
            threshold = zero["stage3_param_persistence_threshold"]
            with torch.device("meta"):
                model = aim_ds.create_model(name)
            sizes = [(p.ndim, p.numel()) for p in model.parameters()]
            assert max(n for d, n in sizes if d == 1) < threshold < min(n for d, n in sizes if d >= 2)
    assert zero_stage(load_ds_config(DS_CONFIGS / "zero2.json")) == 2


def test_driver_reports_bad_key_with_exit_code_2(caplog: pytest.LogCaptureFixture) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_driver", ROOT / "run" / "pretrain.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    code = driver.main(
        ["--deepspeed", str(DS_CONFIGS / "zero3.json"), "--config", str(CONFIGS / "aim-test.yaml"), "optim.lr=1"]
    )
    assert code == 2
    assert "optim.lr" in caplog.text and "optim.peak_lr" in caplog.text
