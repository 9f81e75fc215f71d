"""The process group and the across-ranks helpers, one set for every driver.

Both drivers run under the ``deepspeed`` launcher (or ``torchrun``, or as one plain ``python``
process). NCCL on CUDA, gloo on the CPU; every helper here is a no-op in a world of one, so library
code calls them unconditionally.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import sys
import time
from typing import Literal

import torch
import torch.distributed as dist

ReduceOp = Literal["sum", "min", "max"]
log = logging.getLogger("aim_ds")
STALE_BUILD_LOCK_SECONDS = 30 * 60  # a JIT build of a DeepSpeed op takes about a minute here, minutes with nvcc


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


def init_distributed(*, cuda: bool | None = None, group_of_one: bool = True) -> tuple[int, int, torch.device]:
    """Join (or start) the process group. Returns ``(rank, world_size, device)``.

    Under a launcher (``RANK`` set) this joins its group through DeepSpeed's communication layer
    (so that ``deepspeed.initialize`` finds it ready). As a plain ``python`` process it starts a
    world of one on a free loopback port when ``group_of_one`` (DeepSpeed's engine wants a group),
    and starts nothing otherwise. ``cuda`` defaults to :func:`on_cuda`; the CUDA device is selected
    before NCCL builds its communicators. On the CPU, ranks on one host share its cores: unless
    ``OMP_NUM_THREADS`` is set, each rank gets its share of them.
    """
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
        try:
            import deepspeed
        except ImportError:
            dist.init_process_group(backend=backend)
        else:
            check_build_locks()
            deepspeed.init_distributed(dist_backend=backend)
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
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        log.debug("mallopt is not available; freed host memory may stay with the process")
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
