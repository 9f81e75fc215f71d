"""DeepSpeed engine configs: reading a JSON (``ds_configs/*.json`` or any path), checking the shape of the
parts this project reads, and filling the ``"auto"`` ZeRO knobs from the model's shape.

It sits below both the pretraining package (:mod:`aim_ds.train.engine` merges the run config into the
result) and the planner (:mod:`aim_ds.plan` fills the knobs exactly as the driver will before it
counts memory), so neither reaches into the other. No process group and no DeepSpeed import here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import ConfigError, load_json, short
from .model.aim import AIM, AIMConfig

# The keys the driver fills from the run config (aim_ds.train.config._BATCH_KEYS says from which knob);
# a JSON may leave them out, say "auto", or repeat the same value.
DRIVER_FILLED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON config into a dict: a regular UTF-8 file (:func:`aim_ds.config.load_json`)
    of the shape :func:`check_ds_shape` asks for; otherwise one :class:`ConfigError` naming it."""
    ds = load_json(path, "DeepSpeed config")
    check_ds_shape(ds, f"DeepSpeed config '{path}'")
    return ds


# Sections of a DeepSpeed config that are JSON objects wherever DeepSpeed documents them.
_DS_OBJECTS = (
    "zero_optimization", "bf16", "fp16", "amp", "data_types", "checkpoint", "activation_checkpointing",
    "aio", "flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor", "compile",
)  # fmt: skip


def check_ds_shape(ds: Any, source: str) -> None:
    """The parts of a DeepSpeed config this project reads have the JSON type they must have (an
    object for a section, an integer or "auto" for a batch size, a ZeRO stage 0-3), so that a list
    or a string where an object belongs is one :class:`ConfigError` here, not an AttributeError later."""
    if not isinstance(ds, dict):
        raise ConfigError(f"{source} must hold a JSON object at the top level, not a {type(ds).__name__}")
    for key in _DS_OBJECTS:
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{source}: '{key}' must be a JSON object, not {short(ds[key])}")
    zero = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if key in zero and not isinstance(zero[key], dict):
            raise ConfigError(f"{source}: 'zero_optimization.{key}' must be a JSON object, not {short(zero[key])}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: 'zero_optimization.stage' must be 0, 1, 2 or 3, not {short(stage)}")
    for key in DRIVER_FILLED_KEYS:
        value = ds.get(key, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{source}: '{key}' must be a positive integer or \"auto\", not {short(value)}")


# zero_optimization knobs that may say "auto", filled from the model's shape (in elements). The
# bucket and threshold follow the DeepSpeed integration of Hugging Face Transformers (hidden^2 and
# 10 * hidden). The prefetch bucket departs from its 0.9 * hidden^2 on purpose: that is 1/13 of one
# trunk block (12 D^2 parameters: qkv 3 D^2, proj D^2, fc1 and fc2 4 D^2 each), so ZeRO-3 could never
# have the next block gathered while the current one computes. One whole trunk block it is (201M
# elements at 7B: 0.4 GB in bf16 per GPU).
# Both buckets have a floor, AUTO_BUCKET_FLOOR elements or the whole model when it is smaller: hidden^2
# alone gave aim-tiny a 65,536-element reduce bucket, one collective per few layers' gradients, and its
# steps ran 0.69x as fast as with DeepSpeed's fixed buckets on 2 CPU ranks (BENCHMARKS.md, "Step:
# ZeRO-3"). A bucket larger than the model buys nothing, so the floor stops there.
AUTO_BUCKET_FLOOR = 50_000_000


def _bucket(elements: int, model_cfg: AIMConfig) -> int:
    return max(elements, min(AUTO_BUCKET_FLOOR, model_parameters(model_cfg)))


AUTO_ZERO_KNOBS: dict[str, Callable[[AIMConfig], int]] = {
    "reduce_bucket_size": lambda cfg: _bucket(model_hidden_size(cfg) ** 2, cfg),
    "stage3_prefetch_bucket_size": lambda cfg: _bucket(trunk_block_parameters(cfg), cfg),
    "stage3_param_persistence_threshold": lambda cfg: 10 * model_hidden_size(cfg),
}


@functools.lru_cache(maxsize=16)
def model_parameters(model_cfg: AIMConfig) -> int:
    """Parameters of the whole model ``model_cfg`` (trunk and pixel head), counted on the meta device."""
    with torch.device("meta"):
        model = AIM(model_cfg)
    return sum(p.numel() for p in model.parameters())


def model_hidden_size(model_cfg: AIMConfig) -> int:
    """The width the bucket and threshold scale with: the wider of trunk and pixel head (the head's
    2048 exceeds aim-0.6B's trunk width of 1536), as Transformers takes the largest hidden size."""
    return max(model_cfg.width, model_cfg.head_width)


def trunk_block_parameters(model_cfg: AIMConfig) -> int:
    """Parameters of one trunk block: four D^2 attention matrices, two 4 D^2 MLP matrices (no
    biases), two LayerNorms (2 D each)."""
    width = model_cfg.width
    return 12 * width * width + 4 * width


def resolve_auto_knobs(ds: dict[str, Any], model_cfg: AIMConfig) -> list[str]:
    """Replace ``"auto"`` in the :data:`AUTO_ZERO_KNOBS` of ``ds["zero_optimization"]`` (in place)
    with values from the model's shape. Returns one note per knob filled."""
    zero = ds.get("zero_optimization", {})
    notes = []
    for key, value_of in AUTO_ZERO_KNOBS.items():
        if zero.get(key) == "auto":
            zero[key] = value_of(model_cfg)
            notes.append(f"zero_optimization.{key}=auto -> {zero[key]}")
    return notes


def check_runs_here(
    ds: dict[str, Any], device_name: str, supported_dtypes: Sequence[torch.dtype], source: str = "the DeepSpeed config"
) -> None:
    """Raise :class:`ConfigError` saying why when ``ds`` asks for a precision the accelerator
    ``device_name`` cannot train in (``supported_dtypes``: DeepSpeed's ``get_accelerator()
    .supported_dtypes()``). Nothing is switched off quietly: bf16, offload and ZeRO-3 all run on
    DeepSpeed's CPU accelerator, so the CPU trains what a GPU would."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds.get(key, {}).get("enabled", False) and dtype not in supported_dtypes:
            raise ConfigError(
                f"{source} enables {key} but DeepSpeed's {device_name} accelerator does not support "
                f"{dtype} here (it supports {', '.join(str(d) for d in supported_dtypes)}); use a config "
                f"without {key}, e.g. ds_configs/zero3_fp32.json"
            )


def optimizer_offloaded(ds: dict[str, Any]) -> bool:
    """True when ZeRO keeps the optimizer on the CPU or NVMe (then DeepSpeedCPUAdam is required)."""
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it sets none)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))
