"""The "auto" ZeRO knobs as the driver fills them (aim_ds.train.engine.build_ds_config): buckets never
shrink to a few thousand elements for a small model (one collective per tiny bucket made aim-tiny's
ZeRO-3 step 0.69x as fast, BENCHMARKS.md "Step: ZeRO-3"), and never grow past the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import aim_ds
from aim_ds.config import load_config
from aim_ds.model.aim import AIM
from aim_ds.train.config import PretrainConfig, resolve_plan
from aim_ds.train.engine import AUTO_BUCKET_FLOOR, build_ds_config, load_ds_config, model_config

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = ("reduce_bucket_size", "stage3_prefetch_bucket_size")


def _filled(name: str, ds_file: str, world: int) -> tuple[dict, int]:
    cfg = load_config(PretrainConfig, ROOT / "run" / "configs" / f"{name}.yaml")
    model_cfg = model_config(cfg)
    plan = resolve_plan(cfg, world, model_cfg.image_size, model_cfg.num_patches)
    ds, _ = build_ds_config(load_ds_config(ROOT / "ds_configs" / ds_file), cfg, plan, model_cfg)
    with torch.device("meta"):
        params = sum(p.numel() for p in AIM(model_cfg).parameters())
    return ds["zero_optimization"], params


@pytest.mark.parametrize("name", ["aim-nano", "aim-test", "aim-tiny", "aim-mini"])
@pytest.mark.parametrize("ds_file", ["zero3_fp32.json", "zero3.json"])
def test_small_models_get_one_bucket_of_the_whole_model(name: str, ds_file: str) -> None:
    zero, params = _filled(name, ds_file, world=2)
    for key in BUCKETS:
        # One reduce and one gather collective carry the whole model: not hidden^2 (65,536 for aim-tiny).
        assert zero[key] == params, (key, zero[key], params)
    # Norms and biases stay gathered, every matrix is sharded (ZeRO-3 keeps sharding something here).
    with torch.device("meta"):
        model = aim_ds.create_model(name)
    threshold = zero["stage3_param_persistence_threshold"]
    assert max(p.numel() for p in model.parameters() if p.ndim == 1) < threshold
    assert min(p.numel() for p in model.parameters() if p.ndim >= 2) > threshold


@pytest.mark.parametrize("name", ["aim-0.6B", "aim-7B"])
def test_large_models_keep_bounded_buckets(name: str) -> None:
    zero, params = _filled(name, "zero3.json", world=8)
    assert zero["reduce_bucket_size"] == AUTO_BUCKET_FLOOR < params  # the floor, far below the model
    assert AUTO_BUCKET_FLOOR <= zero["stage3_prefetch_bucket_size"] < params / 20
