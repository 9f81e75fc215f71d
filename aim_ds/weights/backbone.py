"""The backbone tensors a probe loads: which ones, in which dtype, and how ranks share them.

A probe needs the preprocessor and the trunk blocks up to the last probed one, never the pixel head
(:mod:`aim_ds.weights.load` builds the trunk without it). Here:

- :func:`probe_dtype`: each tensor's dtype for the probe: fp32 everywhere on the CPU (the probe runs
  fp32 there); on CUDA, matrices (linear and patch-embedding weights, ``ndim >= 2``) in bf16, which
  is what bf16 autocast casts them to for every matmul anyway, and vectors (norm weights, biases)
  in fp32, which autocast keeps for the norms: the features are the same, the trunk half the size;
- :func:`select_backbone`: the backbone of a state dict, cast tensor by tensor, with the blocks
  after ``keep_blocks`` as *placeholders* (tensors on the meta device: shape and dtype, no data), so
  that the shapes are still checked against the model and the unused blocks cost no memory;
- :func:`write_handover` / :func:`handover_writer` / :func:`read_handover`: the hand-over file rank 0
  writes for the other ranks of a probe, written tensor by tensor or piece by piece as the ZeRO
  shards are merged (:func:`safetensors_writer`; ``safetensors.save_file`` copies every tensor to
  bytes first: a second copy of the trunk) and read memory-mapped (the page cache holds one copy
  shared by every rank on the node, instead of one private copy per rank);
- :func:`fingerprint_state_dict`: the content hash of what was loaded (placeholders by shape only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..io import atomic_path

BACKBONE_PREFIXES = ("preprocessor.", "trunk.")
BLOCK = re.compile(r"^trunk\.blocks\.(\d+)\.")
_SKIPPED_KEY = "aim_ds.skipped"  # hand-over metadata: {name: [dtype, shape]} of the placeholders

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def block_index(key: str) -> int | None:
    """The trunk block a key belongs to (``trunk.blocks.7.mlp.fc1.weight`` -> 7), else None."""
    match = BLOCK.match(key)
    return int(match.group(1)) if match else None


def is_backbone(key: str) -> bool:
    """Whether ``key`` (our layout, wrappers stripped) is a preprocessor or trunk tensor."""
    return key.startswith(BACKBONE_PREFIXES)


def wanted(key: str, keep_blocks: int | None) -> bool:
    """Whether a probe loads ``key``: a backbone tensor outside the blocks ``>= keep_blocks``."""
    index = block_index(key)
    return is_backbone(key) and (keep_blocks is None or index is None or index < keep_blocks)


def probe_dtype(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, matrix_dtype: torch.dtype) -> torch.dtype:
    """The dtype a probe keeps a tensor of ``shape`` and ``dtype`` in: ``matrix_dtype`` for floating
    matrices (``ndim >= 2``), fp32 for other floating tensors, integer tensors unchanged."""
    if not dtype.is_floating_point:
        return dtype
    return matrix_dtype if len(shape) >= 2 else torch.float32


def dtype_rule(matrix_dtype: torch.dtype) -> Callable[[torch.Size], torch.dtype]:
    """:func:`probe_dtype` for floating tensors, as a function of the shape only (what the ZeRO
    shards' fp32 master weights need)."""
    return lambda shape: probe_dtype(shape, torch.float32, matrix_dtype)


def placeholder(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A tensor with a shape and a dtype but no data (meta device): a backbone tensor not loaded."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def select_backbone(
    state_dict: dict[str, Tensor], keep_blocks: int | None = None, matrix_dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """The ``preprocessor.*``/``trunk.*`` tensors of ``state_dict`` (our layout, unwrapped; unknown
    backbone keys are kept so that the shape check reports them), each contiguous in its
    :func:`probe_dtype`; blocks ``>= keep_blocks`` become placeholders. A tensor already in its dtype
    and contiguous is not copied (a memory-mapped file stays mapped)."""
    out = {}
    for key, value in state_dict.items():
        if not is_backbone(key):
            continue
        dtype = probe_dtype(value.shape, value.dtype, matrix_dtype)
        if wanted(key, keep_blocks):
            out[key] = value.detach().to(dtype).contiguous()
        else:
            out[key] = placeholder(value.shape, dtype)
    return out


def loaded_blocks(state_dict: dict[str, Tensor]) -> int | None:
    """How many leading trunk blocks ``state_dict`` holds data for, when later ones are placeholders
    (None when every tensor is loaded). Raises ValueError when the placeholders are not exactly the
    blocks from some index on (the trunk cannot run without a tensor before the last block)."""
    skipped = {key for key, value in state_dict.items() if value.is_meta}
    if not skipped:
        return None
    indices = {block_index(key) for key in skipped}
    if None in indices:
        raise ValueError(f"backbone tensors outside the trunk blocks were not loaded: {sorted(skipped)[:6]}")
    first = min(i for i in indices if i is not None)
    loaded_late = sorted(
        k for k, v in state_dict.items() if not v.is_meta and (index := block_index(k)) is not None and index >= first
    )
    if loaded_late:
        raise ValueError(f"blocks after {first} are only partly loaded: {loaded_late[:6]}")
    return first


def infer_architecture(state_dict: dict[str, Tensor]) -> dict[str, int]:
    """Width, depth and patch size read off a backbone state dict's shapes (for error hints)."""
    info: dict[str, int] = {}
    proj = state_dict.get("preprocessor.patchifier.proj.weight")
    if proj is not None and proj.ndim == 4:
        info["width"] = int(proj.shape[0])
        info["patch_size"] = int(proj.shape[-1])
    blocks = {int(m.group(1)) for k in state_dict if (m := BLOCK.match(k))}
    if blocks:
        info["depth"] = max(blocks) + 1
    return info


def fingerprint_state_dict(state_dict: dict[str, Tensor]) -> str:
    """BLAKE2b over every key, dtype, shape and byte of ``state_dict`` (hex, 32 chars); placeholders
    (blocks after the last probed one) count by key, dtype and shape only.

    Hashing content rather than a path means the same trunk gives the same key whatever file it
    came from, and any change of weights that the probe uses (a later step, a different run) gives
    a new one. It costs about a second per GB on one core, small next to extracting features.
    """
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(state_dict):
        tensor = state_dict[key].detach()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.is_meta:
            digest.update(b"|not loaded")
            continue
        tensor = tensor.cpu().contiguous()
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The hand-over file: written tensor by tensor, read memory-mapped


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


TensorSpec = tuple[torch.dtype, tuple[int, ...]]  # what a tensor of a file will be: dtype, shape
WritePiece = Callable[[str, int, Tensor], None]


def _safetensors_layout(specs: dict[str, TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int], int]:
    """``(the file's first bytes: header length + header, each tensor's byte offset in the file,
    the file's size)`` for tensors ``specs``, stored end to end in this order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, (dtype, shape) in specs.items():
        if dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{key}: dtype {dtype} cannot be written to safetensors here")
        size = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    head = len(encoded).to_bytes(8, "little") + encoded
    starts = {key: len(head) + entry["data_offsets"][0] for key, entry in header.items() if key != "__metadata__"}
    return head, starts, len(head) + offset


@contextlib.contextmanager
def safetensors_writer(
    path: str | os.PathLike, specs: dict[str, TensorSpec], metadata: dict[str, str]
) -> Iterator[WritePiece]:
    """Publish a ``.safetensors`` file at ``path`` (atomically, when the block ends without an error)
    holding tensors of ``specs`` (``{name: (dtype, shape)}``), filled piece by piece: the block gets
    ``write(name, start, values)``, which stores ``values`` (any shape and dtype, cast to the
    tensor's dtype) from element ``start`` of the flattened tensor ``name``. The caller writes every
    element (the file is created at its full size; an element never written reads as zero).

    The bytes go from ``values``' memory to the file: no copy of the whole tensors is held (the
    extra host memory is one cast piece at most), and the written pages are the kernel's page
    cache, not this process's memory."""
    head, starts, size = _safetensors_layout(specs, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        f.truncate(size)

        def write(name: str, start: int, values: Tensor) -> None:
            dtype = specs[name][0]
            data = values.detach().reshape(-1).to(dtype).contiguous()
            if data.numel():
                f.seek(starts[name] + start * dtype.itemsize)
                # A byte view of the tensor's own memory: no copy (bf16 has no numpy dtype, uint8 does).
                f.write(memoryview(data.view(torch.uint8).numpy()))

        yield write


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Publish ``tensors`` (CPU, not meta) as a ``.safetensors`` file at ``path`` (atomically),
    writing each tensor's bytes straight from its memory: the extra host memory is one tensor's
    worth at most, not the whole dict's as with ``safetensors.torch.save_file``."""
    specs = {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()}
    with safetensors_writer(path, specs, metadata) as write:
        for key, tensor in tensors.items():
            write(key, 0, tensor)
    return Path(path)


def _handover_metadata(layout: dict[str, Tensor], stored: Collection[str]) -> dict[str, str]:
    skipped = {k: [_dtype_name(v.dtype), list(v.shape)] for k, v in layout.items() if k not in stored}
    return {"format": "pt", _SKIPPED_KEY: json.dumps(skipped)}


def write_handover(path: str | os.PathLike, state_dict: dict[str, Tensor]) -> Path:
    """Write a selected backbone (:func:`select_backbone`) for the other ranks: the loaded tensors,
    and the placeholders' dtypes and shapes in the metadata."""
    loaded = {k: v for k, v in state_dict.items() if not v.is_meta}
    return write_safetensors(path, loaded, _handover_metadata(state_dict, loaded))


@contextlib.contextmanager
def handover_writer(
    path: str | os.PathLike, layout: dict[str, Tensor], loaded: Collection[str]
) -> Iterator[WritePiece]:
    """The file :func:`write_handover` writes, filled piece by piece (see :func:`safetensors_writer`)
    as the tensors are merged: ``layout`` is the selected backbone as placeholders (every tensor's
    shape and probe dtype, :func:`select_backbone` of placeholders), ``loaded`` the names whose
    data the block writes; the others stay placeholders for the readers."""
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in layout.items() if k in loaded}
    with safetensors_writer(path, specs, _handover_metadata(layout, specs)) as write:
        yield write


def read_handover(path: str | os.PathLike) -> dict[str, Tensor]:
    """The backbone :func:`write_handover` wrote, memory-mapped (the tensors share the page cache
    with every other reader of the file; the file may be removed once read)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    state = load_file(str(path), device="cpu")
    for key, (dtype, shape) in json.loads(metadata.get(_SKIPPED_KEY, "{}")).items():
        state[key] = placeholder(shape, getattr(torch, dtype))
    return state


__all__ = [
    "BACKBONE_PREFIXES",
    "block_index",
    "dtype_rule",
    "fingerprint_state_dict",
    "handover_writer",
    "infer_architecture",
    "is_backbone",
    "loaded_blocks",
    "placeholder",
    "probe_dtype",
    "read_handover",
    "safetensors_writer",
    "select_backbone",
    "wanted",
    "write_handover",
    "write_safetensors",
]
