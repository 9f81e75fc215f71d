"""Promises of the README's "What happens when", each through the real driver: ZeRO-3 on two CPU
ranks under the ``deepspeed`` launcher where the promise is about ranks or checkpoints, a plain
process where it is about a check made before any process group exists.

One base run (4 steps, checkpoints at steps 2 and 4) is shared; each test that damages a run works
on its own copy of it, so the tests pass in any order.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import make_imagefolder

from aim_ds.data.writers import WriteOptions, convert_imagefolder
from aim_ds.distributed import free_port
from aim_ds.weights import checkpoint as ckpt

pytestmark = pytest.mark.deepspeed

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEEPSPEED = shutil.which("deepspeed", path=str(VENV_BIN)) or shutil.which("deepspeed")
DRIVER = Path(__file__).resolve().parent / "promises_driver.py"
TIMEOUT_S = 600  # a launch waits for any DeepSpeed extension another process is building


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("promises")
    folder = make_imagefolder(root / "images", {"a": 12, "b": 12}, size=(48, 40))
    convert_imagefolder(folder, root / "train.beton", WriteOptions(workers=1), progress=False)
    return root / "train.beton"


def _args(beton: Path, out_dir: Path, *overrides: str) -> list[str]:
    return [
        "--deepspeed", str(ROOT / "ds_configs/zero3.json"), "--config", str(ROOT / "run/configs/aim-test.yaml"),
        f"data.sources=[{{path: {beton}, prob: 1.0}}]", "data.val_path=", "data.num_workers=1",
        "train.batch_size=8", "train.micro_batch_size=4", "train.steps=4", "log.every_steps=1",
        "checkpoint.every_steps=2", "checkpoint.keep_last=3", "export.enabled=false", f"out_dir={out_dir}", *overrides,
    ]  # fmt: skip


def _launch(
    beton: Path, out_dir: Path, *overrides: str, fault: str = "none", **fault_env: str
) -> tuple[subprocess.CompletedProcess, dict]:
    """Two ranks under the ``deepspeed`` launcher, in a session of their own (a fault may SIGKILL its
    process group); returns the launcher's result and each rank's exit code (none for a killed rank).
    ``fault_env``: ``PROMISES_*`` settings of the fault (see tests/promises_driver.py)."""
    assert DEEPSPEED, "the deepspeed launcher is not installed next to this Python"
    exits = out_dir.parent / f"{out_dir.name}.exits"
    shutil.rmtree(exits, ignore_errors=True)
    exits.mkdir(parents=True)
    command = [
        DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
        str(DRIVER), *_args(beton, out_dir, *overrides),
    ]  # fmt: skip
    env = dict(_env(), PROMISES_FAULT=fault, PROMISES_EXITS=str(exits), **fault_env)
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, start_new_session=True
    )
    codes = {p.stem: int(p.read_text()) for p in exits.glob("rank*.txt")}
    return proc, codes


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


@pytest.fixture(scope="module")
def base(beton: Path) -> Path:
    """4 steps on two ranks: complete checkpoints at steps 2 and 4."""
    out = beton.parent / "base"
    proc, codes = _launch(beton, out)
    assert proc.returncode == 0 and codes == {"rank0": 0, "rank1": 0}, (proc.stdout + proc.stderr)[-4000:]
    assert [s for s, _ in ckpt.list_complete(out / "checkpoints")] == [2, 4]
    return out


def _copy(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


class _WritesAFile:
    """Unpickling this runs ``open(path, "w")``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_where_no_checkpoint_loads(beton: Path, base: Path, tmp_path: Path) -> None:
    """Every complete checkpoint damaged (one truncated, one crafted): exit 2 on every rank, each
    checkpoint listed with its reason, nothing renamed or pruned, config.yaml and ds_config.json kept."""
    out = _copy(base, tmp_path)
    (_, older), (_, newest) = ckpt.list_complete(out / "checkpoints")
    (shard,) = newest.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    marker = tmp_path / "PWNED"
    crafted = older / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"module": {}, "buffer_names": [], "param_shapes": [], "payload": _WritesAFile(marker)}, crafted)
    kept = {name: (out / name).read_bytes() for name in ("config.yaml", "ds_config.json", "metrics.jsonl")}
    listing = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc, codes = _launch(beton, out, "train.steps=8")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and codes == {"rank0": 2, "rank1": 2}, text[-4000:]
    assert "no complete checkpoint loads" in text, text[-4000:]
    # Each checkpoint on its own line of the error, with its reason naming the file.
    assert f"{newest.name}: {shard}: damaged" in text, text[-4000:]
    assert f"{older.name}: {crafted}: refused" in text, text[-4000:]
    assert "Traceback" not in text
    assert not marker.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == listing  # nothing renamed, set aside or pruned
    assert {name: (out / name).read_bytes() for name in kept} == kept


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_saves_killed_part_way_leave_the_complete_folders(beton: Path, base: Path, tmp_path: Path) -> None:
    """SIGKILL of the whole job (launcher and both ranks) inside a save, twice, then a plain resume:

    1. while step 6 is written (every rank's shards in ``step_6.partial``, its marker not yet written):
       steps 2 and 4 stay byte for byte as they were, the partial folder never counts as complete;
    2. while step 4, which already has a complete folder, is saved again (the resume started from
       step 2): killed after the old folder was moved aside as ``step_4.old`` and before the new one
       took its name;
    3. the next run puts ``step_4.old`` back (with a warning), resumes from it, not from step 2, and
       runs to the end; the debris of both kills is gone and step 4 holds the bytes it had before.
    """
    out = _copy(base, tmp_path)
    ckpt_dir = out / "checkpoints"
    before = {tag: _files(ckpt_dir / tag) for tag in ("step_0000002", "step_0000004")}

    proc, codes = _launch(beton, out, "train.steps=8", fault="kill_writing", PROMISES_TAG="step_0000006")
    text = proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGKILL and codes == {}, text[-4000:]  # killed, no rank exited
    partial = ckpt_dir / "step_0000006.partial"
    assert list(partial.glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")), text[-4000:]  # killed inside the save
    assert not (partial / ckpt.COMPLETE_MARKER).exists() and not (ckpt_dir / "step_0000006").exists()
    assert [s for s, _ in ckpt.list_complete(ckpt_dir)] == [2, 4]
    assert {tag: _files(ckpt_dir / tag) for tag in before} == before

    held = tmp_path / "held" / "step_0000004"
    held.parent.mkdir()
    os.replace(ckpt_dir / "step_0000004", held)
    proc, codes = _launch(
        beton, out, "train.steps=8", fault="kill_in_swap", PROMISES_TAG="step_0000004", PROMISES_HELD=str(held)
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGKILL and codes == {}, text[-4000:]
    assert "resumed from step_0000002" in text, text[-4000:]
    old, new = ckpt_dir / "step_0000004.old", ckpt_dir / "step_0000004.partial"
    assert not (ckpt_dir / "step_0000004").exists() and ckpt.is_complete(new), text[-4000:]  # killed mid-swap
    assert _files(old) == before["step_0000004"]

    proc, codes = _launch(beton, out, "train.steps=8")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and codes == {"rank0": 0, "rank1": 0}, text[-4000:]
    assert f"restored {ckpt_dir / 'step_0000004'}" in text and "resumed from step_0000004" in text, text[-4000:]
    assert [s for s, _ in ckpt.list_complete(ckpt_dir)] == [4, 6, 8]  # keep_last=3
    leftovers = sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("step_"))  # no .partial, no .old
    assert leftovers == ["step_0000004", "step_0000006", "step_0000008"], leftovers
    assert _files(ckpt_dir / "step_0000004") == before["step_0000004"]


def test_nonfinite_gradient_norm_with_a_finite_loss(beton: Path, tmp_path: Path) -> None:
    """A gradient norm past fp32's range while the loss is finite: exit 3 on every rank, naming the
    step and the gradient norm; nothing saved."""
    out = tmp_path / "run"
    proc, codes = _launch(beton, out, "checkpoint.every_steps=1", fault="inf_grad")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and codes == {"rank0": 3, "rank1": 3}, text[-4000:]
    errors = _errors(text)
    # The loss is checked first: naming the gradient norm means the loss of step 1 was finite.
    named = "non-finite gradient norm (inf) at optimizer step 1; stopping without saving"
    assert len(errors) == 2 and all(named in line for line in errors), text[-4000:]
    assert "OVERFLOW! Skipping step" in text  # DeepSpeed saw the non-finite gradients too
    assert "Traceback" not in text
    assert not ckpt.list_tags(out / "checkpoints") and not list((out / "checkpoints").glob("*"))
    assert not (out / "export").exists()


def test_memory_check_names_what_fits_and_can_be_skipped(beton: Path, tmp_path: Path) -> None:
    """A micro-batch whose activations exceed this machine's memory: exit 2 before the engine,
    naming micro-batch settings that fit. ``--skip-memory-check`` starts anyway (it gets as far as
    the engine, then stops at the next check, exit 2 in one line: the 24-image beton has no full
    micro-batch)."""
    out = tmp_path / "run"
    huge = ["train.batch_size=262144", "train.micro_batch_size=262144"]
    command = [sys.executable, str(ROOT / "run/pretrain.py"), *_args(beton, out, *huge)]
    proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "per rank of host memory" in errors[0], proc.stderr[-4000:]
    assert "train.micro_batch_size=" in errors[0] and "model.grad_checkpointing=" in errors[0]
    assert "Traceback" not in proc.stderr and "parameters; world" not in proc.stderr  # no engine
    skipped = subprocess.run(
        [*command[:2], "--skip-memory-check", *command[2:]], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert skipped.returncode == 2, skipped.stderr[-4000:]
    assert "parameters; world 1 x micro-batch 262144" in skipped.stderr, skipped.stderr[-4000:]
    assert "per rank of host memory" not in skipped.stderr
    errors = _errors(skipped.stderr)
    assert len(errors) == 1 and "cannot fill one global batch of 262144" in errors[0], skipped.stderr[-4000:]
    assert "Traceback" not in skipped.stderr


def test_batch_that_does_not_split_fails_on_every_rank(beton: Path, tmp_path: Path) -> None:
    """train.batch_size=7 with micro-batch 4 on two ranks: exit 2 on every rank, one line each, before
    any process group or engine."""
    out = tmp_path / "run"
    proc, codes = _launch(beton, out, "train.batch_size=7")
    text = proc.stdout + proc.stderr
    assert codes == {"rank0": 2, "rank1": 2}, text[-4000:]
    errors = _errors(text)
    assert len(errors) == 2 and all("train.batch_size=7" in line for line in errors), text[-4000:]
    assert "Traceback" not in text and not out.exists()


_ROOT_POWERS = "-dac_override,-dac_read_search"  # the capabilities that let root write and search anywhere


def _as_plain_user(command: list[str]) -> list[str]:
    """``command`` bound by file modes: as root, run without the capabilities that override them
    (``setpriv``), so a folder of mode 555 refuses root's writes as it refuses anyone's."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is missing")
    return [setpriv, f"--bounding-set={_ROOT_POWERS}", f"--inh-caps={_ROOT_POWERS}", *command]


def _in_read_only_mount(folder: Path, command: list[str]) -> list[str]:
    """``command`` in a mount namespace of its own where ``folder`` is a read-only bind mount of itself:
    the mount exists only for that process and ends with it (nothing to clean up, nothing leaks to others)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("a read-only bind mount needs root and unshare (util-linux)")
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && shift && exec "$@"'
    return [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(folder), *command]


@pytest.mark.parametrize("how", ["mode_555", "read_only_mount"])
def test_unwritable_checkpoint_folder_fails_in_one_line(beton: Path, base: Path, tmp_path: Path, how: str) -> None:
    """A run folder whose checkpoints/ cannot be written (a folder of mode 555, also for root: the driver
    runs without root's override capabilities; a read-only mount): exit 2 before the engine, one line
    naming the folder and why, nothing touched."""
    out = _copy(base, tmp_path)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    command = [sys.executable, str(ROOT / "run/pretrain.py"), *_args(beton, out, "train.steps=8")]
    if how == "mode_555":
        command, why = _as_plain_user(command), "not writable (Permission denied)"
        (out / "checkpoints").chmod(0o555)
    else:
        command, why = _in_read_only_mount(out / "checkpoints", command), "not writable (Read-only file system)"
    try:
        proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        (out / "checkpoints").chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and f"'{out / 'checkpoints'}'" in errors[0] and why in errors[0], proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "parameters; world" not in proc.stderr  # no engine
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
