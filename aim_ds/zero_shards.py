"""Read DeepSpeed ZeRO checkpoint shards without running code from them, and merge them to fp32.

DeepSpeed's own ``zero_to_fp32`` reads the ``*_model_states.pt`` and ``*_optim_states.pt`` pickles
with ``torch.load(weights_only=False)``: a crafted file in a weights folder then runs whatever its
pickle names (``os.system``...). Here every shard goes through ``torch.load(weights_only=True)``,
which rebuilds only tensors, containers and plain values, plus the two DeepSpeed classes a ZeRO save
pickles (``ZeroStageEnum`` and the loss scaler; see :func:`allowed_globals`). Any other global is
refused before it is called, and the error names the file.

Layout of a tag folder written by ``engine.save_checkpoint`` (DeepSpeed 0.19, read off real saves):

- ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` (ZeRO-3; ``mp_rank_00_model_states.pt`` for
  ZeRO-1/2): ``{"module": {name: tensor}`` (empty tensors for partitioned parameters),
  ``"buffer_names"``, ``"param_shapes": [{name: torch.Size}, ...]`` (one dict per optimizer
  group, in flattening order), ``"shared_params": {alias: name}``, ``"frozen_param_shapes"``,
  ``"frozen_param_fragments"``, ``"ds_version"``, and the client state};
- ``*zero_pp_rank_{r}_mp_rank_00_optim_states.pt``: ``{"optimizer_state_dict": {"zero_stage",
  "partition_count", "fp32_flat_groups" (ZeRO-3) or "single_partition_of_fp32_groups" (ZeRO-1/2):
  one flat fp32 tensor per group holding this rank's partition, ...}}``.

ZeRO-3 partitions every parameter separately: parameter ``p`` of ``n`` elements takes
``ceil(n / world)`` elements (zero-padded at the end) in each rank's flat buffer, in order, so the
full tensor is the concatenation of the ranks' slices, cut to ``n``. ZeRO-1/2 partition the
concatenation of a group's parameters: the full flat group is the ranks' partitions end to end.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_MODEL_STATES = "*model_states.pt"
_OPTIM_STATES = "*optim_states.pt"


class ShardError(ValueError):
    """A ZeRO checkpoint file that is unsafe, damaged or not what a ZeRO save writes; the message
    names the file and what is wrong."""


def allowed_globals() -> list[Any]:
    """The non-tensor classes a ZeRO save pickles: the stage enum, the loss scalers, and the numpy
    scalar/dtype types some versions store. Rebuilding them calls no user code (an enum lookup, a
    ``__dict__`` update)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    numpy_types = [scalar, np.dtype] + [type(np.dtype(t)) for t in (np.float32, np.float64, np.int64, np.int32)]
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, *numpy_types]


def refusal(exc: BaseException) -> str:
    """The useful part of torch's weights-only refusal, as one line: which global the pickle asked
    for (``posix.system``), or which pickle byte is not a pickle (random bytes, a text file)."""
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"refused: the pickle asks for {match.group(1)}, which is not a tensor or a known DeepSpeed type"
    match = re.search(r"(Unsupported operand \S+|invalid load key[^\n]*)", text)
    detail = match.group(1) if match else (text.strip().splitlines() or [type(exc).__name__])[-1][:200]
    return f"damaged or not a torch checkpoint ({detail})"


def load_shard(path: str | os.PathLike) -> dict[str, Any]:
    """One shard file as plain data, read with ``weights_only=True`` (memory-mapped). Raises
    :class:`ShardError` naming ``path`` when it is refused (a non-allow-listed global), truncated,
    or not a torch zip file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ShardError(f"{path}: {refusal(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ShardError(
            f"{path}: damaged or not a torch checkpoint ({str(exc).strip().splitlines()[0][:200]})"
        ) from None
    if not isinstance(obj, dict):
        raise ShardError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


@dataclass
class ZeroCheckpoint:
    """What consolidation needs from one tag folder (every rank's shards)."""

    folder: Path
    stage: int
    world_size: int
    param_shapes: list[dict[str, torch.Size]]  # one {name: shape} per optimizer group, flattening order
    buffers: dict[str, Tensor]
    shared_params: dict[str, str]  # alias -> name
    frozen_shapes: dict[str, torch.Size]
    frozen_fragments: list[dict[str, Tensor]]  # per rank
    flat_groups: list[list[Tensor]]  # [rank][group] flat fp32 partitions


def _files(folder: Path, pattern: str) -> list[Path]:
    def natural(path: Path) -> list[Any]:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]

    files = sorted(folder.glob(pattern), key=natural)
    if not files:
        raise ShardError(f"{folder}: no {pattern} files (not a DeepSpeed checkpoint folder)")
    return files


def _get(state: dict[str, Any], key: str, file: Path) -> Any:
    if key not in state:
        raise ShardError(f"{file}: no {key!r} entry (not a ZeRO checkpoint shard)")
    return state[key]


def read_zero_checkpoint(folder: str | os.PathLike) -> ZeroCheckpoint:
    """Read every rank's model and optimizer shards of the tag folder ``folder`` (see the module
    docstring). Raises :class:`ShardError` naming the first file that is unsafe or damaged."""
    folder = Path(folder)
    model_files, optim_files = _files(folder, _MODEL_STATES), _files(folder, _OPTIM_STATES)
    models = [load_shard(f) for f in model_files]
    first, first_file = models[0], model_files[0]
    buffer_names = set(_get(first, "buffer_names", first_file))
    module = _get(first, "module", first_file)
    flat_groups, stage, world = [], None, None
    for file in optim_files:
        optim = _get(load_shard(file), "optimizer_state_dict", file)
        stage = int(_get(optim, "zero_stage", file))
        counts = _get(optim, "partition_count", file)
        world = max(counts) if isinstance(counts, (list, tuple)) else int(counts)
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        groups = _get(optim, key, file)
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Tensor) for g in groups):
            raise ShardError(f"{file}: {key!r} is not a list of tensors")
        flat_groups.append(list(groups))
    if world != len(optim_files):
        raise ShardError(
            f"{folder}: the shards say {world} ranks but {len(optim_files)} {_OPTIM_STATES} files are here "
            "(a rank's save is missing or another save's file was left behind)"
        )
    return ZeroCheckpoint(
        folder=folder,
        stage=int(stage),
        world_size=int(world),
        param_shapes=list(_get(first, "param_shapes", first_file)),
        buffers={k: v.float() if v.is_floating_point() else v for k, v in module.items() if k in buffer_names},
        shared_params=dict(first.get("shared_params") or {}),
        frozen_shapes=dict(first.get("frozen_param_shapes") or {}),
        frozen_fragments=[dict(m.get("frozen_param_fragments") or {}) for m in models],
        flat_groups=flat_groups,
    )


def _take(groups: list[Tensor], start: int, length: int) -> list[Tensor]:
    """``length`` elements from ``start`` of the concatenation of ``groups``, as views (no copy of the
    whole buffer: a ZeRO-3 parameter's slice may straddle two groups)."""
    pieces, base = [], 0
    for flat in groups:
        end = base + flat.numel()
        lo, hi = max(start, base), min(start + length, end)
        if lo < hi:
            pieces.append(flat[lo - base : hi - base])
        base = end
    return pieces


def _gather(pieces: list[Tensor], numel: int, shape: torch.Size, dtype: torch.dtype, what: str) -> Tensor:
    """The first ``numel`` elements of the concatenation of ``pieces`` (views into the mapped shards)
    as a new tensor of ``shape`` and ``dtype``, copied piece by piece: no fp32 copy of the whole
    tensor on the way to bf16, and only this tensor's shard pages read."""
    out = torch.empty(numel, dtype=dtype)
    filled = 0
    for piece in pieces:
        count = min(piece.numel(), numel - filled)
        if count <= 0:
            break
        out[filled : filled + count].copy_(piece[:count])
        filled += count
    if filled < numel:
        raise ShardError(f"{what}: the shards hold too few elements for a tensor of shape {list(shape)}")
    return out.view(shape)


DtypeFor = Callable[[torch.Size], torch.dtype]


def _merge_zero3(ckpt: ZeroCheckpoint, keep: Callable[[str], bool], dtype_for: DtypeFor, out: dict) -> None:
    world = ckpt.world_size
    available = sum(g.numel() for g in ckpt.flat_groups[0])
    offset = 0
    for shapes in ckpt.param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)  # every rank holds `part` elements of it, zero-padded
            if keep(name):
                pieces = [p for rank_groups in ckpt.flat_groups for p in _take(rank_groups, offset, part)]
                out[name] = _gather(pieces, numel, shape, dtype_for(shape), f"{ckpt.folder}: {name}")
            offset += part
    if offset != available:
        raise ShardError(f"{ckpt.folder}: the parameters use {offset} of {available} elements per rank's shard")
    for name, shape in ckpt.frozen_shapes.items():
        if keep(name):
            frags = [fragments[name] for fragments in ckpt.frozen_fragments]
            out[name] = _gather(frags, math.prod(shape), shape, dtype_for(shape), f"{ckpt.folder}: {name}")


def _merge_zero12(ckpt: ZeroCheckpoint, keep: Callable[[str], bool], dtype_for: DtypeFor, out: dict) -> None:
    align = 2 * ckpt.world_size  # ZeRO-1/2 pad each flat group to a multiple of 2 x world
    for index, shapes in enumerate(ckpt.param_shapes):
        partitions = [rank_groups[index] for rank_groups in ckpt.flat_groups]  # the group, end to end
        total = sum(p.numel() for p in partitions)
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if offset + numel > total:
                raise ShardError(f"{ckpt.folder}: group {index} holds too few elements for {name} {list(shape)}")
            if keep(name):
                pieces = _take(partitions, offset, numel)
                out[name] = _gather(pieces, numel, shape, dtype_for(shape), f"{ckpt.folder}: {name}")
            offset += numel
        if align * math.ceil(offset / align) != align * math.ceil(total / align):
            raise ShardError(f"{ckpt.folder}: group {index} uses {offset} of {total} elements")
    for name, shape in ckpt.frozen_shapes.items():
        if keep(name):
            out[name] = ckpt.frozen_fragments[0][name].to(dtype_for(shape)).clone()


def parameter_shapes(ckpt: ZeroCheckpoint) -> dict[str, torch.Size]:
    """Every parameter's (and buffer's) name and full shape, read off the shards' metadata without
    merging anything; shared aliases included."""
    shapes: dict[str, torch.Size] = {name: value.shape for name, value in ckpt.buffers.items()}
    for group in ckpt.param_shapes:
        shapes.update({name: torch.Size(shape) for name, shape in group.items()})
    shapes.update({name: torch.Size(shape) for name, shape in ckpt.frozen_shapes.items()})
    shapes.update({alias: shapes[name] for alias, name in ckpt.shared_params.items() if name in shapes})
    return shapes


def consolidate(
    ckpt: ZeroCheckpoint, keep: Callable[[str], bool] | None = None, dtype_for: DtypeFor | None = None
) -> dict[str, Tensor]:
    """The tensors of a read checkpoint (:func:`read_zero_checkpoint`) whose saved names pass
    ``keep`` (all when None), merged from every rank's optimizer shards (the fp32 master weights)
    tensor by tensor, each cast to ``dtype_for(shape)`` (fp32 when None) as it is copied out of the
    memory-mapped shards; the persistent buffers that pass ``keep`` as they were saved (fp32).

    Host memory: the kept tensors in their dtypes, plus the shard pages they were read from (file
    pages of the mapped shards, which the kernel may drop); the optimizer moments are mapped, never
    read. One process, no process group. Raises :class:`ShardError` naming the folder when the
    shards do not add up.
    """
    keep = keep or (lambda name: True)
    dtype_for = dtype_for or (lambda shape: torch.float32)
    out: dict[str, Tensor] = {name: value for name, value in ckpt.buffers.items() if keep(name)}
    if ckpt.stage == 3:
        _merge_zero3(ckpt, keep, dtype_for, out)
    elif ckpt.stage in (1, 2):
        _merge_zero12(ckpt, keep, dtype_for, out)
    else:
        raise ShardError(f"{ckpt.folder}: ZeRO stage {ckpt.stage} checkpoints are not supported")
    for alias, name in ckpt.shared_params.items():
        if name in out and keep(alias):
            out[alias] = out[name]
    return out


def consolidate_fp32(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, Tensor]:
    """The full fp32 state dict of checkpoint ``ckpt_dir/tag``, merged from every rank's optimizer
    shards (the fp32 master weights), plus the model's persistent buffers. One process, no process
    group; host memory for the whole model (4 bytes per parameter) plus the memory-mapped shards.
    Raises :class:`ShardError` naming the file for an unsafe, damaged or incomplete checkpoint."""
    return consolidate(read_zero_checkpoint(Path(ckpt_dir) / tag))


__all__ = [
    "ShardError",
    "ZeroCheckpoint",
    "allowed_globals",
    "consolidate",
    "consolidate_fp32",
    "refusal",
    "load_shard",
    "parameter_shapes",
    "read_zero_checkpoint",
]
