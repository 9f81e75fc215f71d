"""The model registry, keyed by the paper's Table 1 sizes plus small sizes for CPU work.

Each entry holds the architecture (:class:`~aim_ds.model.aim.AIMConfig`), its pretraining recipe and
the probe's "best" block range. :data:`PAPER_RECIPE` is the one home of the paper's numbers
(docs/recipe.md, Table 1 and Table 10): the run config's defaults (``aim_ds.train.config``) are
taken from it, and a test checks every ``run/configs/aim-<size>.yaml`` against its size's recipe.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..optim import lr_at_step, resolve_warmup_steps, steps_from_images, steps_from_patches
from .aim import AIM, AIMConfig


@dataclass(frozen=True)
class Recipe:
    """A pretraining recipe (docs/recipe.md, Table 1 / Table 10). ``batch_size`` is the global batch
    in images. The length is ``steps`` optimizer steps when set, else derived from ``patches_seen``
    (:meth:`total_steps`). Warmup is ``warmup_fraction`` of the length, as in the authors' code; a fixed
    ``warmup_steps`` (>= 0) overrides it, for ablations only (no paper recipe sets one)."""

    peak_lr: float
    batch_size: int
    patches_seen: float  # Table 1's figure; sets the length only when ``steps`` is 0
    warmup_fraction: float
    min_lr: float
    weight_decay: float  # matrices only
    betas: tuple[float, float]
    grad_clip: float  # global gradient 2-norm
    steps: int = 0  # optimizer steps; 0: from patches_seen
    warmup_steps: int = -1  # -1: round(total steps x warmup_fraction); >= 0 overrides the fraction

    def total_steps(self, num_patches: int) -> int:
        """Optimizer steps: ``steps``, or the steps to see ``patches_seen`` patches at ``batch_size``
        images of ``num_patches`` patches per step."""
        if self.steps > 0:
            return self.steps
        return steps_from_patches(self.patches_seen, self.batch_size, num_patches)

    def total_warmup_steps(self, num_patches: int) -> int:
        """Linear-warmup steps: ``warmup_fraction`` of :meth:`total_steps`, or ``warmup_steps`` when >= 0."""
        return resolve_warmup_steps(self.total_steps(num_patches), self.warmup_fraction, self.warmup_steps)

    def lr_at_step(self, step: int, num_patches: int) -> float:
        """This recipe's learning rate at optimizer step ``step`` (:func:`aim_ds.optim.lr_at_step`)."""
        return lr_at_step(
            step,
            peak_lr=self.peak_lr,
            total_steps=self.total_steps(num_patches),
            warmup_steps=self.total_warmup_steps(num_patches),
            min_lr=self.min_lr,
        )


# The paper's recipe, Table 10: AdamW (0.9, 0.95), weight decay 0.05, peak LR 1e-3, 1.25M iterations
# with a linear warmup over the first 2.5% of them (31,250) and a cosine decay to 0, gradient clipping 1.0,
# batch 4096. The authors' code states warmup only as a fraction of the run, so every recipe here does:
# a shorter or longer run keeps 2.5% (docs/recipe.md, "Readings").
PAPER_STEPS = 1_250_000  # AIM-1B, 3B, 7B: 5.12B images (the released ``*-5B-imgs``)
PAPER_WARMUP_FRACTION = 0.025
# AIM-0.6B saw 2B images (its released checkpoint is ``aim-600M-2B-imgs``; Table 1's 0.5T patches =
# 2B x 256): 488,281 steps at batch 4096 (docs/recipe.md, "Readings").
AIM_600M_IMAGES = 2_000_000_000
PAPER_RECIPE = Recipe(
    peak_lr=1e-3,
    batch_size=4096,
    patches_seen=1.2e12,
    warmup_fraction=PAPER_WARMUP_FRACTION,
    min_lr=0.0,
    weight_decay=0.05,
    betas=(0.9, 0.95),
    grad_clip=1.0,
    steps=PAPER_STEPS,
)


def _small_recipe(batch_size: int, steps: int, num_patches: int, warmup_fraction: float) -> Recipe:
    """The paper's optimiser at a small batch and length, for CPU runs (the run configs match it)."""
    return dataclasses.replace(
        PAPER_RECIPE,
        batch_size=batch_size,
        patches_seen=float(batch_size * num_patches * steps),
        warmup_fraction=warmup_fraction,
        steps=steps,
        warmup_steps=-1,
    )


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry."""

    name: str
    config: AIMConfig
    recipe: Recipe
    best_probe_layers: tuple[int, ...] = field(default=())
    paper_params: float | None = None  # preprocessor + trunk, as counted from the authors' code


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec``; a name that is already taken is an error, never a silent overwrite."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    """Registered model names, smallest first."""
    return list(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; an unknown name is a KeyError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    pretrained: bool | str | os.PathLike | None = None,
    pixel_head: bool | None = None,
    **overrides: Any,
) -> AIM:
    """Build an AIM model, timm's way: a registry name, or the path of a saved model.

    - ``create_model("aim-0.6B", **overrides)``: the pretraining model with architecture ``overrides``
      (AIMConfig fields), randomly initialised;
    - ``create_model("aim-0.6B", pretrained=PATH)``: that model holding the weights at ``PATH`` (an
      export folder, or a weights file such as a released ml-aim checkpoint, which fixes eps 1e-6);
    - ``create_model(PATH)`` (a folder or file): the model saved there, its architecture from its
      ``config.json`` (:meth:`AIM.from_pretrained`).

    Pretrained models come back in eval mode. ``pretrained=True`` would mean a download: there is
    no model hub here, so it is an error asking for a path. ``pixel_head``: see
    :func:`aim_ds.model.pretrained.load_pretrained` (for a fresh model: None or True build it).
    ``device="meta"`` builds a fresh model without allocating memory (parameter counting, sharded init).
    """
    name = os.fspath(name_or_path)
    if pretrained is True:
        raise ValueError(
            f"pretrained=True: aim-ds downloads nothing; pass pretrained=<export folder or file> for {name!r}"
        )
    if name not in _REGISTRY and (Path(name).exists() or os.sep in name):
        if pretrained not in (None, False):
            raise ValueError(f"create_model({name!r}, pretrained=...): give the path once, as the first argument")
        pretrained, name = name, None
    if pretrained not in (None, False):
        from .pretrained import load_pretrained

        if name is not None:
            get_model_spec(name)  # an unknown name is named before any file is read
        return load_pretrained(pretrained, name, device=device or "cpu", pixel_head=pixel_head, **overrides)
    spec = get_model_spec(name)
    cfg = spec.config.replace(**overrides) if overrides else spec.config
    with_head = pixel_head is not False
    if device is None:
        return AIM(cfg, name=name, pixel_head=with_head)
    with torch.device(device):
        return AIM(cfg, name=name, pixel_head=with_head)


def probe_blocks(blocks: str | Sequence[int], model_name: str | None, depth: int) -> list[int]:
    """Block indices (0-based) whose outputs the probe averages into its features.

    ``"last"``: the final 6 blocks (all of them when ``depth < 6``). ``"best"``: the registry's
    ``best_probe_layers`` for ``model_name`` (docs/recipe.md: 14-19 for 0.6B and 7B, 12-17 for 1B and
    3B), falling back to ``"last"`` for a model without one. A list: those indices (negative ones
    count from the end). Anything else is a ValueError saying what is wrong.
    """
    if isinstance(blocks, str):
        choice = blocks.strip().lower()
        last = list(range(max(0, depth - 6), depth))
        if choice == "last":
            return last
        if choice == "best":
            best = get_model_spec(model_name).best_probe_layers if model_name in _REGISTRY else ()
            return list(best) if best and max(best) < depth else last
        raise ValueError(f"{blocks!r} is not 'last', 'best' or a list of block indices")
    out = []
    for i in blocks:
        if not -depth <= int(i) < depth:
            raise ValueError(f"block {i} out of range for depth {depth}")
        out.append(int(i) % depth)
    if not out:
        raise ValueError("empty list of blocks")
    return out


def _table1(name: str, width: int, depth: int, recipe: Recipe, best: range, params: float) -> ModelSpec:
    return ModelSpec(
        name=name,
        config=AIMConfig(width=width, depth=depth, num_heads=width // 128),
        recipe=recipe,
        best_probe_layers=tuple(best),
        paper_params=params,
    )


# Small sizes: same architecture, smaller image, patch and width, for tests and CPU demos.
# aim-nano: the study's smallest size (aim_ds/study.py compares aim-nano, aim-test and aim-tiny, about 0.03M,
# 0.2M and 2.7M trunk parameters, trained on the same images for the same steps; BENCHMARKS.md, "The study").
register_model(
    ModelSpec(
        name="aim-nano",
        config=AIMConfig(image_size=32, patch_size=4, width=32, depth=2, num_heads=1, head_width=32, head_depth=1),
        recipe=_small_recipe(batch_size=16, steps=40, num_patches=64, warmup_fraction=0.1),
        best_probe_layers=(0, 1),
    )
)
register_model(
    ModelSpec(
        name="aim-test",
        config=AIMConfig(image_size=32, patch_size=4, width=64, depth=4, num_heads=2, head_width=64, head_depth=2),
        recipe=_small_recipe(batch_size=16, steps=40, num_patches=64, warmup_fraction=0.1),
        best_probe_layers=(0, 1, 2, 3),
    )
)
register_model(
    ModelSpec(
        name="aim-tiny",
        config=AIMConfig(image_size=32, patch_size=4, width=192, depth=6, num_heads=3, head_width=256, head_depth=2),
        recipe=_small_recipe(batch_size=32, steps=200, num_patches=64, warmup_fraction=0.05),
        best_probe_layers=(0, 1, 2, 3, 4, 5),
    )
)
# Between aim-tiny and aim-small at aim-tiny's 32 px (6.3M trunk parameters). The study's largest size until
# it was shown, at the study's 600 steps, to end above aim-tiny's val loss at peak LR 5e-4, 1e-3 and 2e-3
# (BENCHMARKS.md, "The study"): a size for longer CPU runs.
register_model(
    ModelSpec(
        name="aim-mini",
        config=AIMConfig(image_size=32, patch_size=4, width=256, depth=8, num_heads=4, head_width=256, head_depth=2),
        recipe=_small_recipe(batch_size=32, steps=200, num_patches=64, warmup_fraction=0.05),
        best_probe_layers=(2, 3, 4, 5, 6, 7),
    )
)
register_model(
    ModelSpec(
        name="aim-small",
        config=AIMConfig(image_size=112, patch_size=14, width=384, depth=12, num_heads=6, head_width=512, head_depth=4),
        recipe=_small_recipe(
            batch_size=256, steps=20_000, num_patches=64, warmup_fraction=PAPER_RECIPE.warmup_fraction
        ),
        best_probe_layers=(5, 6, 7, 8, 9, 10),
    )
)
# Table 1 (docs/recipe.md); "best" probe blocks 0-indexed.
_AIM_600M_RECIPE = dataclasses.replace(
    PAPER_RECIPE, patches_seen=0.5e12, steps=steps_from_images(AIM_600M_IMAGES, PAPER_RECIPE.batch_size)
)
register_model(_table1("aim-0.6B", 1536, 24, _AIM_600M_RECIPE, range(14, 20), 680.5e6))
register_model(_table1("aim-1B", 2048, 24, PAPER_RECIPE, range(12, 18), 1.209e9))
register_model(_table1("aim-3B", 3072, 24, PAPER_RECIPE, range(12, 18), 2.720e9))
register_model(_table1("aim-7B", 4096, 32, PAPER_RECIPE, range(14, 20), 6.445e9))


def table1_models() -> list[str]:
    """The paper's four sizes."""
    return [name for name, spec in _REGISTRY.items() if spec.paper_params is not None]


__all__ = [
    "AIM_600M_IMAGES",
    "PAPER_RECIPE",
    "PAPER_STEPS",
    "PAPER_WARMUP_FRACTION",
    "ModelSpec",
    "Recipe",
    "create_model",
    "get_model_spec",
    "list_models",
    "probe_blocks",
    "register_model",
    "table1_models",
]
