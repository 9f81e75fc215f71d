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


# After init_distributed's setting (return_freed_memory), fit_host_allocator for a model of
# argv[1] parameters on device argv[2]; then allocate, fill and free a 4 MiB block (aim-tiny's MLP
# activation at micro-batch 16) over and over, and report the page faults per block.
CHURN = """
import resource, sys
import torch
from aim_ds.distributed import fit_host_allocator, return_freed_memory
assert return_freed_memory()
print(fit_host_allocator(int(sys.argv[1]), torch.device(sys.argv[2])))
def block():
    torch.ones(2**20)  # 4 MiB, every page written, freed at once
for _ in range(5):
    block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    block()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_small_cpu_models_reuse_freed_blocks_without_page_faults() -> None:
    """A 4 MiB block above return_freed_memory's 1 MiB threshold is mapped and unmapped each time
    (1,024 pages faulted in and zeroed: what slowed aim-tiny's CPU step). fit_host_allocator gives a
    small model on the CPU glibc's heap back (the block is reused: no faults); a large model, or a
    small one on a GPU, keeps the threshold that returns freed memory."""
    from aim_ds.distributed import SMALL_MODEL_PARAMETERS

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONPATH"] = str(ROOT)
    faults = {}
    for parameters, device in ((3_800_000, "cpu"), (SMALL_MODEL_PARAMETERS, "cpu"), (3_800_000, "cuda")):
        proc = subprocess.run(
            [sys.executable, "-c", CHURN, str(parameters), device], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        changed, per_block = proc.stdout.split()
        faults[(parameters, device)] = (changed == "True", float(per_block))
    assert faults[(3_800_000, "cpu")][0] and faults[(3_800_000, "cpu")][1] < 50, faults
    for kept in ((SMALL_MODEL_PARAMETERS, "cpu"), (3_800_000, "cuda")):
        assert not faults[kept][0] and faults[kept][1] > 900, faults  # measured: ~1,025 per block
