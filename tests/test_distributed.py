"""Process-level helpers of aim_ds.distributed that need no process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Free a 20 MiB block (glibc then raises its mmap threshold to 20 MiB), make 100 blocks of 8 MiB,
# keep only the last one (it pins the top of the heap), and report the resident set size.
FRAGMENT = """
import sys
import torch
from aim_ds.distributed import return_freed_memory
if sys.argv[1] == "on":
    assert return_freed_memory()
big = torch.ones(20 * 2**20, dtype=torch.uint8)
del big
blocks = [torch.ones(8 * 2**20, dtype=torch.uint8) for _ in range(100)]
last = blocks[-1]
del blocks
with open("/proc/self/statm") as statm:
    print(int(statm.read().split()[1]) * 4096)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_host_memory_goes_back_to_the_system(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the fixed threshold glibc keeps ~800 MiB of freed 8 MiB blocks in its heap; with
    return_freed_memory (called by init_distributed on every device) they are returned at once."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONPATH"] = str(ROOT)
    resident = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", FRAGMENT, mode], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        resident[mode] = int(proc.stdout.split()[-1])
    assert resident["off"] - resident["on"] > 500 * 2**20, resident  # measured: ~790 MiB
    from aim_ds.distributed import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory() is False  # the user's own setting wins
