"""The probe run's config: typed sections, the checks a run needs, and the choice of trunk blocks.

The vocabulary is the pretraining config's: ``model: {name: ..., overrides: {...}}``. The recipe
defaults are the paper's probe recipe (docs/recipe.md, "Attentive probe").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError, load_config, parse_yaml, read_text, short
from ..distributed import DistSection
from ..model.registry import probe_blocks

HEAD_TYPES = ("attentive", "linear")
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Feature extraction precision: "float32" (the authors score their released heads in fp32), "bfloat16"
# (bf16 autocast and bf16 weight matrices: faster on GPUs), "auto": bf16 on CUDA, fp32 on the CPU.
FEATURE_DTYPES = ("auto", "float32", "bfloat16")


def feature_compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the trunk computes probe features in, for ``features.dtype`` on ``device``."""
    if setting not in FEATURE_DTYPES:
        raise ConfigError(f"features.dtype {setting!r} is not one of {', '.join(FEATURE_DTYPES)}")
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.float32 if setting == "float32" else torch.bfloat16


@dataclass
class ModelSection:
    """Which registered model the trunk is, with which ``AIMConfig`` overrides (as in pretraining)."""

    name: str = "aim-test"
    overrides: dict[str, Any] = field(default_factory=dict)  # AIMConfig fields, e.g. {image_size: 64}


@dataclass
class DataConfig:
    """Where the labelled betons are and how images are cut."""

    train_path: str = ""  # labelled .beton (python -m data_prep imagefolder ...)
    val_path: str = ""
    image_size: int = 0  # 0: the model's image_size
    resize_size: int = 0  # eval transform's shorter side before the centre crop; 0: image_size * 256 / 224
    scale: tuple[float, float] = (0.08, 1.0)  # training random-resized-crop area range
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip: bool = True
    num_workers: int = 8
    eval_batch_size: int = 0  # images per rank for feature extraction and evaluation; 0: train per-rank batch
    # A bounded subset (0: every image), spread evenly over the file so that every class is in it.
    # max_train_images needs train.augment=false (cached features); the live probe sets both.
    max_train_images: int = 0
    max_val_images: int = 0


@dataclass
class FeaturesConfig:
    """Which trunk blocks feed the heads, and the on-disk feature cache."""

    layers: list[int] | str = "last"  # "last" (final 6 blocks), "best" (docs/recipe.md), or block indices
    cache: bool = True  # keep extracted features (train.augment=false) for later runs; false: scratch, removed
    cache_dir: str = ""  # "": <out_dir>/feature_cache
    cache_dtype: str = "bfloat16"  # float32 | bfloat16 | float16 on disk
    dtype: str = "auto"  # extraction precision: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16


@dataclass
class HeadsConfig:
    """Which heads to train."""

    types: list[str] = field(default_factory=lambda: ["attentive", "linear"])
    num_queries: int = 1  # learnable queries of the attentive head (the paper: 1)
    bias: bool = False  # classifier bias; the authors' current probe has none (older released heads do)


@dataclass
class TrainConfig:
    """The probe recipe (docs/recipe.md, "Attentive probe": the authors' AIMv2 probe recipe)."""

    epochs: int = 100
    warmup_epochs: float = 5.0
    batch_size: int = 1024  # global, over all ranks
    lrs: list[float] = field(default_factory=lambda: [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3])
    min_lr: float = 1e-5
    # A head per (type, LR, weight decay): the AIMv2 probe sweeps decay over 0.05 and 0.1 (docs/recipe.md).
    weight_decays: list[float] = field(default_factory=lambda: [0.05, 0.1])
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 3.0  # max global grad norm per head; 0 disables
    label_smoothing: float = 0.0
    augment: bool = True  # random-resized crop + flip; false: eval transform, cached features
    seed: int = 0
    eval_every_epochs: int = 0  # 0: evaluate once, at the end
    log_every_steps: int = 50
    tensorboard: bool = False  # event files in out_dir/tensorboard/run_N: each head's loss, LR and scores


@dataclass
class ProbeConfig:
    """A probe run. Load with :func:`load_probe_config` (it names the keys that were renamed)."""

    model: ModelSection = field(default_factory=ModelSection)
    out_dir: str = "runs/probe"
    device: str = "auto"  # auto | cpu | cuda
    dist: DistSection = field(default_factory=DistSection)  # process-group timeout, rank-0 wait
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check_old_spelling(tree: dict[str, Any], where: str) -> None:
    """Raise ``ConfigError`` for the spelling of the model before the config vocabulary was one."""
    if isinstance(tree.get("train"), dict) and "weight_decay" in tree["train"]:
        raise ConfigError(f"train.weight_decay became a grid: use train.weight_decays: [...] (in {where})")
    if "model_overrides" in tree:
        raise ConfigError(f"model_overrides was renamed: use model.overrides (in {where})")
    if "model" in tree and not isinstance(tree["model"], dict):
        raise ConfigError(
            f"model: {short(tree['model'])} as a plain name was renamed: use model.name={tree['model']} "
            f"(YAML: 'model: {{name: {tree['model']}}}') (in {where})"
        )


def load_probe_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ProbeConfig:
    """:func:`aim_ds.config.load_config` for :class:`ProbeConfig`, with a clear ``ConfigError`` for
    the old spelling (``model: aim-tiny``, ``model_overrides:``) in the file or in an override."""
    if path is not None:
        # Read through the same guarded reader as load_config (regular UTF-8 file, no duplicate keys,
        # bounded alias expansion), so this early look cannot hang or explode either.
        tree = parse_yaml(read_text(path, "config file"), f"config file '{path}'") or {}
        if isinstance(tree, dict):
            _check_old_spelling(tree, f"'{path}'")
    for item in overrides or []:
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "model_overrides" or key.startswith("model_overrides."):
            raise ConfigError(f"model_overrides was renamed: use model.overrides (override '{item}')")
        if key == "train.weight_decay":
            raise ConfigError(
                f"train.weight_decay became a grid: use train.weight_decays=[{value}] (override '{item}')"
            )
        if key == "model":
            raise ConfigError(f"model was renamed for the model's name: use model.name={value} (override '{item}')")
    return load_config(ProbeConfig, path, overrides)


def validate_config(cfg: ProbeConfig, *, eval_only: bool = False) -> None:
    """Raise ``ConfigError`` naming the key for a config that cannot run."""
    for kind in cfg.heads.types:
        if kind not in HEAD_TYPES:
            raise ConfigError(f"heads.types: unknown head type {kind!r}; known: {', '.join(HEAD_TYPES)}")
    if not cfg.heads.types and not eval_only:
        raise ConfigError("heads.types is empty; give at least one of " + ", ".join(HEAD_TYPES))
    if not eval_only and cfg.train.epochs > 0:
        if not cfg.train.lrs:
            raise ConfigError("train.lrs is empty; give at least one peak learning rate")
        if any(lr <= 0 for lr in cfg.train.lrs):
            raise ConfigError(f"train.lrs must be positive, got {cfg.train.lrs}")
        if len(set(cfg.train.lrs)) != len(cfg.train.lrs):
            raise ConfigError(f"train.lrs has duplicates: {cfg.train.lrs}")
        decays = cfg.train.weight_decays
        if not decays or any(wd < 0 for wd in decays) or len(set(decays)) != len(decays):
            raise ConfigError(f"train.weight_decays must be distinct non-negative values, got {decays}")
        if not cfg.data.train_path:
            raise ConfigError("data.train_path is not set (a labelled .beton)")
    if not cfg.data.val_path:
        raise ConfigError("data.val_path is not set (a labelled .beton)")
    if cfg.features.dtype not in FEATURE_DTYPES:
        raise ConfigError(f"features.dtype {cfg.features.dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
    if cfg.features.cache_dtype not in CACHE_DTYPES:
        raise ConfigError(f"features.cache_dtype {cfg.features.cache_dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
    if cfg.train.batch_size <= 0:
        raise ConfigError(f"train.batch_size must be positive, got {cfg.train.batch_size}")
    for key in ("max_train_images", "max_val_images"):
        if getattr(cfg.data, key) < 0:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)}: must be >= 0 (0: every image)")
    if cfg.data.max_train_images and cfg.train.augment and not eval_only:
        raise ConfigError(
            f"data.max_train_images={cfg.data.max_train_images} needs train.augment=false (a subset is read "
            "through the feature cache); set train.augment=false or data.max_train_images=0"
        )
    if cfg.train.epochs < 0:
        raise ConfigError(f"train.epochs must be >= 0, got {cfg.train.epochs}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={short(cfg.device)}: not one of auto, cpu, cuda")
    if cfg.heads.num_queries < 1:
        raise ConfigError(f"heads.num_queries must be >= 1, got {cfg.heads.num_queries}")


def resolve_layers(layers: Sequence[int] | str, model_name: str, depth: int) -> list[int]:
    """Block indices (0-based) whose outputs are averaged into the probe features: ``"last"``,
    ``"best"`` or a list (:func:`aim_ds.model.registry.probe_blocks`, which ``AIM.forward_features``
    shares, so a downstream user gets the probe's features)."""
    try:
        return probe_blocks(layers, model_name, depth)
    except ValueError as exc:
        raise ConfigError(f"features.layers={short(layers)}: {exc}") from None
