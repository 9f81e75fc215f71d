"""Colour jitter for ImageNet-only ablations: the authors' ImageNet-only AIMv1 config adds
``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with p = 0.8; Table 10 (DFN-2B+) has none, so the paper YAMLs keep it
off (docs/recipe.md, "Augmentations").

The ops follow torchvision's definitions for tensors: brightness ``f * x``; contrast
``f * x + (1 - f) * mean(gray(x))``; saturation ``f * x + (1 - f) * gray(x)`` with gray = 0.2989 R + 0.587 G
+ 0.114 B; hue: the HSV hue shifted by ``h`` (mod 1); each result clamped to [0, 255], the four applied in a
random order per image. Factors are drawn ``U[max(0, 1 - v), 1 + v]`` (hue ``U[-v, v]``). Computed in float32
and rounded to uint8 once at the end (torchvision on uint8 tensors truncates after every op).

Like the crops (:mod:`aim_ds.data.sampling`), every draw is a pure function of (seed, epoch, step, rank):
:func:`sample_color_jitter` takes a generator the loader seeds with them, on a stream of its own, so
turning jitter on changes no crop. The ops are vectorised over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as torchvision
OPS = ("brightness", "contrast", "saturation", "hue")
AUTHORS_VALUES = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
AUTHORS_PROB = 0.8


@dataclass(frozen=True)
class ColorJitter:
    """Strengths (brightness, contrast, saturation in [0, inf), hue in [0, 0.5]) and the probability
    ``prob`` that an image is jittered at all."""

    brightness: float = AUTHORS_VALUES[0]
    contrast: float = AUTHORS_VALUES[1]
    saturation: float = AUTHORS_VALUES[2]
    hue: float = AUTHORS_VALUES[3]
    prob: float = AUTHORS_PROB

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"color jitter {name} must be a finite number >= 0, got {value}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"color jitter hue must lie in [0, 0.5], got {self.hue}")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"color jitter probability must lie in [0, 1], got {self.prob}")

    @classmethod
    def from_values(cls, values: Sequence[float], prob: float) -> ColorJitter:
        """From ``[brightness, contrast, saturation, hue]`` (the YAML's ``data.color_jitter_values``)."""
        if len(values) != 4:
            raise ValueError(f"color jitter values must be [brightness, contrast, saturation, hue], got {values}")
        return cls(*(float(v) for v in values), prob=float(prob))


@dataclass
class JitterPlan:
    """One batch's draws: which images are jittered, their four factors and the order of the ops."""

    apply: np.ndarray  # bool [B]
    factors: np.ndarray  # float32 [B, 4]: brightness, contrast, saturation factors, hue shift
    order: np.ndarray  # int64 [B, 4]: op indices (into OPS) in the order applied


def sample_color_jitter(batch_size: int, jitter: ColorJitter, rng: np.random.Generator) -> JitterPlan:
    """The draws of one batch, vectorised; the same ``rng`` state gives the same plan."""
    apply = rng.random(batch_size) < jitter.prob
    low = np.array([max(0.0, 1.0 - v) for v in (jitter.brightness, jitter.contrast, jitter.saturation)] + [-jitter.hue])
    high = np.array([1.0 + v for v in (jitter.brightness, jitter.contrast, jitter.saturation)] + [jitter.hue])
    factors = rng.uniform(low, high, size=(batch_size, 4)).astype(np.float32)
    order = np.argsort(rng.random((batch_size, 4)), axis=1)  # a uniform random permutation per image
    return JitterPlan(apply=apply, factors=factors, order=order)


def _gray(x: np.ndarray) -> np.ndarray:
    """``[n, H, W, 3]`` -> ``[n, H, W, 1]``."""
    return (x @ GRAY_WEIGHTS)[..., None]


def _blend(x: np.ndarray, other: np.ndarray, factor: np.ndarray) -> np.ndarray:
    f = factor.reshape(-1, 1, 1, 1)
    return np.clip(f * x + (1.0 - f) * other, 0.0, 255.0)


def _shift_hue(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """RGB ``[n, H, W, 3]`` in [0, 255] with its HSV hue shifted by ``shift`` ``[n]`` (in turns)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    top = x.max(axis=-1)
    bottom = x.min(axis=-1)
    span = top - bottom
    safe = np.where(span > 0, span, 1.0)
    # Hue in turns, [0, 1): the sector of the largest channel (R first, then G, then B, as colorsys).
    hue = np.where(
        top == r,
        ((g - b) / safe) % 6.0,
        np.where(top == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(span > 0, hue / 6.0, 0.0)
    sat = np.where(top > 0, span / np.where(top > 0, top, 1.0), 0.0)
    hue = (hue + shift.reshape(-1, 1, 1)) % 1.0
    # HSV -> RGB: each channel from its distance to the hue sector (n = 5, 3, 1 for R, G, B).
    out = np.empty_like(x)
    for channel, n in enumerate((5.0, 3.0, 1.0)):
        k = (n + hue * 6.0) % 6.0
        out[..., channel] = top - top * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return out


def apply_color_jitter(images: np.ndarray, plan: JitterPlan) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` -> uint8 ``[B, H, W, 3]`` with ``plan`` applied (a new array; images not
    selected by ``plan.apply`` are copied unchanged)."""
    out = images.copy()
    chosen = np.flatnonzero(plan.apply)
    if chosen.size == 0:
        return out
    x = images[chosen].astype(np.float32)  # [n, H, W, 3]
    factors, order = plan.factors[chosen], plan.order[chosen]
    for position in range(4):
        for op in range(4):
            rows = np.flatnonzero(order[:, position] == op)
            if rows.size == 0:
                continue
            part, factor = x[rows], factors[rows, op]
            if op == 0:
                part = np.clip(factor.reshape(-1, 1, 1, 1) * part, 0.0, 255.0)
            elif op == 1:
                part = _blend(part, _gray(part).mean(axis=(1, 2, 3), keepdims=True), factor)
            elif op == 2:
                part = _blend(part, _gray(part), factor)
            else:
                part = _shift_hue(part, factor)
            x[rows] = part
    out[chosen] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


__all__ = ["AUTHORS_PROB", "AUTHORS_VALUES", "ColorJitter", "JitterPlan", "apply_color_jitter", "sample_color_jitter"]
