"""Training and evaluation loaders over FFCV betons: a DFN/IN-1k mixture drawn per image, bicubic crops.

Why not one ``ffcv.loader.Loader`` per source: a source at DFN scale is thousands of beton shards, and each
FFCV Loader compiles its own pipeline (~9 s). Here every shard is opened lazily (header, metadata, a
memory map), a batch gathers the stored bytes of its images from whichever shards hold them, and one
compiled kernel decodes (FFCV's libturbojpeg call) and bicubic-crops the whole batch in parallel.

Everything random is a pure function of (seed, epoch, step, rank), never of iteration history:

* the epoch's source schedule: for each global step, how many of its ``batch_size * world_size`` slots
  come from each source is a multinomial draw, and their arrangement a seeded shuffle (together, exactly
  an independent categorical draw per slot), so cumulative per-source counts up to any step cost one
  vectorised draw and ``iter_epoch(epoch, start_step)`` skips consumed batches without decoding them;
* within a source, slot k of the epoch takes image ``perm(k mod N)``, a keyed Feistel permutation (O(1)
  memory at any N, a fresh key per pass over the source), so ranks read disjoint images within one pass;
* crop boxes and flips of a batch come from a generator seeded by (seed, epoch, step, rank).
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .kernels import IMAGENET_MEAN, IMAGENET_STD, KERNEL_LOCK, decode_crop_batch, normalize_batch
from .writers import resolve_betons

SourceSpec = str | os.PathLike | Sequence[tuple[str | os.PathLike, float]]

#: The paper's pretraining data: DFN-2B with probability 0.8, ImageNet-1k with probability 0.2, per image.
#: Paths are placeholders for where data_prep writes them; pass your own list to override.
DEFAULT_MIXTURE: list[tuple[str, float]] = [("data/dfn2b", 0.8), ("data/imagenet/train.beton", 0.2)]

#: Decode a JPEG at libjpeg's 1/2, 1/4 or 1/8 DCT scale when the bicubic step that follows still shrinks by
#: at least this factor. Measured against Pillow (full decode + resize(BICUBIC, box)) on 96 RRC crops of
#: 500x375 photos: 2.5 keeps the worst image's MAE at 0.72 (32 px) / 0.62 (64 px), inside the 1.0 floor;
#: 2.0 reaches 1.05. With <= 512 px betons it only triggers for small outputs (<= ~100 px). 0 disables.
DEFAULT_DCT_MIN_SHRINK = 2.5


# ----------------------------------------------------------------------------------------------------------
# Storage


class BetonShard:
    """One beton, opened lazily: sample count from the header, the rest on first use."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from .writers import beton_num_samples, read_sidecar

        self.path = str(path)
        self.num_images = beton_num_samples(self.path)
        # Betons written elsewhere have no sidecar and are accepted; one whose sidecar disagrees is not.
        sidecar = read_sidecar(self.path)
        if sidecar is not None and int(sidecar.get("num_images", self.num_images)) != self.num_images:
            raise ValueError(
                f"{self.path}: holds {self.num_images} images but its sidecar says {sidecar['num_images']}; "
                "re-run data_prep for it"
            )
        self._opened = False

    def _open(self) -> None:
        from ffcv.reader import Reader

        reader = Reader(self.path)
        names = reader.field_names
        if "image" not in names or "label" not in names:
            raise ValueError(f"{self.path}: expected fields 'image' and 'label', found {names}")
        metadata = reader.metadata
        image = metadata[f"f{names.index('image')}"]
        self.modes = np.ascontiguousarray(image["mode"]).astype(np.uint8)
        self.heights = np.ascontiguousarray(image["height"]).astype(np.int64)
        self.widths = np.ascontiguousarray(image["width"]).astype(np.int64)
        self.pointers = np.ascontiguousarray(image["data_ptr"]).astype(np.int64)
        self.labels = np.ascontiguousarray(metadata[f"f{names.index('label')}"]).astype(np.int64)
        # Only the image field allocates, so the allocation table maps each data pointer to its byte count.
        table = reader.alloc_table
        order = np.argsort(table["ptr"])
        table_ptrs = table["ptr"][order].astype(np.int64)
        table_sizes = table["size"][order].astype(np.int64)
        self.sizes = table_sizes[np.searchsorted(table_ptrs, self.pointers)]
        self.memmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._opened = True

    def ensure_open(self) -> BetonShard:
        if not self._opened:
            self._open()
        return self


@dataclass
class Source:
    """A set of beton shards read as one indexable collection of images."""

    name: str
    shards: list[BetonShard]
    probability: float = 1.0
    starts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        counts = np.array([s.num_images for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        if self.num_images == 0:
            raise ValueError(f"source {self.name} holds no images")

    @property
    def num_images(self) -> int:
        return int(self.starts[-1])

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global image indices -> (shard number, index inside that shard)."""
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return shard, indices - self.starts[shard]


def _open_source(path_or_glob: str | os.PathLike[str], probability: float = 1.0) -> Source:
    paths = resolve_betons(path_or_glob)
    return Source(str(path_or_glob), [BetonShard(p) for p in paths], probability)


def parse_sources(sources: SourceSpec) -> list[Source]:
    """A beton path, a folder/glob of shards, or [(path_or_glob, probability), ...] -> Sources.

    Probabilities must be positive; they are normalised to sum 1.
    """
    if isinstance(sources, (str, os.PathLike)):
        return [_open_source(sources, 1.0)]
    entries = list(sources)
    if not entries:
        raise ValueError("empty source list")
    opened = []
    for entry in entries:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"expected (path_or_glob, probability), got {entry!r}")
        path, probability = entry
        if not (isinstance(probability, (int, float)) and probability > 0 and math.isfinite(probability)):
            raise ValueError(f"probability of {path} must be a positive number, got {probability!r}")
        opened.append(_open_source(path, float(probability)))
    total = sum(s.probability for s in opened)
    for s in opened:
        s.probability /= total
    return opened


@dataclass
class Gathered:
    """The stored bytes and metadata of a batch, ready for the kernel."""

    payload: np.ndarray  # uint8, all images back to back
    offsets: np.ndarray  # int64 [B]
    sizes: np.ndarray  # int64 [B]
    heights: np.ndarray  # int64 [B]
    widths: np.ndarray  # int64 [B]
    modes: np.ndarray  # uint8 [B]
    labels: np.ndarray  # int64 [B]


def gather(sources: Sequence[Source], source_ids: np.ndarray, indices: np.ndarray) -> Gathered:
    """Collect image bytes and metadata for (source, index-within-source) pairs, in that order."""
    count = len(indices)
    heights = np.empty(count, np.int64)
    widths = np.empty(count, np.int64)
    modes = np.empty(count, np.uint8)
    labels = np.empty(count, np.int64)
    sizes = np.empty(count, np.int64)
    pieces: list[np.ndarray] = []
    for i in range(count):
        source = sources[int(source_ids[i])]
        shard_number, local = source.locate(np.array([indices[i]]))
        shard = source.shards[int(shard_number[0])].ensure_open()
        j = int(local[0])
        pointer, size = int(shard.pointers[j]), int(shard.sizes[j])
        pieces.append(shard.memmap[pointer : pointer + size])
        heights[i], widths[i], modes[i], labels[i], sizes[i] = (
            shard.heights[j],
            shard.widths[j],
            shard.modes[j],
            shard.labels[j],
            size,
        )
    offsets = np.zeros(count, np.int64)
    if count > 1:
        offsets[1:] = np.cumsum(sizes)[:-1]
    payload = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    return Gathered(payload, offsets, sizes, heights, widths, modes, labels)


# ----------------------------------------------------------------------------------------------------------
# Randomness as pure functions


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


# ----------------------------------------------------------------------------------------------------------
# Producing batches


def _worker_threads(num_workers: int) -> int:
    import numba

    return max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))


def _to_output(
    images_u8: np.ndarray, labels: np.ndarray, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, H, W, 3] -> (float32 [B, 3, H, W] normalised, int64 [B]) on device.

    CUDA: ship uint8 (4x fewer bytes), then convert and normalise on the GPU. CPU: one fused kernel.
    """
    label_tensor = torch.from_numpy(labels)
    if device is not None and device.type == "cuda":
        images = torch.from_numpy(images_u8).pin_memory().to(device, non_blocking=True)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
        images = (images.permute(0, 3, 1, 2).float() - mean) / std
        return images.contiguous(), label_tensor.to(device, non_blocking=True)
    out = np.empty((images_u8.shape[0], 3, images_u8.shape[1], images_u8.shape[2]), dtype=np.float32)
    normalize_batch(images_u8, np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32), out)
    images = torch.from_numpy(out)
    if device is not None and device.type != "cpu":
        images, label_tensor = images.to(device), label_tensor.to(device)
    return images, label_tensor


def _decode(
    sources: Sequence[Source],
    source_ids: np.ndarray,
    indices: np.ndarray,
    boxes: np.ndarray,
    flips: np.ndarray,
    out_hw: tuple[int, int],
    num_workers: int,
    dct_min_shrink: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    import numba

    batch = gather(sources, source_ids, indices)
    out = np.empty((len(indices), out_hw[0], out_hw[1], 3), dtype=np.uint8)
    with KERNEL_LOCK:
        numba.set_num_threads(_worker_threads(num_workers))
        status = decode_crop_batch(
            batch.payload,
            batch.offsets,
            batch.sizes,
            batch.heights,
            batch.widths,
            batch.modes,
            boxes.astype(np.float64),
            flips.astype(np.bool_),
            out,
            float(dct_min_shrink),
        )
    if status.any():
        bad = np.flatnonzero(status)
        raise RuntimeError(
            f"{len(bad)} images failed to decode (first: source {source_ids[bad[0]]}, "
            f"index {indices[bad[0]]}, status {status[bad[0]]})"
        )
    return out, batch.labels


def _prefetch(produce: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run a generator in a background thread, `depth` items ahead (the kernels release the GIL)."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in produce:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            items.put(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class TrainLoader:
    """Random-resized-crop batches from a mixture of sources; see :func:`build_train_loader`."""

    def __init__(
        self,
        sources: list[Source],
        *,
        batch_size: int,
        image_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        flip: bool,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        device: torch.device | None,
        batches_ahead: int = 2,
        dct_min_shrink: float = DEFAULT_DCT_MIN_SHRINK,
    ) -> None:
        self.sources = sources
        self.dct_min_shrink = dct_min_shrink
        self.batch_size = batch_size
        self.image_size = image_size
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.device = device
        self.batches_ahead = batches_ahead
        self.num_images = sum(s.num_images for s in sources)
        self.steps_per_epoch = self.num_images // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_images} images cannot fill one global batch of {batch_size} x {world_size} ranks"
            )
        self.schedule = MixtureSchedule(
            [s.num_images for s in sources],
            [s.probability for s in sources],
            batch_size,
            world_size,
            seed,
            self.steps_per_epoch,
        )

    def __len__(self) -> int:
        """Optimizer steps per epoch (every rank gets the same number; the remainder is dropped)."""
        return self.steps_per_epoch

    def plan(self, epoch: int, step: int) -> tuple[StepPlan, np.ndarray, np.ndarray]:
        """(which images, crop boxes int64 [B, 4], flips bool [B]) of this rank's batch `step` of `epoch`."""
        plan = self.schedule.plan(epoch, step, self.rank)
        heights = np.empty(self.batch_size, np.int64)
        widths = np.empty(self.batch_size, np.int64)
        for i, (k, index) in enumerate(zip(plan.source_ids, plan.indices, strict=True)):
            source = self.sources[int(k)]
            shard_number, local = source.locate(np.array([index]))
            shard = source.shards[int(shard_number[0])].ensure_open()
            heights[i], widths[i] = shard.heights[local[0]], shard.widths[local[0]]
        rng = np.random.default_rng([self.seed, epoch, step, self.rank, 0xC409])
        boxes = sample_crop_boxes(heights, widths, self.scale, self.ratio, rng)
        flips = rng.random(self.batch_size) < 0.5 if self.flip else np.zeros(self.batch_size, bool)
        return plan, boxes, flips

    def _produce(self, epoch: int, start_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for step in range(start_step, self.steps_per_epoch):
            plan, boxes, flips = self.plan(epoch, step)
            yield _decode(
                self.sources,
                plan.source_ids,
                plan.indices,
                boxes,
                flips,
                (self.image_size, self.image_size),
                self.num_workers,
                self.dct_min_shrink,
            )

    def iter_epoch_uint8(self, epoch: int, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Like iter_epoch but yields the raw crops: uint8 [B, S, S, 3] numpy and int64 [B] labels."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        return _prefetch(self._produce(epoch, start_step), self.batches_ahead)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_step .. len(self) - 1 of `epoch` for this rank.

        Yields images float32 [B, 3, S, S] ImageNet-normalised on `device`, labels int64 [B].
        """
        for images, labels in self.iter_epoch_uint8(epoch, start_step):
            yield _to_output(images, labels, self.device)


class EvalLoader:
    """Resize-shorter-side + centre-crop batches in file order; see :func:`build_eval_loader`."""

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        image_size: int,
        resize_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        device: torch.device | None,
        dct_min_shrink: float = DEFAULT_DCT_MIN_SHRINK,
    ) -> None:
        self.source = source
        self.dct_min_shrink = dct_min_shrink
        self.batch_size = batch_size
        self.image_size = image_size
        self.resize_size = resize_size
        self.num_workers = num_workers
        self.device = device
        # Rank r takes images r, r + W, r + 2W, ...: every image exactly once across ranks, none padded.
        self.indices = np.arange(rank, source.num_images, world_size, dtype=np.int64)
        self.num_images = len(self.indices)

    def __len__(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def _produce(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.num_images, self.batch_size):
            indices = self.indices[start : start + self.batch_size]
            shard_numbers, local = self.source.locate(indices)
            heights = np.empty(len(indices), np.int64)
            widths = np.empty(len(indices), np.int64)
            for i, (s, j) in enumerate(zip(shard_numbers, local, strict=True)):
                shard = self.source.shards[int(s)].ensure_open()
                heights[i], widths[i] = shard.heights[j], shard.widths[j]
            boxes = center_crop_boxes(heights, widths, self.image_size, self.resize_size)
            yield _decode(
                [self.source],
                np.zeros(len(indices), np.int64),
                indices,
                boxes,
                np.zeros(len(indices), bool),
                (self.image_size, self.image_size),
                self.num_workers,
                self.dct_min_shrink,
            )

    def iter_uint8(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Raw crops: uint8 [B, S, S, 3] numpy and int64 [B] labels."""
        return _prefetch(self._produce(), 2)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.iter_uint8():
            yield _to_output(images, labels, self.device)


def _device(device: str | torch.device | None) -> torch.device | None:
    return None if device is None else torch.device(device)


def build_train_loader(
    sources: SourceSpec,
    *,
    batch_size: int,
    image_size: int = 224,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    device: str | torch.device | None = None,
    dct_min_shrink: float = DEFAULT_DCT_MIN_SHRINK,
) -> TrainLoader:
    """The pretraining loader: per-image mixture draw, random-resized crop (bicubic), flip, normalisation.

    sources: a .beton path; a folder or glob of beton shards; or [(path_or_glob, probability), ...]
    (e.g. :data:`DEFAULT_MIXTURE`). len(loader) = steps per epoch for this rank (remainder dropped);
    loader.num_images = images in all sources; ``loader.iter_epoch(epoch, start_step)`` yields
    (float32 [B, 3, image_size, image_size], int64 [B]) deterministically from (seed, epoch, rank, world_size).
    num_workers: decoding threads. dct_min_shrink: see :data:`DEFAULT_DCT_MIN_SHRINK` (0 = always full decode).
    """
    if batch_size < 1 or image_size < 1 or num_workers < 1:
        raise ValueError("batch_size, image_size and num_workers must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if not 0 < scale[0] <= scale[1] <= 1.0 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"bad scale {scale} or ratio {ratio}")
    return TrainLoader(
        parse_sources(sources),
        batch_size=batch_size,
        image_size=image_size,
        scale=tuple(scale),
        ratio=tuple(ratio),
        flip=flip,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        device=_device(device),
        dct_min_shrink=dct_min_shrink,
    )


def build_eval_loader(
    path: str | os.PathLike[str],
    *,
    batch_size: int,
    image_size: int = 224,
    resize_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    device: str | torch.device | None = None,
    dct_min_shrink: float = DEFAULT_DCT_MIN_SHRINK,
) -> EvalLoader:
    """The evaluation loader: shorter side -> resize_size (bicubic), centre crop image_size, normalised.

    Every image of this rank's part (images rank, rank + world_size, ...) exactly once, in file order; the
    last batch may be smaller. Yields (float32 [B, 3, image_size, image_size], int64 [B]).
    """
    if batch_size < 1 or image_size < 1 or resize_size < image_size:
        raise ValueError(f"need batch_size >= 1 and resize_size >= image_size, got {resize_size} < {image_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    source = _open_source(path)
    return EvalLoader(
        source,
        batch_size=batch_size,
        image_size=image_size,
        resize_size=resize_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        device=_device(device),
        dct_min_shrink=dct_min_shrink,
    )


__all__ = [
    "DEFAULT_DCT_MIN_SHRINK",
    "DEFAULT_MIXTURE",
    "EvalLoader",
    "MixtureSchedule",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "center_crop_boxes",
    "feistel_permutation",
    "sample_crop_boxes",
]
