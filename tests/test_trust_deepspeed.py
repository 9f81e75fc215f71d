"""Trust with real DeepSpeed ranks: the real driver under the ``deepspeed`` launcher, ZeRO-3 on two
CPU ranks (aim-test, tiny beton). Two launches shared by the assertions:

- A: a long run, started with umask 027. While it trains, a second job on the same out_dir fails
  at once naming A's host and PID. Then only the ``deepspeed`` runner gets SIGTERM (it exits at once
  and leaves its launcher and ranks behind): the ranks notice, checkpoint and stop, and release the
  lock.
- B: in a copy of A's folder, the newest checkpoint gets a truncated shard and the one before a
  crafted shard whose unpickling would write a file; resuming skips both (naming the files), continues from the third
  and re-saves the crafted step through the temporary folder.

A's checkpoints also feed the shard reader: our weights-only consolidation equals DeepSpeed's
``zero_to_fp32`` on a real 2-rank ZeRO-3 save, and a crafted copy is refused by ``run/probe.py``
and ``run/pretrain.py --export-only`` without the file ever appearing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_fixtures import make_imagefolder

from aim_ds.data.writers import WriteOptions, convert_imagefolder
from aim_ds.distributed import free_port
from aim_ds.metrics import read_metrics
from aim_ds.train.lock import LOCK_FILE
from aim_ds.weights import checkpoint as ckpt

pytestmark = pytest.mark.deepspeed

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEEPSPEED = shutil.which("deepspeed", path=str(VENV_BIN)) or shutil.which("deepspeed")
TIMEOUT_S = 300
UMASK = 0o027


class _WritesAFile:
    """Unpickling this runs ``open(path, "w")``: what a hostile checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _craft(shard: Path, marker: Path) -> None:
    """Replace ``shard`` by a pickle that keeps its keys but would create ``marker`` when loaded
    with ``weights_only=False``."""
    torch.save({"module": {}, "buffer_names": [], "param_shapes": [], "payload": _WritesAFile(marker)}, shard)


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    folder = make_imagefolder(root / "images", {"a": 24, "b": 24}, size=(48, 40))
    convert_imagefolder(folder, root / "train.beton", WriteOptions(workers=1), progress=False)
    return {"root": root, "beton": root / "train.beton"}


def _args(setup: dict[str, Path], out_dir: Path, *overrides: str) -> list[str]:
    return [
        str(ROOT / "run/pretrain.py"), "--deepspeed", str(ROOT / "ds_configs/zero3.json"),
        "--config", str(ROOT / "run/configs/aim-test.yaml"),
        f"data.sources=[{{path: {setup['beton']}, prob: 1.0}}]", "data.val_path=", "data.num_workers=1",
        "train.batch_size=8", "train.micro_batch_size=4", "train.steps=400", "log.every_steps=1",
        "checkpoint.every_steps=2", "checkpoint.keep_last=3", f"out_dir={out_dir}", *overrides,
    ]  # fmt: skip


def _launcher(setup: dict[str, Path], out_dir: Path, *overrides: str) -> list[str]:
    assert DEEPSPEED, "the deepspeed launcher is not installed next to this Python"
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *_args(setup, out_dir, *overrides)]


def _steps(out_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out_dir / "metrics.jsonl", "train")]


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def orphaned(setup: dict[str, Path]) -> dict[str, object]:
    """Launch A (see the module docstring)."""
    out = setup["root"] / "A"
    log_path = setup["root"] / "A.log"
    with open(log_path, "w") as log_file:
        runner = subprocess.Popen(
            _launcher(setup, out),
            cwd=ROOT,
            env=_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=UMASK,
        )
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline and runner.poll() is None and max(_steps(out), default=0) < 7:
                time.sleep(0.5)
            assert runner.poll() is None, log_path.read_text()[-4000:]
            holder = json.loads((out / LOCK_FILE).read_text())
            second = subprocess.run(
                [sys.executable, *_args(setup, out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
            )
            runner.send_signal(signal.SIGTERM)  # the runner only: its launcher and the ranks go on
            runner.wait(timeout=30)
            signalled_step = max(_steps(out))
            while time.monotonic() < deadline and _session_alive(runner.pid):
                time.sleep(0.5)
            left_behind = _session_alive(runner.pid)
        finally:
            if _session_alive(runner.pid):
                os.killpg(runner.pid, signal.SIGKILL)
    return {
        "out": out,
        "log": log_path.read_text(),
        "holder": holder,
        "second": second,
        "signalled_step": signalled_step,
        "left_behind": left_behind,
    }


def test_second_job_fails_at_once_naming_the_holder(orphaned: dict[str, object]) -> None:
    second, holder = orphaned["second"], orphaned["holder"]
    assert holder["host"] == socket.gethostname()
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"PID {holder['pid']} on host {holder['host']}" in second.stderr
    assert "Traceback" not in second.stderr


def test_ranks_checkpoint_and_stop_when_the_runner_is_gone(orphaned: dict[str, object]) -> None:
    out, log = orphaned["out"], orphaned["log"]
    assert not orphaned["left_behind"], log[-4000:]
    assert "deepspeed runner PID" in log and "is gone" in log, log[-4000:]
    last = max(_steps(out))
    assert last < 400 and last >= orphaned["signalled_step"]
    newest = ckpt.latest_complete(out / "checkpoints")
    assert newest is not None and newest[0] == last, log[-4000:]
    assert not (out / LOCK_FILE).exists()  # released by rank 0 on its way out
    assert not list((out / "checkpoints").glob("*.partial"))


def test_every_file_follows_the_umask(orphaned: dict[str, object]) -> None:
    """One rule for every file the run writes: 0666 & ~umask (DeepSpeed's two recovery scripts
    also get the owner's execute bit, which DeepSpeed adds on purpose)."""
    out = orphaned["out"]
    modes = {
        str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) & ~stat.S_IXUSR for p in out.rglob("*") if p.is_file()
    }
    assert "config.yaml" in modes and ckpt.MANIFEST in modes
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != 0o666 & ~UMASK}
    assert not wrong


def test_weights_only_consolidation_matches_deepspeed(orphaned: dict[str, object]) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from aim_ds.weights.zero_shards import consolidate_fp32

    step, path = ckpt.list_complete(orphaned["out"] / "checkpoints")[0]
    ours = consolidate_fp32(path.parent, path.name)
    # DeepSpeed's reader unpickles anything: used here only on a checkpoint this test just wrote.
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    assert set(ours) == set(theirs) and len(ours) > 20
    for key, value in theirs.items():
        assert torch.equal(ours[key], value.contiguous().float()), key


def test_crafted_checkpoint_runs_nothing(orphaned: dict[str, object], tmp_path: Path) -> None:
    """A crafted shard in a run folder: the probe driver and --export-only both exit 2 naming the
    folder, and the file the pickle would create never appears."""
    crafted = tmp_path / "crafted"
    shutil.copytree(orphaned["out"], crafted)
    marker = tmp_path / "PWNED"
    newest = ckpt.latest_complete(crafted / "checkpoints")[1]
    _craft(newest / "zero_pp_rank_1_mp_rank_00_model_states.pt", marker)
    probe = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run/probe.py"),
            "--config",
            str(ROOT / "run/configs/probe_aim-test.yaml"),
            "--weights",
            str(crafted),
            f"out_dir={tmp_path / 'probe'}",
        ],  # fmt: skip
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert probe.returncode == 2, probe.stderr[-3000:]
    assert str(crafted) in probe.stderr and "refused" in probe.stderr, probe.stderr[-3000:]
    export = subprocess.run(
        [sys.executable, str(ROOT / "run/pretrain.py"), "--export-only", str(crafted)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert export.returncode == 2, export.stderr[-3000:]
    assert str(newest) in export.stderr and "refused" in export.stderr, export.stderr[-3000:]
    assert not marker.exists()


@pytest.fixture(scope="module")
def resumed(setup: dict[str, Path], orphaned: dict[str, object]) -> dict[str, object]:
    """Launch B: resume a copy of A with its two newest checkpoints damaged (truncated / crafted).
    A copy, so that the tests reading A's own folder pass in any order."""
    out = setup["root"] / "B"
    shutil.copytree(orphaned["out"], out)
    (oldest_step, _), (crafted_step, crafted), (_, truncated) = ckpt.list_complete(out / "checkpoints")[-3:]
    # bf16 runs name it bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: find it whatever the prefix.
    (shard,) = truncated.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    marker = out.parent / "PWNED_B"
    _craft(crafted / "zero_pp_rank_1_mp_rank_00_model_states.pt", marker)
    proc = subprocess.run(
        _launcher(setup, out, f"train.stop_after_steps={crafted_step}"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return {
        "proc": proc,
        "out": out,
        "oldest_step": oldest_step,
        "crafted_step": crafted_step,
        "truncated": shard,
        "crafted": crafted,
        "marker": marker,
    }


def test_resume_skips_damaged_checkpoints_naming_the_files(resumed: dict[str, object]) -> None:
    proc, out = resumed["proc"], resumed["out"]
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert f"{resumed['truncated']}: damaged" in text, text[-4000:]
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt: refused" in text, text[-4000:]
    assert f"resumed from {ckpt.tag_for_step(resumed['oldest_step'])}" in text, text[-4000:]
    assert not resumed["marker"].exists()  # DeepSpeed's loader never saw the crafted file
    steps = _steps(out)
    assert steps == sorted(steps) and steps[-1] == resumed["crafted_step"]  # metrics trimmed, then continued
    # Both damaged tags were set aside (kept for a look, out of keep_last's count); the crafted step
    # was then saved again: a clean, complete folder.
    truncated_tag = resumed["truncated"].parent
    for damaged in (resumed["crafted"], truncated_tag):
        aside = damaged.with_name(damaged.name + ckpt.DAMAGED_SUFFIX)
        assert aside.is_dir() and ckpt.verify_tag(aside) is not None, aside
    assert not truncated_tag.exists() and truncated_tag.name + ckpt.DAMAGED_SUFFIX in text
    assert ckpt.is_complete(resumed["crafted"]) and ckpt.verify_tag(resumed["crafted"]) is None
    assert all(ckpt.verify_tag(path) is None for _, path in ckpt.list_complete(out / "checkpoints"))
    assert not list((out / "checkpoints").glob("*.partial")) and not list((out / "checkpoints").glob("*.old"))
