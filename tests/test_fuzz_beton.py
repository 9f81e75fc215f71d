"""The fuzzer of tests/fuzz_beton.py on a real beton, in a child process: a crash shows as a signal exit
status (faulthandler prints where), a hang as the timeout. Budget: AIM_FUZZ_EXAMPLES per target (default 40,
seconds of ``make test``); the long run and its figures are in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fuzz_beton_sidecar_and_index_readers(betons: dict[str, Path]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), AIM_FUZZ_EXAMPLES=os.environ.get("AIM_FUZZ_EXAMPLES", "40"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz_beton.py"), str(betons["val"])],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failures"] == []
    outcomes = summary["outcomes"]
    # Both sides of the property were exercised: damaged files refused, harmless edits read unchanged.
    assert outcomes["beton"].get("error", 0) > 0 and outcomes["beton"].get("same", 0) > 0, outcomes
    assert sum(outcomes["sidecar"].values()) > 0 and sum(outcomes["index"].values()) > 0, outcomes
