"""Accelerators the planner, the training log's MFU and the GPU benchmark know by name.

Each entry holds the figures a plan needs together: dense bf16 peak (the vendor's datasheet, without
sparsity), the memory PyTorch reports as ``total_memory`` (a little under the marketing figure: an
H100 80 GB reports about 79.6 GiB), and the bandwidths a ZeRO-3 step moves data over. Bandwidths are
sustained rates in one direction, as copy and NCCL benchmarks reach them on such machines, not line
rates: PCIe Gen4 x16 about 25 GB/s (32 nominal), Gen5 x16 about 50 GB/s (64 nominal); NVLink /
Infinity Fabric per GPU to its node's peers; the network per node is the usual fabric of such
nodes (DGX-class: 8 NICs of 200 Gb/s for A100, 400 Gb/s for H100/H200/MI300X, at about 90%). All of
them are defaults a user overrides (``python -m aim_ds.plan --pcie-gbs/--nvlink-gbs/--network-gbs``)
when the machine differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError

# Peak dense bf16 throughput of an H100 SXM (NVIDIA's datasheet, without sparsity), FLOP/s: the
# default MFU denominator of the training log and the GPU benchmark.
H100_BF16_DENSE_FLOPS = 989e12

GIB = 1024**3
GB = 1e9


@dataclass(frozen=True)
class GPUSpec:
    name: str  # the table's key, e.g. "A100-80GB"
    bf16_flops: float  # dense peak, FLOP/s
    memory: int  # bytes PyTorch reports as total_memory
    pcie: float  # host <-> device, bytes/s one direction (pinned host memory)
    nvlink: float  # device <-> peers in the node, bytes/s one direction (PCIe where there is no NVLink)
    network: float  # per node, inter-node bytes/s one direction (all NICs of the node together)
    patterns: tuple[str, ...] = ()  # lower-case substrings of torch.cuda.get_device_name


GPUS: dict[str, GPUSpec] = {
    spec.name: spec
    for spec in (
        GPUSpec("A100-40GB", 312e12, int(39.4 * GIB), 25 * GB, 240 * GB, 180 * GB, ("a100",)),
        GPUSpec("A100-80GB", 312e12, int(79.2 * GIB), 25 * GB, 240 * GB, 180 * GB, ("a100",)),
        GPUSpec("H100-SXM", H100_BF16_DENSE_FLOPS, int(79.6 * GIB), 50 * GB, 360 * GB, 360 * GB, ("h100 80gb hbm3", "h100-sxm", "h100 sxm")),
        GPUSpec("H100-PCIe", 756e12, int(79.6 * GIB), 50 * GB, 50 * GB, 90 * GB, ("h100 pcie",)),
        GPUSpec("H200", H100_BF16_DENSE_FLOPS, int(139.8 * GIB), 50 * GB, 360 * GB, 360 * GB, ("h200",)),
        GPUSpec("L40S", 362e12, int(44.5 * GIB), 25 * GB, 25 * GB, 45 * GB, ("l40s",)),
        GPUSpec("MI300X", 1307e12, int(191.9 * GIB), 50 * GB, 360 * GB, 360 * GB, ("mi300x",)),
    )
}  # fmt: skip

DEFAULT_GPU = "H100-SXM"


def gpu_spec(name: str) -> GPUSpec:
    """The table's entry for ``name`` (case-insensitive); :class:`ConfigError` listing the known names."""
    for key, spec in GPUS.items():
        if key.lower() == name.strip().lower():
            return spec
    raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")


def match_gpu(device_name: str, total_memory: int | None = None) -> GPUSpec | None:
    """The entry for a name as ``torch.cuda.get_device_name`` reports it (``"NVIDIA A100-SXM4-80GB"``,
    ``"NVIDIA H100 80GB HBM3"``, ``"AMD Instinct MI300X"``), or None. Where the name leaves the
    memory size open (A100 40/80 GB), ``total_memory`` picks the nearer entry."""
    lowered = device_name.lower()
    found = [spec for spec in GPUS.values() if any(p in lowered for p in spec.patterns)]
    if not found:
        return None
    if len(found) > 1:
        sized = [s for s in found if f"{round(s.memory / GIB / 40) * 40}gb" in lowered.replace(" ", "")]
        if len(sized) == 1:
            return sized[0]
        if total_memory is not None:
            return min(found, key=lambda s: abs(s.memory - total_memory))
    return found[0]


def detect_gpu(device: object = None) -> GPUSpec | None:
    """The entry for the current CUDA/ROCm device, None on the CPU or for a GPU not in the table."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(index)
    return match_gpu(torch.cuda.get_device_name(index), props.total_memory)


def peak_flops(override: float = 0.0, device: object = None) -> tuple[float, str]:
    """``(FLOP/s, where it came from)`` for MFU: ``override`` (``log.peak_flops_per_device``) when
    positive, else the detected device's bf16 dense peak, else the H100 SXM's (the CPU, unknown GPUs)."""
    if override > 0:
        return override, "log.peak_flops_per_device"
    spec = detect_gpu(device)
    if spec is not None:
        return spec.bf16_flops, f"{spec.name} bf16 dense peak"
    return H100_BF16_DENSE_FLOPS, f"{DEFAULT_GPU} bf16 dense peak (device not in aim_ds.devices.GPUS)"
