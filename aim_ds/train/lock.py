"""One job per run folder: a lock file taken before anything is written, and the launcher watch.

``<run>/run.lock`` holds ``{"host", "pid", "start_time", "proc_start"}`` of the process that holds
it (rank 0 of the job). It is created with ``O_CREAT | O_EXCL``, so of two jobs started at once
exactly one gets it; the other fails at once naming the holder's host and PID. A lock left by a
process that is gone (killed with SIGKILL, a crashed node) on *this* host is taken over, with a
warning; on another host liveness cannot be checked, so the message says which file to remove.

:class:`LauncherWatch` lets a rank notice that the job around it is gone: the ``deepspeed`` runner
exits at once on SIGTERM while its launcher and the ranks go on training; the ranks then
checkpoint and stop (see :mod:`aim_ds.train.stopping`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError

LOCK_FILE = "run.lock"
# Parents whose disappearance means the job is gone (a plain shell's does not).
_LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torchrun", "torch.distributed.launch")
_FILE_MODE = 0o666  # the umask applies, as for every file the run writes

log = logging.getLogger(__name__)


class RunLockedError(ConfigError):
    """The run folder is held by another live job."""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (Linux), None when unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused PID apart."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))


def _parent_of(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[1]) if fields and len(fields) > 1 else None


class RunLock:
    """The lock of run folder ``run_dir`` for this process; a context manager (acquire / release)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "start_time": time.time(), "proc_start": process_start(pid)}

    def holder(self) -> dict[str, Any] | None:
        """The lock file's record; ``{}`` for an unreadable one (a kill mid-write), None without one."""
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        """The holder is gone: same host and its PID dead, or the PID now belongs to a newer process."""
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid", -1))
        if not pid_alive(pid):
            return True
        started = holder.get("proc_start")
        return started is not None and process_start(pid) not in (None, started)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover races with another job doing the same: retry the O_EXCL create
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released between our create and our read
                if holder and not self._stale(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("start_time", 0))))
                    raise RunLockedError(
                        f"{self.path.parent} is in use by PID {holder.get('pid')} on host {holder.get('host')} "
                        f"(since {since}); if that job is gone, remove {self.path}"
                    ) from None
                if not holder and time.time() - self.path.stat().st_mtime < 10:
                    continue  # being written right now by another job
                log.warning(
                    "taking over the stale lock %s of PID %s on host %s (that process is gone)",
                    self.path,
                    holder.get("pid", "?"),
                    holder.get("host", "?"),
                )
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            self.held = True
            return
        raise RunLockedError(f"could not take {self.path}: another job keeps taking it")

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if self.held:
            holder = self.holder() or {}
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False


class LauncherWatch:
    """Notices that the job around this rank is gone.

    Watched at construction, when the parent is a launcher (DeepSpeed's per-node launcher or
    torchrun): the parent and, under DeepSpeed, the ``deepspeed`` runner above it (the one a user or
    a scheduler signals). A plain ``python`` run watches nothing (its shell may exit on purpose,
    e.g. under ``nohup``). :meth:`gone` says why once either has exited or this process was
    re-parented; it looks at most once per ``interval_s`` seconds (two ``/proc`` reads).
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.parent = os.getppid()
        self.runner: int | None = None
        command = _cmdline(self.parent)
        self.watching = any(name in command for name in _LAUNCHERS)
        if "deepspeed.launcher.launch" in command:
            self.runner = _parent_of(self.parent)
        self.interval_s = interval_s
        self._next = 0.0
        self._reason: str | None = None

    def gone(self) -> str | None:
        """None while the launcher is there; otherwise what is gone."""
        now = time.monotonic()
        if self.watching and self._reason is None and now >= self._next:
            self._next = now + self.interval_s
            if os.getppid() != self.parent or not pid_alive(self.parent):
                self._reason = f"launcher PID {self.parent} is gone"
            elif self.runner is not None and self.runner > 1:
                if not pid_alive(self.runner) or _parent_of(self.parent) != self.runner:
                    self._reason = f"deepspeed runner PID {self.runner} is gone"
        return self._reason


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
