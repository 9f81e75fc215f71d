"""Streamed reads of big weight files: one tensor at a time, cast as it arrives.

A probe needs the trunk only, and in bf16 on the GPU. Reading a whole fp32 export first
(:func:`aim_ds.weights.read_state_dict_file`) holds 4 bytes per parameter on every rank before
anything is cast: 26 GB for AIM-7B. :func:`read_backbone` opens the safetensors file lazily
(``safe_open`` maps it; ``get_tensor`` reads one tensor) and casts each backbone tensor to
``dtype`` before reading the next, so the host holds one ``dtype`` copy of the trunk plus one fp32
tensor in flight. Wiring it into the probe waits for the rewrite of ``aim_ds.weights`` (issue 15).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

BACKBONE_PREFIXES = ("preprocessor.", "trunk.")


def read_backbone(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """``preprocessor.*`` and ``trunk.*`` tensors of the safetensors file ``path`` in ``dtype``
    (floating tensors only; others keep theirs), read one tensor at a time. The pixel head is
    never read."""
    from safetensors import safe_open

    out: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for key in handle.keys():
            if not key.startswith(BACKBONE_PREFIXES):
                continue
            tensor = handle.get_tensor(key)
            # .to() copies into the smaller dtype; the fp32 tensor is dropped before the next read.
            out[key] = tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor
            del tensor
    return out


__all__ = ["BACKBONE_PREFIXES", "read_backbone"]
