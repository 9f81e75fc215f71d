"""Convert image folders and WebDataset tar shards into FFCV ``.beton`` files.

Every output is published through :mod:`aim_ds.io` (written as ``NAME.partial``, then renamed). The
``.beton`` goes first, then ``OUT.classes.json`` (image folders), and the JSON sidecar (``OUT.beton.json``)
last: the sidecar under its final name is what says "finished" (:func:`aim_ds.data.beton.is_complete`).
A run killed at any moment leaves ``*.partial`` debris and at most a beton without its sidecar; both count
as unfinished, and a re-run removes the debris and writes that output again. An old sidecar is removed
before anything else is written, so it can never vouch for a new beton.

Decoding failures must never reach FFCV's ``DatasetWriter``: an exception in one of its worker processes
leaves the parent waiting forever. So conversion runs in two passes:

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
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_path, atomic_write_json, partial_path, remove_if_exists
from .beton import SIDECAR_FORMAT, ConversionError, classes_path, expand_shards, is_complete, sidecar_path
from .images import IMAGE_EXTENSIONS, ImageRef, decode_image, validate_image

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
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
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


def _validate_all(refs: Sequence[ImageRef], workers: int, progress: bool, desc: str) -> list[str | None]:
    if workers <= 1 or len(refs) < 64:
        iterator: Iterable[str | None] = map(validate_image, refs)
        pool = None
    else:
        pool = mp.get_context("fork").Pool(workers)
        iterator = pool.imap(validate_image, refs, chunksize=32)
    try:
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(refs), desc=desc, unit="img", leave=False)
        return list(iterator)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def _ffcv_write(path: Path, dataset: _DecodedDataset, options: WriteOptions) -> None:
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    # Each writer process fills its own pages, so the last page of each is mostly padding: keep pages small
    # (2 MiB) unless one raw image at max_resolution would not fit in a page.
    largest_raw = 3 * (options.max_resolution or 8192) ** 2
    page_size = MIN_PAGE_SIZE
    while page_size < 2 * largest_raw:
        page_size *= 2
    workers = min(options.workers, max(1, len(dataset) // options.chunk_size + 1))
    writer = DatasetWriter(str(path), _fields(options), page_size=page_size, num_workers=workers)
    writer.from_indexed_dataset(dataset, chunksize=options.chunk_size)


def _write_decodable(
    tmp: Path,
    refs: Sequence[ImageRef],
    labels: Sequence[int],
    keep: list[int],
    options: WriteOptions,
    source: str,
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
            _ffcv_write(tmp, dataset, options)
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
) -> dict[str, Any]:
    """The sidecar's content: how ``out_path`` was written (``seconds``: wall time of the whole write)."""
    from .. import __version__

    return {
        "format": SIDECAR_FORMAT,
        "kind": kind,
        "source": source,
        "beton": out_path.name,
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

    reasons = _validate_all(refs, options.workers, progress, f"validate {out_path.name}")
    skipped = [
        {"file": ref.display, "reason": reason} for ref, reason in zip(refs, reasons, strict=True) if reason is not None
    ]
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    if not keep:
        raise ConversionError(f"{source}: none of the {len(refs)} files decoded as an image, nothing to write")
    with atomic_path(out_path) as tmp:
        keep, failed = _write_decodable(tmp, refs, labels, keep, options, source)
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
    source: str | os.PathLike[str], out_path: str | os.PathLike[str], options: WriteOptions, *, progress: bool = True
) -> WriteResult:
    """ImageNet-style folder -> one beton, ``OUT.classes.json`` and (last) its sidecar."""
    classes, refs, labels = scan_imagefolder(source)
    out_path = Path(out_path)
    classes_file = classes_path(out_path)
    return write_beton(
        refs,
        labels,
        out_path,
        options,
        source=str(Path(source).resolve()),
        kind="imagefolder",
        extra_sidecar={"num_classes": len(classes), "classes_file": classes_file.name},
        progress=progress,
        before_sidecar=lambda: atomic_write_json(classes_file, classes, indent=0),
    )


# ----------------------------------------------------------------------------------------------------------
# WebDataset shards (img2dataset output)


def scan_tar(tar_path: str) -> tuple[list[ImageRef], list[dict[str, str]]]:
    """Image refs (byte ranges inside the tar) of a WebDataset shard, one per sample key, in tar order.

    A sample key is the member path up to the first dot of its file name (the webdataset convention); a
    sample with several image members uses the first of jpg, jpeg, png, webp.
    """
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    problems: list[dict[str, str]] = []
    try:
        with tarfile.open(tar_path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, filename = member.name.rpartition("/")
                stem, dot, extension = filename.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                samples.setdefault(key, {})[extension.lower()] = member
    except (tarfile.TarError, OSError, EOFError) as error:
        # A tar cut short by a failed download: keep the complete members read so far.
        problems.append({"file": tar_path, "reason": f"tar read stopped early: {type(error).__name__}: {error}"})
    refs: list[ImageRef] = []
    for key, members in samples.items():
        extension = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if extension is None:
            problems.append({"file": f"{os.path.basename(tar_path)}:{key}", "reason": "no image member"})
            continue
        member = members[extension]
        refs.append(
            ImageRef(tar_path, member.offset_data, member.size, name=f"{os.path.basename(tar_path)}:{member.name}")
        )
    return refs, problems


def webdataset_output_path(tar_path: str, out_dir: str | os.PathLike[str]) -> Path:
    """One output beton per input tar: ``OUT_DIR/<tar name without .tar>.beton``."""
    name = os.path.basename(tar_path)
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    return Path(out_dir) / f"{stem}.beton"


@dataclasses.dataclass
class WebDatasetReport:
    """What a (partial) webdataset conversion did."""

    assigned: list[str]
    converted: list[Path]
    already_complete: list[Path]
    results: list[WriteResult]


def convert_webdataset(
    pattern: str,
    out_dir: str | os.PathLike[str],
    options: WriteOptions,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> WebDatasetReport:
    """Convert this process's share of the tars matching ``pattern``, one beton per tar.

    Tar ``k`` of the sorted list belongs to process ``k % num_shards``, so any number of processes on any
    number of machines split the work without talking to each other. Outputs that are already complete are
    left alone (unless overwrite), so a re-run converts only what is missing or was interrupted.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index} and {num_shards}")
    tars = expand_shards(pattern)
    assigned = [tar for k, tar in enumerate(tars) if k % num_shards == shard_index]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    report = WebDatasetReport(assigned, [], [], [])
    todo = []
    for tar in assigned:
        out_path = webdataset_output_path(tar, out_dir)
        if not overwrite and is_complete(out_path):
            report.already_complete.append(out_path)
        else:
            todo.append((tar, out_path))
    iterator: Iterable[tuple[str, Path]] = todo
    if progress:
        from tqdm import tqdm

        iterator = tqdm(todo, desc=f"shards (process {shard_index}/{num_shards})", unit="tar")
    for tar, out_path in iterator:
        refs, problems = scan_tar(tar)
        if not refs:
            raise ConversionError(f"{tar}: no image samples in this tar")
        result = write_beton(
            refs,
            [UNLABELED] * len(refs),
            out_path,
            options,
            source=str(Path(tar).resolve()),
            kind="webdataset",
            extra_sidecar={"tar_problems": problems, "label": "unlabeled (-1)"},
            progress=progress,
        )
        result.skipped.extend(problems)
        report.converted.append(out_path)
        report.results.append(result)
    return report
