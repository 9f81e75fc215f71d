"""The GPU step benchmark's harness, exercised on the CPU with the test model (real DeepSpeed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aim_ds.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.deepspeed
def test_bench_gpu_harness_runs_plain_zero2_zero3_and_both_attentions_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port())}
    cmd = [
        sys.executable, "bench/bench_gpu.py", "--models", "aim-test", "--micro-batch", "8", "--accumulation", "2",
        "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    results = report["results"]
    assert {(r["attention"], r["mode"]) for r in results} == {("sdpa", "plain"), ("sdpa", "zero2"), ("sdpa", "zero3")}
    for r in results:
        assert r["model"] == "aim-test" and (r["micro_batch"], r["accumulation"]) == (8, 2)
        assert r["step_s"] > 0 and r["images_per_second"] == pytest.approx(16 / r["step_s"])
        assert r["tflops_per_device"] > 0 and r["peak_mem_gib"] > 0
    # FlexAttention cannot train on CPU: each of its rows is skipped with PyTorch's reason.
    assert len(report["skipped"]) == 3
    assert all("FlexAttention does not support backward on CPU" in s for s in report["skipped"])
    table = out.read_text()
    assert "| aim-test | sdpa | zero3 | 8 x 2 |" in table and "step / plain step" in table
    assert "- skipped: aim-test flex plain: FlexAttention does not support backward on CPU" in table
