"""The DeepSpeed config merge, the model and the DeepSpeed engine.

:func:`load_ds_config` and :func:`build_ds_config` need no process group; :func:`build_model` and
:func:`build_engine` run on every rank of a launched job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, load_json, short
from ..model.aim import AIM, AIMConfig
from ..model.registry import get_model_spec
from ..optim import build_optimizer, lr_at_step, param_groups
from .config import _BATCH_KEYS, BatchConfigError, PretrainConfig, RunPlan


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
    for key in _BATCH_KEYS:
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


def build_ds_config(
    base: dict[str, Any],
    cfg: PretrainConfig,
    plan: RunPlan,
    model_cfg: AIMConfig,
    *,
    source: str = "the DeepSpeed config",
) -> tuple[dict[str, Any], list[str]]:
    """Fill batch sizes, clipping and the ``"auto"`` ZeRO knobs into a copy of ``base``.

    A batch value the JSON already sets (other than ``"auto"``) must agree with the run config, else
    :class:`BatchConfigError` says which knob to change. Precision and offload are taken as the
    JSON says, on every device (:func:`check_runs_here` rejects what the device cannot do). A bf16 or
    fp16 ZeRO config that leaves ``data_types.grad_accum_dtype`` / ``communication_data_type`` unset
    gets fp32 for both, since DeepSpeed would otherwise sum and reduce gradients in 16 bits. Returns
    the dict and notes for the log.
    """
    ds = json.loads(json.dumps(base))  # deep copy, plain data
    notes: list[str] = []
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{source} sets '{key}'; remove it: the optimizer and LR schedule come from the run "
                "config's optim section"
            )
    for key, (knob, value_of) in _BATCH_KEYS.items():
        want = value_of(cfg, plan)
        have = ds.get(key, "auto")
        if have != "auto" and not math.isclose(float(have), float(want)):
            raise BatchConfigError(
                f"{source} sets {key}={have} but the run config gives {want} "
                f"(from {knob}, world size {plan.world_size}); remove {key} from {source} "
                f"(the driver fills it) or change {knob}"
            )
        ds[key] = want
    notes += resolve_auto_knobs(ds, model_cfg)
    half = any(ds.get(p, {}).get("enabled", False) for p in ("bf16", "fp16"))
    if half and zero_stage(ds) >= 1:  # stage 0 + bf16 cannot accumulate in fp32 (DeepSpeed refuses)
        if "grad_accum_dtype" not in ds.get("data_types", {}):
            ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
            notes.append(f"{source} leaves data_types.grad_accum_dtype unset: gradients accumulate in fp32")
        if "communication_data_type" not in ds:
            ds["communication_data_type"] = "fp32"
            notes.append(f"{source} leaves communication_data_type unset: gradients are reduced in fp32")
    ds.setdefault("steps_per_print", 10**9)  # our logger reports; silence DeepSpeed's own step prints
    return ds, notes


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


def model_config(cfg: PretrainConfig) -> AIMConfig:
    """The AIMConfig the run builds (registry entry plus ``model.overrides``). The run resolves it
    once here and hands it to everything that needs the architecture."""
    try:
        spec = get_model_spec(cfg.model.name)
    except KeyError as exc:
        raise ConfigError(f"model.name: {exc.args[0]}") from None
    try:
        return spec.config.replace(**cfg.model.overrides) if cfg.model.overrides else spec.config
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from None


def build_model(model_cfg: AIMConfig, cfg: PretrainConfig, ds: dict[str, Any] | None = None) -> AIM:
    """The model ``model_cfg`` (from :func:`model_config`), initialised from ``train.seed`` (the same
    on every rank, so the ZeRO partitions come from one consistent model). With ``model.zero_init``
    and a ZeRO-3 ``ds`` config, parameters are partitioned as each layer is built."""
    torch.manual_seed(cfg.train.seed)
    context: Any = contextlib.nullcontext()
    if cfg.model.zero_init and ds is not None and zero_stage(ds) == 3:
        import deepspeed

        context = deepspeed.zero.Init(config_dict_or_path=ds)
    with context:
        model = AIM(model_cfg, name=cfg.model.name)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing, head=cfg.model.head_grad_checkpointing)
    if cfg.model.compile:
        compile_blocks(model)
    return model


def compile_blocks(model: AIM, **compile_kwargs: Any) -> int:
    """``torch.compile`` each trunk block and each pixel-head block in place (``nn.Module.compile``).
    Returns the number of blocks compiled.

    In place, so parameter names keep no ``_orig_mod.`` prefix: checkpoints, exports and ZeRO-3's
    parameter partitions see the same module tree as in eager mode. Per block, not the whole model:
    ZeRO-3 gathers each layer's parameters in module hooks that DeepSpeed keeps out of graphs
    (``torch.compiler.disable``), so a whole-model graph would break at every layer anyway, and the
    blocks are where the fusable work is (LayerNorm, GELU, residual adds, attention's reshapes).
    Every block of a kind has one shape, so the trunk compiles once and the head once."""
    try:
        import deepspeed.utils.nvtx
    except ImportError:  # plain PyTorch (the probe, the benches)
        pass
    else:
        # DeepSpeed's own engine.compile does the same: its NVTX range wrapper around ZeRO-3's fetch
        # and release functions would otherwise be traced (a graph break and a recompile per call).
        deepspeed.utils.nvtx.enable_nvtx = False
    blocks = [*model.trunk.blocks, *model.head.blocks]
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, counting ZeRO-3 partitioned ones at their full size."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def build_engine(model: nn.Module, cfg: PretrainConfig, ds: dict[str, Any], plan: RunPlan) -> tuple[Any, Any]:
    """AdamW over decay / no-decay groups, wrapped by ``deepspeed.initialize``. Returns
    ``(engine, optimizer)``; ``optimizer`` is ours, whose groups :func:`aim_ds.optim.set_lr` writes
    each step."""
    import deepspeed

    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = build_optimizer(
        groups,
        lr=lr_at_step(0, peak_lr=cfg.optim.peak_lr, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps),
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        offload=optimizer_offloaded(ds),
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine, optimizer


def shard_report(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Per parameter: full size ``ds_numel``, this rank's partition ``local_numel`` and whether ZeRO-3
    keeps it gathered (``persist``). Empty unless the parameters are ZeRO-3 partitioned."""
    report = {}
    for name, param in module.named_parameters():
        if hasattr(param, "ds_tensor"):
            report[name] = {
                "ds_numel": int(param.ds_numel),
                "local_numel": int(param.ds_tensor.numel()),
                "persist": bool(getattr(param, "ds_persist", False)),
                "ndim": len(param.ds_shape),
            }
    return report
