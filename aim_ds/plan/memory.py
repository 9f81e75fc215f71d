"""Memory and time planner for a pretraining run, before any GPU is booked.

    python -m aim_ds.plan --config run/configs/aim-7B.yaml --deepspeed ds_configs/zero3.json --gpus 8 \
        [--nodes 4] [--gpu-memory-gb 80] [--host-memory-gb 1000] [--mfu 0.4] [key=value ...]

Per GPU (per rank on the CPU accelerator, where everything lives in host memory) the peak is the sum of

- model states: DeepSpeed's own ZeRO-3 estimator (``estimate_zero3_model_states_mem_needs``: 16-bit
  parameter partitions, fp32 master weights, Adam moments and gradient partitions, the largest
  layer gathered). An fp32 config (``ds_configs/zero3_fp32.json``) keeps the parameter partition in
  4 bytes instead of 2, bf16 gradient accumulation its gradients in 2 instead of 4:
  :func:`model_state_bytes` adjusts for them.
- activations: what autograd saves, *measured* by running one real trunk block, and the
  preprocessor + head + loss, under ``FakeTensorMode`` (shapes and dtypes, no memory) with
  ``saved_tensors_hooks`` counting each saved storage once, parameters excluded. Without activation
  checkpointing every block keeps its saved tensors; with it each block keeps only its input and
  one block at a time is recomputed in backward. The backward's working set (the gradients of one
  block's activations) is counted as one more block's saved bytes.
- buffers: parameters ZeRO-3 keeps gathered beyond the largest layer during forward and backward
  (``stage3_max_live_parameters``, and ``stage3_max_reuse_distance`` parameters of the trace kept
  for their reuse, plus the prefetch bucket) and the gradient reduce bucket (doubled with
  ``overlap_comm``). Measured on CPU ranks at aim-0.6B widths with the shipped 1e9 knobs: from the
  second step on, every one of the 861M parameters stays gathered through the forward, so the reuse
  window is counted once, not halved (BENCHMARKS.md, "Memory planner").
- optimizer step: each sub group's gradients flattened into fp32 before the step (up to
  ``sub_group_size`` elements). Activations and gathered parameters are released by then, so the
  peak is model states + runtime + the larger of (activations + buffers) and the step.
- runtime: the process's own footprint (torch + DeepSpeed imported; measured in this process on
  the CPU, ``--runtime-gb`` on a GPU, where the CUDA context and allocator slack live).

Step time is ``train_flops_per_image`` (:mod:`aim_ds.flops`, forward + backward) times the batch,
plus a trunk forward per image when blocks are recomputed, over ``world x peak x MFU``.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from ..flops import matmul_params, train_flops_per_image
from ..model import AIM, AIMConfig, Block

GIB = 1024**3


class PlanError(ConfigError):
    """The run does not fit the device; the message names the knob to change."""


@dataclass(frozen=True)
class EngineSettings:
    """What of a DeepSpeed config moves memory (read by :func:`engine_settings`)."""

    stage: int
    bytes_per_param: int  # 2 (bf16/fp16) or 4 (fp32, e.g. ds_configs/zero3_fp32.json)
    offload_optimizer: bool
    offload_param: bool
    max_live_parameters: int
    max_reuse_distance: int
    reduce_bucket_size: int  # elements
    overlap_comm: bool
    prefetch_bucket_size: int = 50_000_000  # elements gathered ahead of use (DeepSpeed's default)
    grad_bytes: int = 2  # per gradient element: 4 when gradients accumulate in fp32 (data_types.grad_accum_dtype)
    sub_group_size: int = 1_000_000_000  # elements the optimizer steps at a time (DeepSpeed's default)


@dataclass(frozen=True)
class Hardware:
    """Where the run goes. ``device_memory`` is per GPU (per rank on the CPU: host memory / ranks)."""

    gpus_per_node: int
    nodes: int
    device: str  # "cuda" or "cpu"
    device_memory: int  # bytes
    host_memory: int  # bytes per node
    runtime: int  # bytes per rank outside the model (CUDA context, or torch + DeepSpeed in host memory)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Parameters:
    trunk: int  # preprocessor + trunk (the figure Table 1 quotes)
    head: int
    largest_layer: int  # parameters of the largest single module (DeepSpeed's "largest layer")

    @property
    def total(self) -> int:
        return self.trunk + self.head


@dataclass(frozen=True)
class Activations:
    """Bytes autograd saves for ONE image, in the run's dtype (see :func:`measure_activations`)."""

    per_block: int  # one trunk block
    block_input: int  # one block's input [N, D], what a checkpointed block keeps
    rest: int  # preprocessor, final norm, pixel head and loss
    depth: int
    num_patches: int

    def peak(self, micro_batch: int, checkpointing: bool) -> int:
        """Peak saved + working bytes for ``micro_batch`` images per rank."""
        kept = self.block_input if checkpointing else self.per_block
        recompute = self.per_block if checkpointing else 0
        working = self.per_block  # gradients of one block's activations in backward
        return micro_batch * (self.depth * kept + recompute + working + self.rest)

    def per_token(self, checkpointing: bool) -> float:
        return self.peak(1, checkpointing) / self.num_patches


@dataclass(frozen=True)
class MemoryPlan:
    """One configuration's peak per rank, in bytes; ``host_per_node`` is host memory per node."""

    micro_batch: int
    accumulation: int
    checkpointing: bool
    model_states: int
    activations: int
    buffers: int
    runtime: int
    host_per_node: int
    optimizer_step: int = 0  # the optimizer step's working set (activations and buffers are freed by then)

    @property
    def peak(self) -> int:
        # forward/backward (activations, gathered parameters) and the optimizer step do not overlap
        return self.model_states + self.runtime + max(self.activations + self.buffers, self.optimizer_step)


def engine_settings(ds: dict[str, Any], *, device: str) -> EngineSettings:
    """Memory-relevant settings of a DeepSpeed config, as the engine runs them on every device
    (:func:`aim_ds.train.engine.build_ds_config` downgrades nothing: bf16 and offload run on the CPU
    accelerator too, where "offloaded" states stay in the same host memory)."""
    zero = ds.get("zero_optimization", {})
    half = ds.get("bf16", {}).get("enabled", False) or ds.get("fp16", {}).get("enabled", False)

    def offloaded(key: str) -> bool:
        return zero.get(key, {}).get("device", "none") in ("cpu", "nvme")

    def number(key: str, default: float) -> int:
        value = zero.get(key, default)
        return int(default if value == "auto" else value)

    fp32_grads = not half or str(ds.get("data_types", {}).get("grad_accum_dtype", "")).lower() in ("fp32", "float32")
    return EngineSettings(
        grad_bytes=4 if fp32_grads else 2,
        stage=int(zero.get("stage", 0)),
        bytes_per_param=2 if half else 4,
        offload_optimizer=offloaded("offload_optimizer"),
        offload_param=offloaded("offload_param"),
        max_live_parameters=number("stage3_max_live_parameters", 1e9),
        max_reuse_distance=number("stage3_max_reuse_distance", 1e9),
        reduce_bucket_size=number("reduce_bucket_size", 5e8),
        prefetch_bucket_size=number("stage3_prefetch_bucket_size", 5e7),
        overlap_comm=bool(zero.get("overlap_comm", False)),
        sub_group_size=number("sub_group_size", 1e9),
    )


def count_parameters(model_cfg: AIMConfig) -> Parameters:
    """Parameter counts of the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AIM(model_cfg)
    trunk = sum(p.numel() for m in (model.preprocessor, model.trunk) for p in m.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return Parameters(trunk=trunk, head=head, largest_layer=largest)


def saved_bytes(run: Callable[[], Any], exclude: list[Tensor]) -> int:
    """Bytes autograd saves for backward while ``run()`` executes: each storage counted once,
    the storages of ``exclude`` (the parameters: model states, not activations) left out."""
    excluded = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded:
            seen[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def measure_activations(model_cfg: AIMConfig, dtype: torch.dtype, batch: int = 2) -> Activations:
    """Saved bytes per image of one block and of the rest of the model, measured under
    ``FakeTensorMode`` at the model's true width and token count (2 images, divided by 2).

    The boolean SDPA mask path is measured; FlexAttention on CUDA saves the same q, k, v, output
    and log-sum-exp and no ``N x N`` tensor either, so the figures hold for both.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..attention import build_mask

    cfg = model_cfg.replace(depth=1, attn_impl="sdpa")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the run's dtype (.to() cannot swap fake parameters)
    try:
        with FakeTensorMode():
            return _measure_fake(cfg, model_cfg.depth, dtype, batch, build_mask)
    finally:
        torch.set_default_dtype(default_dtype)


def _measure_fake(cfg: AIMConfig, depth: int, dtype: torch.dtype, batch: int, build_mask: Callable) -> Activations:
    """:func:`measure_activations` inside ``FakeTensorMode``; ``cfg`` has depth 1."""
    block = Block(cfg)
    x = torch.randn(batch, cfg.num_patches, cfg.width, dtype=dtype, requires_grad=True)
    prefix_len = torch.ones(batch, dtype=torch.long)
    mask = build_mask(prefix_len, cfg.num_patches, "sdpa", torch.device("cpu"))
    per_block = saved_bytes(lambda: block(x, mask), list(block.parameters()))
    model = AIM(cfg)  # the one block it holds is subtracted below
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, dtype=torch.float32)

    def forward() -> Tensor:  # AIM.forward minus its data-dependent argument checks
        return model.forward_loss(model.head(model.forward_trunk(images, prefix_len)), images, prefix_len)

    whole = saved_bytes(forward, list(model.parameters()))
    return Activations(
        per_block=per_block // batch,
        block_input=cfg.num_patches * cfg.width * dtype.itemsize,
        rest=max(whole - per_block, 0) // batch,
        depth=depth,
        num_patches=cfg.num_patches,
    )


def model_state_bytes(params: Parameters, engine: EngineSettings, hw: Hardware) -> tuple[int, int]:
    """``(per GPU, host per node)`` bytes of parameters, gradients and optimizer states under ZeRO-3,
    from DeepSpeed's estimator: 2 bytes a parameter for the 16-bit parameter partition and 16 for the
    optimizer's fp32 master weights, Adam moments and fp32 gradient partition (18 per parameter
    without offload). Read back from a real engine (BENCHMARKS.md, "Memory planner"): bf16 weights
    with fp32 gradient accumulation hold exactly that. Adjusted where a config differs: fp32
    parameters add 2 bytes; gradients kept in bf16 (``grad_accum_dtype`` bf16, no optimizer offload)
    take 2 fewer (the step's fp32 copy is :func:`optimizer_step_bytes`)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    host, device, _largest = estimate_zero3_model_states_mem_needs(
        total_params=params.total,
        largest_layer_params=params.largest_layer,
        num_gpus_per_node=hw.gpus_per_node,
        num_nodes=hw.nodes,
        cpu_offload=engine.offload_optimizer,
        cpu_offload_params=engine.offload_param,
        zero_init=True,
    )

    def per_rank(bytes_per_param: int) -> int:
        return math.ceil(bytes_per_param * params.total / hw.world_size)

    param_extra = per_rank(engine.bytes_per_param - 2)
    if engine.offload_param:
        host += param_extra * hw.gpus_per_node
    else:
        device += param_extra
    if not engine.offload_optimizer:  # offloaded gradients are fp32 in host memory whatever the config
        device += per_rank(engine.grad_bytes - 4)
    return device, host


def buffer_bytes(params: Parameters, engine: EngineSettings) -> int:
    """Gathered parameters beyond the largest layer (those kept within the reuse distance, plus the
    prefetch bucket gathered ahead, all capped by ``stage3_max_live_parameters``) and the gradient
    reduce bucket(s) in the gradients' dtype, per rank."""
    if engine.offload_param:
        return 0  # gathered one layer at a time from host memory (in the estimator's largest layer)
    kept = engine.max_reuse_distance + params.largest_layer + engine.prefetch_bucket_size
    gathered = min(params.total, engine.max_live_parameters, kept)
    reduce = engine.reduce_bucket_size * (2 if engine.overlap_comm else 1)
    return max(gathered - params.largest_layer, 0) * engine.bytes_per_param + reduce * engine.grad_bytes


def optimizer_step_bytes(params: Parameters, engine: EngineSettings, hw: Hardware) -> int:
    """The optimizer step's working set per rank. Without optimizer offload, ZeRO-3 flattens each
    sub group's gradients into a new fp32 tensor before stepping it (``_prepare_fp32_grad_for_sub_group``
    in DeepSpeed's stage3.py), beside the gradient partition it came from: 4 bytes per element of the
    largest sub group, ``min(sub_group_size, parameters / world)``. Measured on aim-0.6B widths on CPU
    ranks: a 1.6 GiB transient at depth 16 (BENCHMARKS.md, "Memory planner"). With the optimizer
    offloaded the gradients are already fp32 in host memory, stepped in place."""
    if engine.offload_optimizer:
        return 0
    return min(engine.sub_group_size, math.ceil(params.total / hw.world_size)) * 4


def plan_memory(
    params: Parameters,
    acts: Activations,
    engine: EngineSettings,
    hw: Hardware,
    *,
    batch_size: int,
    micro_batch: int,
    checkpointing: bool,
) -> MemoryPlan:
    """The peak per rank for one (micro-batch, checkpointing) choice."""
    device_states, host_states = model_state_bytes(params, engine, hw)
    if hw.device == "cpu":  # DeepSpeed's CPU accelerator: "offloaded" states share the same host memory
        device_states += math.ceil(host_states / hw.gpus_per_node)
    return MemoryPlan(
        micro_batch=micro_batch,
        accumulation=max(batch_size // (micro_batch * hw.world_size), 1),
        checkpointing=checkpointing,
        model_states=device_states,
        activations=acts.peak(micro_batch, checkpointing),
        buffers=buffer_bytes(params, engine),
        runtime=hw.runtime,
        host_per_node=host_states,
        optimizer_step=optimizer_step_bytes(params, engine, hw),
    )


def fits(plan: MemoryPlan, hw: Hardware) -> bool:
    host_ok = hw.device == "cpu" or plan.host_per_node <= hw.host_memory
    return plan.peak <= hw.device_memory and host_ok


def micro_batch_choices(batch_size: int, world_size: int) -> list[int]:
    """Micro-batches (powers of two and the largest) that divide the per-rank batch."""
    per_rank = batch_size // world_size
    if per_rank <= 0 or batch_size % world_size:
        return []
    choices = {m for m in (2**i for i in range(per_rank.bit_length())) if per_rank % m == 0}
    return sorted(choices | {per_rank})


def choices_that_fit(
    params: Parameters, acts: Activations, engine: EngineSettings, hw: Hardware, batch_size: int
) -> list[MemoryPlan]:
    """For each checkpointing setting, the largest micro-batch that fits (None of them: empty)."""
    best = []
    for checkpointing in (False, True):
        fitting = [
            plan
            for micro in micro_batch_choices(batch_size, hw.world_size)
            if fits(
                plan := plan_memory(
                    params, acts, engine, hw, batch_size=batch_size, micro_batch=micro, checkpointing=checkpointing
                ),
                hw,
            )
        ]
        if fitting:
            best.append(fitting[-1])
    return best


def step_seconds(
    model_cfg: AIMConfig, batch_size: int, world_size: int, checkpointing: bool, peak_flops: float, mfu: float
) -> float:
    """Seconds per optimizer step at ``mfu`` of ``peak_flops`` per device; recomputing the trunk's
    forward adds ``2 x trunk matmul params x tokens`` per image."""
    flops = train_flops_per_image(model_cfg)
    if checkpointing:
        trunk, _ = matmul_params(model_cfg)
        flops += 2 * trunk * model_cfg.num_patches + 4 * model_cfg.depth * model_cfg.width * model_cfg.num_patches**2
    return flops * batch_size / (world_size * peak_flops * mfu)


def runtime_bytes(device: str, runtime_gb: float | None) -> int:
    """The process's own footprint: ``runtime_gb`` when given; on the CPU this process's peak RSS
    (torch and DeepSpeed are imported by now), which a training rank also carries."""
    if runtime_gb is not None:
        return int(runtime_gb * GIB)
    if device == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return int(2 * GIB)  # CUDA context + NCCL + allocator slack (see --runtime-gb)


def host_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_host_bytes() -> int:
    """Memory the kernel can hand out now without swapping (``MemAvailable``): what a run on the
    CPU accelerator really has, beside the OS, the launcher and whatever else the machine runs.
    Physical memory where ``/proc/meminfo`` does not exist."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return host_memory_bytes()


def resident_bytes() -> int:
    """This process's resident set size now."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
