"""Training and evaluation loaders over FFCV betons: a DFN/IN-1k mixture drawn per image, bicubic crops.

Why not one ``ffcv.loader.Loader`` per source: a source at DFN scale is thousands of beton shards, and each
FFCV Loader compiles its own pipeline (~9 s). Here every shard is opened lazily and a batch gathers the
stored bytes of its images from whichever shards hold them (:mod:`aim_ds.data.sources`), and one compiled
kernel decodes (FFCV's libturbojpeg call) and bicubic-crops the whole batch in parallel
(:mod:`aim_ds.data.kernels`). Everything random is a pure function of (seed, epoch, step, rank)
(:mod:`aim_ds.data.sampling`), so ``iter_epoch(epoch, start_step)`` resumes without decoding what was consumed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .beton import BetonError
from .color_jitter import ColorJitter, apply_color_jitter, sample_color_jitter
from .kernels import IMAGENET_MEAN, IMAGENET_STD, KERNEL_LOCK, STATUS_MESSAGES, decode_crop_batch, normalize_batch
from .sampling import MixtureSchedule, StepPlan, center_crop_boxes, sample_crop_boxes
from .sources import Source, SourceSpec, gather, open_source, parse_sources

#: Decode a JPEG at libjpeg's 1/2, 1/4 or 1/8 DCT scale when the bicubic step that follows still shrinks by
#: at least this factor. Measured against Pillow (full decode + resize(BICUBIC, box)) on 96 RRC crops of
#: 500x375 photos: 2.5 keeps the worst image's MAE at 0.72 (32 px) / 0.62 (64 px), inside the 1.0 floor;
#: 2.0 reaches 1.05 (BENCHMARKS.md). With <= 512 px betons it only triggers for small outputs (<= ~100 px).
#: 0 disables.
DEFAULT_DCT_MIN_SHRINK = 2.5

logger = logging.getLogger(__name__)


class UpsamplingWarning(UserWarning):
    """Images are stored smaller than the crops the loader makes of them."""


def warn_if_upsampled(sources: Sequence[Source], image_size: int) -> None:
    """Warn when a source's images are stored smaller than ``image_size`` px (e.g. betons written at 64 px
    trained at 224): every crop is then an upsample. Looks at the first shard of each source only (its
    metadata is read once and kept), the median longer side."""
    for source in sources:
        shard = source.shards[0].ensure_open()
        stored = int(np.median(np.maximum(shard.heights, shard.widths)))
        if stored < image_size:
            message = (
                f"source {source.name}: images are stored at {stored} px (median longer side of {shard.path}) "
                f"but the loader crops {image_size} px, so every crop is upsampled; convert with "
                f"`python -m data_prep ... --max-resolution {max(512, image_size)}` or lower image_size"
            )
            logger.warning(message)
            warnings.warn(message, UpsamplingWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------
# Producing batches


def _worker_threads(num_workers: int) -> int:
    import numba

    return max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))


_MEAN_F32 = np.asarray(IMAGENET_MEAN, np.float32)  # normalize_batch's constants, built once
_STD_F32 = np.asarray(IMAGENET_STD, np.float32)


def _on_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def _to_output(
    images_u8: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, H, W, 3] -> (float32 [B, 3, H, W] normalised, int64 [B]) on device.

    CUDA: ship uint8 (4x fewer bytes), then convert and normalise on the GPU. CPU: one fused kernel.
    """
    if _on_cuda(device):
        # The prefetch thread (_staged) already put the batch in pinned memory: an asynchronous copy.
        images = torch.as_tensor(images_u8).to(device, non_blocking=True)
        mean, std = _normalisation(device)
        images = (images.permute(0, 3, 1, 2).float() - mean) / std
        return images.contiguous(), torch.as_tensor(labels).to(device, non_blocking=True)
    label_tensor = torch.from_numpy(labels)
    out = np.empty((images_u8.shape[0], 3, images_u8.shape[1], images_u8.shape[2]), dtype=np.float32)
    with KERNEL_LOCK:  # a parallel kernel: one at a time in the process (kernels.KERNEL_LOCK)
        normalize_batch(images_u8, _MEAN_F32, _STD_F32, out)
    images = torch.from_numpy(out)
    if device is not None and device.type != "cpu":
        images, label_tensor = images.to(device), label_tensor.to(device)
    return images, label_tensor


@functools.lru_cache(maxsize=8)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std x 255 as ``[1, 3, 1, 1]`` fp32 tensors on ``device``, made once per device:
    ``torch.tensor(values, device=cuda)`` per batch would copy from pageable memory and wait for the
    stream twice a micro-batch."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return mean.to(device), std.to(device)


def _staged(produce: Iterator[tuple[np.ndarray, np.ndarray]], device: torch.device | None) -> Iterator[Any]:
    """``produce``'s batches made ready in the prefetch thread, off the training thread's time: for a
    CUDA device pinned (normalised later on the GPU, :func:`_output`), otherwise already normalised."""
    for images, labels in produce:
        if _on_cuda(device):
            yield torch.from_numpy(images).pin_memory(), torch.from_numpy(labels).pin_memory()
        else:
            yield _to_output(images, labels, device)


def _output(staged: Iterator[Any], device: torch.device | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training thread's side of :func:`_staged`: the GPU half of the work on CUDA, nothing else."""
    for images, labels in staged:
        yield _to_output(images, labels, device) if _on_cuda(device) else (images, labels)


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
        first = int(bad[0])
        reason = STATUS_MESSAGES.get(int(status[first]), f"status {int(status[first])}")
        more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
        raise BetonError(f"{batch.paths[first]}: row {int(batch.rows[first])}: cannot decode: {reason}{more}")
    return out, batch.labels


PREFETCH_THREAD = "aim-ds-prefetch"
PREFETCH_JOIN_S = 60.0  # at most one batch in production when a reader stops: decoded in well under this


def _prefetch(produce: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run a generator in a background thread, `depth` items ahead (the kernels release the GIL).

    Closing the returned generator (a ``break``, an error, or garbage collection of a half-read epoch)
    stops the thread and waits for it: no thread is left decoding for nobody, or still inside a
    compiled kernel when the process exits."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def offer(item: Any) -> bool:
        """Queue ``item`` unless the reader has stopped (then False: a full queue must not hold us)."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in produce:
                if not offer(item):
                    return
            offer(done)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            offer(error)

    thread = threading.Thread(target=run, name=PREFETCH_THREAD, daemon=True)
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
        if thread is not threading.current_thread():
            thread.join(timeout=PREFETCH_JOIN_S)


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
        color_jitter: ColorJitter | None = None,
    ) -> None:
        self.sources = sources
        self.color_jitter = color_jitter
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
            images, labels = _decode(
                self.sources,
                plan.source_ids,
                plan.indices,
                boxes,
                flips,
                (self.image_size, self.image_size),
                self.num_workers,
                self.dct_min_shrink,
            )
            if self.color_jitter is not None:
                # A stream of its own (seed, epoch, step, rank): turning jitter on changes no crop.
                rng = np.random.default_rng([self.seed, epoch, step, self.rank, 0xC0103])
                images = apply_color_jitter(images, sample_color_jitter(len(images), self.color_jitter, rng))
            yield images, labels

    def iter_epoch_uint8(self, epoch: int, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Like iter_epoch but yields the raw crops: uint8 [B, S, S, 3] numpy and int64 [B] labels."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        return _prefetch(self._produce(epoch, start_step), self.batches_ahead)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches start_step .. len(self) - 1 of `epoch` for this rank.

        Yields images float32 [B, 3, S, S] ImageNet-normalised on `device`, labels int64 [B].
        """
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        staged = _prefetch(_staged(self._produce(epoch, start_step), self.device), self.batches_ahead)
        yield from _output(staged, self.device)


def subset_indices(num_images: int, max_images: int = 0) -> np.ndarray:
    """``max_images`` image indices spread evenly over ``range(num_images)`` (all of them when
    ``max_images`` is 0 or not smaller). Evenly spread, not a prefix: a labelled beton is written
    class by class, so its first images would be a few classes only."""
    if max_images <= 0 or max_images >= num_images:
        return np.arange(num_images, dtype=np.int64)
    return (np.arange(max_images, dtype=np.int64) * num_images) // max_images


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
        max_images: int = 0,
    ) -> None:
        self.source = source
        self.dct_min_shrink = dct_min_shrink
        self.batch_size = batch_size
        self.image_size = image_size
        self.resize_size = resize_size
        self.num_workers = num_workers
        self.device = device
        # Rank r takes images r, r + W, r + 2W, ...: every image exactly once across ranks, none padded.
        self.indices = subset_indices(source.num_images, max_images)[rank::world_size]
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
        yield from _output(_prefetch(_staged(self._produce(), self.device), 2), self.device)


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
    color_jitter: ColorJitter | None = None,
) -> TrainLoader:
    """The pretraining loader: per-image mixture draw, random-resized crop (bicubic), flip, colour jitter
    when given (:mod:`aim_ds.data.color_jitter`; None: none, as in the paper), normalisation.

    sources: a .beton path; a folder or glob of beton shards; or [(path_or_glob, probability), ...]
    (e.g. :data:`aim_ds.data.sources.DEFAULT_MIXTURE`). len(loader) = steps per epoch for this rank (remainder dropped);
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
    opened = parse_sources(sources)
    warn_if_upsampled(opened, image_size)
    return TrainLoader(
        opened,
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
        color_jitter=color_jitter,
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
    max_images: int = 0,
) -> EvalLoader:
    """The evaluation loader: shorter side -> resize_size (bicubic), centre crop image_size, normalised.

    Every image of this rank's part (images rank, rank + world_size, ...) exactly once, in file order; the
    last batch may be smaller. ``max_images`` > 0: only that many images of the file, spread evenly over
    it (:func:`subset_indices`). Yields (float32 [B, 3, image_size, image_size], int64 [B]).
    """
    if batch_size < 1 or image_size < 1 or resize_size < image_size:
        raise ValueError(f"need batch_size >= 1 and resize_size >= image_size, got {resize_size} < {image_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    source = open_source(path)
    warn_if_upsampled([source], image_size)
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
        max_images=max_images,
    )


__all__ = [
    "DEFAULT_DCT_MIN_SHRINK",
    "UpsamplingWarning",
    "EvalLoader",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
]
