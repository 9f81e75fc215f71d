"""Randomness of the loaders as pure functions of (seed, epoch, step, rank), never of iteration history.

* The epoch's source schedule (:class:`MixtureSchedule`): for each global step, how many of its
  ``batch_size * world_size`` slots come from each source is a multinomial draw, and their arrangement a
  seeded shuffle (together, exactly an independent categorical draw per slot), so cumulative per-source
  counts up to any step cost one vectorised draw and a resumed epoch skips consumed batches without
  decoding them.
* Within a source, slot k of the epoch takes image ``perm(k mod N)``, a keyed Feistel permutation
  (:func:`feistel_permutation`: O(1) memory at any N, a fresh key per pass over the source), so ranks read
  disjoint images within one pass.
* Crop boxes (:func:`sample_crop_boxes`, :func:`center_crop_boxes`) are vectorised over a batch; the loader
  seeds their generator with (seed, epoch, step, rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def feistel_permutation(positions: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
    """A keyed bijection of [0, n) evaluated at `positions` (int64 array), in O(len(positions)) memory.

    Four Feistel rounds over the smallest even number of bits covering n, with cycle walking to stay
    inside [0, n).
    """
    if n <= 1:
        return np.zeros_like(positions)
    half = max(1, math.ceil(math.log2(n) / 2))
    mask = np.uint64((1 << half) - 1)
    seeds = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(4, np.uint64)
    x = positions.astype(np.uint64)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        y = x[todo]
        left, right = y >> np.uint64(half), y & mask
        for round_key in seeds:
            left, right = right, left ^ (_mix64(right ^ round_key) & mask)
        y = (left << np.uint64(half)) | right
        x[todo] = y
        todo[todo] = y >= np.uint64(n)
    return x.astype(np.int64)


def sample_crop_boxes(
    heights: np.ndarray,
    widths: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> np.ndarray:
    """torchvision RandomResizedCrop boxes, vectorised: int64 [B, 4] as (x0, y0, x1, y1) in pixels.

    Area fraction ~ U(scale), log aspect ratio (w/h) ~ U(log ratio); the first of `attempts` draws that fits
    is used, else a centre crop clamped to the ratio range (torchvision's fallback).
    """
    count = len(heights)
    heights = heights.astype(np.float64)
    widths = widths.astype(np.float64)
    area = heights * widths
    target = area[:, None] * rng.uniform(scale[0], scale[1], size=(count, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(count, attempts)))
    crop_w = np.round(np.sqrt(target * aspect))
    crop_h = np.round(np.sqrt(target / aspect))
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= widths[:, None]) & (crop_h <= heights[:, None])
    first = np.argmax(fits, axis=1)
    found = fits[np.arange(count), first]
    w = crop_w[np.arange(count), first]
    h = crop_h[np.arange(count), first]
    u = rng.random((count, 2))
    top = np.floor(u[:, 0] * (heights - h + 1))
    left = np.floor(u[:, 1] * (widths - w + 1))
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    in_ratio = widths / heights
    fb_w = np.where(in_ratio < ratio[0], widths, np.where(in_ratio > ratio[1], np.round(heights * ratio[1]), widths))
    fb_h = np.where(in_ratio < ratio[0], np.round(widths / ratio[0]), heights)
    w = np.where(found, w, fb_w)
    h = np.where(found, h, fb_h)
    top = np.where(found, top, np.floor((heights - h) / 2))
    left = np.where(found, left, np.floor((widths - w) / 2))
    return np.stack([left, top, left + w, top + h], axis=1).astype(np.int64)


def center_crop_boxes(heights: np.ndarray, widths: np.ndarray, image_size: int, resize_size: int) -> np.ndarray:
    """Boxes (float64 [B, 4], x0 y0 x1 y1) equal to "resize the shorter side to resize_size, centre-crop
    image_size": in the resized image's pixel grid the crop starts at ((W' - S) // 2, (H' - S) // 2), and
    mapping it back with the exact scale W / W' gives Pillow the same sampling positions and filter support
    as the two-step version."""
    heights = heights.astype(np.float64)
    widths = widths.astype(np.float64)
    short = np.minimum(heights, widths)
    new_w = np.where(widths <= heights, resize_size, np.floor(resize_size * widths / short))
    new_h = np.where(widths <= heights, np.floor(resize_size * heights / short), resize_size)
    # torchvision/Pillow size rounding: int(long * resize / short), the shorter side exactly resize_size.
    left = np.floor((new_w - image_size) / 2.0)
    top = np.floor((new_h - image_size) / 2.0)
    sx = widths / new_w
    sy = heights / new_h
    return np.stack([left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy], axis=1)


@dataclass
class StepPlan:
    """What rank `rank` reads at one step: which source and which image of it, per batch slot."""

    source_ids: np.ndarray  # int64 [B]
    indices: np.ndarray  # int64 [B], index within the source


class MixtureSchedule:
    """The per-epoch draw of sources and images for every (step, rank); pure function of its arguments."""

    def __init__(
        self,
        sizes: Sequence[int],
        probabilities: Sequence[float],
        batch_size: int,
        world_size: int,
        seed: int,
        steps_per_epoch: int,
    ) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.probabilities /= self.probabilities.sum()
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self._cache: tuple[int, np.ndarray] | None = None

    def step_counts(self, epoch: int) -> np.ndarray:
        """int64 [steps + 1, K]: images taken from each source before each step (exclusive prefix sums)."""
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            per_step = rng.multinomial(self.batch_size * self.world_size, self.probabilities, size=self.steps_per_epoch)
            counts = np.zeros((self.steps_per_epoch + 1, len(self.sizes)), dtype=np.int64)
            np.cumsum(per_step, axis=0, out=counts[1:])
            self._cache = (epoch, counts)
        return self._cache[1]

    def plan(self, epoch: int, step: int, rank: int) -> StepPlan:
        """Which source and which image of it fill each of the `batch_size` slots of `rank` at `step`."""
        counts = self.step_counts(epoch)
        taken = counts[step + 1] - counts[step]
        slots = np.repeat(np.arange(len(self.sizes)), taken)
        np.random.default_rng([self.seed, epoch, step, 0xA44A]).shuffle(slots)
        # Position of each slot inside its source's stream for this epoch.
        positions = np.empty(len(slots), dtype=np.int64)
        for k in range(len(self.sizes)):
            where = np.flatnonzero(slots == k)
            positions[where] = counts[step, k] + np.arange(len(where))
        mine = slice(rank * self.batch_size, (rank + 1) * self.batch_size)
        source_ids, positions = slots[mine], positions[mine]
        indices = np.empty(self.batch_size, dtype=np.int64)
        for k in np.unique(source_ids):
            where = source_ids == k
            n = int(self.sizes[k])
            passes, offsets = np.divmod(positions[where], n)
            result = np.empty(len(offsets), dtype=np.int64)
            for p in np.unique(passes):
                sel = passes == p
                result[sel] = feistel_permutation(offsets[sel], n, (self.seed, epoch, int(k), int(p), 0xFE15))
            indices[where] = result
        return StepPlan(source_ids.astype(np.int64), indices)
