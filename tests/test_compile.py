"""``model.compile`` (per-block torch.compile, inductor on CPU) under ZeRO-3 on two CPU ranks, through the
real driver: the losses of 20 steps equal eager's within numerical noise, also across a stop at step 10
and a resume, and no ``_orig_mod.`` prefix reaches the checkpoints or the export."""

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
from safetensors import safe_open

from aim_ds.distributed import free_port
from aim_ds.metrics import read_metrics

pytestmark = pytest.mark.deepspeed

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEEPSPEED = shutil.which("deepspeed", path=str(VENV_BIN)) or shutil.which("deepspeed")
STEPS = 20


def _launch(config: Path, out_dir: Path, *overrides: str) -> dict[int, float]:
    assert DEEPSPEED, "the deepspeed launcher is not installed next to this Python"
    cmd = [
        DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "run/pretrain.py"),
        "--deepspeed", str(ROOT / "ds_configs/zero3_fp32.json"), "--config", str(config), f"out_dir={out_dir}",
        *overrides,
    ]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl", "train")}


@pytest.fixture(scope="module")
def runs(betons: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("compile")
    cfg = yaml.safe_load((ROOT / "run/configs/aim-test.yaml").read_text())
    cfg["data"].update(sources=[{"path": str(betons["train"]), "prob": 1.0}], val_path="")
    cfg["train"].update(batch_size=16, micro_batch_size=8, steps=STEPS)
    cfg["val"] = {"every_steps": 0}
    cfg["log"] = {"every_steps": 1}
    cfg["checkpoint"] = {"every_steps": 10, "keep_last": 2}
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    eager = _launch(config, root / "eager")
    compiled = _launch(config, root / "compiled", "model.compile=true", "train.stop_after_steps=10")
    compiled.update(_launch(config, root / "compiled", "model.compile=true"))  # resumes at step 10
    return {"eager": eager, "compiled": compiled, "dir": root / "compiled"}


def test_compiled_losses_equal_eager_across_a_resume(runs: dict[str, object]) -> None:
    eager, compiled = runs["eager"], runs["compiled"]
    assert sorted(compiled) == sorted(eager) == list(range(1, STEPS + 1))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4, abs=1e-5), step
    assert eager[STEPS] < 0.8 * eager[1]  # it trained


def test_no_orig_mod_in_checkpoints_or_export(runs: dict[str, object]) -> None:
    run_dir: Path = runs["dir"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["compile"] is True
    with safe_open(run_dir / "export" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k for k in keys)
    assert any(k.startswith("trunk.blocks.0.") for k in keys)
    states = sorted((run_dir / "checkpoints").glob("*/zero_pp_rank_0_mp_rank_00_model_states.pt"))
    assert len(states) == 2
    for path in states:
        names = json.dumps(list(torch.load(path, map_location="cpu", weights_only=False)["param_shapes"][0]))
        assert "_orig_mod" not in names and "trunk.blocks.0." in names
