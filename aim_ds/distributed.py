"""The process group and the across-ranks helpers, one set for every driver.

Both drivers run under the ``deepspeed`` launcher (or ``torchrun``, or as one plain ``python``
process). NCCL on CUDA, gloo on the CPU; every helper here is a no-op in a world of one, so library
code calls them unconditionally.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

ReduceOp = Literal["sum", "min", "max"]
log = logging.getLogger("aim_ds")
STALE_BUILD_LOCK_SECONDS = 30 * 60  # a JIT build of a DeepSpeed op takes about a minute here, minutes with nvcc
# How long a rank waits inside one collective before the process group gives up (NCCL aborts every
# rank; gloo raises). DeepSpeed's default is 10 min, less than a 3B/7B checkpoint save to shared
# storage or the final export can take; rank-0-only work (live probe, universal conversion, shard
# merge, pruning) never sits inside a collective (:func:`rank0_phase`), so this bounds I/O only.
DEFAULT_TIMEOUT_MINUTES = 60.0
DEFAULT_RANK0_WAIT_MINUTES = 24 * 60.0
T = TypeVar("T")


@dataclass
class DistSection:
    """The ``dist`` section of the pretraining and probe configs: the process group's patience."""

    # Minutes one collective may wait for the slowest rank before the job stops (NCCL aborts every rank,
    # gloo raises; DeepSpeed's own default is 10). It must cover the slowest work every rank does at once:
    # a checkpoint save to shared storage. Rank-0-only work never waits in a collective (rank0_wait_minutes).
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
    # Minutes the other ranks wait, polling a file outside any collective (rank0_phase), for rank-0-only
    # work: the live probe, converting a checkpoint for another world size, the probe's shard merge,
    # pruning old checkpoints, the final export.
    rank0_wait_minutes: float = DEFAULT_RANK0_WAIT_MINUTES


_rank0_wait_s = DEFAULT_RANK0_WAIT_MINUTES * 60  # set by init_distributed; rank0_phase's default


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    return world()[0]


def world_size() -> int:
    return world()[1]


def is_main() -> bool:
    """True on rank 0 (and in a world of one): the rank that logs and writes shared files."""
    return rank() == 0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for ``MASTER_PORT``/``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cuda() -> bool:
    """True when DeepSpeed's accelerator is CUDA and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return True
    return get_accelerator().device_name() == "cuda"


def init_distributed(
    *, cuda: bool | None = None, group_of_one: bool = True, dist_cfg: DistSection | None = None
) -> tuple[int, int, torch.device]:
    """Join (or start) the process group. Returns ``(rank, world_size, device)``.

    Under a launcher (``RANK`` set) this joins its group through DeepSpeed's communication layer
    (so that ``deepspeed.initialize`` finds it ready). As a plain ``python`` process it starts a
    world of one on a free loopback port when ``group_of_one`` (DeepSpeed's engine wants a group),
    and starts nothing otherwise. ``cuda`` defaults to :func:`on_cuda`; the CUDA device is selected
    before NCCL builds its communicators. On the CPU, ranks on one host share its cores: unless
    ``OMP_NUM_THREADS`` is set, each rank gets its share of them. ``dist_cfg`` (the config's ``dist``
    section, defaults without one): how long a collective may wait for the slowest rank, and how long
    :func:`rank0_phase` waits for rank 0. Unless
    ``cuda`` is False, a CPU build of PyTorch on a node with visible GPUs is a ConfigError
    (:func:`check_torch_build`).
    """
    global _rank0_wait_s
    dist_cfg = dist_cfg or DistSection()
    _rank0_wait_s = dist_cfg.rank0_wait_minutes * 60
    if cuda is not False:
        check_torch_build()
    cuda = on_cuda() if cuda is None else cuda
    return_freed_memory()
    launched = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched and group_of_one and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if (launched or group_of_one) and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        timeout = timedelta(minutes=dist_cfg.timeout_minutes)
        try:
            import deepspeed
        except ImportError:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            check_build_locks()
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
            release_shared_buffers()
    rank_, size = world()
    if cuda:
        return rank_, size, torch.device("cuda", local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return rank_, size, torch.device("cpu")


MMAP_THRESHOLD_BYTES = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc serve every host allocation above ``threshold`` bytes with its own mapping, so
    that freeing it returns the memory to the system at once.

    By default glibc raises that threshold (up to 32 MiB) each time a large block is freed, and from
    then on keeps freed activations, gradient copies and optimizer temporaries in its heap: a ZeRO-3
    rank's resident memory then exceeds its live tensors by about 6 bytes per parameter (measured
    on CPU ranks: 2.16 GiB resident for 1.10 GiB of tensors at 64.5M parameters a rank, 1.51 GiB
    with a fixed 1 MiB threshold, same step time; BENCHMARKS.md, "Memory planner"). It matters
    where ranks live in host memory (the CPU accelerator, optimizer offload). A user's
    ``MALLOC_MMAP_THRESHOLD_`` wins; other C libraries are left alone. Returns True when set."""
    return _mallopt({_M_MMAP_THRESHOLD: threshold})


# glibc's own ceiling for its moving mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), and the
# trim threshold it moves along with it (twice the mmap threshold).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_M_TRIM_THRESHOLD = -1
# Below this many parameters a model's freed host memory kept by glibc (about 6 bytes a parameter
# where it was measured; BENCHMARKS.md, "Memory planner") is under 300 MB: not worth a page fault
# per page of every activation, every step.
SMALL_MODEL_PARAMETERS = 50_000_000


def fit_host_allocator(parameters: int, device: torch.device) -> bool:
    """Undo :func:`return_freed_memory` for a small model computing on the CPU: there every
    activation and gradient above 1 MiB would get a fresh mapping and be unmapped again when freed,
    each page faulted in and zeroed by the kernel, every micro-step. On aim-tiny (3.8M parameters,
    ZeRO-3 on 2 CPU ranks) that doubled the page faults and the system time of a step and cost
    its throughput about a fifth (issue 23; BENCHMARKS.md, "Training step on 2 CPU ranks"), for at
    most a few tens of MB of memory returned. The allocator gets glibc's own steady state instead:
    mmap threshold at its ceiling and the trim threshold at twice that, so freed blocks are reused
    from the heap without a fault.

    Left alone: models of ``SMALL_MODEL_PARAMETERS`` or more (where the freed memory glibc would
    keep is large and a page fault per page is small beside the matmuls that fill it), any
    device but the CPU (a GPU run's host allocations are not its activations), a user's
    ``MALLOC_MMAP_THRESHOLD_``, and C libraries without ``mallopt``. Returns True when changed."""
    if device.type != "cpu" or parameters >= SMALL_MODEL_PARAMETERS:
        return False
    return _mallopt({_M_MMAP_THRESHOLD: GLIBC_MMAP_THRESHOLD_MAX, _M_TRIM_THRESHOLD: 2 * GLIBC_MMAP_THRESHOLD_MAX})


def _mallopt(settings: dict[int, int]) -> bool:
    """glibc's ``mallopt(parameter, value)`` for each item; False (nothing set) under a user's
    ``MALLOC_MMAP_THRESHOLD_``, off Linux, or without glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return all([bool(libc.mallopt(param, ctypes.c_int(value))) for param, value in settings.items()])
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        log.debug("mallopt is not available; glibc's malloc settings are left as they are")
        return False


def build_lock_pattern(root: str | None = None) -> str:
    """Glob of the JIT-build locks (DeepSpeed's ops are built by ``torch.utils.cpp_extension``):
    ``<root>/<op>/lock`` under ``root`` or ``TORCH_EXTENSIONS_DIR``, else under PyTorch's default
    build root, one folder per Python and accelerator (``py311_cpu``, ``py311_cu128``, ...)."""
    root = root or os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return os.path.join(root, "*", "lock")
    from torch.utils.cpp_extension import get_default_build_root

    return os.path.join(get_default_build_root(), "*", "*", "lock")


def check_build_locks(root: str | None = None, *, stale_after: float = STALE_BUILD_LOCK_SECONDS) -> list[str]:
    """Name the JIT-build locks (:func:`build_lock_pattern`) before DeepSpeed builds its ops.

    ``torch.utils.cpp_extension`` guards each build with a ``lock`` file and waits, forever and
    silently, while it exists; a build that was killed leaves it behind and every later rank hangs
    at start-up. A lock older than ``stale_after`` seconds is a :class:`~aim_ds.config.ConfigError`
    naming the file to remove; a younger one (another job building right now) is logged. Returns
    the locks found."""
    from .config import ConfigError

    locks = sorted(glob.glob(build_lock_pattern(root)))
    for lock in locks:
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:  # the build finished meanwhile
            continue
        if age >= stale_after:
            raise ConfigError(
                f"stale extension build lock {lock} ({age / 60:.0f} min old): a killed build of a DeepSpeed "
                "op leaves it, and every rank would wait on it forever; remove it (rm) if no build is running"
            )
        log.warning("extension build lock %s (%.0f s old): waiting for that build to finish", lock, age)
    return locks


SHM_DIR = "/dev/shm"
released_shared_buffers: list[str] = []  # what release_shared_buffers removed in this process


def release_shared_buffers() -> list[str]:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped it.

    On the CPU accelerator, with all ranks on one host, DeepSpeed's communication layer creates a
    67 MB POSIX shared-memory file per rank (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    in /dev/shm), maps every rank's, and never unlinks them: each launch leaves them behind, RAM that
    no process owns (13 GB after a day of test runs here). Each rank maps its peers' files before
    ``deepspeed.init_distributed`` returns; after a barrier the names are no longer needed, and the
    mappings live on until the process exits, however it exits. Returns the paths removed.
    """
    if not os.path.isdir(SHM_DIR):
        return []
    barrier()  # every rank has opened every peer's file (a world of one, launched, makes one too)
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank()
    )
    path = os.path.join(SHM_DIR, name)
    try:
        os.unlink(path)
    except FileNotFoundError:  # a GPU, ranks on several hosts, or an older DeepSpeed: no buffer
        return []
    released_shared_buffers.append(path)
    return [path]


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL takes only CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce_(tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
    """In-place all-reduce of ``tensor`` (on :func:`collective_device`); returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor


def _reduce_int(value: int, op: ReduceOp) -> int:
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=collective_device())
    return int(all_reduce_(t, op).item())


def min_across_ranks(value: int) -> int:
    return _reduce_int(value, "min")


def max_across_ranks(value: int) -> int:
    return _reduce_int(value, "max")


def sum_across_ranks(value: int) -> int:
    return _reduce_int(value, "sum")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def visible_gpus() -> list[str]:
    """The GPUs this process could use, as named by ``nvidia-smi -L`` (one line each), else the
    devices ``CUDA_VISIBLE_DEVICES`` lists (a scheduler sets it on GPU nodes); empty on a CPU node.
    ``CUDA_VISIBLE_DEVICES`` set empty (or ``-1``) hides every GPU, whatever ``nvidia-smi`` sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip() in ("", "-1", "NoDevFiles"):
        return []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0:
            gpus = [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]
            if gpus:
                return gpus
    return [f"CUDA_VISIBLE_DEVICES={d.strip()}" for d in (listed or "").split(",") if d.strip()]


def check_torch_build() -> None:
    """:class:`~aim_ds.config.ConfigError` when this node has GPUs but PyTorch is a CPU build.

    A venv built on a login node without GPUs gets the CPU wheel; on the GPU nodes the run would
    then train on the CPU over gloo, hours per step, without a word. ``DS_ACCELERATOR=cpu`` says the
    CPU is meant and skips the check."""
    from .config import ConfigError

    if os.environ.get("DS_ACCELERATOR") == "cpu" or torch.version.cuda or getattr(torch.version, "hip", None):
        return
    gpus = visible_gpus()
    if gpus:
        raise ConfigError(
            f"this node has {len(gpus)} GPU(s) ({gpus[0]}{', ...' if len(gpus) > 1 else ''}) but PyTorch "
            f"{torch.__version__} is a CPU build (torch.version.cuda is None): the run would train on the CPU. "
            "Install the CUDA build, e.g. on a GPU node `make setup` (or `pip install -c requirements.lock "
            "torch --index-url https://download.pytorch.org/whl/cu128 --force-reinstall`); "
            "set DS_ACCELERATOR=cpu to train on the CPU on purpose"
        )


class Rank0PhaseError(RuntimeError):
    """Rank 0's part of a :func:`rank0_phase` failed (raised on every rank), or rank 0 went away."""


POLL_SECONDS = 1.0


def wait_for_file(
    path: str | os.PathLike, *, what: str, max_wait_s: float, poll_s: float = POLL_SECONDS
) -> dict[str, Any]:
    """Wait, outside any collective, until ``path`` (a JSON file written whole through
    :mod:`aim_ds.io`) exists; return its content. Every ``poll_s`` seconds the file is looked for
    and, under a launcher, rank 0's rendezvous store is asked whether it still answers: rank 0
    hosts it, so a dead rank 0 is a :class:`Rank0PhaseError` within a poll or two instead of a
    wait to ``max_wait_s`` (then also a Rank0PhaseError naming ``what``)."""
    path = Path(path)
    start = time.monotonic()
    while True:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):  # published by rename, so only a foreign file gets here
                pass
        waited = time.monotonic() - start
        if waited > max_wait_s:
            raise Rank0PhaseError(
                f"waited {waited / 60:.1f} min for rank 0 to finish {what} ({path} did not appear); "
                "raise dist.rank0_wait_minutes if that phase is this slow"
            )
        if not _rank0_alive():
            raise Rank0PhaseError(f"rank 0 went away during {what} (its rendezvous store stopped answering)")
        time.sleep(poll_s)


def _rank0_alive() -> bool:
    """False when the process group's store (hosted by rank 0's process) no longer answers."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        store.check(["aim_ds/rank0-alive"])
    except (RuntimeError, ValueError, AttributeError) as exc:  # DistStoreError/DistNetworkError are RuntimeErrors
        if isinstance(exc, AttributeError):  # a torch without the private accessor: cannot tell
            return True
        return False
    return True


def rank0_phase(
    name: str,
    folder: str | os.PathLike,
    work: Callable[[], T],
    *,
    max_wait_s: float | None = None,
    poll_s: float = POLL_SECONDS,
) -> T | Any:
    """Run ``work()`` on rank 0 only while the other ranks wait for it *outside* any collective.

    A rank that waits inside a collective (a barrier) for rank-0-only work is killed by the
    process group's timeout once that work takes longer (NCCL aborts every rank). Here the other
    ranks poll for a marker file ``folder/.rank0-<name>.json`` that rank 0 writes (through
    :mod:`aim_ds.io`) when ``work`` returns or raises; the only collectives are two barriers that
    every rank reaches at once. ``folder`` must be on storage every rank sees (``out_dir``).

    Returns ``work()``'s result on rank 0 and its JSON round trip on the others (so keep it plain
    data). If ``work`` raises, rank 0 re-raises it and the other ranks raise
    :class:`Rank0PhaseError` with its message. ``max_wait_s`` defaults to ``dist.rank0_wait_minutes``.
    In a world of one, just ``work()``.
    """
    if world_size() == 1:
        return work()
    from .io import atomic_write_json, remove_if_exists

    marker = Path(folder) / f".rank0-{name}.json"
    if is_main():
        remove_if_exists(marker)  # a marker left by a job killed mid-phase
    barrier()  # nobody reads the marker before the stale one is gone
    error: BaseException | None = None
    result: Any = None
    if is_main():
        try:
            result = work()
            payload = {"ok": True, "result": result}
        except Exception as exc:  # noqa: BLE001 - handed to the other ranks, then re-raised here
            error = exc
            payload = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, payload)
    else:
        wait = _rank0_wait_s if max_wait_s is None else max_wait_s
        payload = wait_for_file(marker, what=name, max_wait_s=wait, poll_s=poll_s)
        result = payload.get("result")
    barrier()  # every rank has read the marker
    if is_main():
        remove_if_exists(marker)
        if error is not None:
            raise error
    elif not payload.get("ok"):
        raise Rank0PhaseError(f"rank 0 failed in {name}: {payload.get('error')}")
    return result
