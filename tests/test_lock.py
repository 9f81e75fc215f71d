"""The run lock and the stop request, with real files, processes and signals.

- a lock whose holder is gone on another host is taken over once it stops beating, a beating one is
  refused; a record of an earlier run of the same SLURM job is stale at once;
- take-over is atomic: many processes taking over one stale lock at once, exactly one holds it;
- a holder whose lock another job took over notices (heartbeat, or a read before a checkpoint),
  names the new holder and leaves its lock alone on release;
- a record that is valid JSON with a non-numeric PID, or any mutation of a record (hypothesis), is a
  decision, never a traceback; a FIFO named run.lock is refused without blocking;
- a process blocked where no step boundary comes ends on a second signal, or by the watchdog.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aim_ds.train.lock import LOCK_FILE, Holder, RunLock, RunLockedError, RunLockLostError, judge, parse_record

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return dict(env, PYTHONPATH=str(ROOT))


def _foreign(run: Path, *, age_s: float = 0.0, **extra: object) -> bytes:
    """A lock as a job on another host writes it, last touched ``age_s`` ago."""
    run.mkdir(parents=True, exist_ok=True)
    raw = json.dumps({"host": "other-node", "pid": 4242, "start_time": time.time() - age_s, **extra}).encode()
    (run / LOCK_FILE).write_bytes(raw)
    past = time.time() - age_s
    os.utime(run / LOCK_FILE, (past, past))
    return raw


def test_other_host_dead_heartbeat_is_taken_over_at_once(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _foreign(tmp_path, age_s=100)
    with caplog.at_level("INFO"), RunLock(tmp_path, stale_after_s=30) as lock:
        assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    # Decided on the heartbeat already missed, not by watching for another 30 s.
    assert "not touched for 100 s" in caplog.text and "deciding by its heartbeat" not in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_other_host_lock_that_stops_beating_is_taken_over(tmp_path: Path, monkeypatch) -> None:
    """A lock touched just now on another host (the job was SIGKILLed a moment ago): watched, no
    beat comes, taken over after stale_after_s."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _foreign(tmp_path)
    with RunLock(tmp_path, stale_after_s=1.0) as lock:
        assert lock.held


def _on_other_host(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` run in a UTS namespace named other-node when this process may make one (root and
    util-linux's unshare): a real process whose host name is another. Otherwise ``argv`` as is."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        return ["unshare", "--uts", "--", "bash", "-c", 'hostname other-node && exec "$@"', "bash", *argv], True
    return argv, False


def test_live_holder_beats_and_is_refused(tmp_path: Path, monkeypatch, caplog) -> None:
    """A real holder process with a heartbeat every 0.25 s on another host (in a UTS namespace of
    its own when possible, else pretending through its record): refused within about one beat,
    naming it; SIGKILLed, its lock is taken over once no beat has come for stale_after_s."""
    code = (
        "import socket, sys, time\n"
        "if sys.argv[2] == 'pretend': socket.gethostname = lambda: 'other-node'\n"
        "from aim_ds.train.lock import RunLock\n"
        "lock = RunLock(sys.argv[1], stale_after_s=1.0); lock.acquire(); print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    argv, real = _on_other_host([sys.executable, "-c", code, str(tmp_path)])
    holder = subprocess.Popen([*argv, "real" if real else "pretend"], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "other-node" != socket.gethostname()
        with pytest.raises(RunLockedError, match=f"PID {holder.pid} on host other-node.*heartbeat is beating"):
            RunLock(tmp_path, stale_after_s=1.0).acquire()
    finally:
        holder.kill()
        holder.wait()
    # SIGKILLed: no beat any more, taken over by its heartbeat alone (no SLURM job to ask).
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with caplog.at_level("INFO"), RunLock(tmp_path, stale_after_s=1.0) as lock:
        assert lock.held
    assert f"stale lock {tmp_path / LOCK_FILE} of PID {holder.pid} on host other-node" in caplog.text
    assert "(no heartbeat for" in caplog.text or "(not touched for" in caplog.text


def test_earlier_run_of_the_same_slurm_job_is_stale_at_once(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _foreign(tmp_path, slurm_job="777", slurm_restart=0)  # touched just now: only the job id can tell
    with caplog.at_level("INFO"), RunLock(tmp_path, stale_after_s=60) as lock:
        assert lock.held
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (record["slurm_job"], record["slurm_restart"]) == ("777", 1)
    assert "an earlier run of this SLURM job 777" in caplog.text


@pytest.mark.parametrize(
    ("state", "age_s", "verdict"),
    [
        ("CANCELLED", 0.0, "stale"),  # ended: at once, no heartbeat to wait for
        ("GONE", 0.0, "stale"),
        ("RUNNING", 0.0, "watch"),  # running: its heartbeat decides
        ("RUNNING", 1e4, "stale"),
        ("SUSPENDED", 1e4, "live"),  # stopped by SLURM, heartbeat included: it comes back
        (None, 1e4, "stale"),  # SLURM cannot be asked: the heartbeat alone
    ],
)
def test_holder_on_another_host_by_its_slurm_job_state(state: str | None, age_s: float, verdict: str) -> None:
    holder = Holder(host="other-node", pid=4242, slurm_job="41", slurm_restart=0)
    got, why = judge(
        holder, age_s, host=socket.gethostname(), slurm_job="42", slurm_restart=0, stale_after_s=60,
        job_state=lambda job: state if job == "41" else None,
    )  # fmt: skip
    assert got == verdict, why


def test_non_numeric_pid_is_a_decision(tmp_path: Path, monkeypatch) -> None:
    """Valid JSON, PID "abc", this host: no PID to check, so the heartbeat decides (old: taken over)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": "abc", "start_time": "x"}))
    past = time.time() - 100
    os.utime(tmp_path / LOCK_FILE, (past, past))
    with RunLock(tmp_path, stale_after_s=10) as lock:
        assert lock.held


def test_fifo_named_run_lock_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / LOCK_FILE)
    with pytest.raises(RunLockedError, match="not a regular file"):
        RunLock(tmp_path).acquire()


_RACER = """
import os, sys, time
from aim_ds.train.lock import RunLock, RunLockedError
run, go = sys.argv[1], sys.argv[2]
lock = RunLock(run, stale_after_s=30)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
try:
    lock.acquire()
except RunLockedError:
    print("refused", flush=True)
    sys.exit(0)
print("held", flush=True)
time.sleep(3)  # hold it while the others decide
"""


def test_take_over_is_atomic(tmp_path: Path, monkeypatch) -> None:
    """Four processes take over one stale lock at the same instant: exactly one holds it, the
    others are refused naming a live holder (the old protocol let a late unlink remove a fresh lock)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    _foreign(run, age_s=1000)
    go = tmp_path / "go"
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(run), str(go)], env=_env(), stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    for racer in racers:
        assert racer.stdout.readline().strip() == b"ready"
    go.touch()
    outcomes = [r.communicate(timeout=120)[0].decode().strip() for r in racers]
    assert sorted(outcomes) == ["held"] + ["refused"] * 3, outcomes


_TAKER = """
import os, sys
from pathlib import Path
from aim_ds.train.lock import LOCK_FILE, RunLock
# What acquire() does once it judged the lock stale: set the judged record aside, link its own.
taker = RunLock(sys.argv[1])
taker._take_over((Path(sys.argv[1]) / LOCK_FILE).read_bytes())
assert taker._create()
print(os.getpid(), flush=True)
"""


def _take_over_from_another_process(run: Path) -> tuple[int, bytes]:
    """Another job (a real process, SLURM job 777) takes the lock of ``run`` over the way acquire()
    does after judging it stale. Returns its PID and the record it left."""
    env = dict(_env(), SLURM_JOB_ID="777", SLURM_RESTART_COUNT="0")
    out = subprocess.run([sys.executable, "-c", _TAKER, str(run)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout), (run / LOCK_FILE).read_bytes()


def test_heartbeat_notices_a_take_over_and_leaves_the_new_lock_alone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = RunLock(tmp_path, stale_after_s=0.4)  # a beat every 0.1 s
    lock.acquire()
    try:
        pid, theirs = _take_over_from_another_process(tmp_path)
        deadline = time.monotonic() + 10
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.lost, "the heartbeat did not notice the take-over"
        assert f"taken over by PID {pid} on host {socket.gethostname()} (SLURM job 777, restart 0)" in lock.lost_why
        time.sleep(0.3)  # three more beat intervals: a beating loser would touch the new lock
        mtime = (tmp_path / LOCK_FILE).stat().st_mtime_ns
        time.sleep(0.3)
        assert (tmp_path / LOCK_FILE).stat().st_mtime_ns == mtime
    finally:
        lock.release()
    assert (tmp_path / LOCK_FILE).read_bytes() == theirs  # the new holder's lock, untouched
    error = RunLockLostError(12, lock.lost_why)
    assert str(error).endswith("stopping at optimizer step 12 without a checkpoint") and f"PID {pid}" in str(error)


def test_check_reads_the_lock_now(tmp_path: Path, monkeypatch) -> None:
    """Before a checkpoint the loop does not wait for the next beat: check() reads the file."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with RunLock(tmp_path, stale_after_s=600) as lock:  # no beat during the test
        assert not lock.check()
        pid, theirs = _take_over_from_another_process(tmp_path)
        assert lock.check() and f"PID {pid}" in lock.lost_why
    assert (tmp_path / LOCK_FILE).read_bytes() == theirs
    with RunLock(tmp_path / "gone", stale_after_s=600) as lock:
        (tmp_path / "gone" / LOCK_FILE).unlink()
        assert lock.check() and "was removed while this job held it" in lock.lost_why


def test_a_lock_that_cannot_be_read_for_a_moment_is_not_lost(tmp_path: Path, caplog) -> None:
    """A failed read is no verdict (an NFS hiccup must not stop a healthy job): here the lock is
    briefly not a regular file, then back."""
    with caplog.at_level("WARNING"), RunLock(tmp_path, stale_after_s=600) as lock:
        path = tmp_path / LOCK_FILE
        os.rename(path, tmp_path / "aside")
        os.mkfifo(path)
        assert not lock.check() and not lock.check()
        assert caplog.text.count("cannot read the lock to check") == 1
        path.unlink()
        os.rename(tmp_path / "aside", path)
        assert not lock.check() and not lock.lost
    assert not path.exists()  # still this job's: released


# ----------------------------------------------------------------------------- fuzzing the record

_VALID = {
    "host": "node7",
    "pid": 4242,
    "start_time": 1.7e9,
    "proc_start": "12345",
    "slurm_job": "99",
    "slurm_restart": 0,
    "nonce": "ab",
}
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@st.composite
def _mutated_records(draw: st.DrawFn) -> bytes:
    record = dict(_VALID)
    for key in draw(st.lists(st.sampled_from(sorted(_VALID)), max_size=len(_VALID))):
        if draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = draw(_values)
    raw = json.dumps(record).encode()
    how = draw(st.sampled_from(["json", "truncate", "flip", "junk"]))
    if how == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif how == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
    elif how == "junk":
        raw = draw(st.binary(max_size=200))
    return raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_mutated_records(), age=st.floats(0, 1e6), here=st.booleans())
def test_any_record_gives_a_decision(raw: bytes, age: float, here: bool) -> None:
    """Parse and judge any mutation of a record: a Holder (or None) and one of three verdicts,
    never an exception; a holder on this host with an unusable PID is never judged live."""
    holder = parse_record(raw)
    assert holder is None or isinstance(holder, Holder)
    if holder is not None and here:
        holder = Holder(host=socket.gethostname(), pid=holder.pid, slurm_job=holder.slurm_job)
    verdict, why = judge(
        holder,
        age,
        host=socket.gethostname(),
        slurm_job="5",
        slurm_restart=0,
        stale_after_s=60,
        job_state=lambda j: None,
    )
    assert verdict in ("live", "stale", "watch") and why
    if holder is not None and holder.pid is None and verdict == "live":
        pytest.fail("a holder without a usable PID was judged live")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_mutated_records())
def test_any_lock_file_is_taken_or_refused_cleanly(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The whole acquire path on a real file holding the mutation (an old one: no heartbeat)."""
    run = tmp_path_factory.mktemp("fuzz")
    (run / LOCK_FILE).write_bytes(raw)
    past = time.time() - 1000
    os.utime(run / LOCK_FILE, (past, past))
    try:
        with RunLock(run, stale_after_s=0.2) as lock:
            assert lock.held
    except RunLockedError as exc:
        assert str(run) in str(exc)


# ----------------------------------------------------------------------------- a blocked process

_BLOCKED = """
import os, sys, time
from aim_ds.train.stopping import StopRequest
stop = StopRequest(None, repeat_after_s=float(sys.argv[2]), timeout_s=float(sys.argv[3]))
stop.install()
print("blocked", flush=True)
with open(sys.argv[1], "rb") as f:  # a FIFO nobody writes: blocked in open(2), as on a stuck mount
    f.read()
print("unblocked", flush=True)
"""


def _blocked(tmp_path: Path, repeat_after_s: float, timeout_s: float) -> subprocess.Popen:
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED, str(fifo), str(repeat_after_s), str(timeout_s)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "blocked"
    time.sleep(0.3)  # inside open(2)
    return proc


def test_blocked_process_ends_on_a_second_signal(tmp_path: Path) -> None:
    proc = _blocked(tmp_path, repeat_after_s=0.5, timeout_s=0)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # a launcher forwarding the same request: counts as one
        time.sleep(1.0)
        assert proc.poll() is None, "the first request (twice within the grace) must only set the flag"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()  # only SIGKILL ends it when the watcher is broken
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "second signal SIGTERM" in err and "unblocked" not in out


def test_blocked_process_ends_by_the_watchdog(tmp_path: Path) -> None:
    proc = _blocked(tmp_path, repeat_after_s=1000, timeout_s=1.0)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "no stop within stop.timeout_s=1 s after signal SIGINT" in err and "unblocked" not in out
