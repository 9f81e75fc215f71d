"""The DeepSpeed config merge, the model and the DeepSpeed engine.

:func:`build_ds_config` needs no process group; :func:`build_model` and :func:`build_engine` run on
every rank of a launched job. Reading a DeepSpeed JSON and filling its ``"auto"`` knobs is
:mod:`aim_ds.ds_config` (below both this package and the planner, which fills them the same way);
its names are imported here too, where the driver's callers have always found them.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..ds_config import (  # noqa: F401  (re-exported: the engine's callers import them from here)
    AUTO_BUCKET_FLOOR,
    AUTO_ZERO_KNOBS,
    check_ds_shape,
    check_runs_here,
    load_ds_config,
    model_hidden_size,
    model_parameters,
    optimizer_offloaded,
    resolve_auto_knobs,
    trunk_block_parameters,
    zero_stage,
)
from ..model.aim import AIM, AIMConfig
from ..model.registry import get_model_spec
from ..optim import build_optimizer, lr_at_step, param_groups
from .config import _BATCH_KEYS, BatchConfigError, PretrainConfig, RunPlan


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
