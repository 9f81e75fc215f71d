"""FFCV's ``DatasetWriter`` with its worker processes watched, and a free-space check before a write.

FFCV's writer (``ffcv/writer.py``) starts worker processes and then polls a shared counter until every sample
is done. A worker that dies (a full disk raising ENOSPC, an out-of-memory kill, an I/O error) never bumps
the counter, and the other workers spin forever waiting for the dead one's page to be written (pages are
written in order), so the parent hangs. :class:`WatchedDatasetWriter` replaces that loop with one that also
watches every worker's exit code: any death terminates the others and raises :class:`WriterDied` within a
fraction of a second, with the worker's own exception when it raised one (for example
``OSError: [Errno 28] No space left on device``).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..io import PARTIAL_SUFFIX
from .beton import ConversionError

#: How often the parent looks at the done counter and the workers (s).
POLL_SECONDS = 0.05
#: Bytes of FFCV's per-sample metadata for (RGBImageField, IntField), rounded up; the header is 1 KiB per field.
METADATA_BYTES_PER_IMAGE = 64


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so that a killed conversion (a Ray task's worker,
    an OOM-killed parent) does not leave orphaned writers appending to an unlinked ``.partial``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class WriterDied(ConversionError):
    """A writer worker process died; the output it was writing is incomplete."""


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (an out-of-memory kill is a SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


def _guarded(work_fn: Callable[..., None], errors: Any, *args: Any) -> None:
    """A worker's body: run FFCV's worker job; on any exception report it to the parent, then exit non-zero."""
    _die_with_parent()
    try:
        work_fn(*args)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises it
        last = traceback.extract_tb(error.__traceback__)[-1:]
        where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
        errors.put(f"{type(error).__name__}: {error}{where}")
        # SystemExit: no second traceback on stderr (the parent raises the one-line reason), and
        # multiprocessing still flushes the errors queue before the process ends.
        sys.exit(1)


def watched_writer(fname: str, fields: dict[str, Any], *, page_size: int, num_workers: int, progress: bool) -> Any:
    """An ``ffcv.writer.DatasetWriter`` whose wait for its workers is :func:`_run_workers` (deaths raise
    :class:`WriterDied`); ``progress=False`` also silences FFCV's own progress bar."""
    from ffcv.writer import DatasetWriter

    class WatchedDatasetWriter(DatasetWriter):
        def _write_common(
            self, num_samples: int, queue_content: Iterable[Any], work_fn: Callable, extra: Sequence[Any]
        ) -> None:
            self.num_samples = num_samples
            self.prepare()
            try:
                self.finalize(_run_workers(self, queue_content, work_fn, extra, progress))
            finally:
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return WatchedDatasetWriter(fname, fields, page_size=page_size, num_workers=num_workers)


def _run_workers(
    writer: Any, queue_content: Iterable[Any], work_fn: Callable, extra: Sequence[Any], progress: bool
) -> list[Any]:
    """Start FFCV's workers, wait for them while watching their exit codes, return their allocations."""
    from ffcv.memory_allocator import MemoryAllocator

    from ..progress import progress as progress_bar

    context = mp.get_context("fork")  # what FFCV uses on Linux; the dataset is inherited, not pickled
    work: Any = context.Queue()
    for item in queue_content:
        work.put(item)
    for _ in range(writer.num_workers):
        work.put(None)
    allocations: Any = context.Queue()
    errors: Any = context.Queue()
    done = context.Value(ctypes.c_uint64, 0)
    allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
    args = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, allocations, *extra)
    processes = [context.Process(target=_guarded, args=(work_fn, errors, *args)) for _ in range(writer.num_workers)]
    for process in processes:
        process.start()
    collected: list[Any] = []
    bar = progress_bar(
        total=writer.num_samples,
        desc=f"write {Path(writer.fname).name.removesuffix(PARTIAL_SUFFIX)}",
        unit="img",
        leave=False,
        disable=not progress,
    )
    try:
        while len(collected) < len(processes):
            bar.update(int(done.value) - bar.n)
            try:
                # A worker puts its allocations when done and then exits 0; collect before checking deaths.
                collected.append(allocations.get(timeout=POLL_SECONDS))
                continue
            except queue.Empty:
                pass
            for process in processes:
                if process.exitcode not in (None, 0):
                    raise WriterDied(_death_message(writer.fname, process, errors))
            if all(p.exitcode == 0 for p in processes) and allocations.empty():
                raise WriterDied(f"{writer.fname}: writer workers exited without reporting their pages")
        bar.update(int(done.value) - bar.n)  # the closing line counts every image
    finally:
        bar.close()
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=5)
    return [allocation for content in collected for allocation in content]


def _death_message(fname: str, process: Any, errors: Any) -> str:
    try:
        reason = errors.get(timeout=0.5)
    except queue.Empty:
        reason = ""
    detail = f": {reason}" if reason else ""
    return f"writing {fname} failed: writer process {process.pid} {_describe_exit(process.exitcode)}{detail}"


def estimate_beton_bytes(sizes: Sequence[tuple[int, int, int]], max_resolution: int, write_mode: str) -> int:
    """A rough size (bytes) of the beton for images (width px, height px, encoded bytes), after the resize.

    raw: the pixels exactly. JPEG modes: the encoded input shrunk with the pixel count (a re-encode of a
    downscaled image scales roughly with its area), never above the raw pixels. Plus metadata.
    """
    total = 0
    for width, height, num_bytes in sizes:
        scale = min(1.0, max_resolution / max(width, height, 1)) if max_resolution else 1.0
        raw = 3 * max(1, round(width * scale)) * max(1, round(height * scale))
        total += raw if write_mode == "raw" else min(raw, int(num_bytes * scale * scale))
    return total + METADATA_BYTES_PER_IMAGE * len(sizes)


def check_free_space(folder: str | os.PathLike[str], needed_bytes: int) -> None:
    """Raise :class:`ConversionError` naming the folder when it has less than ``needed_bytes`` free."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ConversionError(
            f"not enough free space in {folder}: the output needs about {needed_bytes / 2**20:.1f} MiB "
            f"({needed_bytes} bytes), {free / 2**20:.1f} MiB ({free} bytes) are free"
        )
