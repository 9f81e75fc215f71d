"""Export a training checkpoint as consolidated fp32 safetensors, and load it back without DeepSpeed.

The weights come from the fp32 master copy in the optimizer shards of a complete checkpoint
(:mod:`aim_ds.weights.zero_shards` merges the ZeRO-1/2/3 partitions without unpickling code), not from the
bf16 module weights, so nothing is lost to rounding. Files written to ``<run>/export/``:

- ``model.safetensors``: our full state dict (``preprocessor.*``, ``trunk.*``, ``head.*``);
- ``model.json``: ``{"model", "overrides", "architecture", "step", "aim_ds_version", "checkpoint"}``;
  ``architecture`` is the full resolved :class:`~aim_ds.model.aim.AIMConfig` (every field that changes the
  function), which loading uses, so that an export keeps its meaning when a default changes;
- ``trunk_ml_aim.safetensors`` (optional): the backbone in the released ml-aim key layout;
- ``reference_forward.safetensors`` (end of a training run): the trained engine's outputs on fixed
  inputs, to check that the exported weights reproduce the trained model.

``model.json`` is what makes the folder an export, so it is removed first and published last: while
the other files are replaced (each atomically, through :mod:`aim_ds.io`) the folder holds no
``model.json``, and a reader never pairs new weights with old metadata or the reverse.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_path, atomic_write_json, remove_if_exists
from ..model.aim import AIM, AIMConfig
from ..model.registry import create_model, get_model_spec
from . import checkpoint as ckpt
from .interop import to_ml_aim

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
ML_AIM_FILE = "trunk_ml_aim.safetensors"
REFERENCE_FILE = "reference_forward.safetensors"


# AIMConfig fields that do not change the function (how attention is computed): not stored.
_RUNTIME_FIELDS = frozenset({"attn_impl"})


def architecture_of(cfg: AIMConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that change the model's function (widths, depths, heads, patch and image
    size, norm eps, head block form, target normalisation, ...), as plain JSON data."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _RUNTIME_FIELDS}


def export_architecture(meta: dict[str, Any], where: str | os.PathLike = "model.json") -> dict[str, Any]:
    """The architecture overrides that rebuild an export's model from ``create_model(meta["model"], ...)``.

    With ``meta["architecture"]`` (exports since it was added): every stored field, so that today's
    defaults do not leak in; a field this version does not know is a ValueError naming it. Without it
    (older exports: a registry name and overrides only): the overrides, with a warning naming every
    value assumed from today's registry entry and defaults.
    """
    name = meta.get("model")
    overrides = dict(meta.get("overrides", {}))
    known = {f.name for f in dataclasses.fields(AIMConfig)}
    architecture = meta.get("architecture")
    if architecture is not None:
        unknown = sorted(set(architecture) - known)
        if unknown:
            raise ValueError(
                f"{where}: architecture fields {unknown} are unknown to this aim-ds version (a newer export?); "
                f"known: {', '.join(sorted(known))}"
            )
        missing = sorted(known - _RUNTIME_FIELDS - set(architecture))
        if missing:
            assumed = get_model_spec(name).config.replace(**overrides)
            logger.warning(
                "%s: architecture has no %s; assuming %s",
                where,
                ", ".join(missing),
                ", ".join(f"{k}={getattr(assumed, k)!r}" for k in missing),
            )
        return {**overrides, **architecture}
    assumed = get_model_spec(name).config.replace(**overrides)
    logger.warning(
        "%s has no 'architecture' (an export written before aim-ds stored it): rebuilding %r from today's "
        "registry entry and defaults, assuming %s",
        where,
        name,
        ", ".join(f"{k}={v!r}" for k, v in architecture_of(assumed).items()),
    )
    return overrides


def consolidate_fp32(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, Tensor]:
    """The full fp32 state dict of checkpoint ``ckpt_dir/tag``, merged from every rank's shards.

    Read by :mod:`aim_ds.weights.zero_shards` with ``torch.load(weights_only=True)``: a crafted shard cannot
    run code (DeepSpeed's ``zero_to_fp32`` unpickles anything). Runs in one process without a
    process group; needs host memory for the whole model (4 bytes per parameter, about 27 GB for
    AIM-7B with its head). Raises :class:`aim_ds.weights.zero_shards.ShardError` naming a refused file.
    """
    from .zero_shards import consolidate_fp32 as merge_shards

    return merge_shards(ckpt_dir, tag)


def _complete_state_dict(state: dict[str, Tensor], model: AIM) -> dict[str, Tensor]:
    """Check ``state`` against ``model``'s keys and shapes; raise naming what differs."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(state[key].shape)} != model {tuple(value.shape)}")
    return {key: state[key] for key in expected}


def _write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_export(
    state: dict[str, Tensor],
    export_dir: str | os.PathLike,
    *,
    model_name: str,
    overrides: dict[str, Any],
    step: int,
    ml_aim: bool = False,
    checkpoint: str | None = None,
    reference_forward: dict[str, Tensor] | None = None,
) -> Path:
    """Write a full model state dict as ``model.safetensors`` + ``model.json`` (and the ml-aim trunk
    when ``ml_aim``, and ``reference_forward.safetensors`` when given) into ``export_dir``; keys and
    shapes are checked against ``model_name`` with ``overrides`` first, so that ``model.json``
    rebuilds the model the weights fit. Returns ``export_dir``.

    Order: check, remove the old ``model.json``, publish every other file, publish ``model.json``.
    A failure part-way leaves no ``model.json`` (the folder is then no export), never one that
    describes weights it was not written with.
    """
    from ..version import __version__

    with torch.device("meta"):
        reference = create_model(model_name, **overrides)
    state = _complete_state_dict(state, reference)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model_name,
        "overrides": dict(overrides),
        "architecture": architecture_of(reference.config),
        "step": int(step),
        "aim_ds_version": __version__,
    }
    if checkpoint is not None:
        meta["checkpoint"] = checkpoint
    remove_if_exists(export_dir / META_FILE)
    _write_safetensors(export_dir / WEIGHTS_FILE, state, {"format": "pt", "model": model_name, "step": str(step)})
    if ml_aim:
        # The LayerNorm eps the weights were trained with: the ml-aim layout alone cannot say it, and
        # released files use 1e-6 while our pretraining uses 1e-5 (docs/recipe.md, "Trunk").
        ml_aim_meta = {"format": "pt", "layout": "ml-aim", "norm_eps": repr(reference.config.norm_eps)}
        _write_safetensors(export_dir / ML_AIM_FILE, to_ml_aim(state), ml_aim_meta)
    else:
        remove_if_exists(export_dir / ML_AIM_FILE)  # an earlier export's trunk, not these weights
    if reference_forward is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in reference_forward.items()}
        _write_safetensors(export_dir / REFERENCE_FILE, tensors, {"format": "pt", "step": str(step)})
    atomic_write_json(export_dir / META_FILE, meta)
    return export_dir


def export_checkpoint(
    ckpt_dir: str | os.PathLike,
    tag: str,
    export_dir: str | os.PathLike,
    *,
    model_name: str,
    overrides: dict[str, Any],
    step: int,
    ml_aim: bool = False,
    reference_forward: dict[str, Tensor] | None = None,
) -> Path:
    """Consolidate checkpoint ``ckpt_dir/tag`` and :func:`save_export` it into ``export_dir``."""
    return save_export(
        consolidate_fp32(ckpt_dir, tag),
        export_dir,
        model_name=model_name,
        overrides=overrides,
        step=step,
        ml_aim=ml_aim,
        checkpoint=f"{Path(ckpt_dir).name}/{tag}",
        reference_forward=reference_forward,
    )


def export_latest(
    run_dir: str | os.PathLike,
    *,
    model_name: str,
    overrides: dict[str, Any],
    ml_aim: bool,
    reference_forward: dict[str, Tensor] | None = None,
) -> Path:
    """Export the newest complete checkpoint of ``run_dir`` to ``run_dir/export`` (with the end of
    run's ``reference_forward`` outputs when given; without, an existing reference file is kept)."""
    run_dir = Path(run_dir)
    latest = ckpt.latest_complete(run_dir / "checkpoints")
    if latest is None:
        raise ckpt.CheckpointError(f"{run_dir / 'checkpoints'}: no complete checkpoint to export")
    step, path = latest
    return export_checkpoint(
        path.parent,
        path.name,
        run_dir / EXPORT_DIR,
        model_name=model_name,
        overrides=overrides,
        step=step,
        ml_aim=ml_aim,
        reference_forward=reference_forward,
    )


def load_exported(export_dir: str | os.PathLike, device: str | torch.device = "cpu") -> AIM:
    """Rebuild the model from ``model.json`` (its stored architecture; see :func:`export_architecture`
    for older exports) and load ``model.safetensors`` (strict); no DeepSpeed."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    meta = json.loads((export_dir / META_FILE).read_text())
    model = create_model(meta["model"], **export_architecture(meta, export_dir / META_FILE))
    model.load_state_dict(load_file(str(export_dir / WEIGHTS_FILE), device=str(device)), strict=True)
    return model.to(device)
