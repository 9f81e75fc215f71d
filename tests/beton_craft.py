"""Crafting damaged betons for the safety and fuzz tests: a real beton written by the project's writer,
copied, then patched in place through FFCV's own record layouts (header, metadata rows, allocation table)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aim_ds.data.beton import ALLOC_TABLE_TYPE, FIELD_DESC_TYPE, FIELD_TYPES, HEADER_TYPE

#: Metadata row of a beton written by aim_ds (image, label), as FFCV lays it out.
ROW_TYPE = np.dtype([("image", FIELD_TYPES[2][1]), ("label", FIELD_TYPES[1][1])], align=True)


def layout(path: Path) -> tuple[int, int, int]:
    """(metadata offset, num_samples, alloc_table_ptr) of a beton, read raw (no checks)."""
    header = np.fromfile(path, dtype=HEADER_TYPE, count=1)[0]
    offset = HEADER_TYPE.itemsize + int(header["num_fields"]) * FIELD_DESC_TYPE.itemsize
    return offset, int(header["num_samples"]), int(header["alloc_table_ptr"])


def patch(path: Path, offset: int, record: np.ndarray) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(record.tobytes())


def patched(good: Path, out: Path, *, header=None, rows=None, table=None, sidecar: bool = True) -> Path:
    """A copy of ``good`` at ``out`` with ``header(h)``, ``rows(r)``, ``table(t)`` applied to writable copies of
    its records (each callable edits in place). The sidecar is copied too unless ``sidecar`` is False."""
    shutil.copyfile(good, out)
    if sidecar:
        shutil.copyfile(str(good) + ".json", str(out) + ".json")
    offset, count, table_ptr = layout(out)
    if rows is not None:
        records = np.fromfile(out, dtype=ROW_TYPE, count=count, offset=offset).copy()
        rows(records)
        patch(out, offset, records)
    if table is not None:
        records = np.fromfile(out, dtype=ALLOC_TABLE_TYPE, offset=table_ptr).copy()
        table(records)
        patch(out, table_ptr, records)
    if header is not None:
        record = np.fromfile(out, dtype=HEADER_TYPE, count=1).copy()
        header(record[0])
        patch(out, 0, record)
    return out


def setter(column: str, row: int, field: str | None, value: int) -> Callable[[np.ndarray], None]:
    """``records[column][field][row] = value`` (field None: ``records[column][row]``)."""

    def edit(records: np.ndarray) -> None:
        target = records[column] if field is None else records[column][field]
        target[row] = value

    return edit
