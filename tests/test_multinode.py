"""Past one box, with the real ``deepspeed`` launcher on the CPU accelerator (gloo), aim-test:

- two "nodes" on this machine (``--hostfile``, ``--no_ssh``, ``--node_rank 0/1``, one rank each)
  give the same losses as one node with two ranks;
- a run checkpointed on two ranks resumes on one rank from DeepSpeed's universal checkpoint
  (converted at start-up) and the loss continues; the data position is kept in images, so the
  resumed run reads exactly the images a one-rank run would have (checked on the loader's plan).

Three launches: one node x 2 ranks (the baseline, 6 steps, checkpoints at 3 and 6), two nodes x 1
rank (stopped after 3 steps), and the one-rank resume from the baseline's step-3 checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_pretrain_deepspeed import DEEPSPEED, LAUNCH_TIMEOUT_S, PERSISTENCE_THRESHOLD, ROOT, VENV_BIN

from aim_ds.config import ConfigError
from aim_ds.data.sampling import MixtureSchedule
from aim_ds.distributed import free_port
from aim_ds.metrics import read_metrics
from aim_ds.train.loop import batch_in_epoch_from
from aim_ds.weights import checkpoint as ckpt

STEPS = 6
BATCH, MICRO = 16, 4  # accumulation 2 on two ranks, 4 on one


@pytest.fixture(scope="module")
def run_files(betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multinode")
    cfg = yaml.safe_load((ROOT / "run/configs/aim-test.yaml").read_text())
    cfg["data"].update(sources=[{"path": str(betons["train"]), "prob": 1.0}], val_path="")
    cfg["train"].update(batch_size=BATCH, micro_batch_size=MICRO, steps=STEPS)
    cfg["log"] = {"every_steps": 1}
    cfg["checkpoint"] = {"every_steps": 3, "keep_last": 0}
    cfg["export"] = {"enabled": False}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = PERSISTENCE_THRESHOLD
    (root / "zero3.json").write_text(json.dumps(ds))
    (root / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    return {"config": root / "run.yaml", "ds": root / "zero3.json", "hostfile": root / "hostfile", "root": root}


def _env() -> dict[str, str]:
    # One thread per rank whatever the layout, so that the float reductions match between layouts.
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _driver(run_files: dict[str, Path], out_dir: Path, *overrides: str) -> list[str]:
    return [
        str(ROOT / "run/pretrain.py"), "--deepspeed", str(run_files["ds"]), "--config", str(run_files["config"]),
        f"out_dir={out_dir}", *overrides,
    ]  # fmt: skip


def _run(command: list[str]) -> subprocess.CompletedProcess:
    assert DEEPSPEED, "the deepspeed launcher is not installed next to this Python"
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl", "train")}


@pytest.fixture(scope="module")
def one_node(run_files: dict[str, Path]) -> Path:
    out = run_files["root"] / "one_node"
    _run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *_driver(run_files, out)])
    return out


@pytest.fixture(scope="module")
def two_nodes(run_files: dict[str, Path]) -> tuple[Path, list[str]]:
    """Both nodes' launchers at once, as two hosts would start them (e.g. from srun)."""
    out = run_files["root"] / "two_nodes"
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        command = [
            DEEPSPEED, "--hostfile", str(run_files["hostfile"]), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", port,
            *_driver(run_files, out, f"train.stop_after_steps={STEPS // 2}"),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    logs = [proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for proc in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    return out, logs


@pytest.fixture(scope="module")
def resumed_on_one_rank(run_files: dict[str, Path], one_node: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """The baseline's step-3 checkpoint (written by 2 ranks) resumed by a single rank."""
    out = run_files["root"] / "one_rank"
    out.mkdir()
    shutil.copytree(one_node / "checkpoints" / ckpt.tag_for_step(3), out / "checkpoints" / ckpt.tag_for_step(3))
    shutil.copy(one_node / "config.yaml", out / "config.yaml")
    shutil.copy(one_node / ckpt.MANIFEST, out / ckpt.MANIFEST)  # the folder is aim-ds's (see aim_ds.weights.checkpoint)
    lines = (one_node / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line).get("step", 0) <= 3))
    port = free_port()
    result = _run([DEEPSPEED, "--num_gpus", "1", "--master_port", str(port), *_driver(run_files, out)])
    # A launched world of one gets a DeepSpeed /dev/shm buffer too; it is released like any other.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return out, result


@pytest.mark.deepspeed
def test_two_nodes_match_one_node(one_node: Path, two_nodes: tuple[Path, list[str]]) -> None:
    out, logs = two_nodes
    assert "plan for aim-test on 2 node(s) x 1 cpu = world 2" in logs[0]
    a, b = _losses(one_node), _losses(out)
    assert sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    latest = ckpt.latest_complete(out / "checkpoints")
    assert latest is not None and latest[0] == 3 and ckpt.saved_world_size(latest[1]) == 2


@pytest.mark.deepspeed
def test_resume_on_another_world_size(
    one_node: Path, resumed_on_one_rank: tuple[Path, subprocess.CompletedProcess]
) -> None:
    out, result = resumed_on_one_rank
    text = result.stdout + result.stderr
    step3 = out / "checkpoints" / ckpt.tag_for_step(3)
    assert "written with another world size" in text and (step3 / ckpt.UNIVERSAL).is_dir()
    assert "resumed from step_0000003 at step 3 (epoch 0, batch 12)" in text  # 48 images / (4 x 1 rank)
    a, c = _losses(one_node), _losses(out)
    assert sorted(c) == list(range(1, STEPS + 1))
    # The same images per step, other crops and prefixes (their draws are per rank): close, not equal.
    # A model or optimizer not restored would start again near the first step's loss.
    for step in range(4, STEPS + 1):
        assert c[step] == pytest.approx(a[step], rel=0.2), step
        assert c[step] < 0.6 * c[1], step
    latest = ckpt.latest_complete(out / "checkpoints")
    assert latest is not None and latest[0] == STEPS and ckpt.saved_world_size(latest[1]) == 1
    state = json.loads((step3 / ckpt.COMPLETE_MARKER).read_text())
    assert state["world_size"] == 2


def _images(schedule: MixtureSchedule, epoch: int, steps: range, world: int) -> list[int]:
    return [int(i) for s in steps for r in range(world) for i in schedule.plan(epoch, s, r).indices]


@pytest.mark.parametrize(("world", "micro"), [(1, 4), (1, 8), (4, 2), (2, 2)])
def test_position_in_images_neither_skips_nor_repeats(world: int, micro: int) -> None:
    """One source: the images of optimizer steps 1-3 read by 2 ranks x micro 4, then steps 4-6 read
    from the position in images by ``world`` ranks x ``micro``, are exactly a straight run's, each once."""
    size, epoch = 200, 0
    before = MixtureSchedule([size], [1.0], MICRO, 2, seed=0, steps_per_epoch=size // (MICRO * 2))
    after = MixtureSchedule([size], [1.0], micro, world, seed=0, steps_per_epoch=size // (micro * world))
    first = _images(before, epoch, range(0, 3 * BATCH // (MICRO * 2)), 2)
    images_in_epoch = 3 * BATCH  # what the checkpoint stores
    start = images_in_epoch // (micro * world)
    second = _images(after, epoch, range(start, start + 3 * BATCH // (micro * world)), world)
    straight = MixtureSchedule([size], [1.0], BATCH, 1, seed=0, steps_per_epoch=size // BATCH)
    expected = _images(straight, epoch, range(0, 6), 1)
    assert first + second == expected  # same images in the same stream order
    assert len(np.unique(expected)) == len(expected)


def test_batch_index_from_images() -> None:
    """48 images into the epoch: batch 6 of 2 ranks x 4, 12 of 1 x 4, 6 of 1 x 8; 1 x 5 cannot start
    there and says so; an old checkpoint without the count keeps its batch index."""
    client = {"epoch": 0, "batch_in_epoch": 6, "images_in_epoch": 48}
    assert [batch_in_epoch_from(client, n) for n in (8, 4, 8, 16)] == [6, 12, 6, 3]
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        batch_in_epoch_from(client, 5)
    assert batch_in_epoch_from({"epoch": 0, "batch_in_epoch": 6}, 4) == 6
