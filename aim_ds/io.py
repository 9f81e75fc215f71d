"""Publishing files and folders atomically: one temporary-name scheme for the whole project.

Everything aim-ds writes that a reader may pick up (betons, sidecars, checkpoints' markers, exports,
configs, metrics, plots, probe heads, feature caches) is written under ``<name>.partial`` in the same
folder, flushed to disk, then renamed onto its final name. A reader therefore sees either the old
file or the new one, never a half-written one, and a killed writer leaves only ``*.partial`` debris
that the next writer of the same name removes.

Files are created with the mode the user's umask gives (``0666 & ~umask``), like ``open()`` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    """The temporary name ``path`` is written under before it is published."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def remove_if_exists(*paths: str | os.PathLike) -> None:
    """Remove files or folders; a missing one is not an error."""
    for path in paths:
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def file_kind(mode: int) -> str:
    """What a non-regular file is, by its ``st_mode``, for error messages ("a FIFO", "a socket", ...)."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def not_regular_message(path: str | os.PathLike, kind: str, what: str | None = None) -> str:
    """The one wording of a refusal of a non-regular file ``path`` (``kind`` from :func:`file_kind`).
    With ``what`` ("config file"): "config file 'x' is a FIFO, not a regular file". Without it, in the
    form of the data readers' errors, which start with the path: "x: a FIFO, not a regular file: only
    regular files are read"."""
    if what is None:
        return f"{path}: {kind}, not a regular file: only regular files are read"
    return f"{what} '{path}' is {kind}, not a regular file"


def check_regular_file(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> Path:
    """``path`` (symlinks followed) when it is a regular file; otherwise raise ``error`` naming
    ``what`` and ``path``. Opening a FIFO blocks until a writer comes and a device may never end,
    so nothing a user hands us is opened before this says it is a plain file. Returns ``path``."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise error(f"{what} '{path}' cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise error(not_regular_message(path, file_kind(mode), what)) from None
    return path


def open_regular_fd(path: str | os.PathLike, error: type[Exception] = ValueError, what: str | None = None) -> int:
    """A blocking read-only descriptor of ``path`` (symlinks followed) if it is a regular file; anything
    else (FIFO, socket, device, folder) raises ``error`` naming it (:func:`not_regular_message`).

    The file is opened non-blocking, so a FIFO cannot hang the open, and checked on the open descriptor,
    so nothing can be swapped in between the check and the reads. An ``OSError`` of the open itself (no
    such file, no permission) propagates unchanged: what a missing file means is the caller's call (a
    missing sidecar is "none", a missing config an error)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        # A socket cannot be opened at all (ENXIO): name what it is rather than the errno.
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise error(not_regular_message(path, file_kind(mode), what)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(not_regular_message(path, file_kind(mode), what))
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str | os.PathLike, error: type[Exception] = ValueError, what: str | None = None) -> BinaryIO:
    """:func:`open_regular_fd` as a binary file object (close it, or use it in a ``with``)."""
    return os.fdopen(open_regular_fd(path, error, what), "rb")


def read_regular_file(
    path: str | os.PathLike, what: str, error: type[Exception] = ValueError, *, limit: int | None = None
) -> bytes:
    """The bytes of the regular file ``path``, refusing anything else without blocking
    (:func:`open_regular_fd`); every failure is ``error`` naming ``what`` and ``path``. ``limit``: refuse
    a file larger than this many bytes (a config is small), checked before anything is read."""
    path = Path(path)
    try:
        file = open_regular(path, error, what)
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise error(f"{what} '{path}' cannot be read ({exc.strerror or exc})") from None
    with file as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise error(f"{what} '{path}' is {size} bytes, more than the {limit} a {what} may have")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:  # grew since fstat
        raise error(f"{what} '{path}' is more than the {limit} bytes a {what} may have")
    return data


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which races with other threads.
_FILE_MODE = 0o666 & ~_read_umask()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # The rename itself is durable only once the folder's entry is on disk (POSIX; best effort).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Flush the finished file ``tmp`` to disk and rename it onto ``path``. Returns ``path``."""
    tmp, path = Path(tmp), Path(path)
    _fsync_file(tmp)
    # Writers that create files with 0600 (mkstemp, some libraries) would otherwise leak that mode.
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary name to write ``path`` under; publish it when the block ends without an
    error, remove it when the block raises (or is interrupted)::

        with atomic_path(out / "loss.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    remove_if_exists(tmp)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        remove_if_exists(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically. Returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder to fill; when the block succeeds it replaces ``path`` whole
    (an existing ``path`` is moved aside first and removed only after the new one is in place), so
    a reader never sees a mix of old and new files. When the block raises, the temporary folder goes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    remove_if_exists(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        replace_dir(tmp, path)
    except BaseException:
        remove_if_exists(tmp)
        raise


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the finished folder ``tmp`` onto ``path``. An existing ``path`` is moved aside first
    and removed only once the new one is in place, so there is always a complete folder to find.
    Returns ``path``."""
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(path.name + ".old")
    remove_if_exists(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    remove_if_exists(old)
    return path
