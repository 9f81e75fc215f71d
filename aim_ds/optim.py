"""Optimisation for AIM pretraining: the learning-rate schedule, parameter groups, the optimizer.

The paper's recipe (Table 10): AdamW with betas (0.9, 0.95), eps 1e-8, weight decay 0.05 on
matrices only (not on biases, norms or position embeddings), linear warmup over 2.5% of the steps,
then cosine decay to 0. The schedule is a pure function of the optimizer step so that a resumed
run recomputes exactly the value a straight run would have used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def lr_at_step(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the first update uses ``step=0``).

    Linear warmup ``peak_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first
    update already moves, so no step is spent at LR 0), then cosine from ``peak_lr`` at
    ``step = warmup_steps`` down to ``min_lr`` at ``step = total_steps``. Steps past the end stay
    at ``min_lr``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_from_patches(patches_seen: float, batch_size: int, num_patches: int) -> int:
    """Optimizer steps that show ``patches_seen`` patches at ``batch_size`` images of
    ``num_patches`` patches each (Table 1: 1.2e12 / (4096 * 256) = 1,144,410 steps), rounded up."""
    if batch_size <= 0 or num_patches <= 0:
        raise ValueError("batch_size and num_patches must be positive")
    return int(math.ceil(patches_seen / (batch_size * num_patches)))


def steps_from_images(images_seen: float, batch_size: int) -> int:
    """Optimizer steps that show at most ``images_seen`` images at ``batch_size`` per step, rounded
    down (AIM-0.6B's 2B images at 4096: 488,281 steps)."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    return int(images_seen // batch_size)


def warmup_steps_from_fraction(total_steps: int, warmup_fraction: float) -> int:
    """``round(total_steps * warmup_fraction)``; the paper warms up over 2.5% of the steps."""
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must lie in [0, 1], got {warmup_fraction}")
    return int(round(total_steps * warmup_fraction))


def resolve_warmup_steps(total_steps: int, warmup_fraction: float, warmup_steps: int = -1) -> int:
    """Warmup steps of a ``total_steps`` run: ``warmup_fraction`` of it (the authors' only form, so a
    100k-step ablation warms up 2,500 steps at 2.5%), unless a fixed ``warmup_steps >= 0`` overrides
    it. A fixed count longer than the run is a ValueError naming both numbers."""
    if warmup_steps < 0:
        return warmup_steps_from_fraction(total_steps, warmup_fraction)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} exceeds the run's {total_steps} steps; "
            "leave it at -1 to warm up over warmup_fraction of the run"
        )
    return warmup_steps


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # Under ZeRO-3 a partitioned parameter's .shape is empty; its true shape is ds_shape.
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) <= 1 or name.endswith(".bias") or "pos_embed" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (and conv kernels) with ``weight_decay``; biases, norm weights,
    any other 1-D parameter and anything named ``pos_embed`` with none. Frozen parameters are left
    out. Each group carries ``names`` (for tests and logs; torch ignores unknown keys)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    decay_names: list[str] = []
    no_decay_names: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _is_no_decay(name, param):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(
    groups: Iterable[dict],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    offload: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over ``groups``. With the optimizer offloaded to the CPU by ZeRO, DeepSpeed needs its
    own ``DeepSpeedCPUAdam`` (AdamW mode); otherwise ``torch.optim.AdamW`` with its fused kernel, on
    the CPU as on CUDA: the unfused CPU path makes two temporaries the size of the parameters it steps
    (8 bytes per parameter, as much as its Adam moments: a step peaked
    2.9 GiB [fig:planner.unfused_adamw_excess] above its resident memory at aim-0.6B's widths, depth 4,
    260M parameters a rank) and is 8x slower (measured in BENCHMARKS.md, "Memory planner").
    The learning rate is overwritten every step by :func:`set_lr`."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every param group. ZeRO keeps the groups of the optimizer we passed to
    ``deepspeed.initialize`` (with its fp32 partitions swapped in), so writing here reaches the
    update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
