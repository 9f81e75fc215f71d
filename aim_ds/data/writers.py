"""Convert image folders and WebDataset tar shards into FFCV ``.beton`` files.

Every output is written under a temporary name and renamed only once complete. The JSON sidecar
(``OUT.beton.json``) is renamed into place first and the ``.beton`` last, so a ``.beton`` under its final
name always has its sidecar, and a run killed at any moment leaves either nothing under the final names or
a lone sidecar (which the completeness check rejects and a re-run overwrites).

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
import fnmatch
import glob
import io
import json
import math
import multiprocessing as mp
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

# A truncated image must be an error we can count, never silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Some DFN images are large; the cap only guards against decompression bombs.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
WRITE_MODES: tuple[str, ...] = ("jpg", "raw", "smart", "proportion")
SIDECAR_SUFFIX = ".json"
PARTIAL_SUFFIX = ".partial"
UNLABELED = -1
SIDECAR_FORMAT = "aim-ds-beton-sidecar/1"


class ConversionError(RuntimeError):
    """A user-facing conversion error (missing source, nothing to convert); the CLI prints it without traceback."""


def aim_ds_version() -> str:
    """The aim_ds version string: ``aim_ds.__version__``, else the installed package metadata, else 0.1.0."""
    try:
        import aim_ds

        return str(aim_ds.__version__)
    except Exception:  # noqa: BLE001 - the package may be half-written while others work on it
        pass
    try:
        import importlib.metadata

        return importlib.metadata.version("aim-ds")
    except Exception:  # noqa: BLE001
        return "0.1.0"


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


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where the encoded bytes of one image live: a whole file (size < 0) or a byte range of a tar."""

    path: str
    offset: int = 0
    size: int = -1
    name: str = ""  # what the sidecar calls it: the file path, or "shard.tar:key.jpg"

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"short read: {len(data)} of {self.size} bytes")
        return data

    @property
    def display(self) -> str:
        return self.name or self.path


# ----------------------------------------------------------------------------------------------------------
# Decoding


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparent pixels are composited onto white, not left as whatever colour
    the encoder stored under alpha 0 (often black)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def decode_image(data: bytes, max_resolution: int = 0) -> np.ndarray:
    """Decode encoded image bytes to an upright RGB array.

    Returns uint8 [H, W, 3], EXIF orientation applied, the longer side resized (Pillow bicubic, antialiased)
    to at most ``max_resolution`` px (0 keeps the size). Raises on anything that does not decode fully.
    """
    image = Image.open(io.BytesIO(data))
    if max_resolution and image.format == "JPEG":
        scale = max_resolution / max(image.size)
        if scale < 1.0:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale while keeping both sides >= the request: a large
            # source costs a fraction of a full decode, and the bicubic pass below still sets the final size.
            image.draft("RGB", (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))
    image.load()
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    width, height = image.size
    if max_resolution and max(width, height) > max_resolution:
        scale = max_resolution / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"decoded to shape {array.shape}, expected [H, W, 3]")
    return np.ascontiguousarray(array)


def validate_image(ref: ImageRef) -> str | None:
    """Cheap full-bitstream check. Returns None if the image decodes, else a one-line reason."""
    try:
        data = ref.read()
        if not data:
            return "empty file"
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG":
            # Entropy decoding of every scan still happens at 1/8 scale, so truncation/corruption shows up.
            image.draft(image.mode, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
        image.load()
        if image.size[0] < 1 or image.size[1] < 1:
            return f"degenerate size {image.size}"
        return None
    except Exception as error:  # noqa: BLE001 - any decoder failure is a skip reason, not a crash
        return f"{type(error).__name__}: {error}".strip()[:300]


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
# Output bookkeeping


def sidecar_path(beton_path: str | os.PathLike[str]) -> Path:
    """``OUT.beton`` -> ``OUT.beton.json``."""
    return Path(str(beton_path) + SIDECAR_SUFFIX)


def classes_path(beton_path: str | os.PathLike[str]) -> Path:
    """``OUT.beton`` -> ``OUT.classes.json`` (the class names, index = label)."""
    path = Path(beton_path)
    stem = path.name[: -len(".beton")] if path.name.endswith(".beton") else path.name
    return path.with_name(stem + ".classes.json")


def read_sidecar(beton_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of a beton as a dict, or None when missing or unreadable."""
    path = sidecar_path(beton_path)
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def beton_num_samples(beton_path: str | os.PathLike[str]) -> int:
    """Number of samples from the beton header (reads 24 bytes, not the metadata)."""
    from ffcv.types import HeaderType

    header = np.fromfile(str(beton_path), dtype=HeaderType, count=1)
    if len(header) != 1:
        raise ValueError(f"{beton_path}: not an FFCV beton (file too short)")
    return int(header[0]["num_samples"])


def is_complete(beton_path: str | os.PathLike[str]) -> bool:
    """True when the beton and its sidecar both exist and agree on the image count."""
    path = Path(beton_path)
    if not path.is_file():
        return False
    sidecar = read_sidecar(path)
    if sidecar is None or sidecar.get("format") != SIDECAR_FORMAT:
        return False
    try:
        return beton_num_samples(path) == int(sidecar["num_images"])
    except (ValueError, KeyError, TypeError, OSError):
        return False


def read_class_names(beton_path: str | os.PathLike[str]) -> list[str]:
    """Class names of a beton written by :func:`convert_imagefolder` (index = label)."""
    path = classes_path(beton_path)
    if not path.is_file():
        raise FileNotFoundError(f"no class list beside {beton_path} (expected {path})")
    with open(path) as f:
        names = json.load(f)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: expected a JSON list of strings")
    return names


def _atomic_write_text(path: Path, text: str) -> Path:
    """Write to a temporary name in the same folder; return that name (caller renames)."""
    partial = Path(str(path) + PARTIAL_SUFFIX)
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return partial


def _remove_if_exists(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


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
    before_publish: Callable[[], None] | None = None,
) -> WriteResult:
    """Validate, write and atomically publish one beton with its sidecar.

    refs/labels: one entry per candidate image. Undecodable images are skipped and listed in the sidecar.
    before_publish: called after the data is written and before anything is renamed into place (used to
    publish companion files such as the class list first).
    """
    start = time.perf_counter()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(str(out_path) + PARTIAL_SUFFIX)
    side = sidecar_path(out_path)
    # A previous, killed run may have left these; a stale final sidecar must not pair with the new beton.
    _remove_if_exists(partial, Path(str(side) + PARTIAL_SUFFIX))

    reasons = _validate_all(refs, options.workers, progress, f"validate {out_path.name}")
    skipped = [
        {"file": ref.display, "reason": reason} for ref, reason in zip(refs, reasons, strict=True) if reason is not None
    ]
    keep = [i for i, reason in enumerate(reasons) if reason is None]
    if not keep:
        raise ConversionError(f"{source}: none of the {len(refs)} files decoded as an image, nothing to write")

    with tempfile.TemporaryDirectory(prefix="aim_ds_write_") as scratch:
        for _attempt in range(3):
            failure_log = os.path.join(scratch, "failures.jsonl")
            _remove_if_exists(Path(failure_log))
            dataset = _DecodedDataset(
                [refs[i] for i in keep], [labels[i] for i in keep], options.max_resolution, failure_log
            )
            _ffcv_write(partial, dataset, options)
            if not os.path.exists(failure_log):
                break
            with open(failure_log) as log:
                failed = dict(json.loads(line) for line in log if line.strip())
            for position in sorted(failed):
                skipped.append({"file": dataset.refs[position].display, "reason": failed[position]})
            keep = [k for position, k in enumerate(keep) if position not in failed]
            if not keep:
                _remove_if_exists(partial)
                raise ConversionError(f"{source}: no image decoded, nothing to write")
        else:
            _remove_if_exists(partial)
            raise ConversionError(f"{source}: images kept failing to decode during the write")

    seconds = time.perf_counter() - start
    sidecar = {
        "format": SIDECAR_FORMAT,
        "kind": kind,
        "source": source,
        "beton": out_path.name,
        "num_images": len(keep),
        "num_candidates": len(refs),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "fields": {"image": "RGBImageField", "label": "IntField"},
        "options": dataclasses.asdict(options),
        "resize": "Pillow bicubic (antialiased) on the longer side, after JPEG draft decoding",
        "aim_ds_version": aim_ds_version(),
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(keep) / max(seconds, 1e-9), 1),
        **(extra_sidecar or {}),
    }
    side_partial = _atomic_write_text(side, json.dumps(sidecar, indent=1) + "\n")
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    if before_publish is not None:
        before_publish()
    os.replace(side_partial, side)
    os.replace(partial, out_path)  # last: the beton under its final name means finished
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
    """ImageNet-style folder -> one beton, its sidecar and ``OUT.classes.json``."""
    classes, refs, labels = scan_imagefolder(source)
    out_path = Path(out_path)
    classes_file = classes_path(out_path)

    def publish_classes() -> None:
        os.replace(_atomic_write_text(classes_file, json.dumps(classes, indent=0) + "\n"), classes_file)

    return write_beton(
        refs,
        labels,
        out_path,
        options,
        source=str(Path(source).resolve()),
        kind="imagefolder",
        extra_sidecar={"num_classes": len(classes), "classes_file": classes_file.name},
        progress=progress,
        before_publish=publish_classes,
    )


# ----------------------------------------------------------------------------------------------------------
# WebDataset shards (img2dataset output)

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00099}`` (zero padding kept) and ``{a,b}`` the way shells and webdataset do."""
    match = _BRACE_RANGE.search(pattern)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        low, high = int(first), int(last)
        step = 1 if high >= low else -1
        out: list[str] = []
        for number in range(low, high + step, step):
            out += expand_braces(pattern[: match.start()] + str(number).zfill(width) + pattern[match.end() :])
        return out
    match = _BRACE_LIST.search(pattern)
    if match:
        out = []
        for option in match.group(1).split(","):
            out += expand_braces(pattern[: match.start()] + option + pattern[match.end() :])
        return out
    return [pattern]


def match_pattern(pattern: str) -> tuple[set[str], list[str]]:
    """Paths matching a brace and/or glob pattern, and the literal (non-glob) pieces that do not exist."""
    matches: set[str] = set()
    missing: list[str] = []
    for piece in expand_braces(pattern):
        if glob.has_magic(piece):
            matches.update(glob.glob(piece))
        elif os.path.exists(piece):
            matches.add(piece)
        else:
            missing.append(piece)
    return matches, missing


def expand_shards(pattern: str) -> list[str]:
    """Sorted, de-duplicated tar paths for a brace and/or glob pattern. A literal path must exist."""
    paths, missing = match_pattern(pattern)
    if missing:
        raise ConversionError(f"shard not found: {missing[0]}")
    if not paths:
        raise ConversionError(f"no files match {pattern}")
    return sorted(paths)


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


# ----------------------------------------------------------------------------------------------------------
# Inspection


def resolve_betons(path_or_glob: str | os.PathLike[str]) -> list[Path]:
    """A .beton path, a directory of betons, or a glob/brace pattern -> sorted beton paths (must be non-empty)."""
    text = str(path_or_glob)
    path = Path(text)
    if path.is_dir():
        found = sorted(path.glob("*.beton"))
        if not found:
            raise FileNotFoundError(f"no .beton files in folder {path}")
        return found
    if path.is_file():
        return [path]
    matches, _ = match_pattern(text)
    found = sorted(Path(m) for m in matches if fnmatch.fnmatch(m, "*.beton") or Path(m).is_file())
    if not found:
        raise FileNotFoundError(f"no beton found at {text}")
    return found


def inspect_betons(path_or_glob: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts, fields, stored-resolution statistics and the sidecar of one beton or a set of shards."""
    from ffcv.reader import Reader

    paths = resolve_betons(path_or_glob)
    widths: list[np.ndarray] = []
    heights: list[np.ndarray] = []
    modes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    files = []
    total_bytes = 0
    fields: dict[str, str] = {}
    for path in paths:
        reader = Reader(str(path))
        fields = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
        # FFCV names the metadata columns by position (f0, f1, ...), not by field name.
        column = {name: f"f{i}" for i, name in enumerate(reader.field_names)}
        metadata = reader.metadata
        if "image" in column:
            image = metadata[column["image"]]
            widths.append(image["width"].astype(np.int64))
            heights.append(image["height"].astype(np.int64))
            modes.append(image["mode"].astype(np.int64))
        if "label" in column:
            labels.append(metadata[column["label"]].astype(np.int64))
        size = path.stat().st_size
        total_bytes += size
        sidecar = read_sidecar(path)
        files.append(
            {
                "path": str(path),
                "num_images": int(reader.num_samples),
                "bytes": size,
                "complete": is_complete(path),
                "sidecar": sidecar,
            }
        )
    num_images = sum(f["num_images"] for f in files)
    info: dict[str, Any] = {"files": files, "num_files": len(files), "num_images": num_images, "fields": fields}
    info["bytes"] = total_bytes
    info["bytes_per_image"] = total_bytes / max(num_images, 1)
    if widths:
        w, h = np.concatenate(widths), np.concatenate(heights)
        mode = np.concatenate(modes)

        def stats(values: np.ndarray) -> dict[str, float]:
            if values.size == 0:
                return {}
            return {
                "min": int(values.min()),
                "median": float(np.median(values)),
                "mean": round(float(values.mean()), 1),
                "max": int(values.max()),
            }

        info["width"] = stats(w)
        info["height"] = stats(h)
        info["longer_side"] = stats(np.maximum(w, h))
        info["stored_as"] = {"jpg": int((mode == 0).sum()), "raw": int((mode == 1).sum())}
    if labels:
        all_labels = np.concatenate(labels)
        if all_labels.size:
            info["labels"] = {
                "min": int(all_labels.min()),
                "max": int(all_labels.max()),
                "distinct": int(np.unique(all_labels).size),
            }
    return info


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text for :func:`inspect_betons`."""
    lines = [
        f"files:        {info['num_files']}",
        f"images:       {info['num_images']}",
        f"fields:       {', '.join(f'{k} ({v})' for k, v in info['fields'].items())}",
        f"bytes:        {info['bytes']} ({info['bytes_per_image'] / 1024:.1f} KiB per image)",
    ]
    for key in ("width", "height", "longer_side"):
        if key in info and info[key]:
            s = info[key]
            lines.append(f"{key + ':':<13} min {s['min']}  median {s['median']:g}  mean {s['mean']:g}  max {s['max']}")
    if "stored_as" in info:
        lines.append(f"stored as:    jpg {info['stored_as']['jpg']}, raw {info['stored_as']['raw']}")
    if "labels" in info:
        s = info["labels"]
        lines.append(f"labels:       min {s['min']}  max {s['max']}  distinct {s['distinct']}")
    incomplete = [f["path"] for f in info["files"] if not f["complete"]]
    lines.append(f"complete:     {info['num_files'] - len(incomplete)} of {info['num_files']} have a matching sidecar")
    for path in incomplete[:10]:
        lines.append(f"  no matching sidecar: {path}")
    sidecars = [f["sidecar"] for f in info["files"] if f["sidecar"]]
    if sidecars:
        first = sidecars[0]
        options = first.get("options", {})
        lines.append("written with: " + ", ".join(f"{k}={v}" for k, v in options.items()))
        lines.append(
            f"aim_ds:       {first.get('aim_ds_version')}  kind: {first.get('kind')}  at {first.get('written_utc')}"
        )
        if len(sidecars) == 1:
            lines.append(f"source:       {first.get('source')}")
        skipped = sum(int(s.get("num_skipped", 0)) for s in sidecars)
        lines.append(f"skipped:      {skipped}")
        for sidecar in sidecars:
            for entry in sidecar.get("skipped", [])[:20]:
                lines.append(f"  {entry.get('file')}: {entry.get('reason')}")
    return "\n".join(lines)
