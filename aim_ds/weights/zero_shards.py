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

Merging goes one rank's shard file at a time (:func:`stream_shards`): the output tensors are laid out
first (allocated in their final dtype by :func:`consolidate`, or as a file by
:func:`aim_ds.weights.backbone.handover_writer`), each rank's file is opened, its slices are copied into
place and the file is dropped before the next one is opened, so that the shard pages resident at
once are one rank's, not every rank's.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import check_regular_file

_MODEL_STATES = "*model_states.pt"
_OPTIM_STATES = "*optim_states.pt"


class ShardError(ValueError):
    """A ZeRO checkpoint file that is unsafe, damaged or not what a ZeRO save writes; the message
    names the file and what is wrong."""


def allowed_globals() -> list[Any]:
    """The non-tensor classes a ZeRO save pickles: the stage enum, the loss scalers, ZeRO-1/2's
    ``fragment_address`` (a dataclass of two ints in ``param_slice_mappings``), and the numpy
    scalar/dtype types some versions store. Rebuilding them calls no user code (an enum lookup, a
    ``__dict__`` update)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    numpy_types = [scalar, np.dtype] + [type(np.dtype(t)) for t in (np.float32, np.float64, np.int64, np.int32)]
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, *numpy_types]


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


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block, every ``torch.load`` in this process (DeepSpeed's included, which ask for
    ``weights_only=False``) reads with ``weights_only=True`` and the :func:`allowed_globals` only:
    a pickle that names anything else raises ``UnpicklingError`` before it is called. Used around
    DeepSpeed's checkpoint loading and by the universal converter (:mod:`aim_ds.weights.safe_universal`);
    not thread-safe (it swaps ``torch.load``), like the loads it guards."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed_globals()):
            return original(*args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def read_weights_only(path: str | os.PathLike) -> Any:
    """Whatever the torch file ``path`` holds (a dict of shards, or a bare tensor as in DeepSpeed's
    universal checkpoints), read with ``weights_only=True`` and the :func:`allowed_globals`,
    memory-mapped (tensor bytes are not read). Raises :class:`ShardError` naming ``path`` when it is
    refused (a non-allow-listed global), truncated, not a torch zip file, or not a regular file (a
    FIFO would block the open)."""
    path = Path(path)
    check_regular_file(path, "checkpoint file", ShardError)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ShardError(f"{path}: {refusal(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ShardError(
            f"{path}: damaged or not a torch checkpoint ({str(exc).strip().splitlines()[0][:200]})"
        ) from None


def load_shard(path: str | os.PathLike) -> dict[str, Any]:
    """One shard file as plain data (:func:`read_weights_only`); :class:`ShardError` naming ``path``
    also when it does not hold a dict."""
    obj = read_weights_only(path)
    if not isinstance(obj, dict):
        raise ShardError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


@dataclass
class ZeroCheckpoint:
    """What consolidation needs from one tag folder: the layout read off every rank's shards, and
    the files to merge from. No shard tensor is held here: :func:`stream_shards` opens the files
    one rank at a time."""

    folder: Path
    stage: int
    world_size: int
    param_shapes: list[dict[str, torch.Size]]  # one {name: shape} per optimizer group, flattening order
    buffers: dict[str, Tensor]
    shared_params: dict[str, str]  # alias -> name
    frozen_shapes: dict[str, torch.Size]
    model_files: list[Path]  # per rank (ZeRO-3), or the one ``mp_rank_00_model_states.pt`` (ZeRO-1/2)
    optim_files: list[Path]  # per rank, in rank order
    group_numels: list[list[int]]  # [rank][group] elements of each flat fp32 partition


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


def _flat_groups(file: Path) -> tuple[int, int, list[Tensor]]:
    """``(stage, world size, flat fp32 partitions)`` of one rank's optimizer shard (memory-mapped:
    the partitions' bytes are not read here)."""
    optim = _get(load_shard(file), "optimizer_state_dict", file)
    if not isinstance(optim, dict):
        raise ShardError(f"{file}: 'optimizer_state_dict' is a {type(optim).__name__}, not a mapping")
    try:
        stage = int(_get(optim, "zero_stage", file))
        counts = _get(optim, "partition_count", file)
        world = max(int(c) for c in counts) if isinstance(counts, (list, tuple)) else int(counts)
    except (TypeError, ValueError, OverflowError):
        raise ShardError(f"{file}: 'zero_stage' or 'partition_count' is not a number") from None
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = _get(optim, key, file)
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Tensor) for g in groups):
        raise ShardError(f"{file}: {key!r} is not a list of tensors")
    return stage, int(world), list(groups)


def read_zero_checkpoint(folder: str | os.PathLike) -> ZeroCheckpoint:
    """Read the layout of the tag folder ``folder`` (see the module docstring) off every rank's
    model and optimizer shards, each loaded memory-mapped and dropped again (only their pickles are
    read). Every file is checked here, before anything is merged: raises :class:`ShardError` naming
    the first file that is unsafe or damaged."""
    folder = Path(folder)
    model_files, optim_files = _files(folder, _MODEL_STATES), _files(folder, _OPTIM_STATES)
    first_file = model_files[0]
    first = load_shard(first_file)
    for file in model_files[1:]:
        load_shard(file)
    buffer_names = _get(first, "buffer_names", first_file)
    module = _get(first, "module", first_file)
    if not isinstance(buffer_names, (list, tuple, set)) or not isinstance(module, dict):
        raise ShardError(f"{first_file}: 'buffer_names' or 'module' is not what a ZeRO save writes")
    buffer_names = {name for name in buffer_names if isinstance(name, str)}
    if not all(isinstance(module[name], Tensor) for name in buffer_names if name in module):
        raise ShardError(f"{first_file}: a buffer in 'module' is not a tensor")
    # Cloned: the (small) buffers must not keep the first model file mapped.
    buffers = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in module.items() if k in buffer_names}
    group_numels, stage, world = [], 0, 0
    for file in optim_files:
        stage, world, groups = _flat_groups(file)
        group_numels.append([g.numel() for g in groups])
    if world < 1 or world != len(optim_files):
        raise ShardError(
            f"{folder}: the shards say {world} ranks but {len(optim_files)} {_OPTIM_STATES} files are here "
            "(a rank's save is missing or another save's file was left behind)"
        )
    param_shapes = _get(first, "param_shapes", first_file)
    if not isinstance(param_shapes, (list, tuple)):
        param_shapes = [param_shapes]
    ckpt = ZeroCheckpoint(
        folder=folder,
        stage=stage,
        world_size=world,
        param_shapes=[_shapes(group, first_file, "param_shapes") for group in param_shapes],
        buffers=buffers,
        shared_params=_names(first.get("shared_params") or {}, first_file),
        frozen_shapes=_shapes(first.get("frozen_param_shapes") or {}, first_file, "frozen_param_shapes"),
        model_files=model_files,
        optim_files=optim_files,
        group_numels=group_numels,
    )
    # Before any caller allocates a tensor of these shapes: they must fit what the files hold.
    _check_layout(ckpt)
    _check_frozen(ckpt, model_files)
    return ckpt


def _shapes(group: Any, file: Path, key: str) -> dict[str, torch.Size]:
    """``{name: shape}`` from a shard's metadata, every dimension a non-negative integer; anything
    else (a negative or non-integer size, a name that is not a string) is a :class:`ShardError`."""
    if not isinstance(group, dict):
        raise ShardError(f"{file}: {key!r} holds a {type(group).__name__}, not a {{name: shape}} mapping")
    out = {}
    for name, shape in group.items():
        dims = list(shape) if isinstance(shape, (list, tuple, torch.Size)) else None
        if not isinstance(name, str) or dims is None or not all(type(d) is int and d >= 0 for d in dims):
            raise ShardError(f"{file}: {key!r}: {str(name)[:80]!r} has the shape {str(shape)[:80]}, not sizes >= 0")
        out[name] = torch.Size(dims)
    return out


def _names(mapping: Any, file: Path) -> dict[str, str]:
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ShardError(f"{file}: 'shared_params' is not a {{alias: name}} mapping of strings")
    return dict(mapping)


def _check_frozen(ckpt: ZeroCheckpoint, model_files: list[Path]) -> None:
    """Each frozen parameter's size against the fragments the model files hold (ZeRO-3: one per
    rank; ZeRO-1/2: whole, in the one file), so that no frozen tensor larger than its data is made."""
    if not ckpt.frozen_shapes:
        return
    files = model_files if ckpt.stage == 3 else model_files[:1]
    held = dict.fromkeys(ckpt.frozen_shapes, 0)
    for file in files:
        fragments = load_shard(file).get("frozen_param_fragments") or {}
        for name in held:
            value = fragments.get(name) if isinstance(fragments, dict) else None
            held[name] += value.numel() if isinstance(value, Tensor) else 0
    for name, shape in ckpt.frozen_shapes.items():
        if math.prod(shape) > held[name]:
            raise ShardError(
                f"{ckpt.folder}: frozen {name} {list(shape)} is larger than the {held[name]} elements saved for it"
            )


def _take(groups: list[Tensor], start: int, length: int) -> list[Tensor]:
    """``length`` elements from ``start`` of the concatenation of ``groups``, as views (no copy of the
    whole buffer: a ZeRO-3 parameter's slice may straddle two groups). A negative ``start`` counts
    before the first group: only the part from element 0 on is returned."""
    pieces, base = [], 0
    for flat in groups:
        end = base + flat.numel()
        lo, hi = max(start, base), min(start + length, end)
        if lo < hi:
            pieces.append(flat[lo - base : hi - base])
        base = end
    return pieces


def _numel(numels: list[int], index: int) -> int:
    return numels[index] if index < len(numels) else 0


def _check_layout(ckpt: ZeroCheckpoint) -> None:
    """The parameters' sizes against the partitions' (metadata only, before anything is merged)."""
    if ckpt.stage == 3:
        offset = sum(math.ceil(math.prod(shape) / ckpt.world_size) for g in ckpt.param_shapes for shape in g.values())
        available = sum(ckpt.group_numels[0])
        if offset != available:
            raise ShardError(f"{ckpt.folder}: the parameters use {offset} of {available} elements per rank's shard")
        return
    if ckpt.stage not in (1, 2):
        raise ShardError(f"{ckpt.folder}: ZeRO stage {ckpt.stage} checkpoints are not supported")
    align = 2 * ckpt.world_size  # ZeRO-1/2 pad each flat group to a multiple of 2 x world
    for index, shapes in enumerate(ckpt.param_shapes):
        total = sum(_numel(numels, index) for numels in ckpt.group_numels)
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if offset + numel > total:
                raise ShardError(f"{ckpt.folder}: group {index} holds too few elements for {name} {list(shape)}")
            offset += numel
        if align * math.ceil(offset / align) != align * math.ceil(total / align):
            raise ShardError(f"{ckpt.folder}: group {index} uses {offset} of {total} elements")


def _rank_pieces(
    ckpt: ZeroCheckpoint, rank: int, groups: list[Tensor], fragments: dict[str, Tensor], keep: Callable[[str], bool]
) -> Iterator[tuple[str, Tensor]]:
    """``(name, piece)`` for every kept tensor: rank ``rank``'s part of it, as views into its mapped
    shard, in order. A tensor is the concatenation of its pieces over the ranks in rank order, cut
    to its size (ZeRO-3 pads each parameter's last slice)."""
    if ckpt.stage == 3:
        offset, world = 0, ckpt.world_size
        for shapes in ckpt.param_shapes:
            for name, shape in shapes.items():
                part = math.ceil(math.prod(shape) / world)  # every rank holds `part` elements of it
                if keep(name):
                    yield from ((name, piece) for piece in _take(groups, offset, part))
                offset += part
        yield from ((name, fragments[name].reshape(-1)) for name in ckpt.frozen_shapes if name in fragments)
        return
    for index, shapes in enumerate(ckpt.param_shapes):
        # The full flat group is the ranks' partitions end to end: this rank's starts at `base`.
        base = sum(_numel(numels, index) for numels in ckpt.group_numels[:rank])
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if keep(name):
                yield from ((name, piece) for piece in _take(groups[index : index + 1], offset - base, numel))
            offset += numel
    # ZeRO-1/2 save the frozen parameters whole, in the one model file (rank 0's fragments only).
    yield from ((name, fragments[name].reshape(-1)) for name in ckpt.frozen_shapes if name in fragments)


Write = Callable[[str, int, Tensor], None]


def _frozen_fragments(ckpt: ZeroCheckpoint, rank: int, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    """Rank ``rank``'s fragments of the kept frozen parameters (ZeRO-3: one model file per rank;
    ZeRO-1/2: whole, in rank 0's one model file); empty when there are none to merge."""
    kept = [name for name in ckpt.frozen_shapes if keep(name)]
    index = rank if ckpt.stage == 3 else 0
    if not kept or (ckpt.stage != 3 and rank > 0) or index >= len(ckpt.model_files):
        return {}  # a missing rank's fragments leave the tensor short: stream_shards says so
    file = ckpt.model_files[index]
    fragments = dict(load_shard(file).get("frozen_param_fragments") or {})
    missing = [name for name in kept if name not in fragments]
    if missing:
        raise ShardError(f"{file}: no frozen fragment for {missing[:4]}")
    return {name: fragments[name] for name in kept}


def _merge_rank(ckpt: ZeroCheckpoint, rank: int, keep: Callable[[str], bool], write: Write, filled: dict) -> None:
    """Open rank ``rank``'s shards and hand its pieces of the kept tensors to ``write``.
    ``filled``: ``{name: [elements written so far, numel]}``, updated. Every reference to the
    shards' tensors is gone when this returns (they live in this frame only)."""
    file = ckpt.optim_files[rank]
    stage, world, groups = _flat_groups(file)
    if (stage, world, [g.numel() for g in groups]) != (ckpt.stage, ckpt.world_size, ckpt.group_numels[rank]):
        raise ShardError(f"{file}: changed since the checkpoint was read")
    fragments = _frozen_fragments(ckpt, rank, keep)
    for name, piece in _rank_pieces(ckpt, rank, groups, fragments, keep):
        done, numel = filled[name]
        count = min(piece.numel(), numel - done)
        if count > 0:  # the rest is ZeRO-3's padding
            write(name, done, piece[:count])
            filled[name][0] = done + count


def _merged_shapes(ckpt: ZeroCheckpoint) -> dict[str, torch.Size]:
    """The shapes of the tensors merged from the shards: trained and frozen parameters."""
    shapes = {name: torch.Size(shape) for group in ckpt.param_shapes for name, shape in group.items()}
    shapes.update({name: torch.Size(shape) for name, shape in ckpt.frozen_shapes.items()})
    return shapes


def stream_shards(ckpt: ZeroCheckpoint, keep: Callable[[str], bool], write: Write) -> None:
    """Merge the parameters whose saved names pass ``keep`` from the fp32 master weights, one rank's
    shard file at a time: ``write(name, start, values)`` receives consecutive runs of the flattened
    tensor ``name`` (``values``: a 1-D fp32 view into the mapped shard, valid during the call only;
    ``start``: the index of its first element), each element exactly once. A rank's shard is
    dropped (and unmapped) before the next one is opened, so the shard pages resident at once are
    one rank's. Buffers and shared aliases are not written (see :func:`consolidate`). Raises
    :class:`ShardError` naming the folder or file when the shards do not add up."""
    _check_layout(ckpt)
    shapes = _merged_shapes(ckpt)
    filled = {name: [0, math.prod(shape)] for name, shape in shapes.items() if keep(name)}
    for rank in range(ckpt.world_size):
        _merge_rank(ckpt, rank, keep, write, filled)
        gc.collect()  # the mapping goes with the shard's last tensor: a reference cycle must not keep it
    for name, (count, numel) in filled.items():
        if count < numel:
            raise ShardError(
                f"{ckpt.folder}: {name}: the shards hold too few elements for a tensor of shape {list(shapes[name])}"
            )


DtypeFor = Callable[[torch.Size], torch.dtype]


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
    into tensors allocated up front in ``dtype_for(shape)`` (fp32 when None), each piece cast as it
    is copied out of the memory-mapped shards (:func:`stream_shards`); the persistent buffers that
    pass ``keep`` as they were saved (fp32).

    Host memory: the kept tensors in their dtypes, plus the pages of one rank's shard at a time
    (file pages, dropped before the next rank's file is opened); the optimizer moments are mapped,
    never read. One process, no process group. Raises :class:`ShardError` naming the folder when
    the shards do not add up.
    """
    keep = keep or (lambda name: True)
    dtype_for = dtype_for or (lambda shape: torch.float32)
    out: dict[str, Tensor] = {name: value for name, value in ckpt.buffers.items() if keep(name)}
    shapes = _merged_shapes(ckpt)
    merged = {name: torch.empty(shape, dtype=dtype_for(shape)) for name, shape in shapes.items() if keep(name)}

    def write(name: str, start: int, values: Tensor) -> None:
        merged[name].view(-1)[start : start + values.numel()].copy_(values)

    stream_shards(ckpt, lambda name: name in merged, write)
    out.update(merged)
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
    "read_weights_only",
    "parameter_shapes",
    "read_zero_checkpoint",
    "stream_shards",
]
