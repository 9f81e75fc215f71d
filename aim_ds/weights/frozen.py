"""The frozen AIM trunk a probe runs, built from loaded weights (:mod:`aim_ds.weights.load`).

:func:`build_trunk` checks a backbone state dict against the model's shapes once (naming the Table 1
size the weights match when the name is wrong) and builds the trunk with only the blocks it holds;
:class:`FrozenTrunk` runs it without gradients and returns the mean of the chosen blocks' features;
:func:`build_frozen_trunk` is the one call from a path to a frozen trunk.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from torch import Tensor, nn

from ..model.aim import AIM, RELEASED_NORM_EPS, AIMConfig
from ..model.registry import create_model, get_model_spec, list_models
from .backbone import BACKBONE_PREFIXES, infer_architecture, loaded_blocks
from .export import export_architecture
from .load import TrunkWeights, WeightsError, WeightsMismatchError, load_trunk_weights

logger = logging.getLogger(__name__)


def _matching_models(arch: dict[str, int]) -> list[str]:
    found = []
    for name in list_models():
        cfg = get_model_spec(name).config
        if all(getattr(cfg, key) == value for key, value in arch.items()):
            found.append(name)
    return found


def check_backbone(state_dict: dict[str, Tensor], model: AIM, model_name: str) -> None:
    """Raise :class:`WeightsMismatchError` unless ``state_dict`` holds exactly ``model``'s
    preprocessor and trunk keys with the same shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(BACKBONE_PREFIXES)}
    missing = sorted(set(expected) - set(state_dict), key=_natural)
    unexpected = sorted(set(state_dict) - set(expected), key=_natural)
    mismatched = [
        (k, tuple(state_dict[k].shape), expected[k])
        for k in sorted(set(expected) & set(state_dict), key=_natural)
        if tuple(state_dict[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        arch = infer_architecture(state_dict)
        hint = ""
        if arch:
            names = _matching_models(arch)
            described = ", ".join(f"{k} {v}" for k, v in arch.items())
            hint = f"the checkpoint looks like {described}" + (f" (model {' or '.join(names)})" if names else "")
        raise WeightsMismatchError(model_name, missing, unexpected, mismatched, hint)


def _natural(key: str) -> list[Any]:
    # Sort block 10 after block 9, so that error listings read in model order.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


# ---------------------------------------------------------------------------------------------
# The frozen trunk


def build_trunk(model_name: str, state_dict: dict[str, Tensor], **overrides: Any) -> AIM:
    """The model ``model_name`` (with architecture ``overrides``) holding ``state_dict``'s backbone,
    on the CPU, with the pixel head removed (it is not needed to probe and holds ~0.4B parameters
    at the paper's sizes). Raises :class:`WeightsMismatchError` when the shapes do not fit.

    The model is built on the meta device (no random init of billions of parameters), the
    checkpoint tensors are assigned in place, and the non-persistent buffers (position embedding,
    image statistics) are copied from a depth-0 twin that computes them cheaply. When the blocks
    from some index on are placeholders (:func:`load_trunk_weights` with ``keep_blocks``), their
    shapes are checked too, then the model is built without them.
    """
    meta_model = create_model(model_name, device="meta", **overrides)
    check_backbone(state_dict, meta_model, model_name)
    meta_model.head = None  # as AIM(pixel_head=False): the probe never runs the pixel head
    try:
        keep_blocks = loaded_blocks(state_dict)
    except ValueError as exc:
        raise WeightsError(f"cannot build {model_name}: {exc}") from None
    if keep_blocks is not None:
        del meta_model.trunk.blocks[keep_blocks:]
        state_dict = {key: value for key, value in state_dict.items() if not value.is_meta}
    meta_model.load_state_dict(state_dict, strict=False, assign=True)
    donor = create_model(model_name, **{**overrides, "depth": 0, "head_depth": 0})
    donor_buffers = dict(donor.named_buffers())
    for name, buffer in list(meta_model.named_buffers()):
        if buffer.is_meta:
            if name not in donor_buffers:
                raise RuntimeError(f"cannot rebuild buffer {name!r} of {model_name} (not in a depth-0 twin)")
            module_name, _, attr = name.rpartition(".")
            module = meta_model.get_submodule(module_name) if module_name else meta_model
            module._buffers[attr] = donor_buffers[name].clone()
    leftover = [n for n, t in list(meta_model.named_parameters()) + list(meta_model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left unset after loading: {leftover[:8]}")
    return meta_model


class FrozenTrunk(nn.Module):
    """A frozen AIM trunk that returns probe features.

    ``forward(images)`` runs :meth:`AIM.extract_features` (full bidirectional attention) under
    :func:`torch.inference_mode`, in bf16 autocast on CUDA, and returns the mean of the chosen
    blocks' outputs ``[B, N, D]`` (a normal tensor, safe to feed to trainable heads). The blocks
    after the last chosen one are dropped (they would never run; at 7B with blocks 14-19 that is
    12 of 32 blocks of memory). It counts the images it has seen, so callers can check that a
    cached run did no trunk work.
    """

    def __init__(
        self,
        model: AIM,
        layers: list[int] | None,
        *,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """``compute_dtype``: None, bf16 autocast on CUDA (``autocast_dtype``) and fp32 on the CPU;
        ``torch.float32``: no autocast anywhere; ``torch.bfloat16``: bf16 autocast on any device
        (the probe's ``features.dtype``)."""
        super().__init__()
        self.model = model
        self.layers = None if layers is None else [int(i) % model.config.depth for i in layers]
        if self.layers:
            del self.model.trunk.blocks[max(self.layers) + 1 :]
        self.autocast_dtype = autocast_dtype
        self.compute_dtype = compute_dtype
        self.images_seen = 0
        self.batches_seen = 0
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.eval()

    @property
    def config(self) -> AIMConfig:
        return self.model.config

    def train(self, mode: bool = True) -> FrozenTrunk:
        # The trunk stays in eval mode whatever the caller asks: it is frozen.
        super().train(False)
        return self

    def forward(self, images: Tensor) -> Tensor:
        """``images`` ``[B, 3, H, W]`` ImageNet-normalised -> features ``[B, N, D]`` fp32."""
        device = next(self.model.parameters()).device
        if self.compute_dtype is None:
            use_autocast = device.type == "cuda" and self.autocast_dtype is not None
        else:
            use_autocast = self.compute_dtype != torch.float32
        with (
            torch.inference_mode(),
            torch.autocast(
                device.type, dtype=self.compute_dtype or self.autocast_dtype or torch.bfloat16, enabled=use_autocast
            ),
        ):
            feats = self.model.extract_features(images.to(device, non_blocking=True), self.layers)
            feats = feats.float()
        self.images_seen += images.shape[0]
        self.batches_seen += 1
        # Inference tensors cannot be saved for backward; a clone outside the mode is a normal tensor.
        return feats.clone()


def frozen_trunk(
    model_name: str | None,
    weights: TrunkWeights,
    *,
    layers: list[int] | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = None,
    **overrides: Any,
) -> FrozenTrunk:
    """Loaded ``weights`` in model ``model_name`` (with architecture ``overrides``), frozen, on
    ``device``, computing in ``compute_dtype`` (see :class:`FrozenTrunk`). ``model_name=None`` takes
    the name from the export's ``model.json``."""
    if model_name is None:
        model_name = weights.meta.get("model")
        if model_name is None:
            raise WeightsError(f"{weights.path}: no model.json names the model; pass the model name explicitly")
    elif weights.meta.get("model") not in (None, model_name):
        logger.warning("%s was exported from %r, loading into %r", weights.path, weights.meta["model"], model_name)
    if weights.meta.get("model") == model_name:
        # The export's stored architecture (or, for an older export, its overrides and a warning
        # naming the values assumed); explicit overrides still win.
        try:
            stored = export_architecture(weights.meta, weights.path)
        except ValueError as exc:
            raise WeightsError(str(exc)) from None
        overrides = {**stored, **overrides}
    if weights.source == "ml_aim":
        # Released weights were trained and are served with eps 1e-6; our pretraining default is the
        # training config's 1e-5 (docs/recipe.md, "Trunk"). An explicit override still wins.
        overrides = {"norm_eps": weights.meta.get("norm_eps", RELEASED_NORM_EPS), **overrides}
    model = build_trunk(model_name, weights.state_dict, **overrides)
    return FrozenTrunk(model, layers, compute_dtype=compute_dtype).to(device)


def build_frozen_trunk(
    model_name: str | None,
    path: str | os.PathLike,
    *,
    layers: list[int] | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> tuple[FrozenTrunk, TrunkWeights]:
    """Load weights from ``path`` (any source) into model ``model_name`` and freeze it (see
    :func:`frozen_trunk`). Returns the frozen trunk on ``device`` and the loaded
    :class:`TrunkWeights` (for its fingerprint and source)."""
    weights = load_trunk_weights(path)
    return frozen_trunk(model_name, weights, layers=layers, device=device, **overrides), weights


__all__ = ["FrozenTrunk", "build_frozen_trunk", "build_trunk", "check_backbone", "frozen_trunk"]
