"""Pretrained AIM models from a folder or a file, with no DeepSpeed and no run folder.

An export folder (written by :mod:`aim_ds.weights.export`, or by :meth:`AIM.save_pretrained`) holds:

- ``config.json``: ``{"model_type": "aim", "model_name": ..., <every AIMConfig field that changes the
  function>}``, the model's whole description (Hugging Face's convention: a copied folder is enough);
- ``model.safetensors``: the state dict, fp32 (``preprocessor.*``, ``trunk.*`` and, unless the model was
  saved without it, the pixel head ``head.*``);
- ``model.json`` (exports from a training run): provenance (step, checkpoint, overrides, version). Exports
  written before ``config.json`` existed carry the architecture there (or, older still, only a registry
  name and overrides); they still load.

Also read: a folder in apple/ml-aim's Hugging Face form (``config.json`` with ``embed_dim``,
``num_blocks``...; ``model.safetensors`` in the released layout, the probe head ignored), our
``trunk_ml_aim.safetensors``, and a bare weights file when a registry name says the architecture.
Torch pickles are read with ``weights_only=True`` (no code runs from a weights file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_path, atomic_write_json, remove_if_exists
from .aim import AIM, RELEASED_NORM_EPS, AIMConfig
from .registry import get_model_spec, list_models

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
ML_AIM_FILE = "trunk_ml_aim.safetensors"
MODEL_TYPE = "aim"

# AIMConfig fields that do not change the function (how attention is computed): not stored.
RUNTIME_FIELDS = frozenset({"attn_impl"})
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPERS = ("module.", "_orig_mod.")
# Keys only our pretraining model has (the pixel head); an ml-aim file's head.* is a probe head.
_PIXEL_HEAD = re.compile(r"^head\.(embed|blocks|norm|out)\.")
_BACKBONE_PREFIXES = ("preprocessor.", "trunk.")


class PretrainedError(ValueError):
    """A pretrained path that cannot be loaded: the message names the file and what is wrong."""


def architecture_of(cfg: AIMConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that change the model's function (widths, depths, heads, patch and image
    size, norm eps, head block form, target normalisation, ...), as plain JSON data."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RUNTIME_FIELDS}


def config_json(cfg: AIMConfig, model_name: str | None) -> dict[str, Any]:
    """The ``config.json`` of a model: its type, registry name and full architecture."""
    return {"model_type": MODEL_TYPE, "model_name": model_name, **architecture_of(cfg)}


def export_architecture(meta: dict[str, Any], where: str | os.PathLike = META_FILE) -> dict[str, Any]:
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
        missing = sorted(known - RUNTIME_FIELDS - set(architecture))
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


def ml_aim_architecture(config: dict[str, Any], where: str | os.PathLike) -> dict[str, Any]:
    """AIMConfig fields from apple/ml-aim's model config (the ``config`` argument of its
    ``AIMForImageClassification``: ``img_size``, ``patch_size``, ``embed_dim``, ``num_blocks``,
    ``num_heads``...). The released models use LayerNorm eps 1e-6 (docs/recipe.md, "Trunk")."""

    def single(key: str) -> int:
        value = config[key]
        if isinstance(value, list | tuple):
            if len(set(value)) != 1:
                raise PretrainedError(f"{where}: non-square {key} {value} is not supported")
            value = value[0]
        return int(value)

    try:
        arch: dict[str, Any] = {
            "image_size": single("img_size"),
            "patch_size": single("patch_size"),
            "width": int(config["embed_dim"]),
            "depth": int(config["num_blocks"]),
            "num_heads": int(config["num_heads"]),
            "mlp_ratio": float(config.get("mlp_ratio", 4.0)),
            "norm_eps": RELEASED_NORM_EPS,
        }
    except KeyError as exc:
        raise PretrainedError(f"{where}: an ml-aim config without {exc.args[0]!r}") from None
    if config.get("use_bias") or config.get("num_channels", 3) != 3:
        raise PretrainedError(f"{where}: biases in the blocks or num_channels != 3 are not AIM-v1 as aim-ds builds it")
    return arch


def read_config(folder: Path) -> tuple[str | None, dict[str, Any] | None]:
    """``(registry name, architecture)`` that a folder describes: ``config.json`` (ours or ml-aim's),
    else ``model.json``; ``(None, None)`` when it holds neither."""
    config_file, meta_file = folder / CONFIG_FILE, folder / META_FILE
    if config_file.is_file():
        config = _read_json(config_file)
        if "embed_dim" in config:  # apple/ml-aim's Hugging Face form
            return None, ml_aim_architecture(config, config_file)
        if config.get("model_type") != MODEL_TYPE:
            raise PretrainedError(f"{config_file}: model_type {config.get('model_type')!r} is not {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(AIMConfig)}
        arch = {k: v for k, v in config.items() if k not in ("model_type", "model_name", "aim_ds_version")}
        unknown = sorted(set(arch) - known)
        if unknown:
            raise PretrainedError(
                f"{config_file}: fields {unknown} are unknown to this aim-ds version (a newer export?)"
            )
        missing = sorted(known - RUNTIME_FIELDS - set(arch))
        if missing:
            raise PretrainedError(f"{config_file}: no {', '.join(missing)}; the file is incomplete")
        return config.get("model_name"), arch
    if meta_file.is_file():
        meta = _read_json(meta_file)
        if "model" not in meta:
            raise PretrainedError(f"{meta_file}: no 'model' entry naming the registry model")
        try:
            return meta["model"], export_architecture(meta, meta_file)
        except KeyError as exc:  # an unknown registry name in an old export
            raise PretrainedError(f"{meta_file}: {exc.args[0]}") from None
    return None, None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PretrainedError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(state dict, safetensors metadata)`` of a ``.safetensors`` file or a torch pickle (read with
    ``weights_only=True``; ``{"model"|"state_dict"|"module": sd}`` unwrapped), wrapper prefixes
    (``module.``, ``_orig_mod.``) stripped."""
    if not path.is_file():
        raise PretrainedError(f"{path}: no such weights file")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        elif path.suffix in _TORCH_SUFFIXES:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
            for _ in range(3):
                if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
                    obj = next((obj[k] for k in ("model", "state_dict", "module") if k in obj), obj)
            if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
                raise PretrainedError(f"{path}: not a state dict")
            state = dict(obj)
        else:
            raise PretrainedError(f"{path}: unknown weights file type {path.suffix!r}; expected .safetensors or .pt")
    except PretrainedError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure means a damaged or foreign file
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PretrainedError(f"{path}: damaged or not a weights file ({type(exc).__name__}: {detail})") from None
    for prefix in _WRAPPERS:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, metadata


def _locate(path: Path) -> tuple[Path, Path]:
    """``(folder, weights file)`` for an export folder, a run folder (its ``export/``) or a file."""
    if not path.exists():
        raise PretrainedError(f"{path}: no such file or folder")
    if path.is_file():
        return path.parent, path
    for folder in (path, path / "export"):
        for name in (WEIGHTS_FILE, ML_AIM_FILE):
            if (folder / name).is_file():
                return folder, folder / name
    raise PretrainedError(f"{path}: a folder without {WEIGHTS_FILE} or {ML_AIM_FILE} (not an export)")


def load_pretrained(
    path: str | os.PathLike,
    model_name: str | None = None,
    *,
    device: str | torch.device = "cpu",
    pixel_head: bool | None = None,
    **overrides: Any,
) -> AIM:
    """An :class:`AIM` holding the weights at ``path`` (an export folder, a run folder, or a weights
    file), in eval mode on ``device``.

    The architecture comes from the folder's ``config.json`` (or an older export's ``model.json``);
    for a bare file, from the registry entry ``model_name`` (a released ml-aim file: with LayerNorm
    eps 1e-6). ``model_name`` given beside a stored architecture must agree with it. ``pixel_head``:
    None loads the pixel head when the file holds one; False leaves it out (a feature extractor,
    about 0.4B fewer parameters at the paper's sizes); True requires it. ``overrides``: runtime
    fields (``attn_impl``) or fields equal to the stored ones; a different architecture is an error.
    Every key and shape must match (strict); the model is built on the meta device and takes the
    file's tensors in place, so no random init is spent.
    """
    folder, file = _locate(Path(path))
    stored_name, arch = read_config(folder) if file.name in (WEIGHTS_FILE, ML_AIM_FILE) else (None, None)
    state, metadata = read_weights(file)
    has_pixel_head = any(_PIXEL_HEAD.match(k) for k in state)
    if not has_pixel_head:
        # The released layout, or our trunk-only save: the backbone, and an ml-aim probe head set aside.
        probe = [k for k in state if k.startswith("head.")]
        if probe:
            logger.info("%s: leaving out the probe head (%d tensors) of an ml-aim checkpoint", file, len(probe))
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if pixel_head and not has_pixel_head:
        raise PretrainedError(f"{file}: holds no pixel head (head.embed/blocks/norm/out); load with pixel_head=False")
    if model_name is not None and stored_name is not None and model_name != stored_name:
        logger.warning(
            "%s was saved as %r; loading it as %r with the stored architecture", path, stored_name, model_name
        )
    name = model_name or stored_name
    if arch is None:
        if name is None:
            raise PretrainedError(
                f"{file}: no {CONFIG_FILE} or {META_FILE} beside it says the architecture; pass a registry "
                f"name (one of {', '.join(list_models())})"
            )
        arch = architecture_of(_spec_config(name, file))
        if not has_pixel_head:
            arch["norm_eps"] = RELEASED_NORM_EPS
    if not has_pixel_head and "norm_eps" in metadata:
        # Our ml-aim files say the eps the trunk was trained with; the ml-aim layout alone cannot.
        try:
            arch["norm_eps"] = float(metadata["norm_eps"])
        except ValueError:
            raise PretrainedError(f"{file}: metadata norm_eps {metadata['norm_eps']!r} is not a number") from None
    base = _spec_config(name, file) if name is not None else AIMConfig()
    for key, value in overrides.items():
        if key not in RUNTIME_FIELDS and key in arch and arch[key] != value:
            raise PretrainedError(f"{path}: stores {key}={arch[key]!r}; cannot load it with {key}={value!r}")
    try:
        cfg = base.replace(**{**arch, **overrides})
    except (TypeError, ValueError) as exc:
        raise PretrainedError(f"{path}: {exc}") from None
    with_head = has_pixel_head if pixel_head is None else pixel_head
    if not with_head:
        state = {k: v for k, v in state.items() if k.startswith(_BACKBONE_PREFIXES)}
    with torch.device("meta"):
        model = AIM(cfg, name=name, pixel_head=with_head)
    _check_keys(model, state, file)
    model.load_state_dict(state, strict=True, assign=True)
    model.rebuild_buffers()
    return model.to(device).eval()


def _spec_config(name: str, where: Path) -> AIMConfig:
    try:
        return get_model_spec(name).config
    except KeyError as exc:
        raise PretrainedError(f"{where}: {exc.args[0]}") from None


def _check_keys(model: AIM, state: dict[str, Tensor], file: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:6]))
        raise PretrainedError(f"{file}: does not fit {model.name or 'the model'}: " + ", ".join(parts))


def save_pretrained(model: AIM, path: str | os.PathLike) -> Path:
    """Write ``model`` as an export folder (``model.safetensors``, fp32, then ``config.json`` last),
    each file under a temporary name then renamed. Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    remove_if_exists(folder / CONFIG_FILE)  # the folder is no export while its weights change
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": str(model.name)})
    atomic_write_json(folder / CONFIG_FILE, config_json(model.config, model.name))
    return folder


__all__ = [
    "CONFIG_FILE",
    "META_FILE",
    "ML_AIM_FILE",
    "WEIGHTS_FILE",
    "PretrainedError",
    "architecture_of",
    "config_json",
    "export_architecture",
    "load_pretrained",
    "ml_aim_architecture",
    "read_config",
    "read_weights",
    "save_pretrained",
]
