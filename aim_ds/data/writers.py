"""Convert image folders and WebDataset tar shards into FFCV ``.beton`` files.

Every output is published through :mod:`aim_ds.io` (written as ``NAME.partial``, then renamed). The
``.beton`` goes first, then ``OUT.classes.json`` (image folders), and the JSON sidecar (``OUT.beton.json``)
last: the sidecar under its final name is what says "finished" (:func:`aim_ds.data.beton.is_complete`).
A run killed at any moment leaves ``*.partial`` debris and at most a beton without its sidecar; both count
as unfinished, and a re-run removes the debris and writes that output again. An old sidecar is removed
before anything else is written, so it can never vouch for a new beton.

FFCV's ``DatasetWriter`` runs with its workers watched (:mod:`aim_ds.data.ffcv_write`): a worker that dies
ends that output's write with an error instead of a hang. Decoding failures still must not kill a worker
(one bad image would cost the whole output), so conversion runs in two passes:

1. a validation pass that reads every image and entropy-decodes it at libjpeg's 1/8 DCT scale (the scaled
   IDCT makes this several times cheaper than a full decode, yet a truncated or corrupt bitstream still
   fails), skipping and recording what does not decode;
2. the FFCV write over the images that passed, decoding each once at full quality.

An image that still fails in pass 2 (a file changed between passes) is replaced by a placeholder, recorded
by the worker, and the output is rewritten without it: correctness first, the rare case pays twice.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_path, atomic_write_json, partial_path, remove_if_exists
from .beton import SIDECAR_FORMAT, ConversionError, classes_path, is_complete, sidecar_path
from .ffcv_write import check_free_space, estimate_beton_bytes, watched_writer
from .images import ImageRef, Validation, decode_image, failure_reason, validate_image

WRITE_MODES: tuple[str, ...] = ("jpg", "raw", "smart", "proportion")
UNLABELED = -1


@dataclasses.dataclass(frozen=True)
class WriteOptions:
    """How images are stored in the beton.

    max_resolution: longer side in pixels after resizing (0 keeps the original size). Default 512: an RRC
        crop at the smallest scale 0.4 and the narrowest ratio 3/4 of a 4:3 image spans 0.47 of the longer
        side, so with 512 px nearly every 224 px training crop is still a downscale (no upsampling blur), the
        eval resize to 256 on the shorter side is a downscale too, and bytes grow with the square of it.
    write_mode: FFCV's RGBImageField mode: jpg (re-encode as JPEG), raw (uint8 pixels, ~590 KB at 512x384),
        smart (raw unless the raw pixels exceed smart_threshold bytes), proportion (JPEG with probability
        compress_probability).
    jpeg_quality: 1-100, for jpg/smart/proportion.
    workers: processes for validation and writing.
    chunk_size: images per work item handed to a writer process.
    """

    max_resolution: int = 512
    write_mode: str = "jpg"
    jpeg_quality: int = 90
    smart_threshold: int = 3 * 256 * 256
    compress_probability: float = 0.5
    workers: int = 2
    chunk_size: int = 100

    def __post_init__(self) -> None:
        if not (self.max_resolution == 0 or 16 <= self.max_resolution <= 16384):
            raise ValueError(f"max_resolution must be 0 (keep) or in [16, 16384], got {self.max_resolution}")
        if self.write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {self.write_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.smart_threshold < 0:
            raise ValueError(f"smart_threshold must be >= 0, got {self.smart_threshold}")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise ValueError(f"compress_probability must be in [0, 1], got {self.compress_probability}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


# ----------------------------------------------------------------------------------------------------------
# The dataset FFCV's writer reads (runs in forked worker processes)


class _DecodedDataset:
    """Indexable (image uint8 [H, W, 3], label int) over refs that passed validation.

    A failure here is written to ``failure_log`` (one line per index, O_APPEND is atomic for short lines)
    and a 1x1 placeholder is returned, because raising would hang FFCV's writer.
    """

    def __init__(self, refs: Sequence[ImageRef], labels: Sequence[int], max_resolution: int, failure_log: str):
        self.refs = list(refs)
        self.labels = [int(label) for label in labels]
        self.max_resolution = max_resolution
        self.failure_log = failure_log

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            image = decode_image(self.refs[index].read(), self.max_resolution)
        except Exception as error:  # noqa: BLE001
            reason = failure_reason(error, self.refs[index].display)
            with open(self.failure_log, "a") as log:
                log.write(json.dumps([index, reason]) + "\n")
            image = np.zeros((1, 1, 3), dtype=np.uint8)
        return image, self.labels[index]


def _fields(options: WriteOptions) -> dict[str, Any]:
    from ffcv.fields import IntField, RGBImageField

    return {
        "image": RGBImageField(
            write_mode=options.write_mode,
            max_resolution=None,  # already resized with Pillow bicubic in decode_image
            smart_threshold=options.smart_threshold,
            jpeg_quality=options.jpeg_quality,
            compress_probability=options.compress_probability,
        ),
        "label": IntField(),
    }


# ----------------------------------------------------------------------------------------------------------
# The core writer


@dataclasses.dataclass
class WriteResult:
    """What one beton write produced."""

    beton_path: Path
    num_images: int
    skipped: list[dict[str, str]]
    seconds: float


def _validate_all(refs: Sequence[ImageRef], workers: int, progress: bool, desc: str) -> list[Validation]:
    if workers <= 1 or len(refs) < 64:
        iterator: Iterable[Validation] = map(validate_image, refs)
        pool = None
    else:
        pool = mp.get_context("fork").Pool(workers)
        iterator = pool.imap(validate_image, refs, chunksize=32)
    try:
        if progress:
            from ..progress import progress as progress_bar

            iterator = progress_bar(iterator, total=len(refs), desc=desc, unit="img", leave=False)
        return list(iterator)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def _page_size(options: WriteOptions) -> int:
    """Bytes per FFCV page. Each writer process fills its own pages, so the last page of each is mostly
    padding: keep pages small (2 MiB) unless one raw image at max_resolution would not fit in a page."""
    from ffcv.writer import MIN_PAGE_SIZE

    largest_raw = 3 * (options.max_resolution or 8192) ** 2
    page_size = MIN_PAGE_SIZE
    while page_size < 2 * largest_raw:
        page_size *= 2
    return page_size


def _writer_count(num_images: int, options: WriteOptions) -> int:
    return min(options.workers, max(1, num_images // options.chunk_size + 1))


def _ffcv_write(path: Path, dataset: _DecodedDataset, options: WriteOptions, progress: bool) -> None:
    workers = _writer_count(len(dataset), options)
    writer = watched_writer(
        str(path), _fields(options), page_size=_page_size(options), num_workers=workers, progress=progress
    )
    writer.from_indexed_dataset(dataset, chunksize=options.chunk_size)


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Raise :class:`ConversionError` (one line, naming the folder) unless files can be created in ``folder``.

    Asks the file system itself, not the permission bits: root passes those, yet not a read-only mount."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".aim_ds_write_test_"):
            pass
    except OSError as error:
        raise ConversionError(f"cannot write to output folder {folder}: {error.strerror or error}") from None


def _write_decodable(
    tmp: Path,
    refs: Sequence[ImageRef],
    labels: Sequence[int],
    keep: list[int],
    options: WriteOptions,
    source: str,
    progress: bool,
) -> tuple[list[int], list[dict[str, str]]]:
    """FFCV-write ``refs[keep]`` to ``tmp``, rewriting without any image that fails to decode mid-write.

    Returns the indices (into ``refs``) that were written and the images skipped on the way.
    """
    skipped: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="aim_ds_write_") as scratch:
        failure_log = os.path.join(scratch, "failures.jsonl")
        for _attempt in range(3):
            remove_if_exists(failure_log)
            dataset = _DecodedDataset(
                [refs[i] for i in keep], [labels[i] for i in keep], options.max_resolution, failure_log
            )
            _ffcv_write(tmp, dataset, options, progress)
            if not os.path.exists(failure_log):
                return keep, skipped
            with open(failure_log) as log:
                failed = dict(json.loads(line) for line in log if line.strip())
            for position in sorted(failed):
                skipped.append({"file": dataset.refs[position].display, "reason": failed[position]})
            keep = [k for position, k in enumerate(keep) if position not in failed]
            if not keep:
                raise ConversionError(f"{source}: no image decoded, nothing to write")
    raise ConversionError(f"{source}: images kept failing to decode during the write")


def _sidecar(
    out_path: Path,
    options: WriteOptions,
    *,
    kind: str,
    source: str,
    num_images: int,
    num_candidates: int,
    skipped: list[dict[str, str]],
    seconds: float,
    beton_bytes: int,
) -> dict[str, Any]:
    """The sidecar's content: how ``out_path`` was written (``seconds``: wall time of the whole write)."""
    from ..version import __version__

    return {
        "format": SIDECAR_FORMAT,
        "kind": kind,
        "source": source,
        "beton": out_path.name,
        "beton_bytes": beton_bytes,
        "num_images": num_images,
        "num_candidates": num_candidates,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "fields": {"image": "RGBImageField", "label": "IntField"},
        "options": dataclasses.asdict(options),
        "resize": "Pillow bicubic (antialiased) on the longer side, after JPEG draft decoding",
        "aim_ds_version": __version__,
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
        "images_per_second": round(num_images / max(seconds, 1e-9), 1),
    }


def write_beton(
    refs: Sequence[ImageRef],
    labels: Sequence[int],
    out_path: str | os.PathLike[str],
    options: WriteOptions,
    *,
    source: str,
    kind: str,
    extra_sidecar: dict[str, Any] | None = None,
    progress: bool = True,
    before_sidecar: Callable[[], None] | None = None,
) -> WriteResult:
    """Validate, write and atomically publish one beton, then its sidecar (last: it says "finished").

    refs/labels: one entry per candidate image. Undecodable images are skipped and listed in the sidecar.
    before_sidecar: called once the beton is published and before the sidecar is (used to publish
    companion files such as the class list, so that a finished beton always has them).
    """
    start = time.perf_counter()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    side = sidecar_path(out_path)
    # The old sidecar goes first: until the new one is published this output counts as unfinished, so a
    # run killed after the beton's rename can never leave the new beton vouched for by the old sidecar.
    remove_if_exists(side, partial_path(side))

    checks = _validate_all(refs, options.workers, progress, f"validate {out_path.name}")
    skipped = [
        {"file": ref.display, "reason": check.reason}
        for ref, check in zip(refs, checks, strict=True)
        if check.reason is not None
    ]
    keep = [i for i, check in enumerate(checks) if check.reason is None]
    if not keep:
        first = f" (first: {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""
        raise ConversionError(f"{source}: none of the {len(refs)} files decoded as an image{first}")
    sizes = [(checks[i].width, checks[i].height, checks[i].num_bytes) for i in keep]
    # Plus one part-filled page per writer process (FFCV pads each worker's last page).
    padding = _page_size(options) * _writer_count(len(keep), options)
    check_free_space(out_path.parent, estimate_beton_bytes(sizes, options.max_resolution, options.write_mode) + padding)
    with atomic_path(out_path) as tmp:
        keep, failed = _write_decodable(tmp, refs, labels, keep, options, source, progress)
    skipped += failed
    seconds = time.perf_counter() - start
    if before_sidecar is not None:
        before_sidecar()
    sidecar = _sidecar(
        out_path,
        options,
        kind=kind,
        source=source,
        num_images=len(keep),
        num_candidates=len(refs),
        skipped=skipped,
        seconds=seconds,
        beton_bytes=out_path.stat().st_size,
    )
    atomic_write_json(side, {**sidecar, **(extra_sidecar or {})}, indent=1)
    return WriteResult(out_path, len(keep), skipped, seconds)


# ----------------------------------------------------------------------------------------------------------
# Image folders (ImageNet layout)


def scan_imagefolder(source: str | os.PathLike[str]) -> tuple[list[str], list[ImageRef], list[int]]:
    """Class names (sorted sub-folder names), image refs and labels of an ``SRC/<class>/<file>`` tree.

    Every regular, non-hidden file under a class folder is a candidate: a non-image is skipped and listed
    by the validation pass, not silently ignored here.
    """
    root = Path(source)
    if not root.exists():
        raise ConversionError(f"source folder does not exist: {root}")
    if not root.is_dir():
        raise ConversionError(f"source is not a folder: {root}")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ConversionError(f"source folder has no class sub-folders: {root}")
    refs: list[ImageRef] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                path = os.path.join(dirpath, filename)
                refs.append(ImageRef(path, name=os.path.relpath(path, root)))
                labels.append(label)
    if not refs:
        raise ConversionError(f"source folder has class folders but no files: {root}")
    return classes, refs, labels


def convert_imagefolder(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    options: WriteOptions,
    *,
    labels: str | os.PathLike[str] | None = None,
    classes: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> WriteResult:
    """An image folder -> one beton, ``OUT.classes.json`` and (last) its sidecar.

    Without ``labels``, ``source`` is ``SRC/<class>/<image>`` and the labels are the sorted class folder names'
    indices, or with ``classes`` (a class index file, :func:`aim_ds.data.labels.read_class_index`) their
    indices in it: a folder that is not in the index is an error naming it. With ``labels``, ``source`` is flat
    (ImageNet's val layout) and ``labels`` a labels file (:func:`aim_ds.data.labels.scan_flat_folder`);
    ``classes`` is then required, so that the labels are the train beton's. ``OUT.classes.json`` is the index.

    An existing ``out_path`` (finished or not: a beton without a sidecar may come from elsewhere) is only
    replaced with ``overwrite``; ``*.partial`` debris of a killed run is not an output and is replaced.
    """
    from .labels import read_class_index, scan_flat_folder

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        state = "complete" if is_complete(out_path) else "no matching sidecar"
        raise ConversionError(f"{out_path} already exists ({state}); pass --overwrite to replace it")
    extra: dict[str, Any] = {}
    if labels is not None:
        if classes is None:
            raise ConversionError(
                f"a labels file ({labels}) needs the class index its labels refer to: pass --classes, e.g. the "
                "train beton's train.classes.json, so that label k means the same class in both betons"
            )
        class_names = read_class_index(classes)
        refs, targets = scan_flat_folder(source, labels, class_names)
        extra = {"labels_file": str(Path(labels).resolve()), "class_index": str(Path(classes).resolve())}
    else:
        folder_classes, refs, targets = scan_imagefolder(source)
        class_names = folder_classes
        if classes is not None:
            class_names = read_class_index(classes)
            index = {name: k for k, name in enumerate(class_names)}
            unknown = [name for name in folder_classes if name not in index]
            if unknown:
                raise ConversionError(
                    f"{len(unknown)} class folder(s) of {source} not in the class index {classes}: "
                    f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}"
                )
            targets = [index[folder_classes[t]] for t in targets]
            extra = {"class_index": str(Path(classes).resolve())}
    check_writable(out_path.parent)
    classes_file = classes_path(out_path)
    return write_beton(
        refs,
        targets,
        out_path,
        options,
        source=str(Path(source).resolve()),
        kind="imagefolder",
        extra_sidecar={"num_classes": len(class_names), "classes_file": classes_file.name, **extra},
        progress=progress,
        before_sidecar=lambda: atomic_write_json(classes_file, class_names, indent=0),
    )
