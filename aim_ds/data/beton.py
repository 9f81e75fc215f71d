"""The read side of a beton and its companions: names, the sidecar, completeness, finding and inspecting.

``OUT.beton`` is written by :mod:`aim_ds.data.writers` with two companions beside it:

* ``OUT.beton.json``, the sidecar: how the beton was written (source, counts, options, skipped files);
* ``OUT.classes.json``: the class names, index = label (image folders and Hugging Face datasets); a folder of
  labelled shards has one ``classes.json`` for all of them instead.

Every file is published through :mod:`aim_ds.io` (written as ``NAME.partial``, then renamed), and the sidecar
goes last: a sidecar under its final name that agrees with its beton is what says "finished". A beton
without its sidecar is therefore incomplete (a run was killed between the two renames) and is redone on
re-run; the loader still reads it, since it is whole and betons written elsewhere have no sidecar at all.
This module imports neither the writer nor FFCV: importing ``ffcv`` (even ``ffcv.types``) costs ~9 s on 2
cores (torch, OpenCV and numba work at import), and the loader needs only FFCV's file format, which is
described here with numpy dtypes (:func:`read_beton`; ``tests/test_data_robust.py`` checks them against
FFCV's own).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .. import io as aim_io
from ..io import PARTIAL_SUFFIX

SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = "aim-ds-beton-sidecar/1"
CLASSES_SUFFIX = ".classes.json"
#: The class list of a whole folder of labelled beton shards (one per folder, not one per shard).
FOLDER_CLASSES_NAME = "classes.json"
#: One file per folder of shards: each beton's sample count, so that opening thousands of shards reads one
#: file instead of every header and sidecar (:mod:`aim_ds.data.shard_index`).
INDEX_NAME = "shards.index.json"


# ----------------------------------------------------------------------------------------------------------
# FFCV's file format (ffcv/types.py, format version 2), without importing ffcv

CURRENT_VERSION = 2
HEADER_TYPE = np.dtype(
    [("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
     ("alloc_table_ptr", "<u8")],
    align=True,
)  # fmt: skip
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
#: Per-sample metadata of FFCV's field types, by type id (FloatField, IntField, RGBImageField).
FIELD_TYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("FloatField", np.dtype("<f8")),
    1: ("IntField", np.dtype("<i8")),
    2: ("RGBImageField", np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])),
}


#: libjpeg's own limit on a JPEG side (JPEG_MAX_DIMENSION); the bound on a stored side when no sidecar says more.
MAX_SIDE = 65500
#: Image storage modes of FFCV's RGBImageField (ffcv.fields.rgb_image.IMAGE_MODES).
IMAGE_MODE_NAMES = {0: "jpg", 1: "raw"}


@dataclasses.dataclass
class BetonContents:
    """A beton's header, fields and per-sample metadata (``metadata[name]``: one entry per sample), its
    allocation table (sample_id, ptr, size in bytes of every stored blob) and, per image field, the byte
    count of each sample's blob (``blob_sizes[name]``, int64, checked against the table and the file)."""

    header: np.void
    fields: dict[str, str]  # field name -> FFCV field type name
    metadata: dict[str, np.ndarray]
    alloc_table: np.ndarray
    blob_sizes: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _pread(fd: int, path: str, offset: int, count: int) -> bytes:
    """Exactly ``count`` bytes at ``offset`` (the caller has checked that they lie inside the file)."""
    data = os.pread(fd, count, offset)
    if len(data) != count:
        raise BetonError(f"{path}: short read at byte {offset} ({len(data)} of {count} bytes): changed while read?")
    return data


def read_beton(beton_path: str | os.PathLike[str]) -> BetonContents:
    """Everything but the stored bytes, as FFCV's ``Reader`` reads it, with every row checked.

    The header is checked by :func:`read_header`; then :func:`check_rows` checks every row and the
    allocation table against the file (vectorised: ~0.1 s per million rows), so that nothing past this point can
    read outside the file or decode into a buffer of the wrong size. Raises :class:`BetonError` naming the
    file (and the row) on the first problem.
    """
    path = str(beton_path)
    with open_regular(path) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        header = _check_header(path, _pread(fd, path, 0, min(HEADER_TYPE.itemsize, size)), size)
        count = int(header["num_fields"])
        descriptors = np.frombuffer(
            _pread(fd, path, HEADER_TYPE.itemsize, count * FIELD_DESC_TYPE.itemsize), dtype=FIELD_DESC_TYPE
        )
        names, types = [], []
        for k, descriptor in enumerate(descriptors):
            raw_name = bytes(descriptor["name"]).split(b"\0", 1)[0]
            try:
                name = raw_name.decode("ascii")
            except UnicodeDecodeError:
                raise BetonError(
                    f"{path}: field {k} has a name that is not ASCII ({raw_name!r}): corrupt header"
                ) from None
            type_id = int(descriptor["type_id"])
            if type_id not in FIELD_TYPES:
                raise BetonError(f"{path}: field {name!r} has FFCV type id {type_id}, which aim_ds does not read")
            if name in names:
                raise BetonError(f"{path}: field name {name!r} appears twice: corrupt header")
            names.append(name)
            types.append(FIELD_TYPES[type_id])
        metadata_type = np.dtype([(f"f{i}", t[1]) for i, t in enumerate(types)], align=True)
        offset = HEADER_TYPE.itemsize + descriptors.nbytes
        num_samples = int(header["num_samples"])
        table_ptr = int(header["alloc_table_ptr"])
        metadata_end = offset + num_samples * metadata_type.itemsize
        if metadata_end > table_ptr:
            # Checked before anything is allocated: a header that lies upward must not make us read (or
            # allocate) rows that are not in the file.
            raise BetonError(
                f"{path}: header says {num_samples} samples, whose metadata ({num_samples} x "
                f"{metadata_type.itemsize} bytes from byte {offset}) would run past the allocation table at byte "
                f"{table_ptr}: corrupt or truncated beton"
            )
        rows = np.frombuffer(_pread(fd, path, offset, metadata_end - offset), dtype=metadata_type)
        table = np.frombuffer(_pread(fd, path, table_ptr, size - table_ptr), dtype=ALLOC_TABLE_TYPE)
    contents = BetonContents(
        header,
        {name: t[0] for name, t in zip(names, types, strict=True)},
        {name: rows[f"f{i}"] for i, name in enumerate(names)},
        table,
    )
    check_rows(path, contents, metadata_end, size, max_side(path))
    return contents


def max_side(beton_path: str | os.PathLike[str]) -> int:
    """The longest stored side a beton may hold: its sidecar's ``max_resolution`` when set, else libjpeg's
    limit (FFCV's own field arguments do not record it)."""
    sidecar = read_sidecar(beton_path)
    options = sidecar.get("options") if sidecar else None
    value = options.get("max_resolution") if isinstance(options, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIDE:
        return value
    return MAX_SIDE


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_rows(path: str, contents: BetonContents, metadata_end: int, file_size: int, side_limit: int) -> None:
    """Every allocation inside the data region and every image row consistent with it; fills
    ``contents.blob_sizes``. Raises :class:`BetonError` naming the file and the first bad row.

    The data region runs from the end of the metadata to the allocation table; FFCV never allocates more
    than a page for one sample. An image row must point at the start of an allocation of its own sample,
    have both sides in ``[1, side_limit]`` and a known mode, and a raw image must fit in its allocation.
    (A JPEG's own header is compared with the row's sides when it is decoded: :mod:`aim_ds.data.kernels`.)
    """
    header, table = contents.header, contents.alloc_table
    num_samples, table_ptr = int(header["num_samples"]), int(header["alloc_table_ptr"])
    page_size = int(header["page_size"])
    ptrs, sizes, owners = table["ptr"], table["size"], table["sample_id"]
    # uint64 compared with Python ints first, so that the int64 sums below cannot overflow.
    foreign = owners >= num_samples
    if foreign.any():
        k = _first(foreign)
        raise BetonError(
            f"{path}: allocation {k} belongs to sample {int(owners[k])}, but the header says {num_samples} samples: "
            "corrupt beton (a header whose sample count was changed?)"
        )
    bad = (ptrs < metadata_end) | (ptrs > table_ptr) | (sizes > page_size)
    if bad.any():
        k = _first(bad)
        raise BetonError(
            f"{path}: allocation {k} (sample {int(owners[k])}, bytes {int(ptrs[k])}..+{int(sizes[k])}) lies "
            f"outside the data region [{metadata_end}, {table_ptr}) or exceeds the page size {page_size}: corrupt beton"
        )
    ptrs64, sizes64 = ptrs.astype(np.int64), sizes.astype(np.int64)
    over = ptrs64 + sizes64 > table_ptr
    if over.any():
        k = _first(over)
        raise BetonError(f"{path}: allocation {k} (sample {int(owners[k])}) runs past the data region: corrupt beton")
    for name, kind in contents.fields.items():
        if kind == "RGBImageField":
            contents.blob_sizes[name] = _check_image_rows(
                path, name, contents.metadata[name], owners, sizes64, ptrs64, side_limit
            )


def _check_image_rows(
    path: str, name: str, image: np.ndarray, owners: np.ndarray, sizes: np.ndarray, ptrs: np.ndarray, side_limit: int
) -> np.ndarray:
    """The rows of one RGBImageField (see :func:`check_rows`); returns each row's blob size, int64.

    Compares the stored columns as they are (uint8 / uint16 / uint64 views, no copies); the common layout,
    a table in row order, skips the search.
    """
    modes, widths, heights = image["mode"], image["width"], image["height"]

    def fail(mask: np.ndarray, why: str) -> None:
        if mask.any():
            i = _first(mask)
            size = f"{int(widths[i])}x{int(heights[i])}"
            raise BetonError(f"{path}: row {i} ({name!r}): " + why.format(size=size, mode=int(modes[i])))

    fail(modes > 1, "mode {mode} is not jpg (0) or raw (1): corrupt beton")
    fail((widths == 0) | (heights == 0), "image size {size}: each side must be >= 1: corrupt beton")
    if side_limit < np.iinfo(widths.dtype).max:
        fail(
            (widths > side_limit) | (heights > side_limit),
            f"image size {{size}} exceeds the stored maximum {side_limit}",
        )
    data_ptr = image["data_ptr"]
    rows = np.arange(len(image))
    if len(ptrs) == len(image) and np.array_equal(ptrs, data_ptr):
        entry = rows  # the table lists the rows' allocations in row order
    elif len(ptrs):
        order = np.argsort(ptrs, kind="stable")
        slot = np.minimum(np.searchsorted(ptrs[order], data_ptr), len(order) - 1)
        entry = order[slot]
        fail(ptrs[entry] != data_ptr, "its data pointer is not an allocation of the beton's allocation table: corrupt")
    else:
        fail(np.ones(len(image), bool), "no allocation in the table for its data: corrupt beton")
        return np.zeros(0, np.int64)
    fail(
        owners[entry] != rows.astype(owners.dtype),
        "its data pointer is allocated to another sample: corrupt beton (a header claiming more samples than "
        "were written?)",
    )
    blob = sizes[entry]
    raw = modes == 1
    if raw.any():
        need = widths.astype(np.int64) * heights.astype(np.int64) * 3
        fail(raw & (blob < need), "raw image {size} is larger than its allocation: corrupt")
    return blob


def check_jpeg_sizes(beton_path: str | os.PathLike[str], contents: BetonContents, max_bytes: int | None = None) -> int:
    """Every stored JPEG's own header (TurboJPEG's ``tjDecompressHeader3``) against the row's sides, reading
    the data region in 64 MiB windows, in file order, up to ``max_bytes`` (None: all); returns the bytes read.

    The decode kernel makes the same check on every image it decodes (and refuses to decode on a mismatch);
    this finds such rows up front: ``data_prep inspect`` checks all of them, preflight a bounded prefix.
    """
    from .kernels import jpeg_header_sizes  # numba: imported only when JPEG headers are checked

    path = str(beton_path)
    read = 0
    for name, kind in contents.fields.items():
        if kind != "RGBImageField":
            continue
        image, blob = contents.metadata[name], contents.blob_sizes[name]
        ptrs = image["data_ptr"].astype(np.int64)
        rows = np.flatnonzero(image["mode"] == 0)
        rows = rows[np.argsort(ptrs[rows], kind="stable")]
        ends = np.maximum.accumulate(ptrs[rows] + blob[rows]) if len(rows) else np.zeros(0, np.int64)
        start = 0
        with open_regular(path) as f:
            while start < len(rows) and (max_bytes is None or read < max_bytes):
                low = int(ptrs[rows[start]])
                stop = max(start + 1, int(np.searchsorted(ends, low + (64 << 20), side="right")))
                high = int(ends[stop - 1])
                payload = np.frombuffer(_pread(f.fileno(), path, low, high - low), dtype=np.uint8)
                chunk = rows[start:stop]
                found = jpeg_header_sizes(payload, ptrs[chunk] - low, blob[chunk])
                said = np.stack([image["width"][chunk], image["height"][chunk]], axis=1).astype(np.int64)
                wrong = (found != said).any(axis=1)
                if wrong.any():
                    k = _first(wrong)
                    i = int(chunk[k])
                    theirs = (
                        "no readable JPEG header"
                        if found[k, 0] < 0
                        else f"its JPEG header says {found[k, 0]}x{found[k, 1]}"
                    )
                    raise BetonError(
                        f"{path}: row {i} ({name!r}): the metadata says {said[k, 0]}x{said[k, 1]}, but {theirs}: "
                        "corrupt beton"
                    )
                read += high - low
                start = stop
    return read


class ConversionError(RuntimeError):
    """A user-facing conversion error (missing source, nothing to convert); the CLI prints it without traceback."""


# ----------------------------------------------------------------------------------------------------------
# Names and the sidecar


def sidecar_path(beton_path: str | os.PathLike[str]) -> Path:
    """``OUT.beton`` -> ``OUT.beton.json``."""
    return Path(str(beton_path) + SIDECAR_SUFFIX)


def classes_path(beton_path: str | os.PathLike[str]) -> Path:
    """``OUT.beton`` -> ``OUT.classes.json`` (the class names, index = label)."""
    path = Path(beton_path)
    stem = path.name[: -len(".beton")] if path.name.endswith(".beton") else path.name
    return path.with_name(stem + CLASSES_SUFFIX)


def folder_classes_path(folder: str | os.PathLike[str]) -> Path:
    """``FOLDER`` of shards -> ``FOLDER/classes.json`` (their shared class names, index = label)."""
    return Path(folder) / FOLDER_CLASSES_NAME


def read_sidecar(beton_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The sidecar of a beton as a dict, or None when missing or unreadable. One that is not a regular file
    (a FIFO would block the read forever) raises :class:`BetonError` naming it."""
    path = sidecar_path(beton_path)
    try:
        file = open_regular(path)
    except FileNotFoundError:
        return None
    try:
        content = json.loads(read_small(file, path))
    except (OSError, ValueError, RecursionError):
        return None
    return content if isinstance(content, dict) else None


def read_small(file: Any, path: str | os.PathLike[str]) -> str:
    """The UTF-8 text of an opened JSON companion (closed after), refusing one over :data:`MAX_JSON_BYTES`:
    ours are KBs, and the size is checked before anything is allocated for it."""
    with file as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise BetonError(f"{path}: {size} bytes, too large for a sidecar, class list or shard index")
        return f.read(size).decode("utf-8")


#: A sidecar or index larger than this is not ours (ours are KBs; a sidecar lists at most its skipped files).
MAX_JSON_BYTES = 256 << 20


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """:func:`aim_ds.io.open_regular` raising :class:`BetonError`: a binary file object of ``path`` if it is
    a regular file, else an error naming it and what it is (a FIFO would hang every rank)."""
    return aim_io.open_regular(path, BetonError)


def check_regular_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`BetonError` naming ``path`` unless it is a regular file (no open: a stat)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise BetonError(aim_io.not_regular_message(path, aim_io.file_kind(mode)))


class BetonError(ValueError):
    """A file that is not a whole FFCV beton (wrong format, truncated, disagreeing with its sidecar)."""


# What a file that is not a beton often is, by its first bytes: named in the error.
_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"RIFF": "a RIFF (WebP?) file", b"{": "JSON"}


def read_header(beton_path: str | os.PathLike[str]) -> np.void:
    """FFCV's header of a beton (version, num_fields, page_size, num_samples, alloc_table_ptr), checked
    against the file's size and its sidecar; raises :class:`BetonError` naming the file and what is wrong.

    Without this a JPEG renamed ``.beton`` fails in FFCV with "Unable to allocate 128 PiB" and a truncated
    beton with "negative dimensions are not allowed". Only a regular file is opened (a FIFO would hang).
    """
    path = str(beton_path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_TYPE.itemsize)
    return _check_header(path, head, size)


def _check_header(path: str, head: bytes, size: int) -> np.void:
    HeaderType, FieldDescType = HEADER_TYPE, FIELD_DESC_TYPE  # noqa: N806 - FFCV's names, for the reader

    if len(head) < HeaderType.itemsize:
        raise BetonError(f"{path}: not an FFCV beton: {size} bytes, shorter than its {HeaderType.itemsize}-byte header")
    header = np.frombuffer(head, dtype=HeaderType)[0]
    if int(header["version"]) != CURRENT_VERSION or not 0 < int(header["num_fields"]) <= 64:
        looks = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), f"starts {head[:8].hex()}")
        raise BetonError(f"{path}: not an FFCV beton (header version {int(header['version'])}, expected "
                         f"{CURRENT_VERSION}; the file looks like {looks})")  # fmt: skip
    page_size = int(header["page_size"])
    if page_size < 4096 or page_size & (page_size - 1):
        raise BetonError(f"{path}: corrupt beton header: page size {page_size} is not a power of two >= 4096")
    table = int(header["alloc_table_ptr"])
    fields_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    if table > size or table < fields_end:
        raise BetonError(f"{path}: truncated or corrupt beton: {size} bytes, but its header puts the allocation "
                         f"table at byte {table} (a copy or write cut short?)")  # fmt: skip
    if table < fields_end + int(header["num_samples"]):
        raise BetonError(f"{path}: corrupt beton header: {int(header['num_samples'])} samples cannot fit before its "
                         f"allocation table at byte {table}")  # fmt: skip
    if (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise BetonError(f"{path}: truncated or corrupt beton: its allocation table ({size - table} bytes) is not "
                         f"a whole number of {ALLOC_TABLE_TYPE.itemsize}-byte entries")  # fmt: skip
    sidecar = read_sidecar(path)
    expected = sidecar.get("beton_bytes") if sidecar else None
    if isinstance(expected, int) and expected != size:
        raise BetonError(f"{path}: {size} bytes, but its sidecar says the beton was written with {expected} bytes "
                         "(truncated or replaced?); re-run data_prep for it")  # fmt: skip
    said = sidecar.get("num_images") if sidecar else None
    if isinstance(said, int) and said != int(header["num_samples"]):
        raise BetonError(f"{path}: holds {int(header['num_samples'])} images but its sidecar says {said}; re-run "
                         "data_prep for it")  # fmt: skip
    return header


def beton_num_samples(beton_path: str | os.PathLike[str]) -> int:
    """Number of samples from the checked beton header (see :func:`read_header`; reads 24 bytes)."""
    return int(read_header(beton_path)["num_samples"])


def is_complete(beton_path: str | os.PathLike[str]) -> bool:
    """True when the beton is finished: it exists and its sidecar (published last) exists, is ours and
    agrees with it on the image count. A beton without its sidecar is not finished."""
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
    """Class names (index = label) of a labelled beton, or of a folder of labelled shards.

    A beton's are in ``OUT.classes.json`` beside it (image folders, Hugging Face datasets) or, for a shard,
    in its folder's ``classes.json`` (labelled WebDataset shards); a folder's in its ``classes.json``.
    """
    given = Path(beton_path)
    # A folder's own classes.json first, then FOLDER.classes.json beside it (what older code looked for).
    candidates = [folder_classes_path(given), classes_path(given)] if given.is_dir() else [classes_path(given)]
    if not given.is_dir():
        candidates.append(folder_classes_path(given.parent))
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise FileNotFoundError(
            f"no class list for {beton_path} (expected {' or '.join(map(str, candidates))}); labelled "
            "betons get one from data_prep (imagefolder, hf, or webdataset with --label-key and --classes)"
        )
    try:
        names = json.loads(read_small(open_regular(path), path))
    except BetonError:
        raise
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not a JSON list of class names ({error})") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: expected a JSON list of strings")
    return names


# ----------------------------------------------------------------------------------------------------------
# Brace and glob patterns (shard lists and beton sets)

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


def _is_companion(name: str) -> bool:
    """Files that live beside betons but are not betons: write debris and our JSON companions."""
    return name in (INDEX_NAME, FOLDER_CLASSES_NAME) or name.endswith(
        (PARTIAL_SUFFIX, ".beton" + SIDECAR_SUFFIX, CLASSES_SUFFIX)
    )


def resolve_betons(path_or_glob: str | os.PathLike[str]) -> list[Path]:
    """A .beton path, a directory of betons, or a glob/brace pattern -> sorted beton paths (must be non-empty).

    A pattern never picks up ``*.partial`` debris of a killed write, sidecars or class lists.
    """
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
    found = sorted(
        Path(m)
        for m in matches
        if not _is_companion(os.path.basename(m)) and (fnmatch.fnmatch(m, "*.beton") or Path(m).is_file())
    )
    if not found:
        raise FileNotFoundError(f"no beton found at {text}")
    return found


# ----------------------------------------------------------------------------------------------------------
# Inspection


def _stats(values: np.ndarray) -> dict[str, float]:
    """min / median / mean / max of an int array ({} when empty)."""
    if values.size == 0:
        return {}
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": round(float(values.mean()), 1),
        "max": int(values.max()),
    }


def _read_columns(path: Path) -> tuple[dict[str, str], int, dict[str, np.ndarray]]:
    """(field name -> handler type, sample count, int64 columns width/height/mode/label present) of one beton,
    every row checked (:func:`read_beton`) and every JPEG's header compared with its row."""
    contents = read_beton(path)
    check_jpeg_sizes(path, contents)
    columns: dict[str, np.ndarray] = {}
    if contents.fields.get("image") == "RGBImageField":
        image = contents.metadata["image"]
        for key in ("width", "height", "mode"):
            columns[key] = image[key].astype(np.int64)
    if contents.fields.get("label") == "IntField":
        columns["label"] = contents.metadata["label"].astype(np.int64)
    return contents.fields, int(contents.header["num_samples"]), columns


def inspect_betons(path_or_glob: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts, fields, stored-resolution statistics (px) and the sidecar of one beton or a set of shards."""
    paths = resolve_betons(path_or_glob)
    gathered: dict[str, list[np.ndarray]] = {"width": [], "height": [], "mode": [], "label": []}
    files = []
    fields: dict[str, str] = {}
    for path in paths:
        fields, num_images, columns = _read_columns(path)
        for key, values in columns.items():
            gathered[key].append(values)
        files.append(
            {
                "path": str(path),
                "num_images": num_images,
                "bytes": path.stat().st_size,
                "complete": is_complete(path),
                "sidecar": read_sidecar(path),
            }
        )
    num_images = sum(f["num_images"] for f in files)
    total_bytes = sum(f["bytes"] for f in files)
    info: dict[str, Any] = {"files": files, "num_files": len(files), "num_images": num_images, "fields": fields}
    info["bytes"] = total_bytes
    info["bytes_per_image"] = total_bytes / max(num_images, 1)
    if gathered["width"]:
        w, h = np.concatenate(gathered["width"]), np.concatenate(gathered["height"])
        mode = np.concatenate(gathered["mode"])
        info["width"] = _stats(w)
        info["height"] = _stats(h)
        info["longer_side"] = _stats(np.maximum(w, h))
        info["stored_as"] = {"jpg": int((mode == 0).sum()), "raw": int((mode == 1).sum())}
    if gathered["label"]:
        all_labels = np.concatenate(gathered["label"])
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
    # A sidecar is a user's file like any other: values of the wrong type are shown as they are, not trusted.
    sidecars = [f["sidecar"] for f in info["files"] if f["sidecar"]]
    if sidecars:
        first = sidecars[0]
        options = first.get("options")
        if isinstance(options, dict):
            lines.append("written with: " + ", ".join(f"{k}={str(v):.80}" for k, v in options.items()))
        lines.append(
            f"aim_ds:       {first.get('aim_ds_version')!s:.40}  kind: {first.get('kind')!s:.40}  "
            f"at {first.get('written_utc')!s:.40}"
        )
        if len(sidecars) == 1:
            lines.append(f"source:       {first.get('source')!s:.200}")
        counts = [s.get("num_skipped", 0) for s in sidecars]
        lines.append(f"skipped:      {sum(c for c in counts if type(c) is int)}")
        for sidecar in sidecars:
            entries = sidecar.get("skipped")
            for entry in entries[:20] if isinstance(entries, list) else []:
                if isinstance(entry, dict):
                    lines.append(f"  {entry.get('file')!s:.200}: {entry.get('reason')!s:.200}")
    return "\n".join(lines)
