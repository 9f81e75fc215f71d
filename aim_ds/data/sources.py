"""Where a batch's bytes come from: betons opened lazily, grouped into sources, gathered per batch.

A source at DFN scale is thousands of beton shards, so nothing per shard is read at start-up beyond its sample
count, which comes from the folder's index (:mod:`aim_ds.data.shard_index`: one file, not one header and
one sidecar per shard). A shard's metadata is read on first use, and its bytes are read with ``pread``
through a bounded cache of file descriptors (:class:`_OpenFiles`), so open files stay bounded however many
shards a run touches (one memory map per shard used to hold one descriptor each: 2,000 shards hit the usual
limit of 1,024). :func:`gather` collects the stored bytes of a batch's images, ready for one kernel call.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import open_regular_fd
from .beton import BetonError, check_jpeg_sizes, read_beton, read_header, resolve_betons
from .shard_index import index_path, shard_counts

SourceSpec = str | os.PathLike | Sequence[tuple[str | os.PathLike, float]]

#: The paper's pretraining data (docs/recipe.md): DFN-2B with probability 0.8, ImageNet-1k with
#: probability 0.2, per image. Paths are placeholders for where data_prep writes them; pass your own list
#: to override.
DEFAULT_MIXTURE: list[tuple[str, float]] = [("data/dfn2b", 0.8), ("data/imagenet/train.beton", 0.2)]


class _OpenFiles:
    """Read-only file descriptors by path, least recently used closed beyond ``limit`` (thread-safe)."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, path: str, offset: int, size: int) -> np.ndarray:
        """``size`` bytes of ``path`` from byte ``offset``, uint8 [size]."""
        with self._lock:
            fd = self._fds.pop(path, None)
            if fd is None:
                fd = open_regular_fd(path, BetonError)  # a FIFO swapped in is refused, not waited on
                while len(self._fds) >= self.limit:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[path] = fd
            # pread under the lock: the fd cannot be closed by another thread mid-read (reads are page-cache
            # copies of a few tens of KB; the decode kernel, not this, is where time goes).
            data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{path}: short read at byte {offset}: {len(data)} of {size} bytes (file truncated?)")
        return np.frombuffer(data, dtype=np.uint8)

    def close(self) -> None:
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1])


OPEN_FILES = _OpenFiles()


class BetonShard:
    """One beton, opened lazily: sample count given (from the index) or read from the header, the rest on
    first use."""

    def __init__(self, path: str | os.PathLike[str], num_images: int | None = None) -> None:
        self.path = str(path)
        self.num_images = int(read_header(self.path)["num_samples"]) if num_images is None else int(num_images)
        self._opened = False

    def _open(self) -> None:
        # read_beton checks the header again (replaced or cut short since start-up?) and every row.
        contents = read_beton(self.path)
        if int(contents.header["num_samples"]) != self.num_images:
            raise BetonError(
                f"{self.path}: holds {int(contents.header['num_samples'])} images, {self.num_images} expected "
                f"(from {index_path(os.path.dirname(self.path))}: delete that index if it is stale or edited)"
            )
        if contents.fields.get("image") != "RGBImageField" or "label" not in contents.metadata:
            raise BetonError(f"{self.path}: expected fields 'image' and 'label', found {list(contents.fields)}")
        image = contents.metadata["image"]
        self.modes = np.ascontiguousarray(image["mode"]).astype(np.uint8)
        self.heights = np.ascontiguousarray(image["height"]).astype(np.int64)
        self.widths = np.ascontiguousarray(image["width"]).astype(np.int64)
        self.pointers = np.ascontiguousarray(image["data_ptr"]).astype(np.int64)
        self.labels = np.ascontiguousarray(contents.metadata["label"]).astype(np.int64)
        # Each data pointer is an allocation of its own row, inside the file (checked by read_beton).
        self.sizes = contents.blob_sizes["image"]
        self._opened = True

    def read(self, index: int) -> np.ndarray:
        """The stored bytes of image ``index`` (JPEG or raw pixels), uint8 [n]."""
        return OPEN_FILES.read(self.path, int(self.pointers[index]), int(self.sizes[index]))

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
    counts = shard_counts(paths)
    return Source(str(path_or_glob), [BetonShard(p, n) for p, n in zip(paths, counts, strict=True)], probability)


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
    paths: list[str]  # [B] the beton each image came from
    rows: np.ndarray  # int64 [B] its row in that beton (what an error names)


def gather(sources: Sequence[Source], source_ids: np.ndarray, indices: np.ndarray) -> Gathered:
    """Collect image bytes and metadata for (source, index-within-source) pairs, in that order."""
    count = len(indices)
    heights = np.empty(count, np.int64)
    widths = np.empty(count, np.int64)
    modes = np.empty(count, np.uint8)
    labels = np.empty(count, np.int64)
    sizes = np.empty(count, np.int64)
    rows = np.empty(count, np.int64)
    paths: list[str] = []
    pieces: list[np.ndarray] = []
    for i in range(count):
        source = sources[int(source_ids[i])]
        shard_number, local = source.locate(np.array([indices[i]]))
        shard = source.shards[int(shard_number[0])].ensure_open()
        j = int(local[0])
        size = int(shard.sizes[j])
        pieces.append(shard.read(j))
        paths.append(shard.path)
        rows[i] = j
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
    return Gathered(payload, offsets, sizes, heights, widths, modes, labels, paths, rows)


#: Up to this many shards of a source have every row checked before training starts; beyond it, every
#: shard's header is still checked against the index, and the rows of the others on first use.
CHECK_ALL_ROWS_UP_TO = 64
#: Stored JPEG bytes per source whose headers are compared with their rows before training starts (the decode
#: kernel checks every image it decodes anyway; this finds a bad beton before the engine is built).
CHECK_JPEG_BYTES = 256 << 20


def check_betons(paths: Sequence[str | os.PathLike[str]]) -> int:
    """What preflight checks of a source before any rank builds anything; returns its image count.

    Every shard's header is read and compared with the count its folder's ``shards.index.json`` gives
    (an index that lies would otherwise fail the first read of that shard, possibly hours in), and the rows
    of the first :data:`CHECK_ALL_ROWS_UP_TO` shards are checked whole (:func:`read_beton`), with the JPEG
    headers of their first :data:`CHECK_JPEG_BYTES` of stored bytes (:func:`check_jpeg_sizes`). Raises
    :class:`BetonError` naming the file (and the row) on the first problem.
    """
    shards = [Path(p) for p in paths]
    counts = shard_counts(shards, save=False)
    budget = CHECK_JPEG_BYTES
    for k, (shard, count) in enumerate(zip(shards, counts, strict=True)):
        held = int(read_header(shard)["num_samples"])
        if held != count:
            raise BetonError(
                f"{index_path(shard.parent)} says {shard.name} holds {count} images, its header says {held}: "
                "the index is stale or edited (delete it; it is rebuilt from the headers)"
            )
        if k < CHECK_ALL_ROWS_UP_TO:
            contents = read_beton(shard)
            if contents.fields.get("image") != "RGBImageField" or "label" not in contents.metadata:
                raise BetonError(f"{shard}: expected fields 'image' and 'label', found {list(contents.fields)}")
            if budget > 0:
                budget -= check_jpeg_sizes(shard, contents, budget)
    return sum(counts)
