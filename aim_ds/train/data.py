"""The pretraining loaders, the stateless prefix-length draw, and iteration from a data position.

A rank's data position is ``(epoch, batch_in_epoch)``: the next micro-batch it will read. Epochs
end at the shortest rank's end, since under ZeRO-3 every forward gathers parameters collectively
and all ranks must take the same number of steps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from ..distributed import min_across_ranks
from .config import PretrainConfig, RunPlan


def build_loaders(cfg: PretrainConfig, plan: RunPlan, rank: int, world: int, device: torch.device) -> tuple[Any, Any]:
    """The training mixture loader and the held-out loader (None without ``data.val_path``)."""
    from ..data import build_eval_loader, build_train_loader
    from ..data.color_jitter import ColorJitter

    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: give at least one {path, prob}")
    sources = [(s.path, s.prob) for s in cfg.data.sources]
    loader_device = device if device.type == "cuda" else None
    jitter = None
    if cfg.data.color_jitter:
        try:
            jitter = ColorJitter.from_values(cfg.data.color_jitter_values, cfg.data.color_jitter_prob)
        except ValueError as exc:
            raise ConfigError(f"data.color_jitter_values / data.color_jitter_prob: {exc}") from None
    try:
        train = build_train_loader(
            sources,
            batch_size=plan.micro_batch_size,
            image_size=plan.image_size,
            scale=tuple(cfg.data.scale),
            ratio=tuple(cfg.data.ratio),
            flip=cfg.data.flip,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world,
            num_workers=cfg.data.num_workers,
            device=loader_device,
            color_jitter=jitter,
        )
    except ValueError as exc:  # too few images for one micro-batch on every rank: the user's numbers
        raise ConfigError(f"data.sources: {exc}; lower train.micro_batch_size or add images") from None
    val = None
    if cfg.data.val_path:
        val = build_eval_loader(
            cfg.data.val_path,
            batch_size=cfg.val.batch_size or plan.micro_batch_size,
            image_size=plan.image_size,
            resize_size=cfg.data.resize_size or round(plan.image_size * 256 / 224),
            rank=rank,
            world_size=world,
            num_workers=cfg.data.num_workers,
            device=loader_device,
        )
    return train, val


def _seed_from(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_prefix_len(batch_size: int, num_patches: int, *key: Any) -> Tensor:
    """Prefix lengths ``[batch_size]`` int64, uniform in ``[1, num_patches - 1]``, from a generator
    seeded by ``key`` (e.g. ``(seed, rank, step, micro_step)``): stateless, so reproducible on resume."""
    generator = torch.Generator().manual_seed(_seed_from(*key))
    return torch.randint(1, num_patches, (batch_size,), generator=generator)


def _batches_per_epoch(loader: Any) -> int:
    return min_across_ranks(len(loader))


def iterate_batches(loader: Any, epoch: int, batch_in_epoch: int, per_epoch: int) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(epoch, index_in_epoch, images)`` from position ``(epoch, batch_in_epoch)`` onwards,
    across epoch boundaries, forever. ``images`` ``[micro_batch_size, 3, H, W]``."""
    while True:
        if batch_in_epoch < per_epoch:
            index = batch_in_epoch
            for images, _labels in loader.iter_epoch(epoch, start_step=batch_in_epoch):
                yield epoch, index, images
                index += 1
                if index >= per_epoch:
                    break
        epoch, batch_in_epoch = epoch + 1, 0
