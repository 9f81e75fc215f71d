"""Trust without DeepSpeed ranks: a bad config fails before anything is built (exit 2, one message
naming the key), damaged weights fail with one line naming the file, a crafted ZeRO shard never runs
its code, the run-folder lock, checkpoint manifest and swap, probe metrics history."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from data_fixtures import make_imagefolder

from aim_ds.data.writers import WriteOptions, convert_imagefolder
from aim_ds.train.lock import LOCK_FILE, RunLock, RunLockedError
from aim_ds.weights import checkpoint as ckpt
from aim_ds.weights.load import WeightsError, load_trunk_weights
from aim_ds.weights.zero_shards import ShardError, consolidate_fp32, load_shard

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "run" / "configs"
DS_ZERO3 = ROOT / "ds_configs" / "zero3.json"


def _driver():
    spec = importlib.util.spec_from_file_location("pretrain_driver", ROOT / "run" / "pretrain.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    return driver


@pytest.fixture(scope="module")
def beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) beton of photo JPEGs, written by the project's writer."""
    root = tmp_path_factory.mktemp("beton")
    folder = make_imagefolder(root / "images", {"a": 3, "b": 3}, size=(48, 40))
    out = root / "train.beton"
    convert_imagefolder(folder, out, WriteOptions(workers=1), progress=False)
    return out


def _args(beton: Path, out_dir: Path, *overrides: str) -> list[str]:
    return [
        "--deepspeed", str(DS_ZERO3), "--config", str(CONFIGS / "aim-test.yaml"),
        f"data.sources=[{{path: {beton}, prob: 1.0}}]", f"data.val_path={beton}", f"out_dir={out_dir}", *overrides,
    ]  # fmt: skip


BAD_CONFIGS = [
    (["data.sources=[{path: /nonexistent/x.beton, prob: 1.0}]"], "data.sources[0].path='/nonexistent/x.beton'"),
    (["data.val_path=/nonexistent/val.beton"], "data.val_path='/nonexistent/val.beton'"),
    (["data.scale=[1.0,0.4]"], "data.scale=[1.0, 0.4]"),
    (["data.sources=[{path: BETON, prob: 0}]"], "data.sources[0].prob=0.0"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["optim.peak_lr=nan"], "optim.peak_lr=nan"),
    (["optim.peak_lr=-0.001"], "optim.peak_lr=-0.001"),
    (["train.micro_batch_size=-2"], "train.micro_batch_size=-2"),
    (["out_dir=/proc/aim_ds_cannot_write_here"], "out_dir='/proc/aim_ds_cannot_write_here'"),
]


@pytest.mark.parametrize(("overrides", "named"), BAD_CONFIGS, ids=[n.split("=")[0] for _, n in BAD_CONFIGS])
def test_bad_config_fails_before_anything_is_built(
    beton: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, overrides: list[str], named: str
) -> None:
    overrides = [o.replace("BETON", str(beton)) for o in overrides]
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        code = _driver().main(_args(beton, out, *overrides))
    assert code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and named in errors[0].getMessage(), caplog.text
    assert not torch.distributed.is_initialized()  # no process group, hence no engine
    assert not (out / "config.yaml").exists() and not (out / LOCK_FILE).exists()


def test_plain_process_bad_resume_keeps_config_yaml(beton: Path, tmp_path: Path) -> None:
    """The real driver as a plain process, with a valid config, on a run folder whose only complete
    checkpoint is damaged: it gets as far as the engine and the resume, exits 2 with one message
    naming the file, and leaves the run's config.yaml (and the checkpoint) untouched."""
    out = tmp_path / "run"
    tag = out / "checkpoints" / ckpt.tag_for_step(2)
    tag.mkdir(parents=True)
    ckpt.write_manifest(out)
    (out / "config.yaml").write_text("# the run's own config\n")
    shard = tag / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"PK\x03\x04 not a checkpoint, cut short")
    ckpt.mark_complete(tag, {"step": 2, "world_size": 1})  # this world size: no universal conversion
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    command = [
        sys.executable,
        str(ROOT / "run" / "pretrain.py"),
        *_args(beton, out, "train.batch_size=2", "train.micro_batch_size=2"),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "parameters; world 1" in proc.stderr, proc.stderr[-3000:]  # the engine was built: the resume ran
    lines = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(lines) == 1 and "cannot resume" in lines[0] and "no complete checkpoint loads" in lines[0], proc.stderr
    assert f"{tag.name}: {shard}: damaged" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_stale_extension_build_lock_is_named_not_waited_on(beton: Path, tmp_path: Path) -> None:
    """A killed JIT build leaves ``<op>/lock`` behind, on which torch.utils.cpp_extension waits
    forever. The real driver (plain process) exits 2 naming the file; a young lock (a build running
    now) is only reported."""
    from aim_ds.config import ConfigError
    from aim_ds.distributed import check_build_locks

    root = tmp_path / "torch_extensions"
    (root / "cpu_adam").mkdir(parents=True)
    lock = root / "cpu_adam" / "lock"
    lock.write_text("")
    assert check_build_locks(str(root)) == [str(lock)]  # young: another build may be running
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    with pytest.raises(ConfigError, match="stale extension build lock .*cpu_adam/lock"):
        check_build_locks(str(root))
    out = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), TORCH_EXTENSIONS_DIR=str(root))
    command = [sys.executable, str(ROOT / "run" / "pretrain.py"), *_args(beton, out)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"stale extension build lock {lock}" in proc.stderr and "Traceback" not in proc.stderr
    assert lock.exists()  # named, never removed behind the user's back
    lock.unlink()
    assert check_build_locks(str(root)) == []


def test_foreign_run_folder_is_refused(beton: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "foreign"
    (out / "checkpoints" / "step_0000010").mkdir(parents=True)
    assert _driver().main(_args(beton, out)) == 2
    assert "aim_ds_run.json" in caplog.text and "did not write" in caplog.text


# ----------------------------------------------------------------------------- damaged weights


def _damaged_files(root: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    good = root / "good.safetensors"
    save_file({"trunk.blocks.0.mlp.fc1.weight": torch.randn(256, 64)}, str(good))
    data = good.read_bytes()
    files = {
        "truncated": root / "truncated.safetensors",
        "random": root / "random.safetensors",
        "random_pth": root / "random.pth",
        "text_bin": root / "notes.bin",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"].write_bytes(os.urandom(4096))
    files["random_pth"].write_bytes(os.urandom(4096))
    files["text_bin"].write_text("these are not weights\n")
    return files


def test_damaged_weights_name_the_file(tmp_path: Path) -> None:
    for kind, path in _damaged_files(tmp_path).items():
        with pytest.raises(WeightsError) as info:
            load_trunk_weights(path)
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message, (kind, message)
        assert "damaged or not" in message, (kind, message)
    # A probe head given with --head goes through the same readers.
    from aim_ds.probe.heads import load_head

    heads = _damaged_files(tmp_path / "heads")
    for path in (heads["truncated"], heads["text_bin"]):
        with pytest.raises(WeightsError, match=f"^{path}: damaged or not"):
            load_head(path, num_heads=4)


def test_probe_driver_exits_2_on_damaged_weights(tmp_path: Path) -> None:
    """run/probe.py: one stderr line naming the file, exit 2, no traceback."""
    files = _damaged_files(tmp_path)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    for path in (files["truncated"], files["text_bin"]):
        command = [
            sys.executable, str(ROOT / "run" / "probe.py"), "--config", str(CONFIGS / "probe_aim-test.yaml"),
            "--weights", str(path), f"out_dir={tmp_path / 'probe'}",
        ]  # fmt: skip
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(path) in errors[0], proc.stderr[-3000:]


# ----------------------------------------------------------------------------- crafted shards


class _WritesAFile:
    """Unpickling this runs ``open(path, "w")``: what a hostile checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_shard_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    tag = tmp_path / "run" / "checkpoints" / "step_0000002"
    tag.mkdir(parents=True)
    state = {"module": {}, "buffer_names": [], "param_shapes": [], "payload": _WritesAFile(marker)}
    torch.save(state, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ShardError, match="refused: the pickle asks for .*open"):
        load_shard(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(ShardError):
        consolidate_fp32(tag.parent, tag.name)
    with pytest.raises(WeightsError) as info:
        load_trunk_weights(tmp_path / "run")
    assert str(tmp_path / "run") in str(info.value)
    assert "open" in (ckpt.verify_tag(tag) or "")
    assert not marker.exists()


# ----------------------------------------------------------------------------- lock, manifest, swap


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.mkdir()
        record = {"host": socket.gethostname(), "pid": holder.pid, "start_time": 0.0, "proc_start": None}
        (run / LOCK_FILE).write_text(json.dumps(record))
        with pytest.raises(RunLockedError, match=f"PID {holder.pid} on host {socket.gethostname()}"):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now (same host): its lock is stale and is taken over, with a warning.
    with caplog.at_level(logging.WARNING), RunLock(run) as lock:
        assert lock.held and json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in caplog.text and not (run / LOCK_FILE).exists()
    # A lock from another host is judged by its heartbeat (tests/test_lock.py): a beating one is refused.
    (run / LOCK_FILE).write_text(json.dumps({"host": "other-node", "pid": 1, "start_time": 0.0}))
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(0.05):
            os.utime(run / LOCK_FILE)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        with pytest.raises(RunLockedError, match="PID 1 on host other-node"):
            RunLock(run, stale_after_s=5).acquire()
    finally:
        beating.set()
        beater.join()


_WRITE_RUN_FILES = """
import json, stat, sys
from pathlib import Path
from aim_ds.weights import checkpoint as ckpt
from aim_ds.config import save_config
from aim_ds.train.config import PretrainConfig
from aim_ds.train.lock import RunLock
run = Path(sys.argv[1])
with RunLock(run):
    ckpt.write_manifest(run)
    save_config(PretrainConfig(), run / "config.yaml")
    print(json.dumps({p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()}))
"""


@pytest.mark.parametrize("umask", [0o027, 0o077], ids=["027", "077"])
def test_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """Every writer goes through aim_ds.io: the lock, the manifest, configs get 0666 & ~umask, for
    the umask the process was started with (set here, not read from the code)."""
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _WRITE_RUN_FILES, str(run)], env=env, capture_output=True, text=True, timeout=120,
        umask=umask,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = 0o666 & ~umask
    assert expected == {0o027: 0o640, 0o077: 0o600}[umask]
    modes = json.loads(proc.stdout)  # read while the lock was held
    assert modes == {LOCK_FILE: expected, ckpt.MANIFEST: expected, "config.yaml": expected}


def test_probe_metrics_keep_their_history(tmp_path: Path) -> None:
    from aim_ds.probe.loop import _MetricsLog

    path = tmp_path / "probe_metrics.jsonl"
    for run in range(2):
        log = _MetricsLog(path)
        log.write({"kind": "train", "step": 1, "run_index": run})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["run_start", "train", "run_start", "train"]
    assert [r["run"] for r in records if r["kind"] == "run_start"] == [0, 1]


_CHILD = """
import sys, time
from pathlib import Path
from aim_ds.train.lock import LauncherWatch
watch = LauncherWatch(interval_s=0.05)
print("watching" if watch.watching else "not watching", watch.gone(), flush=True)
deadline = time.monotonic() + 60
while watch.watching and watch.gone() is None and time.monotonic() < deadline:
    time.sleep(0.05)
Path(sys.argv[1]).write_text(str(watch.gone()))
"""

_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline(), end="", flush=True)  # the child watches; now this launcher goes
print(os.getpid(), flush=True)
"""


def test_ranks_notice_their_launcher_is_gone(tmp_path: Path) -> None:
    """A real process tree: a launcher (torchrun's module name in its command line) starts a rank,
    then exits; the rank sees it gone. Under a plain parent nothing is watched."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = tmp_path / "rank.txt"
    launcher = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, _CHILD, str(result), "torch.distributed.run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    first, launcher_pid = launcher.stdout.split("\n")[:2]
    assert first == "watching None", launcher.stdout + launcher.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not result.exists():
        time.sleep(0.1)
    assert result.read_text() == f"launcher PID {launcher_pid} is gone"
    plain = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "plain.txt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plain.stdout.strip() == "not watching None", plain.stdout + plain.stderr
    assert (tmp_path / "plain.txt").read_text() == "None"


def test_complete_folder_moved_aside_by_a_killed_swap_is_restored(tmp_path: Path) -> None:
    """The folder state a kill inside aim_ds.io.replace_dir leaves (the old complete step_4 moved to
    step_4.old, the new complete one still step_4.partial): step 4 is invisible to the resume until
    restore_interrupted_swaps puts it back; the next save's prune removes the leftover. (The real
    kill, with DeepSpeed ranks: tests/test_promises.py.)"""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / ckpt.tag_for_step(step)).mkdir(parents=True)
        ckpt.mark_complete(root / ckpt.tag_for_step(step), {"step": step})
    os.replace(root / "step_0000004", root / "step_0000004.old")
    (root / "step_0000004.partial").mkdir()
    ckpt.mark_complete(root / "step_0000004.partial", {"step": 4})
    assert [s for s, _ in ckpt.list_complete(root)] == [2]
    assert ckpt.restore_interrupted_swaps(root) == [root / "step_0000004"]
    assert [s for s, _ in ckpt.list_complete(root)] == [2, 4]
    assert ckpt.restore_interrupted_swaps(root) == []  # nothing left to restore
    ckpt.prune(root, 3)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000004"]
    # A finished swap whose .old removal was cut short: the new folder stays, nothing is restored.
    (root / "step_0000004.old").mkdir()
    ckpt.mark_complete(root / "step_0000004.old", {"step": 4})
    assert ckpt.restore_interrupted_swaps(root) == [] and ckpt.is_complete(root / "step_0000004")
