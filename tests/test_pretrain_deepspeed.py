"""The real driver under the deepspeed launcher: ZeRO-3 on two CPU ranks (gloo, fp32 as
ds_configs/zero3_fp32.json asks; bf16 and offload runs are in tests/test_gpu_path.py), aim-test,
a small beton of real photo tiles. Four launches shared by the assertions:

- A: a straight run of 2k steps (gradient accumulation 2, activation checkpointing, validation,
  periodic checkpoints, shard report, export, TensorBoard);
- B: the same run killed with SIGTERM (to the whole process group, as a scheduler does) mid-run;
- C: B started again with the same out_dir: resumes and finishes (B and C log to offline W&B and
  TensorBoard: one W&B run and one TensorBoard history across the two launches);
- D: a run whose loss blows up (peak LR 1e30), its model built under deepspeed.zero.Init;
- E: a run whose run lock another job takes over mid-run: it stops without a checkpoint (exit 4).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
import torch
import yaml

from aim_ds.distributed import free_port
from aim_ds.metrics import read_metrics
from aim_ds.train.lock import LOCK_FILE, RunLock
from aim_ds.train.stopping import EXIT_LOCK_LOST
from aim_ds.weights import checkpoint as ckpt

pytestmark = pytest.mark.deepspeed

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEEPSPEED = shutil.which("deepspeed", path=str(VENV_BIN)) or shutil.which("deepspeed")
STEPS = 24  # "2k"
PERSISTENCE_THRESHOLD = 1024  # between aim-test's largest 1-D parameter (64) and smallest matrix (3072)
LAUNCH_TIMEOUT_S = 300
WATCHED = ("log.wandb=true", "log.tensorboard=true")  # B and C: W&B (offline) and TensorBoard across a resume
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "images_per_second", "epoch", "world_size", "step_time_s", "data_wait_s")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_files(betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run config over the test betons and an fp32 ZeRO-3 config whose persistence threshold
    makes aim-test's matrices and 1-D parameters go through ZeRO-3's gather / release path and
    stay gathered respectively (its "auto", 10 x width, would fall between them too)."""
    root = tmp_path_factory.mktemp("cfg")
    cfg = yaml.safe_load((ROOT / "run/configs/aim-test.yaml").read_text())
    cfg["data"].update(sources=[{"path": str(betons["train"]), "prob": 1.0}], val_path=str(betons["val"]))
    cfg["model"]["grad_checkpointing"] = True
    cfg["model"]["head_grad_checkpointing"] = True
    cfg["train"].update(batch_size=16, micro_batch_size=4, steps=STEPS)  # accumulation 2 on 2 ranks
    cfg["val"] = {"every_steps": 12, "max_batches": 2}
    cfg["log"] = {"every_steps": 1}
    cfg["checkpoint"] = {"every_steps": 8, "keep_last": 2}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    ds = json.loads((ROOT / "ds_configs/zero3_fp32.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = PERSISTENCE_THRESHOLD
    (root / "zero3.json").write_text(json.dumps(ds))
    return {"config": root / "run.yaml", "ds": root / "zero3.json", "root": root}


def _command(run_files: dict[str, Path], out_dir: Path, *overrides: str) -> list[str]:
    assert DEEPSPEED, "the deepspeed launcher is not installed next to this Python"
    return [
        DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
        str(ROOT / "run/pretrain.py"), "--deepspeed", str(run_files["ds"]), "--config", str(run_files["config"]),
        f"out_dir={out_dir}", *overrides,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _launch(run_files: dict[str, Path], out_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(run_files, out_dir, *overrides),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )


def _losses(out_dir: Path, kind: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl", kind)}


def _start(run_files: dict[str, Path], out: Path, log_file: IO[str], *overrides: str) -> subprocess.Popen:
    """The job launched in its own process group (so that a signal reaches the launcher and both
    ranks), its output going to ``log_file``."""
    return subprocess.Popen(
        _command(run_files, out, *overrides),
        cwd=ROOT,
        env=_env(),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def straight(run_files: dict[str, Path]) -> tuple[Path, subprocess.CompletedProcess]:
    out = run_files["root"] / "A"
    result = _launch(run_files, out, "log.shard_report=true", "log.tensorboard=true")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result


@pytest.fixture(scope="module")
def killed_and_resumed(run_files: dict[str, Path]) -> dict[str, object]:
    out = run_files["root"] / "B"
    log_path = run_files["root"] / "B.log"
    with open(log_path, "w") as log_file:
        proc = _start(run_files, out, log_file, *WATCHED)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        signalled_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            steps = _losses(out)
            if steps and max(steps) >= 5:
                signalled_at = max(steps)
                os.killpg(proc.pid, signal.SIGTERM)  # launcher, its children and both ranks
                break
            time.sleep(0.05)
        assert signalled_at is not None, "the run ended or timed out before it could be signalled"
        proc.wait(timeout=60)
        # The launchers die at once; the ranks checkpoint first. Wait for the group to empty.
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    first_log = log_path.read_text()
    latest = ckpt.latest_complete(out / "checkpoints")
    assert latest is not None, first_log[-4000:]
    stopped_at = latest[0]
    resumed = _launch(run_files, out, *WATCHED)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    return {
        "out": out,
        "signalled_at": signalled_at,
        "stopped_at": stopped_at,
        "first_log": first_log,
        "resumed": resumed,
    }


# ----------------------------------------------------------------------------- tests


def test_loss_falls(straight: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = straight
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in range(1, 5)) / 4
    last = sum(losses[s] for s in range(STEPS - 3, STEPS + 1)) / 4
    assert last < 0.8 * first, (first, last)
    val = _losses(out, "val")
    assert sorted(val) == [12, 24] and all(math.isfinite(v) for v in val.values())
    assert val[24] < losses[1]


def test_log_fields_and_artifacts(straight: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = straight
    record = read_metrics(out / "metrics.jsonl", "train")[-1]
    assert {"step", "loss", "lr", "grad_norm", "images_per_second", "world_size", "eta_s"} <= set(record)
    assert record["lr"] == pytest.approx(0.0, abs=1e-4) and record["grad_norm"] > 0
    records = read_metrics(out / "metrics.jsonl", "train")
    for r in records:  # the pace fields of every line: both ranks counted, the loader's wait inside the step
        assert r["world_size"] == 2 and r["step_time_s"] > 0 and r["data_wait_s"] > 0, r  # measured, never 0
        # The wait is the slowest rank's; rank 0's window may start a few ms after the other rank's.
        assert r["data_wait_s"] < r["step_time_s"] + 0.05 or r["step"] == 1, r
        assert "peak_memory_gib" not in r  # CUDA only
    assert all(r["eta_s"] > 0 for r in records[:-1]) and record["eta_s"] == 0
    # From the second line on, ETA = steps left x the launch's pace since its first line, which takes at
    # least the steps' own times (the windows lie inside it; validation and checkpoints come on top).
    for k in range(2, STEPS):
        pace = records[k - 1]["eta_s"] / (STEPS - k)
        assert pace >= 0.98 * sum(r["step_time_s"] for r in records[1:k]) / (k - 1), k
    text = result.stdout + result.stderr
    line = re.search(
        r"step 24/24 loss \S+ lr \S+ grad_norm \S+ \S+ img/s (\S+) s/step \(data wait (\S+) s\) ranks 2 ETA 0s", text
    )
    assert line, text[-3000:]
    assert float(line.group(2)) < float(line.group(1)) + 0.05
    assert "turned off" not in result.stdout + result.stderr  # nothing is downgraded on CPU
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == STEPS and saved["train"]["micro_batch_size"] == 4
    # Warmup is saved as the run's fraction (aim-test.yaml: 0.1), the count derived at start-up and logged.
    assert saved["optim"]["warmup_fraction"] == 0.1 and saved["optim"]["warmup_steps"] < 0
    assert f"{STEPS} steps, {round(STEPS * 0.1)} warmup" in result.stdout + result.stderr
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is False  # fp32 because zero3_fp32.json says so
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["zero_optimization"]["reduce_bucket_size"] == 274_480  # the whole model: below the floor
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16,
        4,
        2,
    )
    for png in ("loss.png", "patches.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parameters_are_sharded(straight: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = straight
    reports = [json.loads((out / f"shards_rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0].keys() == reports[1].keys() and len(reports[0]) > 10
    for name, info in reports[0].items():
        other = reports[1][name]
        full = info["ds_numel"]
        # Each rank holds its own half (ZeRO pads the last partition up to ceil(n / 2)).
        assert info["local_numel"] == other["local_numel"] == math.ceil(full / 2), name
        assert info["persist"] == (full <= PERSISTENCE_THRESHOLD) == (info["ndim"] == 1), name


def test_checkpoints_kept_and_complete(straight: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = straight
    tags = ckpt.list_tags(out / "checkpoints")
    assert [s for s, _ in tags] == [16, 24]  # keep_last=2 of 8, 16, 24
    assert all(ckpt.is_complete(p) for _, p in tags)
    assert sorted(p.name for p in tags[-1][1].glob("rng_state_rank*.pt")) == [
        "rng_state_rank0.pt",
        "rng_state_rank1.pt",
    ]


def test_export_reloads_without_deepspeed(straight: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = straight
    code = (
        "import sys, json, torch\n"
        "from safetensors.torch import load_file\n"
        "import aim_ds\n"
        f"export = {str(out / 'export')!r}\n"
        "meta = json.load(open(export + '/model.json'))\n"
        "model = aim_ds.create_model(meta['model'], **meta['overrides'])\n"
        "model.load_state_dict(load_file(export + '/model.safetensors'), strict=True)\n"
        "model.eval()\n"
        "ref = load_file(export + '/reference_forward.safetensors')\n"
        "with torch.no_grad():\n"
        "    out = model(ref['images'], prefix_len=ref['prefix_len'])\n"
        "torch.testing.assert_close(out['pred'], ref['pred'], rtol=1e-5, atol=1e-5)\n"
        "torch.testing.assert_close(out['loss'].reshape(1), ref['loss'], rtol=1e-5, atol=1e-6)\n"
        "trunk = load_file(export + '/trunk_ml_aim.safetensors')\n"
        "assert set(trunk) == set(aim_ds.weights.interop.to_ml_aim(model.state_dict())), 'ml-aim keys'\n"
        "assert 'deepspeed' not in sys.modules, 'loading must not need DeepSpeed'\n"
        "print('OK', meta['step'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"OK {STEPS}"


def test_export_only_matches_end_of_run_export(
    straight: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    out, _ = straight
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("export"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "run/pretrain.py"), "--export-only", str(copy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(out / "export/model.safetensors"), load_file(copy / "export/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag's ``{step: value}`` as TensorBoard shows it (all event files, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_scalar_of_the_log(straight: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = straight
    scalars = _tensorboard_scalars(out / "tensorboard")
    for r in read_metrics(out / "metrics.jsonl", "train"):
        for name in (*TRAIN_SCALARS, "eta_s"):
            assert scalars[f"train/{name}"][r["step"]] == pytest.approx(r[name], rel=1e-6, abs=1e-6), (name, r)
    assert sorted(scalars["train/loss"]) == list(range(1, STEPS + 1))
    assert scalars["val/loss"] == pytest.approx(_losses(out, "val"), rel=1e-6)
    assert not (out / "wandb").exists() and not (out / "wandb_id.txt").exists()  # W&B stays off unless asked


def _wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` of the history records in a W&B ``.wandb`` file: LevelDB's log format
    (32 KiB blocks of records, each with a 7-byte header: checksum, length, type full/first/middle/last)
    after W&B's 7-byte file header, each record one ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", run_file
    history: dict[int, dict[str, float]] = {}
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pieces = (pieces if kind in (3, 4) else b"") + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # first or middle piece: wait for the rest
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pieces)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    return history


def test_wandb_and_tensorboard_continue_across_the_resume(killed_and_resumed: dict[str, object]) -> None:
    out = killed_and_resumed["out"]
    stopped_at = killed_and_resumed["stopped_at"]
    run_id = (out / "wandb_id.txt").read_text().strip()
    folders = sorted((out / "wandb").glob("offline-run-*"))
    # Two launches, one W&B run: both offline folders carry the id (`wandb sync` uploads them in order).
    assert len(folders) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", f.name) for f in folders), folders
    first, second = (_wandb_history(f / f"run-{run_id}.wandb") for f in folders)
    # DeepSpeed's launcher answers SIGTERM by terminating each rank's whole process tree, W&B's service
    # process too (SLURM signals every process of the job alike): the service shuts down at once and
    # drops the records it had not yet written. Rank 0 must then go on to its stop checkpoint, with W&B
    # turned off if a log call met the dead service (whether one does depends on timing: both were seen),
    # never crashing in it. (Measured once: the first launch's offline file kept none of its 6 steps.)
    # The stop then shuts W&B down itself (MetricsLogger.close: finish + teardown, bounded): wandb's own
    # exit hook, which printed a ConnectionResetError traceback at interpreter exit, has nothing left to do.
    first_log = killed_and_resumed["first_log"]
    assert "Traceback" not in first_log and "Exception ignored" not in first_log, first_log[-3000:]
    assert first_log.count("W&B logging is off for the rest of this run") <= 1
    assert f"stopped at step {stopped_at}" in first_log
    assert set(first) <= set(range(1, stopped_at + 1))
    assert sorted(second) == list(range(stopped_at + 1, STEPS + 1))  # the history goes on where it stopped
    losses = _losses(out)
    for step, items in {**first, **second}.items():
        assert items["train/loss"] == pytest.approx(losses[step], rel=1e-6), step
        assert items["train/world_size"] == 2
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6)  # one history, each step once
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_sigterm_checkpoints_and_exits_cleanly(killed_and_resumed: dict[str, object]) -> None:
    log = killed_and_resumed["first_log"]
    stopped_at = killed_and_resumed["stopped_at"]
    assert "(signal SIGTERM)" in log
    assert killed_and_resumed["signalled_at"] <= stopped_at < STEPS
    assert f"stopped at step {stopped_at}" in log


def test_resume_is_exact(
    straight: tuple[Path, subprocess.CompletedProcess], killed_and_resumed: dict[str, object]
) -> None:
    out_a, _ = straight
    out_c = killed_and_resumed["out"]
    stopped_at = killed_and_resumed["stopped_at"]
    resumed = killed_and_resumed["resumed"]
    assert f"resumed from {ckpt.tag_for_step(stopped_at)} at step {stopped_at}" in resumed.stdout + resumed.stderr
    a, c = _losses(out_a), _losses(out_c)
    assert sorted(c) == list(range(1, STEPS + 1))  # the file reads as one straight run
    for step in range(stopped_at + 1, STEPS + 1):
        assert c[step] == pytest.approx(a[step], rel=1e-6, abs=0), step
    va, vc = _losses(out_a, "val"), _losses(out_c, "val")
    assert vc[24] == pytest.approx(va[24], rel=1e-6)


def test_non_finite_loss_stops_without_saving(
    straight: tuple[Path, subprocess.CompletedProcess], run_files: dict[str, Path]
) -> None:
    out = run_files["root"] / "D"
    result = _launch(
        run_files,
        out,
        "optim.peak_lr=1e30",
        "optim.warmup_steps=0",
        "checkpoint.every_steps=1",
        "val.every_steps=0",
        "model.zero_init=true",  # also: the model built already partitioned starts from the same weights
    )
    text = result.stdout + result.stderr
    assert result.returncode == 3, text[-3000:]  # the driver's code for a non-finite loss, through the launcher
    assert "non-finite loss" in text and "at optimizer step 2" in text, text[-3000:]
    # Step 1 was saved before the blow-up; nothing after it, nothing half-written left behind.
    assert [s for s, _ in ckpt.list_tags(out / "checkpoints")] == [1]
    last_good = out / "checkpoints" / ckpt.tag_for_step(1)
    assert ckpt.is_complete(last_good)
    assert json.loads((last_good / ckpt.COMPLETE_MARKER).read_text())["step"] == 1
    assert sorted(p.name for p in last_good.glob("rng_state_rank*.pt")) == ["rng_state_rank0.pt", "rng_state_rank1.pt"]
    assert not list(out.rglob("*.partial"))
    # Intact: both ranks' shards still consolidate into the step-1 weights.
    exported = subprocess.run(
        [sys.executable, str(ROOT / "run/pretrain.py"), "--export-only", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    meta = json.loads((out / "export" / "model.json").read_text())
    assert meta["step"] == 1 and meta["checkpoint"] == f"checkpoints/{ckpt.tag_for_step(1)}"
    # The first loss comes before any update: same seed, data and prefixes as run A, built under
    # zero.Init instead of in full, so it must match A's up to float32 rounding (one ulp has been
    # seen: the partitioned build's gathers can change a reduction's order).
    assert _losses(out)[1] == pytest.approx(_losses(straight[0])[1], rel=1e-6, abs=0)


def test_lock_taken_over_mid_run_stops_without_a_checkpoint(run_files: dict[str, Path]) -> None:
    """A job whose heartbeat stalled (NFS refusing utime) has its lock taken over by another job: it
    must stop within a few steps on every rank, save nothing more, leave the new lock alone and exit
    4 (not 75: a requeue would bring a second writer back)."""
    out = run_files["root"] / "E"
    every = 4
    log_path = run_files["root"] / "E.log"
    overrides = (
        "train.steps=400",  # far more than the test lets it run
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=0",  # keep all: a pruned tag would hide what was written
        "val.every_steps=0",
        "lock.stale_after_s=2",  # a beat every 0.5 s
    )
    with open(log_path, "w") as log_file:
        proc = _start(run_files, out, log_file, *overrides)
        try:
            deadline = time.monotonic() + LAUNCH_TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None and max(_losses(out), default=0) < every + 1:
                time.sleep(0.05)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            # What a job that judged the lock stale does (RunLock.acquire): set the judged record aside
            # and link its own in its place.
            taker = RunLock(out)
            taker._take_over((out / LOCK_FILE).read_bytes())
            assert taker._create()
            theirs = (out / LOCK_FILE).read_bytes()
            # A step logged after this read started after the take-over: its checkpoint must not come.
            last_seen = max(_losses(out))
            code = proc.wait(timeout=LAUNCH_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert code == EXIT_LOCK_LOST, text[-3000:]
    assert (out / LOCK_FILE).read_bytes() == theirs  # neither touched nor released by the loser
    saved = [step for step, _ in ckpt.list_tags(out / "checkpoints")]
    assert saved and max(saved) <= last_seen, (saved, last_seen)
    assert all(ckpt.is_complete(out / "checkpoints" / ckpt.tag_for_step(s)) for s in saved)
    assert max(_losses(out)) <= last_seen + every, text[-3000:]  # at the next checkpoint at the latest
    lines = [line for line in text.splitlines() if f"taken over by PID {os.getpid()} on host" in line]
    assert len(lines) == 1 and "ERROR" in lines[0] and "without a checkpoint" in lines[0], text[-3000:]
    assert "Traceback" not in text and "stopped at step" not in text, text[-3000:]
    assert not (out / "export").exists()
