"""One job per run folder: a lock file taken before anything is written, and the launcher watch.

``<run>/run.lock`` holds ``{"host", "pid", "start_time", "proc_start", "slurm_job", "slurm_restart",
"nonce"}`` of the process that holds it (rank 0 of the job). It appears whole or not at all: the
record is written to a private file first and hard-linked to ``run.lock`` (``link`` fails when the
name exists, on local disks and NFS alike), so of two jobs started at once exactly one gets it.

The holder *beats*: a thread touches the file every ``stale_after_s / 4`` seconds. Another job
decides at once when it can (:func:`judge`): a live process on this host holds it (refused), the
process on this host is gone, or the record is an earlier run of this same SLURM job (a requeue)
or of a SLURM job that no longer runs (taken over); a suspended SLURM job (stopped, its heartbeat
too, until SLURM resumes it) is live. Otherwise (another host) it watches the
heartbeat: a beat means a live holder (refused, within one beat), no beat for ``stale_after_s``
seconds means the holder is gone wherever it ran (taken over). The mtime is compared with itself,
not with this host's clock, so clocks that disagree across nodes do not matter.

Taking over is atomic: the stale file is renamed to a private name and compared with what was
judged; when a quicker job had already replaced it with its own fresh lock, that lock is linked
back and the take-over retried, so two jobs never both hold the folder.

A holder whose heartbeat stalled (a file system that refuses ``utime`` for a while) may find its
lock taken over while it still runs. It notices (:meth:`RunLock.check`, at each beat and before
each checkpoint) and the training loop stops every rank at the same step without saving
(:class:`RunLockLostError`, exit 4), leaving the new holder's lock alone: one writer per folder.

:class:`LauncherWatch` lets a rank notice that the job around it is gone: the ``deepspeed`` runner
exits at once on SIGTERM while its launcher and the ranks go on training; the ranks then
checkpoint and stop (see :mod:`aim_ds.train.stopping`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError

LOCK_FILE = "run.lock"
DEFAULT_STALE_AFTER_S = 120.0
MAX_RECORD_BYTES = 64 * 1024  # a lock record is ~250 bytes; more is not a lock
# Parents whose disappearance means the job is gone (a plain shell's does not).
_LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torchrun", "torch.distributed.launch")
_FILE_MODE = 0o666  # the umask applies, as for every file the run writes
_UNREADABLE_GRACE_S = 10.0  # an unreadable record younger than this may be an older aim-ds writing it
# SLURM job states in which the job has no processes left (squeue/scontrol names).
_SLURM_ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PENDING",
    "PREEMPTED",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
    "TIMEOUT",
}

log = logging.getLogger(__name__)


class RunLockedError(ConfigError):
    """The run folder is held by another live job."""


class RunLockLostError(RuntimeError):
    """Another job took this job's run lock over (or it was removed) while this job trained: raised on
    every rank at the same step, before anything more is saved. Not a ConfigError: the driver exits
    with its own code (4), which a requeue loop must not requeue, since the run belongs to the other job."""

    def __init__(self, step: int, who: str | None) -> None:
        # ``who``: rank 0's description of what happened to the lock; None on the other ranks.
        what = who or "rank 0 lost the run lock (its log names the job that holds it)"
        super().__init__(f"{what}; stopping at optimizer step {step} without a checkpoint")
        self.step = step


@dataclass(frozen=True)
class Holder:
    """A parsed lock record. A field that is missing or of the wrong type is None: the decision then
    rests on what is left (at worst the heartbeat), never on a guess."""

    host: str | None = None
    pid: int | None = None
    start_time: float | None = None
    proc_start: str | None = None
    slurm_job: str | None = None
    slurm_restart: int | None = None

    def name(self) -> str:
        return f"PID {self.pid if self.pid is not None else '?'} on host {self.host or '?'}"

    def job(self) -> str:
        """:meth:`name` with the SLURM job when the record has one."""
        if self.slurm_job is None:
            return self.name()
        return f"{self.name()} (SLURM job {self.slurm_job}, restart {self.slurm_restart or 0})"

    def since(self) -> str:
        if self.start_time is None:
            return "an unknown time"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start_time))


def parse_record(raw: bytes) -> Holder | None:
    """The holder named by a lock file's bytes; None when they are not a lock record at all (not
    UTF-8 JSON, not an object). Never raises."""
    if len(raw) > MAX_RECORD_BYTES:
        return None
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None

    def text(key: str) -> str | None:
        value = record.get(key)
        return value if isinstance(value, str) and 0 < len(value) <= 255 else None

    def integer(key: str, low: int) -> int | None:
        value = record.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and low <= value < 2**31 else None

    start = record.get("start_time")
    start_ok = isinstance(start, (int, float)) and not isinstance(start, bool) and math.isfinite(start)
    return Holder(
        host=text("host"),
        pid=integer("pid", 1),
        start_time=float(start) if start_ok and 0 <= start < 1e11 else None,
        proc_start=text("proc_start"),
        slurm_job=text("slurm_job"),
        slurm_restart=integer("slurm_restart", 0),
    )


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
    except OverflowError:
        return False
    fields = _proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))


def _parent_of(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[1]) if fields and len(fields) > 1 else None


def slurm_job_state(job_id: str) -> str | None:
    """SLURM's state of job ``job_id`` (``RUNNING``, ``COMPLETED``, ...), ``"GONE"`` when SLURM no
    longer knows it, None when SLURM cannot be asked here (no ``scontrol``, no answer)."""
    if not job_id.isdigit():
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return "GONE" if "Invalid job id" in out.stderr else None
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def _this_job() -> tuple[str | None, int | None]:
    job = os.environ.get("SLURM_JOB_ID")
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return job, int(restart) if restart.isdigit() else 0


def judge(
    holder: Holder | None,
    age_s: float,
    *,
    host: str,
    slurm_job: str | None,
    slurm_restart: int | None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    job_state: Callable[[str], str | None] = slurm_job_state,
) -> tuple[str, str]:
    """What to do about a lock held by ``holder`` whose file was last touched ``age_s`` seconds ago
    (by this host's clock): ``("live", why)`` refuse, ``("stale", why)`` take it over, ``("watch",
    why)`` decide by watching its heartbeat. ``host``, ``slurm_job``, ``slurm_restart`` describe
    this process."""
    if holder is None:
        if age_s < _UNREADABLE_GRACE_S:
            return "watch", "its record is unreadable (being written?)"
        return "stale", "its record is not a lock record"
    if holder.slurm_job is not None and holder.slurm_job == slurm_job and holder.slurm_restart != slurm_restart:
        return "stale", f"it is an earlier run of this SLURM job {slurm_job} (restart {holder.slurm_restart})"
    if holder.host == host and holder.pid is not None:
        if not pid_alive(holder.pid):
            return "stale", "that process is gone"
        started = holder.proc_start
        if started is not None and process_start(holder.pid) not in (None, started):
            return "stale", "that PID now belongs to another process"
        return "live", "that process is running on this host"
    if holder.slurm_job is not None and holder.slurm_job != slurm_job:
        state = job_state(holder.slurm_job)
        if state is not None and (state == "GONE" or state.split()[0] in _SLURM_ENDED):
            return "stale", f"its SLURM job {holder.slurm_job} is {state.lower()}"
        if state is not None and state.split()[0] == "SUSPENDED":
            # Its processes are stopped (SIGSTOP), heartbeat included, and go on when SLURM resumes it.
            return "live", f"its SLURM job {holder.slurm_job} is suspended"
    if age_s > stale_after_s:
        return "stale", f"not touched for {age_s:.0f} s > lock.stale_after_s"
    return "watch", "its holder runs elsewhere; deciding by its heartbeat"


class RunLock:
    """The lock of run folder ``run_dir`` for this process; a context manager (acquire / release).

    ``stale_after_s``: a holder that has not beaten for that long is gone (``lock.stale_after_s``);
    the holder beats every quarter of it."""

    def __init__(self, run_dir: str | os.PathLike, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        if not (isinstance(stale_after_s, (int, float)) and math.isfinite(stale_after_s) and stale_after_s > 0):
            raise ConfigError(f"lock.stale_after_s={stale_after_s!r}: must be a finite number of seconds > 0")
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_after_s = float(stale_after_s)
        self.held = False
        self.lost = False  # set by the heartbeat (or check()) when another job replaced this lock
        self.lost_why: str | None = None  # what happened to it, naming the new holder when there is one
        self._raw = b""
        self._utime_failed = False
        self._read_failed = False
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _record(self) -> bytes:
        pid = os.getpid()
        job, restart = _this_job()
        record = {
            "host": socket.gethostname(),
            "pid": pid,
            "start_time": time.time(),
            "proc_start": process_start(pid),
            "slurm_job": job,
            "slurm_restart": restart if job else None,
            "nonce": uuid.uuid4().hex,  # two records are never byte-equal: the take-over compares bytes
        }
        return json.dumps(record).encode()

    def _read(self) -> tuple[bytes, os.stat_result] | None:
        """The lock file's bytes and stat, None when there is none. Only a regular file is read (a
        FIFO or device named run.lock would block or never end): anything else is refused."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise RunLockedError(f"{self.path} is not a regular file; remove it")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RunLockedError(f"{self.path}: cannot read the lock ({exc.strerror}); remove it") from None
        with os.fdopen(fd, "rb") as f:
            return f.read(MAX_RECORD_BYTES + 1), os.fstat(f.fileno())

    def holder(self) -> dict[str, Any] | None:
        """The lock file's record as written; ``{}`` for an unreadable one, None without a file."""
        found = self._read()
        if found is None:
            return None
        try:
            record = json.loads(found[0])
        except (ValueError, UnicodeDecodeError, RecursionError):
            return {}
        return record if isinstance(record, dict) else {}

    def _create(self) -> bool:
        """Write our record to a private file and link it to run.lock; False when the name exists."""
        raw = self._record()
        tmp = self.path.with_name(f".{LOCK_FILE}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._raw = raw
        return True

    def _take_over(self, judged: bytes) -> None:
        """Remove the stale lock whose bytes were ``judged``, and nothing else (see the module doc)."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another job removed it first
        try:
            moved = aside.read_bytes()[: MAX_RECORD_BYTES + 1]
            if moved != judged:  # a quicker job's fresh lock: give it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    log.error("%s: a lock moved aside during a take-over could not be put back", self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)

    def _refuse(self, holder: Holder | None, why: str) -> RunLockedError:
        who = holder.name() if holder else "an unreadable record"
        since = holder.since() if holder else "an unknown time"
        return RunLockedError(
            f"{self.path.parent} is in use by {who} (since {since}; {why}); if that job is gone, remove {self.path} "
            f"(a lock whose holder stops beating is taken over after lock.stale_after_s={self.stale_after_s:g} s)"
        )

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the holder. Waits at most about
        ``stale_after_s`` (a holder on another host whose heartbeat has to be watched)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        job, restart = _this_job()
        watched: tuple[bytes, int, float] | None = None  # (bytes, mtime_ns, since) of the file being watched
        for _ in range(100_000):
            if self._create():
                self.held = True
                self.lost, self.lost_why = False, None
                self._start_heartbeat()
                return
            found = self._read()
            if found is None:
                continue  # released between our link and our read
            raw, st = found
            holder = parse_record(raw)
            verdict, why = judge(
                holder,
                time.time() - st.st_mtime,
                host=host,
                slurm_job=job,
                slurm_restart=restart,
                stale_after_s=self.stale_after_s,
            )
            if verdict == "watch":
                now = time.monotonic()
                if watched is None or watched[0] != raw:
                    watched = (raw, st.st_mtime_ns, now)
                elif st.st_mtime_ns != watched[1]:
                    raise self._refuse(holder, "its heartbeat is beating")
                elif now - watched[2] >= self.stale_after_s:
                    verdict, why = "stale", f"no heartbeat for {now - watched[2]:.0f} s"
                if verdict == "watch":
                    if watched[2] == now:
                        log.info("%s is held by %s: %s (up to %g s)", self.path, _who(holder), why, self.stale_after_s)
                    time.sleep(min(1.0, self.stale_after_s / 20))
                    continue
            if verdict == "live":
                raise self._refuse(holder, why)
            log.warning("taking over the stale lock %s of %s (%s)", self.path, _who(holder), why)
            self._take_over(raw)
            watched = None
        raise RunLockedError(f"could not take {self.path}: other jobs keep taking it")

    def _start_heartbeat(self) -> None:
        self._stop_beat.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        """Touch the lock while it is ours; stop beating once another job has replaced it."""
        interval = self.stale_after_s / 4
        while not self._stop_beat.wait(interval):
            if self.check():
                return
            try:
                os.utime(self.path)
            except OSError as exc:
                # Not fatal (the next beat may work), but a holder that cannot beat is taken over after
                # lock.stale_after_s: check() then stops this job. Said once, not every beat.
                if not self._utime_failed:
                    self._utime_failed = True
                    log.warning("%s: the heartbeat cannot touch the lock (%s)", self.path, exc.strerror or exc)

    def check(self) -> bool:
        """Whether this job has lost the lock: read the file now and compare it byte for byte with
        the record this job wrote. Once lost, stays lost (:attr:`lost_why` says to whom); a lock never
        held is not lost. Called by the heartbeat, and by rank 0 before each checkpoint."""
        if self.lost or not self.held:
            return self.lost
        try:
            found = self._read()
        except (RunLockedError, OSError) as exc:
            # No verdict from a read that failed (an NFS hiccup must not stop a healthy job): the next
            # beat reads again. Said once.
            if not self._read_failed:
                self._read_failed = True
                log.warning("%s: cannot read the lock to check it is still this job's (%s)", self.path, exc)
            return False
        if found is not None and found[0] == self._raw:
            return False
        why = f"{self.path} was removed while this job held it"
        if found is not None:
            holder = parse_record(found[0])
            who = holder.job() if holder is not None else "an unreadable record"
            why = f"{self.path} was taken over by {who} (since {holder.since() if holder else 'an unknown time'})"
        self.lost_why = why
        self.lost = True  # last: a reader that sees lost also sees lost_why
        log.debug("%s", why)
        return True

    def release(self) -> None:
        """Stop beating and remove the lock file if it is still this process's; a lost lock (another
        job's now) is not even read again."""
        if self._beat is not None:
            self._stop_beat.set()
            self._beat.join()
            self._beat = None
        if self.held and not self.lost:
            with contextlib.suppress(RunLockedError):
                found = self._read()
                if found is not None and found[0] == self._raw:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
            self.held = False


def _who(holder: Holder | None) -> str:
    return holder.name() if holder else "an unreadable record"


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
