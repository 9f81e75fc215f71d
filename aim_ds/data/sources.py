"""Where a batch's bytes come from: betons opened lazily, grouped into sources, gathered per batch.

A source at DFN scale is thousands of beton shards, so a shard is opened lazily (sample count from the
header; metadata and a memory map on first use), and :func:`gather` collects the stored bytes of a
batch's images from whichever shards hold them, ready for one decoding kernel call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .beton import beton_num_samples, read_sidecar, resolve_betons

SourceSpec = str | os.PathLike | Sequence[tuple[str | os.PathLike, float]]

#: The paper's pretraining data (docs/recipe.md): DFN-2B with probability 0.8, ImageNet-1k with
#: probability 0.2, per image. Paths are placeholders for where data_prep writes them; pass your own list
#: to override.
DEFAULT_MIXTURE: list[tuple[str, float]] = [("data/dfn2b", 0.8), ("data/imagenet/train.beton", 0.2)]


class BetonShard:
    """One beton, opened lazily: sample count from the header, the rest on first use."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.num_images = beton_num_samples(self.path)
        # A beton without a sidecar (written elsewhere, or a killed run's last rename missing) is whole, since it
        # was published atomically, and is read; one whose sidecar disagrees with it is not.
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


def open_source(path_or_glob: str | os.PathLike[str], probability: float = 1.0) -> Source:
    """One source from a .beton path, a folder of betons or a glob/brace pattern (see ``resolve_betons``)."""
    paths = resolve_betons(path_or_glob)
    return Source(str(path_or_glob), [BetonShard(p) for p in paths], probability)


def parse_sources(sources: SourceSpec) -> list[Source]:
    """A beton path, a folder/glob of shards, or [(path_or_glob, probability), ...] -> Sources.

    Probabilities must be positive; they are normalised to sum 1.
    """
    if isinstance(sources, (str, os.PathLike)):
        return [open_source(sources, 1.0)]
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
        opened.append(open_source(path, float(probability)))
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
