"""Load AIM trunk weights from any of the three places they live (the frozen trunk: :mod:`aim_ds.weights.frozen`).

Sources, told apart by what is on disk (:func:`detect_source`):

- ``export``: our pretraining export, a folder holding ``model.safetensors`` + ``model.json``
  (``<run>/export``) or the ``.safetensors`` file itself (our full state dict, pixel head included);
- ``deepspeed``: a DeepSpeed ZeRO checkpoint, given as the run folder (``<run>``), its
  ``checkpoints/`` folder or one tag folder (``checkpoints/step_0000100``); consolidated to fp32 on
  the fly from the optimizer shards (no process group needed);
- ``ml_aim``: a released apple/ml-aim backbone (``.safetensors``, ``.pth``/``.pt``/``.bin``),
  possibly carrying a probe head (``head.cls_token``...), mapped by :mod:`aim_ds.weights.interop` (pure key
  mapping; this module reads the files and calls it, never the other way).

All of them end as *our* backbone state dict: ``preprocessor.*`` and ``trunk.*`` keys in fp32 (for a
probe: only the blocks it runs, matrices in its dtype, the rest shape-only; :mod:`aim_ds.weights.backbone`). Each
file is read once: the source is told from folder names (or a safetensors header), the wrapper
prefixes are stripped once at reading, the keys mapped once, the shapes checked once
(:func:`aim_ds.weights.frozen.build_trunk`, which also builds the frozen trunk a probe runs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..io import check_regular_file
from ..model.pretrained import CONFIG_FILE, MODEL_TYPE, read_config
from . import checkpoint as ckpt
from .backbone import (
    dtype_rule,
    fingerprint_state_dict,
    handover_writer,
    infer_architecture,
    placeholder,
    select_backbone,
    wanted,
)
from .export import EXPORT_DIR, META_FILE, WEIGHTS_FILE
from .interop import map_ml_aim_keys, strip_wrappers
from .zero_shards import (
    ShardError,
    ZeroCheckpoint,
    consolidate,
    parameter_shapes,
    read_zero_checkpoint,
    refusal,
    stream_shards,
)

Source = Literal["export", "deepspeed", "ml_aim"]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Keys that only our pretraining model has (the pixel head); their presence marks our layout.
_PIXEL_HEAD = re.compile(r"^head\.(embed|blocks|norm|out)\.")

logger = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights path that cannot be read as any known source."""


class WeightsMismatchError(ValueError):
    """A checkpoint whose backbone does not fit the named model.

    ``missing``: model keys absent from the checkpoint; ``unexpected``: checkpoint keys the model
    lacks; ``mismatched``: ``(key, checkpoint shape, model shape)``.
    """

    def __init__(
        self,
        model_name: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        hint: str = "",
    ) -> None:
        self.model_name = model_name
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [f"checkpoint does not match model {model_name!r}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_abbrev(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_abbrev(unexpected)}")
        for key, got, want in mismatched[:20]:
            lines.append(f"  shape mismatch {key}: checkpoint {list(got)} vs model {list(want)}")
        if len(mismatched) > 20:
            lines.append(f"  ... and {len(mismatched) - 20} more shape mismatches")
        if hint:
            lines.append(f"  {hint}")
        super().__init__("\n".join(lines))


def _abbrev(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass
class TrunkWeights:
    """A loaded backbone: our ``preprocessor.*`` + ``trunk.*`` state dict in fp32, where it came
    from, and the export's ``model.json`` when there was one (it names the model)."""

    state_dict: dict[str, Tensor]
    source: Source
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Content hash of the backbone (see :func:`fingerprint_state_dict`)."""
        return fingerprint_state_dict(self.state_dict)


# ---------------------------------------------------------------------------------------------
# Reading: the source is told from names and headers, the file is read once, keys mapped once


def read_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from a ``.safetensors`` file or a torch pickle (loaded with
    ``weights_only=True``; a ``{"model": ...}``/``{"state_dict": ...}``/``{"module": ...}`` wrapper
    is unwrapped), with the wrapper key prefixes (``module.``, ``_orig_mod.``, ``model.``) stripped."""
    path = Path(path)
    check_regular_file(path, "weights file", WeightsError)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        with read_errors(path, "a safetensors file"):
            return strip_wrappers(load_file(str(path), device="cpu"))
    if path.suffix in _TORCH_SUFFIXES:
        with read_errors(path, "a torch checkpoint"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        for _ in range(3):  # nested wrappers, e.g. {"model": {"module": sd}}
            if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
                return strip_wrappers(dict(obj))
            if isinstance(obj, dict):
                inner = next((obj[k] for k in ("model", "state_dict", "module") if k in obj), None)
                if inner is not None:
                    obj = inner
                    continue
            break
        raise WeightsError(f"{path}: not a state dict (found {type(obj).__name__} without tensor values)")
    raise WeightsError(
        f"{path}: unknown weights file type {path.suffix!r}; expected .safetensors or one of {_TORCH_SUFFIXES}"
    )


@contextlib.contextmanager
def read_errors(path: Path, kind: str) -> Iterator[None]:
    """Turn a reader's raw error (``SafetensorError``, ``UnpicklingError``, ``KeyError: 101``...) into
    one :class:`WeightsError` line naming ``path`` and what is wrong with it."""
    try:
        yield
    except WeightsError:
        raise
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{path}: {refusal(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - every reader failure means the same: a damaged file
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(f"{path}: damaged or not {kind} ({type(exc).__name__}: {detail})") from None


def resolve_deepspeed_checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    """``(checkpoints_dir, tag)`` for a run folder, a checkpoints folder or a tag folder.

    In a checkpoints folder the newest *complete* checkpoint (``COMPLETE`` marker, written by
    :mod:`aim_ds.weights.checkpoint`) wins; failing that DeepSpeed's own ``latest`` file; failing that the
    highest ``step_*`` tag, with a warning, as a checkpoint of another tool may carry no marker.
    """
    path = Path(path)
    if _is_tag_dir(path):
        return path.parent, path.name
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = ckpt.latest_complete(ckpt_dir)
    if latest is not None:
        return ckpt_dir, latest[1].name
    latest_file = ckpt_dir / "latest"
    if latest_file.is_file():
        tag = latest_file.read_text().strip()
        if _is_tag_dir(ckpt_dir / tag):
            return ckpt_dir, tag
    tags = [p for _, p in ckpt.list_tags(ckpt_dir) if _is_tag_dir(p)]
    if tags:
        logger.warning("no complete marker or 'latest' file in %s; using %s", ckpt_dir, tags[-1].name)
        return ckpt_dir, tags[-1].name
    raise WeightsError(
        f"{path}: no DeepSpeed checkpoint found (looked for tag folders with *model_states.pt in {ckpt_dir})"
    )


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def _folder_source(path: Path) -> Source:
    """Which kind of weights the folder ``path`` holds, from the names in it."""
    if (path / WEIGHTS_FILE).is_file():
        return "export"
    if _is_tag_dir(path) or (path / "checkpoints").is_dir() or ckpt.list_tags(path) or (path / "latest").is_file():
        return "deepspeed"
    if (path / EXPORT_DIR / WEIGHTS_FILE).is_file():
        return "export"
    raise WeightsError(
        f"{path}: a folder with neither {WEIGHTS_FILE} (an export), nor checkpoints/ or step_* tag "
        "folders (a DeepSpeed checkpoint)"
    )


def _keys_source(keys: Iterable[str]) -> Source:
    """A weights file's kind from its (unwrapped) keys: our pixel head marks our export layout."""
    return "export" if any(_PIXEL_HEAD.match(k) for k in keys) else "ml_aim"


def detect_source(path: str | os.PathLike) -> Source:
    """Which kind of weights ``path`` holds (see the module docstring): folders by their file
    names, ``.safetensors`` files by their header's keys. A torch pickle has no header: it is read
    (:func:`load_trunk_weights` reads each file once and tells its kind from the keys it read)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights path {path} does not exist")
    if path.is_dir():
        return _folder_source(path)
    check_regular_file(path, "weights file", WeightsError)  # a FIFO or a device would block the read
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with read_errors(path, "a safetensors file"), safe_open(str(path), framework="pt") as f:
            return _keys_source(strip_wrappers(dict.fromkeys(f.keys())))
    return _keys_source(read_state_dict_file(path))


def _backbone(state_dict: dict[str, Tensor], keep_blocks: int | None, matrix_dtype: torch.dtype) -> dict[str, Tensor]:
    """Our layout (unwrapped): the backbone as the probe keeps it (:func:`aim_ds.weights.backbone.select_backbone`);
    the pixel head dropped."""
    out = select_backbone(state_dict, keep_blocks, matrix_dtype)
    if not out:
        sample = ", ".join(list(state_dict)[:6])
        raise WeightsError(f"no preprocessor.* or trunk.* keys in the weights (first keys: {sample})")
    return out


def _read_meta(folder: Path) -> dict[str, Any]:
    """The export's ``model.json``; failing that, the name and architecture of our ``config.json``
    (a folder copied without its provenance file, as ``AIM.save_pretrained`` writes it)."""
    meta_file = folder / META_FILE
    if meta_file.is_file():
        with read_errors(meta_file, "JSON"):
            return json.loads(meta_file.read_text())
    config_file = folder / CONFIG_FILE
    if config_file.is_file():
        with read_errors(config_file, "JSON"):
            config = json.loads(config_file.read_text())
        if isinstance(config, dict) and config.get("model_type") == MODEL_TYPE:
            name, arch = read_config(folder)
            return {"model": name, "architecture": arch}
    return {}


@contextlib.contextmanager
def _refusing(path: Path) -> Iterator[None]:
    try:
        yield
    except ShardError as exc:
        raise WeightsError(f"refusing the DeepSpeed checkpoint in {path}: {exc}") from None


def _read_deepspeed(path: Path) -> tuple[ZeroCheckpoint, dict[str, str], dict[str, Any]]:
    """The layout of the checkpoint ``path`` resolves to (every shard checked, nothing merged), our
    name for each saved tensor (wrappers stripped), and the :class:`TrunkWeights` meta."""
    ckpt_dir, tag = resolve_deepspeed_checkpoint(path)
    with _refusing(path):
        zero = read_zero_checkpoint(ckpt_dir / tag)
    shapes = parameter_shapes(zero)
    ours = {saved: name for name, saved in strip_wrappers(dict(zip(shapes, shapes))).items()}
    meta: dict[str, Any] = {"checkpoint": str(ckpt_dir / tag), "step": ckpt.step_from_tag(tag)}
    # The model name the run was trained with, from a sibling export's model.json, if any.
    run_meta = _read_meta(ckpt_dir.parent / EXPORT_DIR)
    if run_meta:
        meta.update(model=run_meta.get("model"), overrides=run_meta.get("overrides", {}))
        if "architecture" in run_meta:
            meta["architecture"] = run_meta["architecture"]
    return zero, ours, meta


def _load_deepspeed(path: Path, keep_blocks: int | None, matrix_dtype: torch.dtype) -> TrunkWeights:
    """Merge only the backbone tensors the probe loads, from the memory-mapped shards one rank's
    file at a time, each straight into its dtype (never the pixel head, never the optimizer moments)."""
    zero, ours, meta = _read_deepspeed(path)
    shapes = parameter_shapes(zero)
    to_dtype = dtype_rule(matrix_dtype)
    with _refusing(path):
        merged = consolidate(zero, lambda saved: wanted(ours[saved], keep_blocks), to_dtype)
    skipped = {name: placeholder(shapes[saved], to_dtype(shapes[saved])) for saved, name in ours.items()}
    loaded = {ours[saved]: tensor for saved, tensor in merged.items()}
    state = _backbone({**skipped, **loaded}, keep_blocks, matrix_dtype)
    return TrunkWeights(state_dict=state, source="deepspeed", path=path, meta=meta)


def write_deepspeed_handover(
    path: str | os.PathLike,
    handover: str | os.PathLike,
    *,
    keep_blocks: int | None = None,
    matrix_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Rank 0's part of a probe on several ranks: the backbone ``load_trunk_weights(path,
    keep_blocks=..., matrix_dtype=...)`` loads from a DeepSpeed checkpoint (the same tensors, dtypes
    and placeholders), merged from the shards one rank's file at a time straight into the hand-over
    file ``handover`` (:func:`aim_ds.weights.backbone.handover_writer`, read back by
    :func:`aim_ds.weights.backbone.read_handover`). No private copy of the backbone is held: the host memory
    is one rank's fp32 shard pages at a time. Returns the :class:`TrunkWeights` meta."""
    path = Path(path)
    zero, ours, meta = _read_deepspeed(path)
    shapes = parameter_shapes(zero)
    as_saved = {
        name: placeholder(shapes[saved], zero.buffers[saved].dtype if saved in zero.buffers else torch.float32)
        for saved, name in ours.items()
    }
    layout = _backbone(as_saved, keep_blocks, matrix_dtype)  # every backbone tensor's shape and probe dtype
    loaded = {name for name in layout if wanted(name, keep_blocks)}
    targets: dict[str, list[str]] = {}  # saved tensor -> the names it fills (a shared one, its aliases too)
    for saved, name in ours.items():
        if name in loaded:
            targets.setdefault(zero.shared_params.get(saved, saved), []).append(name)
    with _refusing(path), handover_writer(handover, layout, loaded) as write:

        def write_saved(saved: str, start: int, values: Tensor) -> None:
            for name in targets[saved]:
                write(name, start, values)

        for saved, buffer in zero.buffers.items():
            if saved in targets:
                write_saved(saved, 0, buffer)
        stream_shards(zero, targets.__contains__, write_saved)
    return meta


def _load_file(file: Path, path: Path, keep_blocks: int | None, matrix_dtype: torch.dtype) -> TrunkWeights:
    """One read of a weights file; its keys say whether it is our export or an ml-aim backbone."""
    raw = read_state_dict_file(file)
    if _keys_source(raw) == "export":
        state = _backbone(raw, keep_blocks, matrix_dtype)
        return TrunkWeights(state_dict=state, source="export", path=path, meta=_read_meta(file.parent))
    state = select_backbone(map_ml_aim_keys(raw), keep_blocks, matrix_dtype)
    return TrunkWeights(state_dict=state, source="ml_aim", path=path, meta=_ml_aim_meta(file))


def _ml_aim_meta(file: Path) -> dict[str, Any]:
    """``{"norm_eps": ...}`` when an ml-aim-layout safetensors file says what eps it was trained with
    (our ``trunk_ml_aim.safetensors`` export does; released files do not). Reads the header only."""
    if file.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
    try:
        return {"norm_eps": float(header["norm_eps"])} if "norm_eps" in header else {}
    except ValueError:
        return {}


def load_trunk_weights(
    path: str | os.PathLike, *, keep_blocks: int | None = None, matrix_dtype: torch.dtype = torch.float32
) -> TrunkWeights:
    """Read a backbone from any source, reading its file(s) once; see :func:`load_trunk_state_dict`.

    For a probe: ``keep_blocks`` loads only the trunk blocks before it (the later ones become
    shape-only placeholders on the meta device: a DeepSpeed checkpoint never merges them, a
    memory-mapped file never reads them), and ``matrix_dtype`` is the dtype of the weight matrices
    (bf16 for a CUDA probe; vectors stay fp32; see :mod:`aim_ds.weights.backbone`). The defaults load
    everything in fp32.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights path {path} does not exist")
    if not path.is_dir():
        return _load_file(path, path, keep_blocks, matrix_dtype)
    if _folder_source(path) == "deepspeed":
        return _load_deepspeed(path, keep_blocks, matrix_dtype)
    folder = path if (path / WEIGHTS_FILE).is_file() else path / EXPORT_DIR
    return _load_file(folder / WEIGHTS_FILE, path, keep_blocks, matrix_dtype)


def load_trunk_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Our backbone state dict (``preprocessor.*`` + ``trunk.*``, fp32, CPU) from an export folder
    or file, a DeepSpeed checkpoint (run folder, ``checkpoints/`` or a tag folder) or a released
    ml-aim backbone file."""
    return load_trunk_weights(path).state_dict


__all__ = [
    "TrunkWeights",
    "WeightsError",
    "WeightsMismatchError",
    "detect_source",
    "fingerprint_state_dict",
    "infer_architecture",
    "load_trunk_state_dict",
    "load_trunk_weights",
    "read_errors",
    "read_state_dict_file",
    "resolve_deepspeed_checkpoint",
    "write_deepspeed_handover",
]
