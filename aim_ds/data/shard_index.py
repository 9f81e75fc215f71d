"""One index file per folder of beton shards: each shard's sample count, keyed by name and checked by stat.

Opening a source of 2,000 shards used to read every header and every sidecar (4,000 opens, and the sidecars
can be large). ``shards.index.json`` beside the shards holds ``{name: {num_images, bytes, mtime_ns}}``;
an entry counts only while the shard's size and modification time still match it (one ``stat``, no open),
so an index left stale by a rewrite or a concurrent conversion costs a header read for the changed shards,
never a wrong count. data_prep refreshes it after converting; the loader refreshes it when it had to read
headers and the folder is writable. Concurrent refreshes are safe: each publishes a whole file atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_json
from .beton import INDEX_NAME, BetonError, beton_num_samples, open_regular, read_sidecar, read_small

INDEX_FORMAT = "aim-ds-shard-index/1"


def index_path(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / INDEX_NAME


def _load(folder: Path) -> dict[str, dict[str, int]]:
    """The folder's index; {} when missing or unreadable (the headers are then read). One that is not a
    regular file raises :class:`BetonError` naming it (a FIFO would block the read forever)."""
    try:
        file = open_regular(index_path(folder))
    except FileNotFoundError:
        return {}
    try:
        content = json.loads(read_small(file, index_path(folder)))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(content, dict) or content.get("format") != INDEX_FORMAT:
        return {}
    shards = content.get("shards")
    return shards if isinstance(shards, dict) else {}


def _entry(path: Path) -> dict[str, int]:
    """A fresh index entry from the checked header; a sidecar that disagrees makes the shard unusable."""
    stat = path.stat()
    count = beton_num_samples(path)
    sidecar = read_sidecar(path)
    # A beton without a sidecar (written elsewhere, or a killed run's last rename missing) is whole, since it
    # was published atomically, and is read; one whose sidecar disagrees with it is not.
    said = sidecar.get("num_images", count) if sidecar is not None else count
    if said != count:
        raise BetonError(f"{path}: holds {count} images but its sidecar says {said!r}; re-run data_prep for it")
    return {"num_images": count, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _matches(entry: Any, stat: os.stat_result) -> bool:
    """An entry counts while the shard's size and mtime match it and its count is a plain int >= 0."""
    if not isinstance(entry, dict) or entry.get("bytes") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
        return False
    count = entry.get("num_images")
    return type(count) is int and count >= 0


def _save(folder: Path, shards: dict[str, dict[str, int]]) -> None:
    """Best effort: a read-only folder of shards is still readable, only slower to open."""
    try:
        atomic_write_json(index_path(folder), {"format": INDEX_FORMAT, "shards": shards}, indent=None)
    except OSError:
        pass


def shard_counts(paths: Sequence[Path], *, save: bool = True) -> list[int]:
    """Sample count of each beton, from the folder's index where it is current, else from the header."""
    counts: list[int] = []
    indexes: dict[Path, dict[str, dict[str, int]]] = {}
    changed: set[Path] = set()
    for path in paths:
        folder = path.parent
        if folder not in indexes:
            indexes[folder] = _load(folder)
        entries = indexes[folder]
        entry = entries.get(path.name)
        if not _matches(entry, path.stat()):
            entry = entries[path.name] = _entry(path)
            changed.add(folder)
        counts.append(int(entry["num_images"]))
    if save:
        for folder in changed:
            _save(folder, indexes[folder])
    return counts


def refresh_shard_index(folder: str | os.PathLike[str]) -> None:
    """Bring ``folder``'s index up to date with the betons in it (unreadable betons are left out)."""
    folder = Path(folder)
    old = _load(folder)
    shards: dict[str, dict[str, int]] = {}
    for path in sorted(folder.glob("*.beton")):
        entry = old.get(path.name)
        try:
            shards[path.name] = entry if _matches(entry, path.stat()) else _entry(path)
        except (OSError, ValueError):
            continue
    _save(folder, shards)
