"""scripts/slurm/pretrain.sbatch under a real SLURM (slurm-wlm + munge, brought up by
scripts/slurm/testcluster.sh in a private folder; KillWait 10 s), 2 CPU ranks of real DeepSpeed on
real images. Each job must come back by itself and end COMPLETED, with every step's loss equal to
the uninterrupted job's:

- straight: no interruption, STEPS steps (the reference of every other job);
- preempted: ``scontrol requeue`` mid-run (SLURM's SIGTERM; the ranks checkpoint and stop, SLURM
  requeues, the job resumes from the newest checkpoint); it ends at ``train.stop_after_steps``
  (losses compared up to there: the schedule is the full run's, so the prefix is the reference's);
- time limit: ``--time=2 --signal=B:USR1@50``: the batch shell is warned (SLURM sends it 50-110 s
  before the end: seen 36-66 s after the start), writes the stop file, the ranks checkpoint and exit
  75, the script requeues itself, as often as it takes; only the stop checkpoints carry the progress
  (no periodic checkpoints). The first allocation's ranks are frozen (SIGSTOP, as a stalled node or
  file system would hold them) from step 8 until the warning, so the run outlasts that allocation
  however fast the machine trains (STEPS take ~40 s on a quiet 2-core machine: less than the warning);
- hard kill on another host: the first job's ranks run in a UTS namespace of their own named
  OTHER_HOST (``unshare --uts``), so its lock is written by a real process of another host name; a
  second job is refused while it runs (its SLURM job is RUNNING and its heartbeat beats), then rank
  0 is SIGKILLed and the whole job ``scancel -s KILL``-ed; a new job takes the lock over from the
  job's SLURM state (CANCELLED), at once rather than after lock.stale_after_s, and finishes.

Needs root (the daemons, unshare) and apt or an installed slurm-wlm; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from aim_ds.metrics import read_metrics
from aim_ds.train.lock import LOCK_FILE

pytestmark = [pytest.mark.deepspeed, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts/slurm/pretrain.sbatch"
CLUSTER = ROOT / "scripts/slurm/testcluster.sh"
STEPS = 200
TIME_LIMIT = ("--time=2", "--signal=B:USR1@50")
PREEMPTED_STEPS = 30  # the preempted and killed jobs end at train.stop_after_steps
KILLED_STEPS = 80
STALE_AFTER_S = 5
JOB_TIMEOUT_S = 900
OTHER_HOST = "aimds-other-node"


def _can_run() -> str | None:
    if os.geteuid() != 0:
        return "a real SLURM test cluster needs root"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "no slurm-wlm and no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp folder: it is 0700 and munged runs as the munge user.
    folder = Path(tempfile.mkdtemp(prefix="aim_ds_slurm_"))
    up = subprocess.run(
        ["bash", str(CLUSTER), "up", str(folder)], capture_output=True, text=True, timeout=900, check=False
    )
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(
            SLURM_CONF=str(folder / "slurm.conf"),
            PROCS_PER_NODE="2",
            DS_ACCELERATOR="cpu",
            AIM_DS_ROOT=str(ROOT),
            PYTHON=sys.executable,
            PYTHONPATH=str(ROOT),
        )
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(folder)], capture_output=True, timeout=120, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def run_config(betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurm_cfg")
    cfg = yaml.safe_load((ROOT / "run/configs/aim-test.yaml").read_text())
    cfg["data"].update(sources=[{"path": str(betons["train"]), "prob": 1.0}], val_path="")
    cfg["train"].update(batch_size=32, micro_batch_size=8, steps=STEPS)  # accumulation 2
    cfg["val"] = {"every_steps": 0}
    cfg["log"] = {"every_steps": 1}
    cfg["checkpoint"] = {"every_steps": 0, "keep_last": 2}  # only stop checkpoints carry progress
    cfg["export"] = {"enabled": False}
    cfg["lock"] = {"stale_after_s": STALE_AFTER_S}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root / "run.yaml"


def _submit(
    env: dict[str, str],
    config: Path,
    out: Path,
    *sbatch_args: str,
    overrides: tuple[str, ...] = (),
    log: Path | None = None,
) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            "sbatch", "--parsable", f"--output={log or f'{out}.slurm.log'}", *sbatch_args, str(SBATCH),
            "--config", str(config), "--deepspeed", str(ROOT / "ds_configs/zero3_fp32.json"), f"out_dir={out}",
            *overrides,
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def _wait(env: dict[str, str], job: str, until, what: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = _job(env, job)
        if until(info):
            return info
        time.sleep(1)
    pytest.fail(f"job {job}: {what} did not happen within {timeout_s} s: {_job(env, job)}")


def _done(info: dict[str, str]) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _losses(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in read_metrics(path, "train")} if path.exists() else {}


def _log(out: Path) -> str:
    return Path(f"{out}.slurm.log").read_text(errors="replace")


def _wait_step(env: dict[str, str], job: str, out: Path, step: int) -> int:
    def reached(info: dict[str, str]) -> bool:
        assert not _done(info), _log(out)[-4000:]
        return max(_losses(out), default=0) >= step

    _wait(env, job, reached, f"step {step}")
    return max(_losses(out))


@pytest.fixture(scope="module")
def straight(cluster: dict[str, str], run_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("slurm_runs") / "straight"
    job = _submit(cluster, run_config, out)
    info = _wait(cluster, job, _done, "the end")
    return {"out": out, "info": info, "losses": _losses(out)}


def test_uninterrupted_job_completes(straight: dict) -> None:
    assert straight["info"]["JobState"] == "COMPLETED", _log(straight["out"])[-4000:]
    assert straight["info"]["ExitCode"] == "0:0" and straight["info"]["Restarts"] == "0"
    assert sorted(straight["losses"]) == list(range(1, STEPS + 1))
    assert "pretrain.sbatch: " in _log(straight["out"]) and "the run finished" in _log(straight["out"])


def _assert_same_losses(out: Path, reference: dict[int, float], last_step: int = STEPS) -> None:
    losses = _losses(out)
    reference = {step: loss for step, loss in reference.items() if step <= last_step}
    assert sorted(losses) == sorted(reference), _log(out)[-4000:]
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"


def test_preempted_job_comes_back_and_matches(cluster: dict[str, str], run_config: Path, straight: dict) -> None:
    out = straight["out"].parent / "preempted"
    job = _submit(cluster, run_config, out, overrides=(f"train.stop_after_steps={PREEMPTED_STEPS}",))
    at = _wait_step(cluster, job, out, 8)
    signalled = time.time()
    requeue = subprocess.run(["scontrol", "requeue", job], env=cluster, capture_output=True, text=True, check=False)
    assert requeue.returncode == 0, requeue.stderr
    info = _wait(cluster, job, _done, "the end")
    log = _log(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert int(info["Restarts"]) >= 1
    stopped = re.findall(r"stopped at step (\d+) \(signal SIGTERM\)", log)
    assert stopped and int(stopped[0]) >= at, log[-4000:]  # the stop checkpoint was written before SIGKILL
    assert f"resumed from step_{int(stopped[0]):07d}" in log
    _assert_same_losses(out, straight["losses"], PREEMPTED_STEPS)
    _record(out, "preempted", signalled)


def test_time_limit_requeues_itself_and_matches(cluster: dict[str, str], run_config: Path, straight: dict) -> None:
    out = straight["out"].parent / "time_limit"
    job = _submit(cluster, run_config, out, *TIME_LIMIT)
    _wait_step(cluster, job, out, 8)
    ranks = _rank_pids(out)
    assert len(ranks) == 2, ranks
    try:  # frozen until SLURM's warning reaches the batch shell: this allocation cannot hold the run
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        _wait(cluster, job, lambda info: "time limit near (SIGUSR1)" in _log(out), "the warning")
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    # Then as many allocations as the rest takes (start-up ~15-25 s of each ~40-70 s before the warning).
    info = _wait(cluster, job, _done, "the end", timeout_s=2 * JOB_TIMEOUT_S)
    log = _log(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    restarts = int(info["Restarts"])
    assert restarts >= 1, log[-4000:]
    # Every allocation but the last was ended by its time limit's warning, none by the limit itself.
    assert log.count("time limit near (SIGUSR1)") >= restarts, log[-4000:]
    assert log.count("stopped with a checkpoint; requeueing job") == restarts, log[-4000:]
    assert "DUE TO TIME LIMIT" not in log, log[-4000:]
    # Rank 0 names the stop file, or the other rank's request when that rank saw the file first.
    stops = [int(s) for s in re.findall(r"stopped at step (\d+) \((?:stop file|another rank)", log)]
    assert len(stops) == restarts and stops == sorted(stops) and stops[0] < STEPS, log[-4000:]
    resumed = [int(s) for s in re.findall(r"resumed from step_(\d+) at step", log)]
    # Each allocation went on from the previous one's stop checkpoint (checkpoint.every_steps=0: the only ones).
    assert resumed == stops, log[-4000:]
    _assert_same_losses(out, straight["losses"])
    assert not (out / "stop.request").exists()  # a warning during the last steps is not left for a later run
    _record(out, "time_limit", None)


def _rank_pids(out: Path) -> list[int]:
    """The PIDs of the training ranks (``run/pretrain.py --local_rank=N ... out_dir=OUT``) of a job."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue
        if any(a.endswith("run/pretrain.py") for a in argv) and f"out_dir={out}" in argv:
            if any(a.startswith("--local_rank") for a in argv):
                pids.append(int(proc.name))
    return sorted(pids)


def _other_host_python(folder: Path) -> Path:
    """A PYTHON for pretrain.sbatch that runs in a UTS namespace named OTHER_HOST: the DeepSpeed
    runner, its launcher and the ranks (children inherit the namespace) see that host name."""
    wrapper = folder / "python-on-other-host"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'exec unshare --uts -- bash -c \'hostname "$0" && exec "$@"\' {OTHER_HOST} {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def test_hard_killed_job_on_another_host_is_taken_over(
    cluster: dict[str, str], run_config: Path, straight: dict
) -> None:
    if not shutil.which("unshare"):
        pytest.skip("no unshare (util-linux) to give the first job another host name")
    out = straight["out"].parent / "killed"
    overrides = ("checkpoint.every_steps=4", f"train.stop_after_steps={KILLED_STEPS}")
    elsewhere = dict(cluster, PYTHON=str(_other_host_python(out.parent)))
    job = _submit(elsewhere, run_config, out, overrides=overrides)
    lock = out / LOCK_FILE

    def locked(info: dict[str, str]) -> bool:
        assert not _done(info), _log(out)[-4000:]
        return lock.exists()

    # Asked at once, while the first job starts up: the refused job's own start-up overlaps it.
    _wait(cluster, job, locked, "the lock")
    record = json.loads(lock.read_text())
    assert record["host"] == OTHER_HOST and record["slurm_job"] == job, record  # written over there
    assert OTHER_HOST != socket.gethostname()

    # A live holder is refused (its SLURM job is RUNNING and its heartbeat beats), by every rank.
    refused_log = out.parent / "killed.refused.slurm.log"
    refused = _submit(cluster, run_config, out, overrides=overrides, log=refused_log)
    info = _wait(cluster, refused, _done, "the refusal")
    text = refused_log.read_text(errors="replace")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text[-4000:]
    assert f"is in use by PID {record['pid']} on host {OTHER_HOST}" in text, text[-4000:]
    assert "its heartbeat is beating" in text and "taking over" not in text, text[-4000:]
    assert not _done(_job(cluster, job)), _log(out)[-4000:]
    assert json.loads(lock.read_text()) == record

    # A hard end as a node loss leaves it: rank 0, the lock's holder, SIGKILLed, then the job.
    # (`scancel -s KILL` alone reaches the step's top processes; under proctrack/linuxproc the ranks
    # below the launcher then get SLURM's SIGTERM at clean-up and would stop gracefully.)
    at = _wait_step(cluster, job, out, 6)
    assert at < KILLED_STEPS - 4, "the first job ran too far before the kill"
    os.kill(record["pid"], signal.SIGKILL)  # the same PID namespace: only the UTS one is its own
    subprocess.run(["scancel", "-s", "KILL", job], env=cluster, check=True, timeout=30)
    _wait(cluster, job, _done, "the kill")
    assert lock.exists(), "a SIGKILLed rank 0 leaves its lock"
    assert json.loads(lock.read_text())["host"] == OTHER_HOST

    job2 = _submit(cluster, run_config, out, overrides=overrides)
    info = _wait(cluster, job2, _done, "the end")
    log = _log(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    # Not after lock.stale_after_s of watching: SLURM says the holder's job has ended.
    took = re.findall(r"taking over the stale lock \S+ of PID (\d+) on host (\S+) \((.*)\)", log)
    assert took == [(str(record["pid"]), OTHER_HOST, f"its SLURM job {job} is cancelled")], log[-4000:]
    assert "resumed from step_" in log
    _assert_same_losses(out, straight["losses"], KILLED_STEPS)
    _record(out, "killed", None)


def _record(out: Path, name: str, signalled: float | None) -> None:
    """Timings for BENCHMARKS.md from the job's log (not asserted)."""
    events = re.findall(
        r"^(?:pretrain\.sbatch: (\d\d:\d\d:\d\d\.\d+) (job \d+ restart \d+|time limit near|SIGTERM from SLURM|"
        r"stopped with a checkpoint|the run finished)"
        r"|\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),(\d+) .*?(stopped at step \d+|resumed from \S+|step \d+/|taking over))",
        _log(out),
        re.M,
    )
    stamps = [(a or f"{c}.{d}", b or e) for a, b, c, d, e in events]
    (out.parent / f"{name}.timings.json").write_text(json.dumps({"signalled": signalled, "events": stamps}))
