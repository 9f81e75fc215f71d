"""Hostile files through the real drivers: nothing handed to DeepSpeed is unpickled unchecked, and
bad configs, DeepSpeed JSONs and weights end in one line, exit 2, before anything is built.

One tiny real checkpoint (aim-test, ZeRO-3, 2 steps, by the driver as a plain process: a DeepSpeed
world of one) is written once and copied per case; its ``COMPLETE`` marker claims two ranks. A crafted file is a pickle whose payload creates a marker file when unpickled by
``torch.load(weights_only=False)``: in every case the run exits 2 naming the file and the marker
never appears.

- Resume on another world size (the ``COMPLETE`` marker says 2 ranks, the plain process is one): the
  newest checkpoint is checked before DeepSpeed's converter runs, and the converter itself runs
  weights-only (:mod:`aim_ds.weights.safe_universal`), checked here on its own too.
- A planted ``<tag>/universal/`` folder, reached with ``checkpoint.load_universal: true`` and no
  change of world size, or by a change of world size: checked recursively before DeepSpeed opens it.
- A clean checkpoint still resumes on another world size through the weights-only converter, and
  the universal files it writes pass the weights-only check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_pretrain_deepspeed import LAUNCH_TIMEOUT_S, PERSISTENCE_THRESHOLD, ROOT, VENV_BIN

from aim_ds.metrics import read_metrics
from aim_ds.train.lock import LOCK_FILE
from aim_ds.weights import checkpoint as ckpt

STEPS = 2


class _WritesAFile:
    """Unpickling this runs ``open(path, "w")``: what a hostile checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _craft(file: Path, marker: Path) -> None:
    """Replace ``file`` by a pickle that would create ``marker`` when loaded with weights_only=False."""
    torch.save({"module": {}, "buffer_names": [], "param_shapes": [], "payload": _WritesAFile(marker)}, file)


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def files(betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    cfg = yaml.safe_load((ROOT / "run/configs/aim-test.yaml").read_text())
    cfg["data"].update(sources=[{"path": str(betons["train"]), "prob": 1.0}], val_path="")
    cfg["train"].update(batch_size=8, micro_batch_size=4, steps=STEPS)
    cfg["checkpoint"] = {"every_steps": STEPS, "keep_last": 1}
    cfg["export"] = {"enabled": False}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = PERSISTENCE_THRESHOLD
    (root / "zero3.json").write_text(json.dumps(ds))
    ds["checkpoint"] = {"load_universal": True}
    (root / "zero3_universal.json").write_text(json.dumps(ds))
    return {"root": root, "config": root / "run.yaml", "ds": root / "zero3.json", "betons": betons["train"]}


def _driver(files: dict[str, Path], out: Path, *overrides: str, ds: Path | None = None) -> list[str]:
    return [
        str(ROOT / "run/pretrain.py"), "--deepspeed", str(ds or files["ds"]), "--config", str(files["config"]),
        f"out_dir={out}", *overrides,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(files: dict[str, Path]) -> Path:
    """The tiny real checkpoint: 2 steps of aim-test, ZeRO-3, by the driver as a plain process (a
    DeepSpeed world of one). Its ``COMPLETE`` marker is then made to claim 2 ranks, as a checkpoint
    written by two would: a resume by one rank converts it to DeepSpeed's universal form."""
    out = files["root"] / "trained"
    done = _plain(_driver(files, out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    tag = out / "checkpoints" / ckpt.tag_for_step(STEPS)
    assert ckpt.saved_world_size(tag) == 1
    ckpt.mark_complete(tag, {"step": STEPS, "world_size": 2})
    return out


def _copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out, out / "checkpoints" / ckpt.tag_for_step(STEPS)


def _plain(command: list[str]) -> subprocess.CompletedProcess:
    """The real driver as a plain process: a DeepSpeed world of one rank."""
    return subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=2 * LAUNCH_TIMEOUT_S
    )


def _one_error(proc: subprocess.CompletedProcess, *named: str) -> str:
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = proc.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if " ERROR " in line or line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    # One message: its line, plus the indented list a resume adds (one line per checkpoint tried).
    end = errors[0] + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    message = "\n".join(lines[errors[0] : end])
    for name in named:
        assert name in message, message
    return message


@pytest.mark.deepspeed
def test_resume_on_another_world_size_checks_before_converting(
    files: dict[str, Path], trained: Path, tmp_path: Path
) -> None:
    out, tag = _copy(trained, tmp_path)
    marker = tmp_path / "PWNED"
    crafted = sorted(tag.glob("*optim_states.pt"))[-1]
    _craft(crafted, marker)
    proc = _plain(_driver(files, out, f"train.steps={STEPS + 2}"))
    _one_error(proc, str(crafted))
    assert not marker.exists()
    assert not (tag / ckpt.UNIVERSAL).exists() and not list(tag.glob("*.partial"))
    assert not (out / LOCK_FILE).exists()


def test_converter_runs_nothing_even_unchecked(trained: Path, tmp_path: Path) -> None:
    """The second layer on its own: the converter process, handed the crafted folder without our
    check, refuses the pickle (DeepSpeed's own converter, the broken variant, creates the marker)."""
    _, tag = _copy(trained, tmp_path)
    marker = tmp_path / "PWNED"
    _craft(sorted(tag.glob("*optim_states.pt"))[0], marker)
    command = ckpt.universal_command(tag)
    proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode != 0 and "UnpicklingError" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()


@pytest.mark.deepspeed
@pytest.mark.parametrize("how", ["load_universal", "world_size"])
def test_planted_universal_folder_runs_nothing(files: dict[str, Path], trained: Path, tmp_path: Path, how: str) -> None:
    """A ``universal/`` folder planted in the newest checkpoint, reached through the DeepSpeed JSON's
    ``checkpoint.load_universal`` with the saved world size unchanged, or through a world size change
    (the folder is then taken as already converted)."""
    out, tag = _copy(trained, tmp_path)
    marker = tmp_path / "PWNED"
    crafted = tag / ckpt.UNIVERSAL / "zero" / "trunk.blocks.0.mlp.fc1.weight" / "fp32.pt"
    crafted.parent.mkdir(parents=True)
    shutil.copy(sorted(tag.glob("*model_states.pt"))[0], tag / ckpt.UNIVERSAL / "mp_rank_00_model_states.pt")
    _craft(crafted, marker)
    ds = None
    if how == "load_universal":
        ckpt.mark_complete(tag, {"step": STEPS, "world_size": 1})  # the world it is resumed on: no conversion
        ds = files["root"] / "zero3_universal.json"
    proc = _plain(_driver(files, out, f"train.steps={STEPS + 2}", ds=ds))
    _one_error(proc, str(crafted))
    assert not marker.exists()
    assert tag.is_dir() and not list((out / "checkpoints").glob("*.damaged"))


@pytest.mark.deepspeed
def test_clean_checkpoint_resumes_on_another_world_size(files: dict[str, Path], trained: Path, tmp_path: Path) -> None:
    """The weights-only converter and loads still do the job: a checkpoint said to be two ranks', one
    rank resumes from its universal form and trains on; the universal files pass the weights-only
    check."""
    out, tag = _copy(trained, tmp_path)
    proc = _plain(_driver(files, out, f"train.steps={STEPS + 1}", "checkpoint.keep_last=0"))  # keep the tag
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ckpt.verify_tag(tag) is None and list((tag / ckpt.UNIVERSAL).rglob("*.pt"))
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")]
    assert steps == [1, 2, 3], steps  # steps 1-2 from the first run, step 3 after the resume only
    assert "resumed from step_0000002" in proc.stderr, proc.stderr[-3000:]


def test_verify_tag_refuses_links_out_and_fifos(trained: Path, tmp_path: Path) -> None:
    """Every entry of a tag folder, recursively: a symlink leaving the run folder and a FIFO (which
    would block the open) are named, without opening anything."""
    out, tag = _copy(trained, tmp_path)
    assert ckpt.verify_tag(tag) is None
    outside = tmp_path / "elsewhere.pt"
    shutil.copy(sorted(tag.glob("*model_states.pt"))[0], outside)
    link = tag / ckpt.UNIVERSAL / "zero" / "p" / "fp32.pt"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    assert "outside the run folder" in (ckpt.verify_tag(tag) or "")
    link.unlink()
    os.mkfifo(link)
    assert str(link) in (ckpt.verify_tag(tag) or "") and "not a regular file" in (ckpt.verify_tag(tag) or "")
    link.unlink()
    (tag / ckpt.UNIVERSAL / "loop").symlink_to(tag)  # a link back up: walked once, no endless loop
    assert ckpt.verify_tag(tag) is None


# ---------------------------------------------------------------------------------------------
# One line, exit 2, before the engine


def _base(files: dict[str, Path], tmp_path: Path) -> list[str]:
    return _driver(files, tmp_path / "run")


BAD_RUNS = [
    (["data.num_workers=0"], "data.num_workers=0"),
    (["data.resize_size=16"], "data.resize_size=16"),
    (["train.seed=1e30"], "train.seed=1000000000000000019884624838656"),
    (["probe.every_steps=5"], "probe.every_steps > 0 needs probe.train_path"),
]


@pytest.mark.parametrize(("overrides", "named"), BAD_RUNS, ids=[o[0].split("=")[0] for o, _ in BAD_RUNS])
def test_bad_run_config_one_line_before_the_engine(
    files: dict[str, Path], tmp_path: Path, overrides: list[str], named: str
) -> None:
    proc = _plain([*_base(files, tmp_path), *overrides])
    _one_error(proc, named)
    assert "DeepSpeed info" not in proc.stderr and "deepspeed.initialize" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_overlong_out_dir_is_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / ("x" * 300)
    proc = _plain(_driver(files, out))
    _one_error(proc, "out_dir=", "longer than")


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


HOSTILE_TEXT = {
    "non_utf8": (b"train:\n  batch_size: 8\n  steps: \xff\xfe\n", "not UTF-8 text"),
    "duplicate": (b"train:\n  batch_size: 8\ndata:\n  num_workers: 1\ntrain:\n  batch_size: 4096\n", "lines 1 and 5"),
    "alias_bomb": (
        (
            'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
            + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
        ).encode(),
        "expands to more than",
    ),
}


@pytest.mark.parametrize("case", [*HOSTILE_TEXT, "fifo", "device"])
def test_hostile_run_config_file(files: dict[str, Path], tmp_path: Path, case: str) -> None:
    path = tmp_path / "run.yaml"
    if case == "fifo":
        _fifo(path)
        why = "is a FIFO"
    elif case == "device":
        path, why = Path("/dev/zero"), "is a character device"
    else:
        data, why = HOSTILE_TEXT[case]
        path.write_bytes(data)
    command = _base(files, tmp_path)
    command[command.index("--config") + 1] = str(path)
    proc = _plain(command)
    message = _one_error(proc, str(path), why)
    assert len(message) < 600  # an expanded value is never printed


DS_BAD = {
    "list": ("[1, 2]", "must hold a JSON object"),
    "string_section": ('{"zero_optimization": "3"}', "'zero_optimization' must be a JSON object"),
    "offload_list": ('{"zero_optimization": {"stage": 3, "offload_param": [1]}}', "offload_param"),
    "batch_string": ('{"train_batch_size": [8]}', "'train_batch_size' must be a positive integer"),
    "duplicate": ('{"zero_optimization": {"stage": 3}, "zero_optimization": {"stage": 0}}', "appears twice"),
    "non_utf8": (b'{"a": "\xff"}', "not UTF-8 text"),
}


@pytest.mark.parametrize("case", [*DS_BAD, "fifo"])
def test_hostile_deepspeed_json(files: dict[str, Path], tmp_path: Path, case: str) -> None:
    path = tmp_path / "ds.json"
    if case == "fifo":
        _fifo(path)
        why = "is a FIFO"
    else:
        text, why = DS_BAD[case]
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    proc = _plain(_driver(files, tmp_path / "run", ds=path))
    _one_error(proc, str(path), why)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Weights folders: layout checked before any tensor is allocated


def _reshape_saved(tag: Path, shape: list[int]) -> None:
    """Give the first parameter of every model-states file the shape ``shape`` (a lying layout)."""
    for file in tag.glob("*model_states.pt"):
        state = torch.load(file, weights_only=False)  # our own file, written by the fixture
        group = state["param_shapes"][0]
        first = next(iter(group))
        group[first] = torch.Size(shape) if min(shape) >= 0 else shape
        torch.save(state, file)


@pytest.mark.parametrize("shape", [[-4, 64], [1 << 40, 1 << 20]], ids=["negative", "huge"])
def test_lying_param_shapes_export_only(trained: Path, tmp_path: Path, shape: list[int]) -> None:
    out, tag = _copy(trained, tmp_path)
    _reshape_saved(tag, shape)
    proc = _plain([str(ROOT / "run/pretrain.py"), "--export-only", str(out)])
    _one_error(proc, str(tag))
    assert not (out / "export").exists()


def _probe_config(tmp_path: Path, betons: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "run/configs/probe_aim-test.yaml").read_text())
    cfg["data"].update(train_path=str(betons), val_path=str(betons), num_workers=1)
    cfg["out_dir"] = str(tmp_path / "probe")
    cfg["train"].update(epochs=1, lrs=[1e-3])
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("shape", [[-4, 64], [1 << 40, 1 << 20]], ids=["negative", "huge"])
def test_lying_param_shapes_probe(files: dict[str, Path], trained: Path, tmp_path: Path, shape: list[int]) -> None:
    out, tag = _copy(trained, tmp_path)
    _reshape_saved(tag, shape)
    config = _probe_config(tmp_path, files["betons"])
    proc = _plain([str(ROOT / "run/probe.py"), "--config", str(config), "--weights", str(out)])
    _one_error(proc, str(tag))


def test_fifo_as_probe_weights(files: dict[str, Path], tmp_path: Path) -> None:
    config = _probe_config(tmp_path, files["betons"])
    weights = _fifo(tmp_path / "model.safetensors")
    proc = _plain([str(ROOT / "run/probe.py"), "--config", str(config), "--weights", str(weights)])
    _one_error(proc, str(weights), "is a FIFO")


def test_fifo_as_probe_head(files: dict[str, Path], tmp_path: Path) -> None:
    """A FIFO as ``--head`` (the safetensors reader would wait on it forever): exit 2 naming it, before
    the trunk is read (the weights named here do not exist: the head is checked first)."""
    config = _probe_config(tmp_path, files["betons"])
    head = _fifo(tmp_path / "head.safetensors")
    command = [str(ROOT / "run/probe.py"), "--config", str(config), "--weights", str(tmp_path / "no_weights")]
    proc = subprocess.run(
        [sys.executable, *command, "--head", str(head), "--eval-only"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    _one_error(proc, f"head file '{head}' is a FIFO, not a regular file")


def test_export_only_without_a_complete_checkpoint(trained: Path, tmp_path: Path) -> None:
    out, tag = _copy(trained, tmp_path)
    (tag / ckpt.COMPLETE_MARKER).unlink()
    proc = _plain([str(ROOT / "run/pretrain.py"), "--export-only", str(out)])
    _one_error(proc, "no complete checkpoint")


@pytest.mark.deepspeed
def test_failed_universal_conversion_is_one_line(files: dict[str, Path], trained: Path, tmp_path: Path) -> None:
    """A checkpoint that passes the weights-only check but that DeepSpeed's converter cannot convert
    (an optimizer shard with no fp32 groups): exit 2, one line, before any engine."""
    out, tag = _copy(trained, tmp_path)
    for file in tag.glob("*optim_states.pt"):
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": 2}}, file)
    proc = _plain(_driver(files, out, f"train.steps={STEPS + 2}"))
    _one_error(proc, "universal checkpoint failed")
    assert not (tag / ckpt.UNIVERSAL).exists() and not (tag / f"{ckpt.UNIVERSAL}.partial").exists()
