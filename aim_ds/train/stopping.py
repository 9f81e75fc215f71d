"""Stopping on request: a signal, the run folder's stop file or ``train.stop_after_steps``; then a
checkpoint and the end of the loop.

A signal only sets a flag. Saving inside the handler would run collectives from a signal context on
one rank only; the flag is instead all-reduced with the step's loss so that every rank stops at the
same step boundary, after the checkpoint every rank takes part in.

Requests a rank takes (any one is enough: the flag is summed over ranks):

- SIGTERM, SIGINT or SIGUSR1 to the rank;
- ``<out_dir>/stop.request`` exists (looked at once a second): what ``scripts/slurm/pretrain.sbatch``
  writes when SLURM warns its batch shell of the time limit. A file cannot be raced by DeepSpeed's
  launcher, which SIGKILLs its ranks 30 s after its own SIGTERM; rank 0 removes it after the stop;
- the launcher around the rank is gone (:class:`~aim_ds.train.lock.LauncherWatch`).

Rank 0 also carries the run lock (:attr:`StopRequest.lock`). When another job has taken it over, the
loop stops every rank at the same step by the same all-reduce, but without a checkpoint and with
:class:`~aim_ds.train.lock.RunLockLostError`: the run folder is the other job's now. Rank 0 also
reads the lock right before each checkpoint (one collective says the verdict to all ranks), so that
no checkpoint starts once the heartbeat could have known.

A process blocked where no step boundary comes (a stuck read, a collective whose peer hangs) would
otherwise only die by SIGKILL: a watcher thread sees every signal as it arrives (through
``signal.set_wakeup_fd``, which works while the main thread is stuck in C), and ends the process
with a message when a second SIGTERM/SIGINT comes ``stop.repeat_after_s`` or more after the first
(a launcher that forwards the scheduler's signal delivers two within milliseconds: those count as
one), or when the stop has not ended the process ``stop.timeout_s`` after the first signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..distributed import max_across_ranks
from ..weights import checkpoint as ckpt
from .job import Job
from .lock import LauncherWatch, RunLock, RunLockLostError

log = logging.getLogger(__name__)

STOP_FILE = "stop.request"
# Exit codes of run/pretrain.py a requeue loop reads (scripts/slurm/pretrain.sbatch does).
EXIT_FINISHED = 0  # finished, or stopped at train.stop_after_steps as configured
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_STOPPED = 75  # stopped on request with a checkpoint: start it again (EX_TEMPFAIL)
EXIT_LOCK_LOST = 4  # another job took the run lock over: stopped without a checkpoint; never requeue
_HARD = (signal.SIGTERM, signal.SIGINT)
_CAUGHT = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

_active: StopRequest | None = None


def active() -> StopRequest | None:
    """The request installed in this process (by the driver), None when none is."""
    return _active


class StopRequest:
    """Stop requests of this rank (see the module doc) while installed; :meth:`restore` puts the
    previous handlers back. ``stop_file``: the file whose existence asks to stop (None: none).
    ``repeat_after_s``, ``timeout_s``: the second-signal grace and the watchdog (0: off)."""

    def __init__(
        self, stop_file: str | os.PathLike | None = None, *, repeat_after_s: float = 2.0, timeout_s: float = 0.0
    ) -> None:
        self.signum: int | None = None
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self.repeat_after_s = repeat_after_s
        self.timeout_s = timeout_s
        self.first_signal_at: float | None = None  # monotonic
        self._file_seen = False
        self._next_file_check = 0.0
        self._previous: dict[int, Any] = {}
        self._previous_wakeup: int | None = None
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self.watch = LauncherWatch()
        self.lock: RunLock | None = None  # rank 0's run lock, once held (the driver sets it)

    @property
    def lock_lost(self) -> bool:
        """Whether the run lock this rank holds was taken over (the heartbeat's verdict; no file read)."""
        return self.lock is not None and self.lock.lost

    def lock_lost_why(self) -> str | None:
        """What happened to the lock (rank 0, once lost), None otherwise."""
        return self.lock.lost_why if self.lock is not None and self.lock.lost else None

    @property
    def requested(self) -> bool:
        return self.signum is not None or self._stop_file_seen() or self.watch.gone() is not None

    @property
    def reason(self) -> str | None:
        """Why this rank asks to stop (a signal's name, the stop file, what is gone), None when it does not."""
        if self.signum is not None:
            return f"signal {signal.Signals(self.signum).name}"
        if self._file_seen:
            return f"stop file {self.stop_file}"
        return self.watch.gone()

    def _stop_file_seen(self) -> bool:
        if self.stop_file is None or self._file_seen:
            return self._file_seen
        now = time.monotonic()
        if now >= self._next_file_check:  # a stat per second, not per step, on shared storage
            self._next_file_check = now + 1.0
            self._file_seen = os.path.lexists(self.stop_file)
        return self._file_seen

    def consume_stop_file(self) -> None:
        """Remove the stop file after a stop (rank 0; whichever rank saw it), so the next start trains."""
        if self.stop_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.stop_file.unlink()

    def install(self) -> None:
        global _active
        for sig in _CAUGHT:
            self._previous[sig] = signal.signal(sig, self._handle)
        if threading.current_thread() is threading.main_thread():
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._pipe = (read_fd, write_fd)
            self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._watcher = threading.Thread(target=self._watch_signals, name="stop-watcher", daemon=True)
            self._watcher.start()
        _active = self

    def restore(self) -> None:
        global _active
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup if self._previous_wakeup is not None else -1)
            os.close(self._pipe[1])  # the watcher reads EOF and ends
            if self._watcher is not None:
                self._watcher.join(timeout=5)
            os.close(self._pipe[0])
            self._pipe = self._watcher = None
        if _active is self:
            _active = None

    def _handle(self, signum: int, _frame: Any) -> None:
        self._note(signum)

    def _note(self, signum: int) -> None:
        """A signal seen (by the handler or the watcher: whichever comes first; both are harmless twice)."""
        if self.signum is None:
            self.signum = signum
            self.first_signal_at = time.monotonic()

    def _watch_signals(self) -> None:
        """The watcher thread: every signal number the C handler writes to the wakeup pipe, and the
        watchdog's clock once a first signal has come."""
        assert self._pipe is not None
        read_fd = self._pipe[0]
        os.set_blocking(read_fd, False)
        import select

        while True:
            wait = None
            if self.timeout_s > 0 and self.first_signal_at is not None:
                wait = max(0.0, self.first_signal_at + self.timeout_s - time.monotonic())
            ready, _, _ = select.select([read_fd], [], [], wait)
            if not ready:
                _end(
                    f"no stop within stop.timeout_s={self.timeout_s:g} s after {self.reason}: the loop is "
                    "blocked (a stuck read or a collective whose peer is gone?); ending without a checkpoint",
                    128 + (self.signum or signal.SIGTERM),
                )
            try:
                data = os.read(read_fd, 64)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return  # restore() closed the pipe
            now = time.monotonic()
            for signum in data:
                if signum not in _CAUGHT:
                    continue
                first = self.first_signal_at
                if first is not None and signum in _HARD and now - first >= self.repeat_after_s:
                    _end(
                        f"second signal {signal.Signals(signum).name} {now - first:.0f} s after the first: "
                        "ending now without a checkpoint",
                        128 + signum,
                    )
                self._note(signum)


def _end(message: str, code: int) -> None:
    """End the process from the watcher thread: the main thread may be stuck where no Python runs."""
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), f"aim_ds: {message} (exit {code})\n".encode())
    os._exit(code)


def ensure_lock_held(stop: StopRequest | None, step: int) -> None:
    """Every rank, before anything is written for ``step`` (a checkpoint, the end of the run): rank 0
    reads its lock now, and every rank raises :class:`RunLockLostError` when it was taken over."""
    lock = stop.lock if stop is not None else None
    lost = lock is not None and lock.check()
    if max_across_ranks(int(lost)):
        raise RunLockLostError(step, stop.lock_lost_why() if stop is not None else None)


def save_or_stop(
    job: Job, step: int, epoch: int, batch_in_epoch: int, *, stop_now: bool, stop: StopRequest
) -> tuple[bool, bool]:
    """After optimizer step ``step``: save a checkpoint when one is due (periodic, or before a stop),
    and say whether the loop ends here. ``stop_now`` is the all-ranks request flag of this step.
    Returns ``(saved, stopping)``. The last step is left to the end of the run, which always saves."""
    cfg = job.cfg
    if step >= job.plan.total_steps:
        return False, False
    stop_after = cfg.train.stop_after_steps > 0 and step >= cfg.train.stop_after_steps
    periodic = cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0
    stopping = stop_now or stop_after
    if periodic or stopping:
        ensure_lock_held(stop, step)
        job.save(step, epoch, batch_in_epoch)
    if stopping and job.is_main:
        # stop_now may come from another rank's request; this rank names its own when it has one.
        why = stop.reason or ("train.stop_after_steps" if stop_after and not stop_now else "another rank's request")
        log.info("stopped at step %d (%s); checkpoint %s saved", step, why, ckpt.tag_for_step(step))
    return periodic or stopping, stopping
