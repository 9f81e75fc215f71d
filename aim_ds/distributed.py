"""The process group and the across-ranks helpers, one set for every driver.

Both drivers run under the ``deepspeed`` launcher (or ``torchrun``, or as one plain ``python``
process). NCCL on CUDA, gloo on the CPU; every helper here is a no-op in a world of one, so library
code calls them unconditionally.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

import torch
import torch.distributed as dist

ReduceOp = Literal["sum", "min", "max"]


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
            deepspeed.init_distributed(dist_backend=backend)
    rank_, size = world()
    if cuda:
        return rank_, size, torch.device("cuda", local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return rank_, size, torch.device("cpu")


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
