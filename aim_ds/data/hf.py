"""Hugging Face ``datasets`` (saved with ``save_to_disk``, or parquet files) -> one beton, read with pyarrow.

The ``datasets`` package is not needed: its files are plain Arrow. ``save_to_disk`` writes a folder with
``state.json`` (the Arrow files, in order), ``dataset_info.json`` (the features) and the Arrow IPC stream
files; a ``DatasetDict`` is one such folder per split beside ``dataset_dict.json``. The Hub's parquet
copies (``data/train-00000-of-00010.parquet``) carry the same features in their schema metadata
(``huggingface``). An ``Image`` column is a struct ``{bytes, path}``: the encoded bytes, or (when they were
not embedded) the path of the file. A ``ClassLabel`` column holds integers and its class names, which become
``OUT.classes.json``; -1 (ClassLabel's "no label", e.g. ImageNet's test split) stays -1, the unlabelled value.

Images are never all in memory: an image is referenced by (file, row group, row), and each process reads the
image column one row group at a time (a parquet row group, or a whole memory-mapped Arrow file), keeping the
last few, because the validation and write passes both visit the rows in order, in chunks.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_json, read_regular_file
from .beton import ConversionError, classes_path, is_complete
from .writers import UNLABELED, WriteOptions, WriteResult, check_writable, write_beton

#: Row groups (or Arrow files) whose image column a process keeps decoded.
_CACHED_GROUPS = 2
_cache: OrderedDict[tuple[str, int, str], Any] = OrderedDict()
_CACHE_PID = [os.getpid()]


def _pyarrow() -> Any:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConversionError("data_prep hf needs pyarrow: pip install pyarrow (requirements.txt pins it)") from None
    import pyarrow

    return pyarrow


def _image_column(path: str, group: int, column: str) -> Any:
    """The image column of one row group of a parquet file (group >= 0) or of a whole Arrow stream file
    (group -1, memory-mapped: no copy), cached per process."""
    if _CACHE_PID[0] != os.getpid():  # a forked worker starts with its own cache, not the parent's
        _cache.clear()
        _CACHE_PID[0] = os.getpid()
    key = (path, group, column)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    pa = _pyarrow()
    if group < 0:
        table = pa.ipc.open_stream(pa.memory_map(path, "r")).read_all()
    else:
        table = pa.parquet.ParquetFile(path).read_row_group(group, columns=[column], use_threads=False)
    values = table.column(column)
    _cache[key] = values
    while len(_cache) > _CACHED_GROUPS:
        _cache.popitem(last=False)
    return values


@dataclasses.dataclass(frozen=True)
class ArrowImageRef:
    """One image in an Arrow or parquet file: ``row`` of row group ``group`` (-1: the whole Arrow file)."""

    path: str
    group: int
    row: int
    column: str
    name: str
    root: str = ""  # where a relative image path (bytes not embedded) is looked up

    def read(self) -> bytes:
        """The encoded image bytes; raises OSError naming what is missing."""
        value = _image_column(self.path, self.group, self.column)[self.row].as_py()
        if isinstance(value, dict):
            data, file = value.get("bytes"), value.get("path")
            if data:
                return bytes(data)
            if not file:
                raise OSError(f"{self.name}: the image has neither bytes nor a path")
            file = file if os.path.isabs(file) else os.path.join(self.root, file)
            return read_regular_file(file, "image file", OSError)
        if isinstance(value, (bytes, bytearray)) and value:
            return bytes(value)
        raise OSError(f"{self.name}: no image bytes (value {type(value).__name__})")

    @property
    def display(self) -> str:
        return self.name


@dataclasses.dataclass
class HFFiles:
    """The data files of one split, their kind ("arrow" or "parquet") and the ``datasets`` features (or {})."""

    files: list[Path]
    kind: str
    features: dict[str, Any]


def _json(path: Path) -> Any:
    try:
        return json.loads(read_regular_file(path, "dataset metadata", ConversionError, limit=64 << 20))
    except ValueError as error:
        raise ConversionError(f"{path}: not JSON ({error})") from None


def _saved_split(folder: Path) -> HFFiles:
    """A ``save_to_disk`` folder of one split: its Arrow files in ``state.json``'s order."""
    state = _json(folder / "state.json")
    names = [entry.get("filename") for entry in state.get("_data_files", []) if isinstance(entry, dict)]
    if not names or not all(isinstance(n, str) for n in names):
        raise ConversionError(f"{folder / 'state.json'}: lists no data files (_data_files)")
    files = [folder / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"{folder / 'state.json'} lists {missing[0]}, which is missing")
    info = folder / "dataset_info.json"
    features = _json(info).get("features", {}) if info.exists() else {}
    return HFFiles(files, "arrow", features if isinstance(features, dict) else {})


def find_hf_files(source: str | os.PathLike[str], split: str | None = None) -> HFFiles:
    """The files of a dataset: a ``save_to_disk`` folder (a Dataset, or a DatasetDict with ``split``), a
    parquet file, a folder of parquet files (recursively; with ``split``, those named ``SPLIT-*`` or under a
    ``SPLIT`` folder) or a glob of them. Raises :class:`ConversionError` saying what was found instead."""
    text = str(source)
    root = Path(text)
    if root.is_dir() and (root / "dataset_dict.json").exists():
        splits = _json(root / "dataset_dict.json").get("splits", [])
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise ConversionError(f"{root} is a DatasetDict with splits {splits}: choose one with --split")
        return _saved_split(root / split)
    if root.is_dir() and (root / "state.json").exists():
        return _saved_split(root)
    if root.is_file():
        parquet = [root]
    elif root.is_dir():
        parquet = sorted(root.rglob("*.parquet"))
    else:
        parquet = sorted(Path(p) for p in glob.glob(text, recursive=True) if p.endswith(".parquet"))
    if split is not None:
        parquet = [p for p in parquet if p.name.startswith(f"{split}-") or split in p.relative_to(p.anchor).parts[:-1]]
    if not parquet:
        where = f" for split {split!r}" if split else ""
        raise ConversionError(f"no Hugging Face dataset at {text}{where}: expected a save_to_disk folder "
                              "(state.json or dataset_dict.json) or parquet files")  # fmt: skip
    pa = _pyarrow()
    metadata = pa.parquet.read_schema(parquet[0]).metadata or {}
    features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    return HFFiles(parquet, "parquet", features if isinstance(features, dict) else {})


def _row_groups(pa: Any, file: Path, kind: str, columns: Sequence[str]) -> list[tuple[int, int, list[Any] | None]]:
    """(group number, rows, the label column's values or None) for each row group of ``file`` (one group
    numbered -1 for an Arrow file). ``columns``: the image column, then the label column if any. Only the
    label column is read here: the image bytes are read by the writer processes."""
    if kind == "arrow":
        table = pa.ipc.open_stream(pa.memory_map(str(file), "r")).read_all()
        names = table.column_names
    else:
        reader = pa.parquet.ParquetFile(str(file))
        names = reader.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ConversionError(f"{file}: no column {missing[0]!r} (columns: {names})")
    label = columns[1] if len(columns) > 1 else None
    if kind == "arrow":
        return [(-1, table.num_rows, table.column(label).to_pylist() if label else None)]
    groups = []
    for group in range(reader.num_row_groups):
        rows = reader.metadata.row_group(group).num_rows
        values = (
            reader.read_row_group(group, columns=[label], use_threads=False).column(label).to_pylist()
            if label
            else None
        )
        groups.append((group, rows, values))
    return groups


def scan_hf(
    files: HFFiles, image_column: str, label_column: str | None, classes: Sequence[str] | None
) -> tuple[list[ArrowImageRef], list[int], list[str] | None]:
    """Image refs, labels and class names (None when unknown) of a dataset's files.

    Labels: a ``ClassLabel`` column's integers (its names the classes unless ``classes`` is given), an integer
    column (range-checked against ``classes`` when given), or a string column (class names: looked up in
    ``classes``, else indexed in sorted order). -1 is kept as unlabelled; a null label is an error naming the row.
    """
    pa = _pyarrow()
    feature = files.features.get(label_column, {}) if label_column else {}
    names: list[str] | None = list(classes) if classes is not None else None
    if names is None and isinstance(feature, dict) and isinstance(feature.get("names"), list):
        names = [str(n) for n in feature["names"]]
    refs: list[ArrowImageRef] = []
    raw: list[Any] = []
    columns = [image_column] + ([label_column] if label_column else [])
    for file in files.files:
        for group, count, values in _row_groups(pa, file, files.kind, columns):
            where = f"{file.name}" + (f":group {group}" if group >= 0 else "")
            refs += [
                ArrowImageRef(str(file), group, row, image_column, f"{where}:row {row}", str(file.parent))
                for row in range(count)
            ]
            raw += values if values is not None else [UNLABELED] * count
    if not refs:
        raise ConversionError(f"{files.files[0].parent}: the dataset has no rows")
    labels: list[int] = []
    problems: list[str] = []
    strings = sorted({v for v in raw if isinstance(v, str)})
    if strings and names is None:
        names = strings
    index = {name: k for k, name in enumerate(names or [])}
    for ref, value in zip(refs, raw, strict=True):
        if isinstance(value, str) and value in index:
            labels.append(index[value])
        elif isinstance(value, int) and not isinstance(value, bool) and value == UNLABELED:
            labels.append(UNLABELED)
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value >= 0
            and (names is None or value < len(names))
        ):
            labels.append(value)
        else:
            bound = f" (classes: {len(names)})" if names is not None else ""
            problems.append(f"{ref.name}: label {value!r} in column {label_column!r} is not a class{bound}")
    if problems:
        listed = "\n  ".join(problems[:10])
        raise ConversionError(f"{len(problems)} row(s) with a bad label:\n  {listed}")
    return refs, labels, names


def convert_hf(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    options: WriteOptions,
    *,
    image_column: str = "image",
    label_column: str | None = "label",
    split: str | None = None,
    classes: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> WriteResult:
    """A Hugging Face dataset (see :func:`find_hf_files`) -> one beton, its class list when the labels have
    names (``OUT.classes.json``), and (last) its sidecar. ``label_column`` None: every label -1. ``classes``:
    a class index file (:func:`aim_ds.data.labels.read_class_index`) the labels must follow, e.g. the train
    beton's, for a validation split."""
    from .labels import read_class_index

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        state = "complete" if is_complete(out_path) else "no matching sidecar"
        raise ConversionError(f"{out_path} already exists ({state}); pass --overwrite to replace it")
    class_index = read_class_index(classes) if classes is not None else None
    files = find_hf_files(source, split)
    refs, labels, names = scan_hf(files, image_column, label_column, class_index)
    check_writable(out_path.parent)
    classes_file = classes_path(out_path)
    extra: dict[str, Any] = {
        "hf_files": [str(f.resolve()) for f in files.files],
        "image_column": image_column,
        "label_column": label_column,
        "label": "unlabeled (-1)" if label_column is None else f"column {label_column!r}",
    }
    if names is not None:
        extra.update(num_classes=len(names), classes_file=classes_file.name)
    return write_beton(
        refs,
        labels,
        out_path,
        options,
        source=str(Path(source).resolve()) if Path(source).exists() else str(source),
        kind="huggingface",
        extra_sidecar=extra,
        progress=progress,
        before_sidecar=(lambda: atomic_write_json(classes_file, names, indent=0)) if names is not None else None,
    )
