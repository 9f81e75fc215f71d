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
  window is counted once, not halved (BENCHMARKS.md, "Memory planner"). Parameter offload does not
  change them: the gathered copies and buckets live on the GPU either way (about 2 GiB at 7B).
- optimizer step: each sub group's gradients flattened into fp32 before the step (up to
  ``sub_group_size`` elements). Activations and gathered parameters are released by then, so the
  peak is model states + runtime + the larger of (activations + buffers) and the step.
- runtime: the process's own footprint (torch + DeepSpeed imported; measured in this process on
  the CPU, ``--runtime-gb`` on a GPU, where the CUDA context and allocator slack live).

On a GPU the peak must stay under the card's memory less a headroom for the caching allocator's
fragmentation (:data:`HEADROOM_FRACTION`, 8%); the card's memory, peak FLOP/s and bandwidths come
from :mod:`aim_ds.devices`.

Step time (a prediction): compute is ``train_flops_per_image`` (:mod:`aim_ds.model.flops`, forward +
backward) times the batch, plus a trunk forward per image when blocks are recomputed, over
``world x peak x MFU``; the ZeRO-3 collectives (:func:`traffic`: bytes over NVLink and each node's
network per micro-step) overlap it, so the step takes the longer of the two; offload transfers over
PCIe are added in series (:func:`step_time`).
"""

from __future__ import annotations

import functools
import math
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from ..devices import DEFAULT_GPU, GPUS, GPUSpec
from ..model.aim import AIM, AIMConfig, Block
from ..model.flops import matmul_params, train_flops_per_image

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
    comm_bytes: int = 4  # per gradient element reduce-scattered (communication_data_type; fp32 as shipped)
    hpz_partition_size: int = 1  # ZeRO++ hpZ: a secondary weight partition over this many ranks (1: off)
    quantized_weights: bool = False  # ZeRO++ qwZ: weight all-gathers in int8
    quantized_gradients: bool = False  # ZeRO++ qgZ: gradient reduction in int4 (hierarchical all-to-all)


@dataclass(frozen=True)
class Hardware:
    """Where the run goes. ``device_memory`` is per GPU (per rank on the CPU: host memory / ranks).

    ``headroom`` is memory a plan must leave free on the device for what it does not count: the
    caching allocator's fragmentation above the bytes it hands out (:func:`default_headroom`). ``gpu``
    gives the peak FLOP/s and the PCIe, NVLink and network bandwidths (:mod:`aim_ds.devices`)."""

    gpus_per_node: int
    nodes: int
    device: str  # "cuda" or "cpu"
    device_memory: int  # bytes
    host_memory: int  # bytes per node
    runtime: int  # bytes per rank outside the model (CUDA context, or torch + DeepSpeed in host memory)
    headroom: int = 0  # bytes per device kept free (allocator fragmentation)
    gpu: GPUSpec = field(default_factory=lambda: GPUS[DEFAULT_GPU])

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable(self) -> int:
        """Bytes a plan's peak may reach."""
        return self.device_memory - self.headroom


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
        comm_bytes=_dtype_bytes(ds.get("communication_data_type"), 2 if half else 4),
        hpz_partition_size=max(int(zero.get("zero_hpz_partition_size", 1)), 1),
        quantized_weights=bool(zero.get("zero_quantized_weights", False)),
        quantized_gradients=bool(zero.get("zero_quantized_gradients", False)),
    )


def _dtype_bytes(name: Any, default: int) -> int:
    """Bytes per element of a DeepSpeed dtype name ("fp32", "bf16", ...); ``default`` when unset."""
    if name is None:
        return default
    return 4 if str(name).lower() in ("fp32", "float32", "float") else 2


@functools.lru_cache(maxsize=32)
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


@functools.lru_cache(maxsize=32)  # pure in its arguments; the bench's tables ask for each model many times
def measure_activations(model_cfg: AIMConfig, dtype: torch.dtype, batch: int = 2) -> Activations:
    """Saved bytes per image of one block and of the rest of the model, measured under
    ``FakeTensorMode`` at the model's true width and token count (2 images, divided by 2).

    The boolean SDPA mask path is measured; FlexAttention on CUDA saves the same q, k, v, output
    and log-sum-exp and no ``N x N`` tensor either, so the figures hold for both.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..model.attention import build_mask

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
    if engine.hpz_partition_size > 1:  # ZeRO++ hpZ: a secondary 16-bit partition over the node's ranks
        device += math.ceil(engine.bytes_per_param * params.total / engine.hpz_partition_size)
    return device, host


def buffer_bytes(params: Parameters, engine: EngineSettings) -> int:
    """Gathered parameters beyond the largest layer (those kept within the reuse distance, plus the
    prefetch bucket gathered ahead, all capped by ``stage3_max_live_parameters``) and the gradient
    reduce bucket(s) in the gradients' dtype, per rank, with or without parameter offload."""
    gathered = gathered_parameters(params, engine)
    reduce = engine.reduce_bucket_size * (2 if engine.overlap_comm else 1)
    return max(gathered - params.largest_layer, 0) * engine.bytes_per_param + reduce * engine.grad_bytes


def gathered_parameters(params: Parameters, engine: EngineSettings) -> int:
    """Parameters ZeRO-3 holds gathered on the device at once (elements): the reuse window, the
    largest layer and the prefetch bucket, capped by ``stage3_max_live_parameters`` and the model.

    Parameter offload changes where the *partitions* live (host memory), not this: the parameter
    coordinator gathers into device memory and keeps and prefetches exactly as without offload, so
    at 7B with the shipped knobs (1e9 live) about 2 GiB of gathered bf16 weights and reduce buckets
    sit on the GPU under ``zero3_offload.json`` too."""
    kept = engine.max_reuse_distance + params.largest_layer + engine.prefetch_bucket_size
    return min(params.total, engine.max_live_parameters, kept)


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
    return plan.peak <= hw.usable and host_ok


# Fraction of a GPU's memory a plan leaves free for PyTorch's caching allocator: under ZeRO-3 it
# serves buffers of many sizes (gathered layers, reduce buckets, activations), and the memory it has
# reserved but cannot hand out typically runs at 5-10% of the card. The CUDA context, NCCL's
# communicator buffers and cuBLAS workspaces are the separate runtime term (2 GiB, --runtime-gb).
HEADROOM_FRACTION = 0.08


def default_headroom(device: str, device_memory: int, fraction: float = HEADROOM_FRACTION) -> int:
    """Bytes kept free on a GPU (none on the CPU accelerator, where the runtime term is measured)."""
    return int(fraction * device_memory) if device == "cuda" else 0


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


@dataclass(frozen=True)
class Traffic:
    """Bytes ZeRO-3 moves for one rank, per micro-step and once per optimizer step (see :func:`traffic`)."""

    pcie_per_micro: float  # host <-> this GPU, both directions summed
    pcie_per_step: float  # host <-> this GPU at the accumulation boundary
    intra_per_micro: float  # this GPU's collective bytes over NVLink (ring: S x (ranks - 1) / ranks)
    inter_per_micro: float  # its node's collective bytes over the network (0 on one node)


def traffic(params: Parameters, engine: EngineSettings, hw: Hardware) -> Traffic:
    """What crosses PCIe, NVLink and the network per rank, counted from DeepSpeed 0.19.8's stage 3.

    Collectives (per micro-step; a ring moves ``S x (n - 1) / n`` bytes through every rank and, across
    nodes, through every node's NICs for a collective of ``S`` bytes over ``n`` ranks):

    - forward: every parameter all-gathered in its dtype (int8 with ZeRO++ ``zero_quantized_weights``);
    - backward: all-gathered again, except those still gathered from the forward (the window of
      :func:`gathered_parameters`); with ZeRO++ hpZ (``zero_hpz_partition_size`` > 1) from the
      secondary copy inside the node, over NVLink only;
    - gradients reduce-scattered in ``communication_data_type`` (4 bytes as shipped; int4 with
      ``zero_quantized_gradients``).

    So with bf16 weights and fp32 reduction: ``2 + 2 + 4 = 8`` bytes a parameter per micro-step,
    less the backward's reused window.

    PCIe with ``offload_optimizer`` (``partition_grads``): the fp32 gradient partition lives in pinned
    host memory (``grad_partitions_flat_buffer``). The first micro-step copies each reduced partition
    there and back to the GPU (``copy_`` then ``.to(device)``); every later one brings the host
    buffer to the GPU, adds, and copies it back: two crossings of the partition per micro-step in the
    accumulation dtype. At the accumulation boundary the partition crosses once more, into the
    optimizer's fp32 gradients (``_offload_grad_partition_at_boundary``); without parameter offload
    the updated 16-bit partition then returns to the GPU. With ``offload_param`` every gather first
    brings the rank's partition from host memory: forward and backward, less the reused window."""
    world, nodes = hw.world_size, hw.nodes
    partition = params.total / world
    reused = gathered_parameters(params, engine)
    weight = 1 if engine.quantized_weights else engine.bytes_per_param
    grad = 0.5 if engine.quantized_gradients else engine.comm_bytes
    ring = (world - 1) / world
    forward = weight * params.total
    backward = weight * max(params.total - reused, 0)
    hpz = min(engine.hpz_partition_size, hw.gpus_per_node)
    if nodes > 1 and hpz > 1:  # hpZ: the backward gathers from a copy held within the node
        inter = (forward + grad * params.total) * ring
        secondary = engine.bytes_per_param * max(params.total - reused, 0) * (hpz - 1) / hpz
        intra = inter + secondary
    else:
        intra = (forward + backward + grad * params.total) * ring
        inter = intra if nodes > 1 else 0.0
    pcie_micro = pcie_step = 0.0
    if hw.device == "cuda":  # on the CPU accelerator "offloaded" states stay where they are
        if engine.offload_optimizer:
            pcie_micro += 2 * engine.grad_bytes * partition
            pcie_step += 4 * partition + (0 if engine.offload_param else engine.bytes_per_param * partition)
        if engine.offload_param:
            pcie_micro += engine.bytes_per_param * (2 * params.total - reused) / world
    return Traffic(pcie_micro, pcie_step, intra, inter)


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds per optimizer step and what bounds it (see :func:`step_time`)."""

    compute: float
    network: float  # collectives over NVLink and the network, all micro-steps
    pcie: float  # offload transfers, all micro-steps and the boundary
    overlap_comm: bool

    @property
    def total(self) -> float:
        comm = max(self.compute, self.network) if self.overlap_comm else self.compute + self.network
        return comm + self.pcie

    @property
    def communication_bound(self) -> bool:
        """The collectives take longer than the arithmetic they should hide behind."""
        return self.network > self.compute

    @property
    def bound(self) -> str:
        terms = {"compute": self.compute, "communication": self.network, "PCIe (offload)": self.pcie}
        return max(terms, key=lambda key: terms[key])


def step_time(
    model_cfg: AIMConfig,
    params: Parameters,
    engine: EngineSettings,
    hw: Hardware,
    *,
    batch_size: int,
    micro_batch: int,
    checkpointing: bool,
    peak_flops: float,
    mfu: float,
) -> StepTime:
    """Compute (:func:`step_seconds`), collectives and offload transfers of one optimizer step.

    Collectives overlap the arithmetic when ``overlap_comm`` is on (ZeRO-3 prefetches the gathers and
    reduces on a side stream): the step takes the longer of the two. Offload transfers are added in
    series, an upper bound: each gradient partition's host round trip is chained with its
    accumulation, and every backward waits for the reduce stream at its end."""
    accumulation = max(batch_size // (micro_batch * hw.world_size), 1)
    moved = traffic(params, engine, hw)
    links = [moved.intra_per_micro / hw.gpu.nvlink] if hw.world_size > 1 else [0.0]
    if hw.nodes > 1:
        links.append(moved.inter_per_micro / hw.gpu.network)
    pcie = (accumulation * moved.pcie_per_micro + moved.pcie_per_step) / hw.gpu.pcie
    return StepTime(
        compute=step_seconds(model_cfg, batch_size, hw.world_size, checkpointing, peak_flops, mfu),
        network=accumulation * max(links),
        pcie=pcie,
        overlap_comm=engine.overlap_comm,
    )


def fastest_that_fits(
    model_cfg: AIMConfig,
    params: Parameters,
    acts: Activations,
    engine: EngineSettings,
    hw: Hardware,
    batch_size: int,
    *,
    peak_flops: float,
    mfu: float,
) -> tuple[MemoryPlan, StepTime] | None:
    """Of every (micro-batch, checkpointing) that fits, the one with the shortest predicted step
    (ties: the larger micro-batch, then no checkpointing); None when nothing fits. Under offload the
    transfers scale with the number of micro-steps, so this is usually the largest micro-batch,
    with checkpointing when that is what makes it fit."""
    found = []
    for checkpointing in (False, True):
        for micro in micro_batch_choices(batch_size, hw.world_size):
            plan = plan_memory(
                params, acts, engine, hw, batch_size=batch_size, micro_batch=micro, checkpointing=checkpointing
            )
            if fits(plan, hw):
                timing = step_time(
                    model_cfg, params, engine, hw, batch_size=batch_size, micro_batch=micro,
                    checkpointing=checkpointing, peak_flops=peak_flops, mfu=mfu,
                )  # fmt: skip
                found.append((round(timing.total, 6), -micro, checkpointing, plan, timing))
    if not found:
        return None
    best = min(found, key=lambda item: item[:3])
    return best[3], best[4]


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
