"""Export a training checkpoint as consolidated fp32 safetensors, and load it back without DeepSpeed.

The weights come from the fp32 master copy in the optimizer shards of a complete checkpoint
(:mod:`aim_ds.weights.zero_shards` merges the ZeRO-1/2/3 partitions without unpickling code), not from the
bf16 module weights, so nothing is lost to rounding. Files written to ``<run>/export/``:

- ``model.safetensors``: our full state dict (``preprocessor.*``, ``trunk.*``, ``head.*``);
- ``config.json``: ``{"model_type": "aim", "model_name", <the full resolved AIMConfig>, "aim_ds_version"}``,
  every field that changes the function, so that the folder alone rebuilds the model
  (``aim_ds.create_model(folder)``, ``AIM.from_pretrained(folder)``; :mod:`aim_ds.model.pretrained`) and an
  export keeps its meaning when a default changes;
- ``model.json``: provenance, ``{"model", "overrides", "architecture", "step", "aim_ds_version", "checkpoint"}``
  (the architecture again, for aim-ds versions that predate ``config.json``; exports from those versions
  have only this file and still load);
- ``trunk_ml_aim.safetensors`` (optional): the backbone in the released ml-aim key layout (with a probe
  head, :mod:`aim_ds.weights.ml_aim` writes the whole ml-aim model);
- ``reference_forward.safetensors`` (end of a training run): the trained engine's outputs on fixed
  inputs, to check that the exported weights reproduce the trained model.

``config.json`` and ``model.json`` describe the weights, so both are removed first and published last:
while the other files are replaced (each atomically, through :mod:`aim_ds.io`) the folder holds neither,
and a reader never pairs new weights with old metadata or the reverse.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_path, atomic_write_json, remove_if_exists
from ..model.aim import AIM
from ..model.pretrained import (
    CONFIG_FILE,
    META_FILE,
    ML_AIM_FILE,
    WEIGHTS_FILE,
    architecture_of,
    config_json,
    export_architecture,
    load_pretrained,
)
from ..model.registry import create_model
from . import checkpoint as ckpt
from .interop import to_ml_aim

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
REFERENCE_FILE = "reference_forward.safetensors"


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

    Order: check, remove the old ``config.json`` and ``model.json``, publish every other file, publish
    ``config.json`` then ``model.json``. A failure part-way leaves no description (no export), never one that
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
    # Both descriptions go first and come back after the weights: whichever a reader finds
    # describes the weights beside it.
    remove_if_exists(export_dir / META_FILE)
    remove_if_exists(export_dir / CONFIG_FILE)
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
    atomic_write_json(
        export_dir / CONFIG_FILE, {**config_json(reference.config, model_name), "aim_ds_version": __version__}
    )
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
    """The exported model (pixel head included) from ``config.json``, or an older export's
    ``model.json`` (see :func:`export_architecture`), and ``model.safetensors`` (strict); no DeepSpeed.
    :meth:`aim_ds.AIM.from_pretrained` is the same with more choices."""
    return load_pretrained(export_dir, device=device, pixel_head=True)


__all__ = [
    "CONFIG_FILE",
    "EXPORT_DIR",
    "META_FILE",
    "ML_AIM_FILE",
    "REFERENCE_FILE",
    "WEIGHTS_FILE",
    "architecture_of",
    "consolidate_fp32",
    "export_architecture",
    "export_checkpoint",
    "export_latest",
    "load_exported",
    "save_export",
]
