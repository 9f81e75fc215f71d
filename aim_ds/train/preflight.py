"""Checks that run before any rank builds anything: every field and every path of the run config.

:func:`check_config` raises :class:`~aim_ds.config.ConfigError` with one message naming the key and
its value (``optim.peak_lr=nan: must be a finite number > 0``), so that a bad config fails in a
second with exit code 2, before DeepSpeed starts, a checkpoint loads or ``config.yaml`` is
rewritten. It needs no process group: every rank runs it on its own and they all agree.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .config import PretrainConfig, resolve_plan

MAX_SEED = 2**32 - 1


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {why}")


def _finite(key: str, value: float, *, low: float, low_open: bool = False, high: float = math.inf) -> None:
    """``value`` finite and within ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        bound = f"> {low}" if low_open else f">= {low}"
        upper = f" and <= {high}" if math.isfinite(high) else ""
        raise _bad(key, value, f"must be a finite number {bound}{upper}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise _bad(key, value, f"must be >= {low}")


def _check_pair(key: str, pair: tuple[float, float], *, low: float, high: float) -> None:
    """A ``(lo, hi)`` range with ``low < lo <= hi <= high``."""
    lo, hi = pair
    if not (math.isfinite(lo) and math.isfinite(hi)) or not (low < lo <= hi <= high):
        upper = "" if math.isinf(high) else f" <= {high}"
        raise _bad(key, list(pair), f"must be [low, high] with {low} < low <= high{upper}")


def check_fields(cfg: PretrainConfig) -> None:
    """Every number of ``cfg`` within its range (no paths; see :func:`check_paths`)."""
    d, t, o = cfg.data, cfg.train, cfg.optim
    if not d.sources:
        raise _bad("data.sources", [], "give at least one {path, prob}")
    for i, source in enumerate(d.sources):
        if not source.path:
            raise _bad(f"data.sources[{i}].path", source.path, "is empty")
        _finite(f"data.sources[{i}].prob", source.prob, low=0.0, low_open=True)
    _at_least("data.image_size", d.image_size, 0)
    _at_least("data.resize_size", d.resize_size, 0)
    _check_pair("data.scale", d.scale, low=0.0, high=1.0)
    _check_pair("data.ratio", d.ratio, low=0.0, high=math.inf)
    # The loaders decode in worker threads: 0 would build a loader with nothing to decode.
    _at_least("data.num_workers", d.num_workers, 1)
    if d.color_jitter:
        from ..data.color_jitter import ColorJitter

        try:
            ColorJitter.from_values(d.color_jitter_values, d.color_jitter_prob)
        except (TypeError, ValueError) as exc:
            why = f"{exc} (prob {d.color_jitter_prob})"
            raise _bad("data.color_jitter_values", list(d.color_jitter_values), why) from None
    _at_least("train.batch_size", t.batch_size, 1)
    _at_least("train.micro_batch_size", t.micro_batch_size, 0)
    _at_least("train.steps", t.steps, 0)
    _finite("train.patches_seen", t.patches_seen, low=0.0)
    _at_least("train.seed", t.seed, 0)
    if t.seed > MAX_SEED:  # numpy and the loaders' generators take 32-bit seeds
        raise _bad("train.seed", t.seed, f"must be <= {MAX_SEED}")
    _at_least("train.stop_after_steps", t.stop_after_steps, 0)
    _finite("optim.peak_lr", o.peak_lr, low=0.0, low_open=True)
    _finite("optim.min_lr", o.min_lr, low=0.0, high=o.peak_lr)
    _finite("optim.warmup_fraction", o.warmup_fraction, low=0.0, high=1.0)
    _at_least("optim.warmup_steps", o.warmup_steps, -1)
    _finite("optim.weight_decay", o.weight_decay, low=0.0)
    for i, beta in enumerate(o.betas):
        _finite(f"optim.betas[{i}]", beta, low=0.0, high=1.0)
        if beta >= 1.0:
            raise _bad(f"optim.betas[{i}]", beta, "must be < 1")
    _finite("optim.eps", o.eps, low=0.0, low_open=True)
    _finite("optim.grad_clip", o.grad_clip, low=0.0)
    for key in ("every_steps", "batch_size", "max_batches", "patch_grid_images"):
        _at_least(f"val.{key}", getattr(cfg.val, key), 0)
    _at_least("log.every_steps", cfg.log.every_steps, 0)
    _finite("log.peak_flops_per_device", cfg.log.peak_flops_per_device, low=0.0)  # 0: from the device
    _at_least("checkpoint.every_steps", cfg.checkpoint.every_steps, 0)
    _finite("lock.stale_after_s", cfg.lock.stale_after_s, low=0.0, low_open=True)
    _finite("stop.repeat_after_s", cfg.stop.repeat_after_s, low=0.0)
    _finite("stop.timeout_s", cfg.stop.timeout_s, low=0.0)
    _finite("dist.timeout_minutes", cfg.dist.timeout_minutes, low=0.0, low_open=True)
    _finite("dist.rank0_wait_minutes", cfg.dist.rank0_wait_minutes, low=0.0, low_open=True)
    _at_least("probe.max_train_images", cfg.probe.max_train_images, 0)
    _at_least("probe.max_val_images", cfg.probe.max_val_images, 0)
    if not cfg.out_dir:
        raise _bad("out_dir", cfg.out_dir, "is empty")


def _existing_parent(folder: Path) -> Path:
    """``folder`` or its nearest parent that exists (where it would be created)."""
    probe = folder
    while True:
        try:
            if probe.exists() or probe.parent == probe:
                return probe
        except OSError:  # a name too long, a loop of links: look further up
            pass
        probe = probe.parent


def _writable(key: str, folder: Path) -> None:
    """``folder`` (or its nearest existing parent, where it will be created) accepts a new file."""
    try:
        limit = os.pathconf(_existing_parent(folder), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in folder.parts:
        if len(os.fsencode(part)) > limit:
            raise _bad(
                key, str(folder), f"the name {part[:40]!r}... is longer than the {limit} bytes a file name may have"
            )
    probe = _existing_parent(folder)
    if not probe.is_dir():
        raise _bad(key, str(folder), f"{probe} exists and is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise _bad(key, str(folder), f"not writable ({exc.strerror or exc})") from None


def _check_betons(key: str, value: str, paths: list[Path]) -> None:
    """Every beton's header (against its folder's index) and its rows (see
    :func:`aim_ds.data.sources.check_betons`): a FIFO, a JPEG renamed ``.beton``, a truncated or corrupt
    beton fails here, not when the loaders are built after the engine (or on every rank, hung)."""
    from ..data.beton import BetonError
    from ..data.sources import check_betons

    try:
        check_betons(paths)
    except (BetonError, OSError) as exc:
        raise _bad(key, value, str(exc)) from None


def check_paths(cfg: PretrainConfig) -> None:
    """Every source and the val beton exist; ``out_dir`` and its checkpoint folder are writable."""
    from ..data.beton import resolve_betons

    for i, source in enumerate(cfg.data.sources):
        try:
            paths = resolve_betons(source.path)
        except (FileNotFoundError, OSError, ValueError) as exc:
            raise _bad(f"data.sources[{i}].path", source.path, f"no beton there ({exc})") from None
        _check_betons(f"data.sources[{i}].path", source.path, paths)
    if cfg.data.val_path:
        val = Path(cfg.data.val_path)
        if not val.exists():
            raise _bad("data.val_path", cfg.data.val_path, "no such file")
        if not os.access(val, os.R_OK):
            raise _bad("data.val_path", cfg.data.val_path, "not readable")
        _check_betons("data.val_path", cfg.data.val_path, [val])
    for key in ("train_path", "val_path"):
        value = getattr(cfg.probe, key)
        if cfg.probe.every_steps > 0 and value and not Path(value).is_file():
            raise _bad(f"probe.{key}", value, "no such file (a labelled .beton)")
    out_dir = Path(cfg.out_dir)
    _writable("out_dir", out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if ckpt_dir.exists():
        _writable("out_dir (its checkpoints/ folder)", ckpt_dir)


def check_logging(cfg: PretrainConfig) -> None:
    """W&B and TensorBoard, when asked for, can start: their packages are installed and the W&B id a
    resumed run continues (``out_dir/wandb_id.txt``) is whole. Found here, not on rank 0 after the
    engine is built while the other ranks wait for it."""
    for key, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if getattr(cfg.log, key) and importlib.util.find_spec(package) is None:
            raise _bad(f"log.{key}", True, f"needs the {package} package (pip install {package}; requirements.txt)")
    if cfg.log.wandb:
        from ..metrics import WANDB_ID_FILE, wandb_run_id

        if (Path(cfg.out_dir) / WANDB_ID_FILE).is_file():
            try:
                wandb_run_id(cfg.out_dir)
            except (OSError, ValueError) as exc:
                raise _bad("log.wandb", True, str(exc)) from None


def check_config(cfg: PretrainConfig, world_size: int | None = None) -> None:
    """Fields, the model (registry name and overrides), the batch split for ``world_size`` ranks
    (default: the launcher's ``WORLD_SIZE``, 1 for a plain process), then paths: the first problem
    raises :class:`ConfigError` naming its key and value."""
    from .engine import model_config
    from .live_probe import check_live_probe

    check_fields(cfg)
    check_logging(cfg)
    model_cfg = model_config(cfg)
    image_size = cfg.data.image_size or model_cfg.image_size
    if image_size != model_cfg.image_size:
        raise _bad("data.image_size", image_size, f"differs from the model's image_size={model_cfg.image_size}")
    if 0 < cfg.data.resize_size < image_size:
        raise _bad(
            "data.resize_size",
            cfg.data.resize_size,
            f"must be 0 (image_size * 256 / 224) or >= the image size {image_size}: the centre crop needs it",
        )
    # The live probe's settings, here rather than after the engine is built.
    check_live_probe(cfg)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    resolve_plan(cfg, world, image_size, model_cfg.num_patches)
    check_paths(cfg)
