"""What a probe run builds before training: device and process group, the frozen trunk, the data
geometry and the loaders' plumbing from images to trunk features."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from ..distributed import barrier, check_torch_build, fit_host_allocator, init_distributed, is_main, rank0_phase
from ..io import remove_if_exists
from ..model.flops import matmul_params
from ..model.registry import get_model_spec
from ..weights.backbone import read_handover
from ..weights.frozen import FrozenTrunk, frozen_trunk
from ..weights.load import (
    TrunkWeights,
    WeightsError,
    detect_source,
    load_trunk_weights,
    write_deepspeed_handover,
)
from .config import ProbeConfig, feature_compute_dtype, resolve_layers

# Rank 0 hands a consolidated ZeRO checkpoint's backbone to the other ranks through this file.
HANDOVER_FILE = ".trunk_from_deepspeed.safetensors"


@dataclass
class ProbeContext:
    """Everything a run builds before training: trunk, data sources, geometry."""

    cfg: ProbeConfig
    trunk: FrozenTrunk
    weights_fingerprint: str
    weights_path: str
    weights_source: str
    layers: list[int]
    class_names: list[str]
    device: torch.device
    rank: int
    world_size: int
    image_size: int
    resize_size: int
    per_rank_batch: int  # training images per rank per step
    eval_batch: int  # images per rank per extraction/evaluation batch
    train_images: int = 0  # training images read over all ranks (0 for evaluation only)


def log(msg: str) -> None:
    """Print on rank 0 only (every rank runs the same code)."""
    if is_main():
        print(msg, flush=True)


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A progress bar on rank 0 (tqdm's on a terminal, plain lines in a log file: :mod:`aim_ds.progress`),
    a silent one elsewhere."""
    from ..progress import progress as progress_bar

    return progress_bar(iterable, disable=not is_main(), dynamic_ncols=True, **kwargs)


def _wants_cuda(name: str) -> bool:
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={name!r}: not one of auto, cpu, cuda")
    return name == "cuda" or (name == "auto" and torch.cuda.is_available())


def _is_deepspeed_folder(weights: str | os.PathLike) -> bool:
    # Folder names only: a weights file is never read to learn its kind before it is loaded.
    path = Path(weights)
    try:
        return path.is_dir() and detect_source(path) == "deepspeed"
    except WeightsError:  # not weights at all: load_trunk_weights reports it
        return False


def trunk_matrix_dtype(device: torch.device, features_dtype: str = "auto") -> torch.dtype:
    """The dtype of the trunk's weight matrices for a probe on ``device`` computing features in
    ``features_dtype`` (:func:`~aim_ds.probe.config.feature_compute_dtype`): bf16 under bf16 (what
    bf16 autocast casts them to for every matmul, so the features do not change; vectors stay fp32),
    fp32 otherwise."""
    return feature_compute_dtype(features_dtype, device)


def _load_weights(
    cfg: ProbeConfig,
    weights: str | os.PathLike,
    rank: int,
    world_size: int,
    *,
    keep_blocks: int | None = None,
    matrix_dtype: torch.dtype = torch.float32,
) -> TrunkWeights:
    """The backbone the probe runs (blocks before ``keep_blocks``, matrices in ``matrix_dtype``),
    read once per rank. Merging ZeRO shards reads the fp32 master weights of every rank's optimizer
    state: with several ranks, rank 0 merges the needed tensors once, one rank's shard file at a
    time, straight into a safetensors file that every rank then maps, rank 0 included (one copy in
    the page cache for the whole node, no private copy on rank 0); the file is removed once every
    rank has read it."""
    load = {"keep_blocks": keep_blocks, "matrix_dtype": matrix_dtype}
    if world_size == 1 or not _is_deepspeed_folder(weights):
        return load_trunk_weights(weights, **load)
    handover = Path(cfg.out_dir) / HANDOVER_FILE
    # Merging a big model's shards on rank 0 can outlast the process group's timeout: the other
    # ranks wait for it outside any collective.
    meta: dict[str, Any] = {}  # rank 0's only, as before (it may hold more than plain JSON)
    rank0_phase("shard-merge", cfg.out_dir, lambda: meta.update(write_deepspeed_handover(weights, handover, **load)))
    loaded = TrunkWeights(state_dict=read_handover(handover), source="deepspeed", path=Path(weights), meta=meta)
    barrier()  # every rank has read (mapped) the hand-over file
    if rank == 0:
        remove_if_exists(handover)
    return loaded


def load_frozen_trunk(
    cfg: ProbeConfig,
    weights: str | os.PathLike,
    layers: list[int],
    rank: int,
    world_size: int,
    device: torch.device | None = None,
) -> tuple[FrozenTrunk, TrunkWeights]:
    """The frozen trunk of ``cfg.model`` on ``device`` (CPU when None) holding ``weights``' backbone
    up to the last of ``layers`` (resolved block indices), and the loaded :class:`TrunkWeights`
    (for its fingerprint). Host memory per rank: about one copy of those blocks in their probe
    dtype (:func:`trunk_matrix_dtype`), see BENCHMARKS.md "Probe start-up memory"."""
    device = device or torch.device("cpu")
    depth = get_model_spec(cfg.model.name).config.replace(**cfg.model.overrides).depth
    keep_blocks = max(int(i) % depth for i in layers) + 1 if layers else None
    compute_dtype = feature_compute_dtype(cfg.features.dtype, device)
    loaded = _load_weights(
        cfg,
        weights,
        rank,
        world_size,
        keep_blocks=keep_blocks,
        matrix_dtype=trunk_matrix_dtype(device, cfg.features.dtype),
    )
    trunk = frozen_trunk(
        cfg.model.name, loaded, layers=layers, device=device, compute_dtype=compute_dtype, **cfg.model.overrides
    )
    return trunk, loaded


def _beton_images(key: str, value: str) -> int:
    """The images of the beton (or shards) at ``value`` (config key ``key``), from their checked
    headers (a missing file, a FIFO, a JPEG renamed ``.beton``, a truncated one: ConfigError naming the
    key). Headers only, a few bytes per shard: the probe starts again at every live probe."""
    from ..data.beton import BetonError, beton_num_samples, resolve_betons

    try:
        return sum(beton_num_samples(shard) for shard in resolve_betons(value))
    except (BetonError, OSError, ValueError) as exc:
        raise ConfigError(f"{key}={value}: {exc}") from None


def _classes(key: str, value: str) -> list[str]:
    from ..data import read_class_names

    try:
        return list(read_class_names(value))
    except (OSError, ValueError) as exc:  # BetonError is a ValueError
        raise ConfigError(f"{key}={value}: {exc}") from None


def check_data(cfg: ProbeConfig, *, train: bool) -> tuple[list[str], int]:
    """The probe's data before anything is built from it: the val beton, and with ``train`` the train
    one, are betons with class lists, and the same lists. Returns the class names and the number of
    training images read (at most ``data.max_train_images``; 0 without ``train``)."""
    _beton_images("data.val_path", cfg.data.val_path)
    val_names = _classes("data.val_path", cfg.data.val_path)
    if not train:
        return val_names, 0
    images = _beton_images("data.train_path", cfg.data.train_path)
    class_names = _classes("data.train_path", cfg.data.train_path)
    if val_names != class_names:
        raise ConfigError(
            f"data.train_path={cfg.data.train_path} and data.val_path={cfg.data.val_path}: different class lists "
            f"({len(class_names)} classes in the train beton, {len(val_names)} in the val one); write both from "
            "folders with the same class sub-folders"
        )
    return class_names, min(images, cfg.data.max_train_images) if cfg.data.max_train_images else images


def check_batch_fits(cfg: ProbeConfig, world_size: int, images: int, per_rank_steps: int | None = None) -> None:
    """Raise ConfigError when ``train.batch_size`` gives no full step per epoch from ``images``
    training images over ``world_size`` ranks (or when a rank's loader, ``per_rank_steps``, has none)."""
    per_rank = cfg.train.batch_size // world_size
    if images // world_size >= per_rank and per_rank_steps != 0:
        return
    raise ConfigError(
        f"train.batch_size={cfg.train.batch_size}: larger than the training set (data.train_path="
        f"{cfg.data.train_path}: {images} images"
        + (f" with data.max_train_images={cfg.data.max_train_images}" if cfg.data.max_train_images else "")
        + (f", {images // world_size} per rank over {world_size} ranks" if world_size > 1 else "")
        + "); lower train.batch_size"
    )


def prepare(cfg: ProbeConfig, weights: str | os.PathLike, *, train: bool = True) -> ProbeContext:
    """Set up the device, the process group (none in a plain single process), the frozen trunk and
    the data geometry. ``train=False`` (evaluation only) reads the class list from the val beton
    and leaves the train one alone."""
    if cfg.device != "cpu":  # a GPU node with a CPU build of torch would probe on the CPU without a word
        check_torch_build()
    rank, world_size, device = init_distributed(cuda=_wants_cuda(cfg.device), group_of_one=False, dist_cfg=cfg.dist)
    model_cfg = get_model_spec(cfg.model.name).config.replace(**cfg.model.overrides)
    fit_host_allocator(matmul_params(model_cfg)[0], device)  # the trunk: the probe's largest part
    image_size = cfg.data.image_size or model_cfg.image_size
    if image_size != model_cfg.image_size:
        raise ConfigError(
            f"data.image_size={image_size}: differs from {cfg.model.name}'s image_size {model_cfg.image_size} "
            "(the fixed position embedding is built for that grid); set model.overrides.image_size too"
        )
    if cfg.train.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}: not divisible by the world size {world_size}; "
            f"set train.batch_size to a multiple of {world_size}"
        )
    layers = resolve_layers(cfg.features.layers, cfg.model.name, model_cfg.depth)
    trunk, loaded = load_frozen_trunk(cfg, weights, layers, rank, world_size, device)
    # After the weights (a bad --weights is named first, whatever the data), before any feature.
    class_names, images = check_data(cfg, train=train)
    if train and cfg.train.epochs > 0:
        check_batch_fits(cfg, world_size, images)
    per_rank = cfg.train.batch_size // world_size
    return ProbeContext(
        cfg=cfg,
        trunk=trunk,
        weights_fingerprint=loaded.fingerprint(),
        weights_path=str(weights),
        weights_source=loaded.source,
        layers=layers,
        class_names=class_names,
        device=device,
        rank=rank,
        world_size=world_size,
        image_size=image_size,
        resize_size=cfg.data.resize_size or int(round(image_size * 256 / 224)),
        per_rank_batch=per_rank,
        eval_batch=cfg.data.eval_batch_size or per_rank,
        train_images=images,
    )


def loader_device(ctx: ProbeContext) -> torch.device | None:
    """Where the loaders put batches: on the GPU when training there, else where they are made."""
    return ctx.device if ctx.device.type == "cuda" else None


def build_train_images(ctx: ProbeContext) -> Any:
    """This rank's augmented training loader (random-resized crop, flip) of ``(images, labels)``."""
    from ..data import build_train_loader

    cfg = ctx.cfg
    return build_train_loader(
        cfg.data.train_path,
        batch_size=ctx.per_rank_batch,
        image_size=ctx.image_size,
        scale=tuple(cfg.data.scale),
        ratio=tuple(cfg.data.ratio),
        flip=cfg.data.flip,
        seed=cfg.train.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=cfg.data.num_workers,
        device=loader_device(ctx),
    )


def max_images_of(cfg: ProbeConfig, path: str) -> int:
    """The subset size for ``path``: ``data.max_train_images`` for the train beton,
    ``data.max_val_images`` for the val one (0: every image)."""
    return cfg.data.max_train_images if path == cfg.data.train_path else cfg.data.max_val_images


def build_eval_images(ctx: ProbeContext, path: str) -> Any:
    """This rank's shard of ``path`` (its bounded subset, :func:`max_images_of`) through the eval
    transform (resize, centre crop)."""
    from ..data import build_eval_loader

    return build_eval_loader(
        path,
        batch_size=ctx.eval_batch,
        image_size=ctx.image_size,
        resize_size=ctx.resize_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=ctx.cfg.data.num_workers,
        device=loader_device(ctx),
        max_images=max_images_of(ctx.cfg, path),
    )


def iterate_loader(loader: Any, epoch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` of one epoch of ``loader`` (an epoch-seeded loader, or any iterable)."""
    if hasattr(loader, "iter_epoch"):
        yield from loader.iter_epoch(epoch)
    else:
        yield from loader


def trunk_batches(
    ctx: ProbeContext, images: Iterator[tuple[Tensor, Tensor]], desc: str | None, total: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` -> ``(features [B, N, D], labels [B])`` through the frozen trunk, on
    ``ctx.device``; a progress bar named ``desc`` unless it is None (training has its own bar)."""
    if desc is not None:
        images = progress(images, desc=desc, total=total, leave=False)
    for imgs, labels in images:
        yield ctx.trunk(imgs), labels.to(ctx.device, non_blocking=True).long()


def eval_batches(ctx: ProbeContext, path: str, desc: str) -> Iterator[tuple[Tensor, Tensor]]:
    """Features and labels of this rank's shard of ``path`` through the eval transform."""
    loader = build_eval_images(ctx, path)
    total = len(loader) if hasattr(loader, "__len__") else None
    return trunk_batches(ctx, iterate_loader(loader), desc, total)
