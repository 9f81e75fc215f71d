"""Export a training checkpoint as consolidated fp32 safetensors, and load it back without DeepSpeed.

The weights come from the fp32 master copy in the optimizer shards of a complete checkpoint
(DeepSpeed's ``zero_to_fp32`` merges the ZeRO-2/3 partitions), not from the bf16 module weights,
so nothing is lost to rounding. Files written to ``<run>/export/``:

- ``model.safetensors``: our full state dict (``preprocessor.*``, ``trunk.*``, ``head.*``);
- ``model.json``: ``{"model", "overrides", "step", "aim_ds_version", "checkpoint"}``;
- ``trunk_ml_aim.safetensors`` (optional): the backbone in the released ml-aim key layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .interop import to_ml_aim
from .model import AIM
from .registry import create_model

EXPORT_DIR = "export"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
ML_AIM_FILE = "trunk_ml_aim.safetensors"


def consolidate_fp32(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, Tensor]:
    """The full fp32 state dict of checkpoint ``ckpt_dir/tag``, merged from every rank's shards.

    Runs in one process without a process group; needs host memory for the whole model
    (4 bytes per parameter, about 27 GB for AIM-7B with its head).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    # zero_to_fp32 may hand back views into one flat buffer; safetensors wants separate tensors.
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}


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


def save_export(
    state: dict[str, Tensor],
    export_dir: str | os.PathLike,
    *,
    model_name: str,
    overrides: dict[str, Any],
    step: int,
    ml_aim: bool = False,
    checkpoint: str | None = None,
) -> Path:
    """Write a full model state dict as ``model.safetensors`` + ``model.json`` (and the ml-aim trunk
    when ``ml_aim``) into ``export_dir``; keys and shapes are checked against ``model_name`` first.
    Every file is written under a temporary name and renamed. Returns ``export_dir``."""
    from safetensors.torch import save_file

    from . import __version__

    with torch.device("meta"):
        reference = create_model(model_name, **overrides)
    state = _complete_state_dict(state, reference)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_name, "overrides": dict(overrides), "step": int(step), "aim_ds_version": __version__}
    if checkpoint is not None:
        meta["checkpoint"] = checkpoint
    # Write under temporary names, then rename: a reader never picks up a half-written export.
    tmp = export_dir / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "model": model_name, "step": str(step)})
    os.replace(tmp, export_dir / WEIGHTS_FILE)
    if ml_aim:
        tmp = export_dir / f".{ML_AIM_FILE}.tmp"
        save_file(to_ml_aim(state), str(tmp), metadata={"format": "pt", "layout": "ml-aim"})
        os.replace(tmp, export_dir / ML_AIM_FILE)
    tmp = export_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, export_dir / META_FILE)
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
    )


def export_latest(run_dir: str | os.PathLike, *, model_name: str, overrides: dict[str, Any], ml_aim: bool) -> Path:
    """Export the newest complete checkpoint of ``run_dir`` to ``run_dir/export``."""
    run_dir = Path(run_dir)
    latest = ckpt.latest_complete(run_dir / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    step, path = latest
    return export_checkpoint(
        path.parent,
        path.name,
        run_dir / EXPORT_DIR,
        model_name=model_name,
        overrides=overrides,
        step=step,
        ml_aim=ml_aim,
    )


def load_exported(export_dir: str | os.PathLike, device: str | torch.device = "cpu") -> AIM:
    """Rebuild the model from ``model.json`` and load ``model.safetensors`` (strict); no DeepSpeed."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    meta = json.loads((export_dir / META_FILE).read_text())
    model = create_model(meta["model"], **meta.get("overrides", {}))
    model.load_state_dict(load_file(str(export_dir / WEIGHTS_FILE), device=str(device)), strict=True)
    return model.to(device)
