"""The GPU step benchmark's harness, exercised on the CPU with the test model (real DeepSpeed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.deepspeed
def test_bench_gpu_harness_runs_zero3_and_plain_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    from aim_ds.distributed import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port())}  # not a fixed port: other jobs
    cmd = [
        sys.executable,
        "bench/bench_gpu.py",
        "--models",
        "aim-test",
        "--micro-batch",
        "8",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert {r["mode"] for r in results} == {"zero3", "plain"}
    for r in results:
        assert r["model"] == "aim-test" and r["micro_batch"] == 8
        assert r["step_s"] > 0 and r["images_per_second"] == pytest.approx(8 / r["step_s"])
        assert r["tflops_per_device"] > 0
    table = out.read_text()
    assert "| aim-test | zero3 | 8 |" in table and "ZeRO-3 / plain step" in table
