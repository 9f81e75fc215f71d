"""A cluster job's start-up and its rank-0 phases (issue 20): no process-group cliff while rank 0
works alone, a micro-batch that follows the world size, GPU nodes with a CPU build of PyTorch
refused, and a live probe that runs where it fits on a bounded subset."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from aim_ds.config import load_config
from aim_ds.data.loader import subset_indices
from aim_ds.distributed import free_port
from aim_ds.metrics import read_metrics
from aim_ds.model.registry import get_model_spec
from aim_ds.study import subprocess_device
from aim_ds.train.config import BatchConfigError, PretrainConfig, largest_divisor_at_most, resolve_plan

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEEPSPEED = shutil.which("deepspeed", path=str(VENV_BIN)) or shutil.which("deepspeed")
PAPER_CONFIGS = ["aim-0.6B", "aim-1B", "aim-3B", "aim-7B"]
WORLD_SIZES = [8, 16, 32, 64, 128]
GIB = 2**30


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **extra)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# ----------------------------------------------------------------------------- rank-0 phases


def _launch_worker(out: Path, mode: str) -> dict[int, dict]:
    assert DEEPSPEED, "the deepspeed launcher is not installed next to this Python"
    out.mkdir(parents=True)
    command = [
        DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "tests/rank0_phase_worker.py"),
        "--out", str(out), "--mode", mode, "--timeout-s", "3", "--work-s", "8",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.mark.deepspeed
def test_rank0_phase_longer_than_the_timeout_does_not_kill_the_job(tmp_path: Path) -> None:
    """Two gloo ranks with a 3 s process-group timeout; rank 0 works alone for 8 s. Waiting in
    rank0_phase (a file poll) both ranks get its result and the group works afterwards; a failing
    rank-0 phase stops every rank with rank 0's message. The old way, a barrier, times out."""
    got = _launch_worker(tmp_path / "phase", "phase")
    for rank in (0, 1):
        assert got[rank]["error"] == "" and got[rank]["result"] == {"answer": 42.0}, got
        assert got[rank]["before"] == got[rank]["after"] == 2
        assert got[rank]["fail_error"].endswith("disk full (on purpose)"), got
    assert got[0]["fail_error"].startswith("OSError") and got[1]["fail_error"].startswith("Rank0PhaseError")
    assert not list((tmp_path / "phase").glob(".rank0-*"))  # markers are removed
    # The broken variant: the other rank waits for rank 0 inside a barrier and the timeout fires.
    old = _launch_worker(tmp_path / "barrier", "barrier")
    assert "Timed out" in old[1]["error"] or "timeout" in old[1]["error"].lower(), old


@pytest.mark.deepspeed
def test_waiting_ranks_notice_a_dead_rank0(tmp_path: Path) -> None:
    """Rank 0 dies inside a rank-0 phase (two plain processes, no launcher to kill the other one):
    rank 1 stops with a Rank0PhaseError instead of polling for the 10 minutes it may wait."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [sys.executable, str(ROOT / "tests/rank0_phase_worker.py"), "--out", str(tmp_path)]
        command += ["--mode", "die", "--timeout-s", "600", "--work-s", "2"]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert procs[0].returncode == 17, logs[0][-2000:]
    assert procs[1].returncode == 0, logs[1][-2000:]
    got = json.loads((tmp_path / "rank1.json").read_text())
    assert got["error"].startswith("Rank0PhaseError: rank 0 went away during die"), got


# ----------------------------------------------------------------------------- the micro-batch


def _plan(name: str, world: int, *overrides: str):
    cfg = load_config(PretrainConfig, ROOT / "run" / "configs" / f"{name}.yaml", overrides=list(overrides))
    model_cfg = get_model_spec(cfg.model.name).config.replace(**cfg.model.overrides)
    return cfg, model_cfg, resolve_plan(cfg, world, model_cfg.image_size, model_cfg.num_patches)


def test_largest_divisor_at_most() -> None:
    assert [largest_divisor_at_most(64, m) for m in (128, 64, 63, 48, 1, 0)] == [64, 64, 32, 32, 1, 1]
    assert largest_divisor_at_most(100, 64) == 50 and largest_divisor_at_most(7, 6) == 1


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_shipped_yaml_starts_on_8_to_128_gpus(name: str) -> None:
    """The paper's batch stays 4096; the micro-batch follows the world size where the configured one
    does not divide the per-GPU batch (0.6B's 128 on 64 GPUs: 64), and the ZeRO-3 memory plan of the
    micro-batch used fits 8 x 80 GiB GPUs per node."""
    from aim_ds.plan import make_plan
    from aim_ds.plan.memory import Hardware, runtime_bytes
    from aim_ds.train.engine import load_ds_config

    ds = load_ds_config(ROOT / "ds_configs" / "zero3.json")
    for world in WORLD_SIZES:
        cfg, model_cfg, plan = _plan(name, world)
        assert cfg.train.batch_size == 4096
        assert plan.micro_batch_size * plan.grad_accum_steps * world == 4096
        assert plan.micro_batch_size == min(cfg.train.micro_batch_size, 4096 // world)
        if plan.micro_batch_size != cfg.train.micro_batch_size:
            assert f"train.micro_batch_size={cfg.train.micro_batch_size} does not divide" in plan.micro_batch_note
            assert f"using micro-batch {plan.micro_batch_size}" in plan.micro_batch_note
        else:
            assert plan.micro_batch_note == ""
        hw = Hardware(8, world // 8, "cuda", 80 * GIB, 1024 * GIB, runtime_bytes("cuda", None))
        sizing = make_plan(
            model_cfg,
            name,
            ds,
            hw,
            batch_size=4096,
            micro_batch=plan.micro_batch_size,
            checkpointing=cfg.model.grad_checkpointing,
        )
        assert sizing.fits, (world, sizing.text)


def test_batch_that_cannot_split_names_the_knob() -> None:
    with pytest.raises(BatchConfigError, match=r"train\.batch_size=4000 does not split evenly over world size 64"):
        _plan("aim-0.6B", 64, "train.batch_size=4000")
    with pytest.raises(BatchConfigError, match="smaller than the world size"):
        _plan("aim-test", 32)
    _, _, plan = _plan("aim-0.6B", 64)
    assert "/world" not in plan.micro_batch_note and "train.batch_size to" not in plan.micro_batch_note


# ----------------------------------------------------------------------------- GPU nodes, CPU torch

CHECK = "from aim_ds.distributed import init_distributed; init_distributed(group_of_one=False); print('ok')"


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path) -> Path:
    """An ``nvidia-smi`` on PATH that lists 8 GPUs, as on a GPU node (the environment, not our code)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    lines = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})" for i in range(8))
    smi.write_text(f'#!/bin/sh\n[ "$1" = "-L" ] || exit 9\ncat <<EOF\n{lines}\nEOF\n')
    smi.chmod(0o755)
    return bin_dir


def _check_in_subprocess(bin_dir: Path | None, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = _env()
    for key in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(__import__("torch").version.cuda is not None, reason="needs a CPU build of PyTorch")
def test_gpu_node_with_cpu_torch_is_refused(fake_nvidia_smi: Path) -> None:
    proc = _check_in_subprocess(fake_nvidia_smi)
    assert proc.returncode != 0
    assert "8 GPU(s)" in proc.stderr and "CPU build" in proc.stderr and "download.pytorch.org/whl/cu" in proc.stderr
    # A scheduler's CUDA_VISIBLE_DEVICES alone (no nvidia-smi on PATH) says the same.
    assert "CPU build" in _check_in_subprocess(None, CUDA_VISIBLE_DEVICES="0,1").stderr
    # The CPU on purpose, GPUs hidden, or a CPU node: no complaint.
    for changes, smi in (({"DS_ACCELERATOR": "cpu"}, fake_nvidia_smi), ({"CUDA_VISIBLE_DEVICES": ""}, fake_nvidia_smi)):
        proc = _check_in_subprocess(smi, **changes)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    proc = _check_in_subprocess(None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The probe driver says it with exit 2 before reading anything.
    env = {k: v for k, v in _env().items() if k != "DS_ACCELERATOR"}
    env["PATH"] = f"{fake_nvidia_smi}{os.pathsep}{env['PATH']}"
    command = [
        sys.executable, str(ROOT / "run/probe.py"), "--config", str(ROOT / "run/configs/probe_aim-test.yaml"),
        "--weights", "/nonexistent", "data.train_path=/nonexistent.beton", "data.val_path=/nonexistent.beton",
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "CPU build" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- the live probe


def test_probe_subprocess_device_choice() -> None:
    """``auto`` never shares a training GPU: on this CPU-only machine it is the CPU; ``cuda:N``
    maps into the launcher's visible list."""
    assert subprocess_device("cpu", {"CUDA_VISIBLE_DEVICES": "0,1"})[:2] == ("", "cpu")
    assert subprocess_device("auto", {"CUDA_VISIBLE_DEVICES": "0,1", "LOCAL_WORLD_SIZE": "2"})[:2] == ("", "cpu")
    assert subprocess_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,6"})[:2] == ("6", "cuda")
    assert subprocess_device("cuda:3", {})[:2] == ("3", "cuda")
    with pytest.raises(ValueError, match="only 2 GPUs"):
        subprocess_device("cuda:2", {"CUDA_VISIBLE_DEVICES": "4,6"})
    with pytest.raises(ValueError, match="cpu, auto or cuda:N"):
        subprocess_device("gpu", {})


def test_subset_spreads_over_the_file() -> None:
    picked = subset_indices(1000, 10)
    assert picked.tolist() == list(range(0, 1000, 100))  # every class of a class-ordered beton, not a prefix
    assert subset_indices(5, 0).tolist() == subset_indices(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert len(set(subset_indices(1001, 1000).tolist())) == 1000


TIMEOUT_MINUTES = 0.2  # 12 s: far below a live probe here (a fresh process that imports torch and DeepSpeed)
PROBE_OVERRIDES = [
    "train.epochs=1",
    "train.batch_size=16",
    "train.lrs=[1e-2]",
    "train.weight_decays=[0.05]",
    "data.num_workers=1",
]


@pytest.mark.deepspeed
def test_real_run_with_a_short_timeout_a_live_probe_and_a_micro_batch_that_does_not_divide(
    betons: dict[str, Path], tmp_path: Path
) -> None:
    """The driver on 2 CPU ranks with dist.timeout_minutes=0.2: micro-batch 5 does not divide the 8
    images per rank, so 4 x accumulation 2 is used and said; the live probe (rank 0 alone, longer
    than the timeout) runs on the CPU on its bounded subset and the job goes on to its checkpoint
    and export."""
    cfg = yaml.safe_load((ROOT / "run/configs/aim-test.yaml").read_text())
    cfg["data"].update(sources=[{"path": str(betons["train"]), "prob": 1.0}], val_path=str(betons["val"]))
    cfg["data"]["num_workers"] = 1
    cfg["train"].update(batch_size=16, micro_batch_size=5, steps=2)
    cfg["val"] = {"every_steps": 2, "max_batches": 1}
    cfg["checkpoint"] = {"every_steps": 2, "keep_last": 1}
    cfg["dist"] = {"timeout_minutes": TIMEOUT_MINUTES}
    cfg["probe"] = {
        "every_steps": 2,
        "config": str(ROOT / "run/configs/probe_aim-test.yaml"),
        "train_path": str(betons["train"]),
        "val_path": str(betons["val"]),
        "overrides": PROBE_OVERRIDES,
        "max_train_images": 40,
        "max_val_images": 10,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert DEEPSPEED, "the deepspeed launcher is not installed next to this Python"
    command = [
        DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "run/pretrain.py"),
        "--deepspeed", str(ROOT / "ds_configs/zero3_fp32.json"), "--config", str(tmp_path / "run.yaml"),
        f"out_dir={out}",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-5000:]
    assert "train.micro_batch_size=5 does not divide the 8 images per rank" in logs
    assert "using micro-batch 4 x gradient accumulation 2" in logs
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["micro_batch_size"] == 4
    probes = read_metrics(out / "metrics.jsonl", "probe")
    assert [r["step"] for r in probes] == [2]
    # Whether this probe outlasts the timeout depends on the machine's speed; the property itself is
    # shown, independently of speed, by test_rank0_phase_longer_than_the_timeout_does_not_kill_the_job.
    results = json.loads((out / "live_probe" / "step_0000002" / "results.json").read_text())
    assert results["device"] == "cpu"
    assert results["trunk_images_forwarded"] == 40 + 10  # the bounded subset, each image once
    assert (out / "export").is_dir() and (out / "checkpoints" / "step_0000002").is_dir()
    assert not list(out.rglob(".rank0-*"))  # every rank-0 phase cleaned up its marker


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs for the cache")
def test_feature_cache_larger_than_its_disk_is_refused(betons: dict[str, Path], tmp_path: Path) -> None:
    """run/probe.py with the feature cache on a disk too small for it (a real tmpfs): exit 2 naming
    both sizes before a byte is written."""
    import torch

    from aim_ds.model.registry import create_model
    from aim_ds.weights.export import save_export

    torch.manual_seed(0)
    save_export(
        create_model("aim-test").state_dict(), tmp_path / "weights", model_name="aim-test", overrides={}, step=0
    )
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode()[-200:]}")
    try:
        command = [
            sys.executable, str(ROOT / "run/probe.py"), "--config", str(ROOT / "run/configs/probe_aim-test.yaml"),
            "--weights", str(tmp_path / "weights"), f"data.train_path={betons['train']}",
            f"data.val_path={betons['val']}", f"out_dir={tmp_path / 'probe'}", "train.augment=false",
            "train.batch_size=50", f"features.cache_dir={small}", "data.num_workers=1", "device=cpu",
        ]  # fmt: skip
        proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert re.search(
            r"the train feature cache needs [\d.]+ [KMG]iB on .*but only [\d.]+ KiB is free there", proc.stderr
        )
        assert "data.max_train_images" in proc.stderr
        assert list(small.iterdir()) == []  # nothing half-written
    finally:
        subprocess.run(["umount", str(small)], check=False)


# ----------------------------------------------------------------------------- make setup without root

SETUP = ROOT / "scripts" / "setup.sh"
CHECK_TOOLS = ("bash", "pkg-config", "ldconfig", "dpkg-query", "grep", "cut", "sort", "tr", "id", "dirname", "cat")


def _as_nobody(path: str) -> subprocess.CompletedProcess:
    env = {"PATH": path, "HOME": "/nonexistent", "LANG": "C"}
    return subprocess.run(
        [shutil.which("runuser") or "runuser", "-u", "nobody", "--", "/bin/bash", str(SETUP), "--check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="runs the check as another user")
def test_setup_check_without_root(request: pytest.FixtureRequest) -> None:
    """As an ordinary user (nobody) the system-library check passes where the libraries are present
    (no sudo, no apt), and names the missing one with the apt and conda commands otherwise."""
    if not SETUP.stat().st_mode & 0o004 or not os.access(ROOT, os.X_OK):
        pytest.skip("the checkout is not readable by other users")
    proc = _as_nobody("/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    assert proc.returncode == 0 and "all present" in proc.stdout, proc.stdout + proc.stderr
    # The same machine with g++ out of reach (a PATH holding only the tools the check uses).
    bin_dir = Path(tempfile.mkdtemp(prefix="aim-ds-check-", dir="/tmp"))  # pytest's tmp_path is root's only
    request.addfinalizer(lambda: shutil.rmtree(bin_dir, ignore_errors=True))
    bin_dir.chmod(0o755)
    for tool in CHECK_TOOLS:
        found = shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin")
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    proc = _as_nobody(str(bin_dir))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "missing system libraries: g++" in proc.stdout
    assert "sudo apt-get install -y --no-install-recommends g++" in proc.stdout
    assert "conda install -c conda-forge gxx" in proc.stdout
    assert "sudo:" not in proc.stderr and "Permission denied" not in proc.stderr + proc.stdout


def test_lock_pins_what_setup_installs() -> None:
    """requirements.lock pins every requirement of requirements.txt (the versions the suite passed with)."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version

    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")
            assert name in pins, f"{name} (requirements.txt) is not pinned in requirements.lock"
    assert "+" not in pins["torch"]  # one pin for the CPU and the CUDA wheel
    assert "aim-ds" not in pins
