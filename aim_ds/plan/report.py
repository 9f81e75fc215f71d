"""The plan as text, the does-not-fit message naming the knob, and the driver's start-up check."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..devices import detect_gpu
from ..distributed import min_across_ranks
from ..ds_config import resolve_auto_knobs
from ..model.aim import AIMConfig
from ..model.flops import H100_BF16_DENSE_FLOPS
from .memory import (
    GIB,
    Activations,
    Hardware,
    MemoryPlan,
    Parameters,
    PlanError,
    StepTime,
    available_host_bytes,
    choices_that_fit,
    count_parameters,
    default_headroom,
    engine_settings,
    fastest_that_fits,
    fits,
    host_memory_bytes,
    measure_activations,
    plan_memory,
    resident_bytes,
    runtime_bytes,
    step_time,
)


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def _figure(value: float) -> str:
    """Thousands separated from 100 up, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _hours(steps: int, seconds: float, world: int) -> str:
    hours = steps * seconds / 3600
    return (
        f"{steps:,} steps x {seconds:.3g} s = {_figure(hours)} h ({_figure(hours / 24)} days), "
        f"{_figure(hours * world)} GPU-hours"
    )


def _timing(timing: StepTime) -> str:
    bound = ", communication-bound" if timing.communication_bound else ""
    return (
        f"{timing.total:.3g} s (compute {timing.compute:.3g} s, collectives {timing.network:.3g} s"
        f"{' overlapped' if timing.overlap_comm else ' in series'}, offload PCIe {timing.pcie:.3g} s; "
        f"bound by {timing.bound}{bound})"
    )


def format_plan(
    name: str,
    params: Parameters,
    acts: Activations,
    hw: Hardware,
    chosen: MemoryPlan,
    best: list[MemoryPlan],
    seconds: float | StepTime,
    mfu: float,
    peak_flops: float = H100_BF16_DENSE_FLOPS,
    *,
    steps: int = 0,
    fastest: tuple[MemoryPlan, StepTime] | None = None,
) -> str:
    """The plan as the CLI and the driver print it. Measured or counted: parameters, activations,
    model states (DeepSpeed's estimator), buffers. Predicted: the step time and the run's hours
    (an assumed MFU, bandwidths from the device table), marked as such in the text."""
    unit = "GPU" if hw.device == "cuda" else "rank (CPU: host memory)"
    verdict = "fits" if fits(chosen, hw) else "DOES NOT FIT"
    kept = f" less {_gib(hw.headroom)} headroom for the allocator" if hw.headroom else ""
    gpu = f" {hw.gpu.name}" if hw.device == "cuda" else ""
    lines = [
        f"plan for {name} on {hw.nodes} node(s) x {hw.gpus_per_node}{gpu} {hw.device} = world {hw.world_size}",
        f"  parameters: trunk {params.trunk / 1e6:.1f}M + head {params.head / 1e6:.1f}M = "
        f"{params.total / 1e6:.1f}M (largest layer {params.largest_layer / 1e6:.1f}M)",
        f"  activations per token: {acts.per_token(False) / 1024:.1f} KiB without checkpointing, "
        f"{acts.per_token(True) / 1024:.1f} KiB with (measured: one block saves "
        f"{acts.per_block / acts.num_patches / 1024:.1f} KiB/token)",
        f"  per {unit}, micro-batch {chosen.micro_batch} x accumulation {chosen.accumulation}, "
        f"checkpointing {'on' if chosen.checkpointing else 'off'}:",
        f"    model states {_gib(chosen.model_states)} (DeepSpeed estimator)",
        f"    activations  {_gib(chosen.activations)}",
        f"    optim. step  {_gib(chosen.optimizer_step)} (fp32 gradients of one sub group; the peak takes the "
        "larger of this and activations + buffers)",
        f"    buffers      {_gib(chosen.buffers)} (gathered parameters, prefetch and reduce buckets)",
        f"    runtime      {_gib(chosen.runtime)}",
        f"    peak         {_gib(chosen.peak)} of {_gib(hw.device_memory)}{kept}: {verdict}",
    ]
    if hw.device == "cuda":
        lines.append(f"  host memory per node: {_gib(chosen.host_per_node)} of {_gib(hw.host_memory)}")
    for plan in best:
        lines.append(
            f"  fits: micro-batch {plan.micro_batch} x accumulation {plan.accumulation}, checkpointing "
            f"{'on' if plan.checkpointing else 'off'} (peak {_gib(plan.peak)})"
        )
    if not best:
        lines.append("  no micro-batch fits, even at 1 with checkpointing")
    where = f"MFU {mfu:.0%} of {peak_flops / 1e12:.4g} TFLOP/s per device"
    if hw.device != "cuda":  # the time model is a GPU's; the CPU accelerator's speed is not predicted
        compute = seconds.compute if isinstance(seconds, StepTime) else seconds
        lines.append(f"  step time on {hw.gpu.name} GPUs at {where}: {compute:.3g} s (no CPU prediction)")
    elif isinstance(seconds, StepTime):
        lines.append(f"  predicted step time at {where}: {_timing(seconds)}")
        if steps:
            lines.append(f"  predicted run: {_hours(steps, seconds.total, hw.world_size)}")
    else:
        lines.append(f"  step time at {where}: {seconds:.3g} s")
    if fastest is not None and hw.device == "cuda":
        plan, timing = fastest
        lines.append(
            f"  fastest that fits: micro-batch {plan.micro_batch} x accumulation {plan.accumulation}, checkpointing "
            f"{'on' if plan.checkpointing else 'off'} (peak {_gib(plan.peak)}): {_timing(timing)}"
            + (f"; run {_hours(steps, timing.total, hw.world_size)}" if steps else "")
        )
    if hw.device == "cuda":
        lines.append(
            f"  predictions: step time and hours assume the MFU above and {hw.gpu.name}'s bandwidths (PCIe "
            f"{hw.gpu.pcie / 1e9:.0f}, NVLink {hw.gpu.nvlink / 1e9:.0f}, network {hw.gpu.network / 1e9:.0f} GB/s "
            "per node); memory figures are counted or measured"
        )
    return "\n".join(lines)


def does_not_fit_message(
    chosen: MemoryPlan, best: list[MemoryPlan], hw: Hardware, fastest: tuple[MemoryPlan, StepTime] | None = None
) -> str:
    """Why ``chosen`` does not fit, naming the knob to change (and, of the settings that fit, the
    one with the shortest predicted step)."""
    where = "per GPU" if hw.device == "cuda" else "per rank of host memory"
    if chosen.peak > hw.usable:
        kept = f" ({_gib(hw.device_memory)} less {_gib(hw.headroom)} headroom)" if hw.headroom else ""
        head = f"the plan needs {_gib(chosen.peak)} {where} but {_gib(hw.usable)} is available{kept}"
    else:
        head = f"the plan needs {_gib(chosen.host_per_node)} of host memory per node, {_gib(hw.host_memory)} is there"
    if best:
        fixes = " or ".join(
            f"train.micro_batch_size={p.micro_batch} with model.grad_checkpointing={str(p.checkpointing).lower()}"
            for p in best
        )
        if fastest is not None:
            plan, timing = fastest
            fixes += (
                f" (fastest predicted: train.micro_batch_size={plan.micro_batch} with model.grad_checkpointing="
                f"{str(plan.checkpointing).lower()}, {timing.total:.3g} s a step)"
            )
        return f"{head}; set {fixes}"
    ways = []
    if chosen.buffers > chosen.activations:  # parameters kept gathered outweigh the micro-batch's activations
        ways.append(
            f"smaller zero_optimization.stage3_max_live_parameters and stage3_max_reuse_distance (parameters "
            f"kept gathered: {_gib(chosen.buffers)} here)"
        )
    if chosen.optimizer_step > chosen.activations:  # the step, not the micro-batch, can set the peak
        ways.append(
            f"a smaller zero_optimization.sub_group_size (the optimizer step flattens one sub group's "
            f"gradients into fp32: {_gib(chosen.optimizer_step)} here)"
        )
    if hw.device == "cuda":
        ways += ["more GPUs (--num_gpus / nodes)", "a DeepSpeed config with offload (ds_configs/zero3_offload.json)"]
    else:  # offloading moves nothing on the CPU accelerator: host memory is the device memory
        ways.append("more nodes (the ranks of one machine share its memory)")
    return f"{head}; even micro-batch 1 with checkpointing does not fit: use " + " or ".join(ways)


@dataclass(frozen=True)
class RunSizing:
    """Everything the plan of one run needs; :func:`make_plan` computes it."""

    text: str
    chosen: MemoryPlan
    best: list[MemoryPlan]
    fits: bool
    message: str
    step: StepTime | None = None  # predicted, for ``chosen``
    fastest: tuple[MemoryPlan, StepTime] | None = None  # the fitting choice with the shortest predicted step
    steps: int = 0  # optimizer steps of the run (0: not given)
    peak_flops: float = H100_BF16_DENSE_FLOPS

    @property
    def hours(self) -> float:
        """Predicted wall-clock hours of the run at ``chosen``'s step time (0 without ``steps``)."""
        return self.steps * self.step.total / 3600 if self.step else 0.0


def make_plan(
    model_cfg: AIMConfig,
    name: str,
    ds: dict[str, Any],
    hw: Hardware,
    *,
    batch_size: int,
    micro_batch: int,
    checkpointing: bool,
    mfu: float = 0.4,
    peak_flops: float | None = None,
    steps: int = 0,
) -> RunSizing:
    """Plan ``micro_batch`` with ``checkpointing`` and the choices that fit, as text and numbers.
    ``peak_flops`` defaults to ``hw.gpu``'s bf16 dense peak; ``steps`` (the run's optimizer steps)
    adds the predicted hours and GPU-hours."""
    ds = copy.deepcopy(ds)
    resolve_auto_knobs(ds, model_cfg)  # "auto" knobs as the driver will fill them
    engine = engine_settings(ds, device=hw.device)
    if engine.stage != 3:
        raise ConfigError(f"the planner models ZeRO-3; the DeepSpeed config has stage {engine.stage}")
    params = count_parameters(model_cfg)
    acts = measure_activations(model_cfg, torch.bfloat16 if engine.bytes_per_param == 2 else torch.float32)
    chosen = plan_memory(
        params, acts, engine, hw, batch_size=batch_size, micro_batch=micro_batch, checkpointing=checkpointing
    )
    best = choices_that_fit(params, acts, engine, hw, batch_size)
    peak = peak_flops if peak_flops else hw.gpu.bf16_flops
    timing = step_time(
        model_cfg, params, engine, hw, batch_size=batch_size, micro_batch=micro_batch, checkpointing=checkpointing,
        peak_flops=peak, mfu=mfu,
    )  # fmt: skip
    fastest = fastest_that_fits(model_cfg, params, acts, engine, hw, batch_size, peak_flops=peak, mfu=mfu)
    ok = fits(chosen, hw)
    text = format_plan(name, params, acts, hw, chosen, best, timing, mfu, peak, steps=steps, fastest=fastest)
    message = "" if ok else does_not_fit_message(chosen, best, hw, fastest if hw.device == "cuda" else None)
    return RunSizing(text, chosen, best, ok, message, timing, fastest, steps, peak)


def local_hardware(world_size: int, device: torch.device) -> Hardware:
    """The hardware of a launched run: ranks per node from the launcher's environment, the GPU's
    memory on CUDA, or on the CPU this machine's available memory shared by its ranks.

    On the CPU a rank's share is (``MemAvailable`` now + the resident memory the node's ranks already
    hold) / ranks per node: the ranks' own footprint is the plan's runtime term, other processes'
    memory is not the run's. Ranks read it at slightly different moments, so they agree on the
    smallest share (a collective: every rank calls this)."""
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size))), 1)
    host = host_memory_bytes()
    gpu = None
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        gpu = detect_gpu(device)
    else:
        memory = min_across_ranks((available_host_bytes() + local * resident_bytes()) // local)
    hw = Hardware(
        gpus_per_node=local,
        nodes=max(world_size // max(local, 1), 1),
        device=device.type,
        device_memory=memory,
        host_memory=host,
        runtime=runtime_bytes(device.type, None),
        headroom=default_headroom(device.type, memory),
    )
    return dataclasses.replace(hw, gpu=gpu) if gpu is not None else hw


def check_run(
    model_cfg: AIMConfig,
    name: str,
    ds: dict[str, Any],
    hw: Hardware,
    *,
    batch_size: int,
    micro_batch: int,
    checkpointing: bool,
    peak_flops: float | None = None,
    steps: int = 0,
) -> RunSizing:
    """The driver's start-up plan (every rank computes the same one, so all stop together);
    :class:`PlanError` naming the knob to change when it does not fit."""
    sizing = make_plan(
        model_cfg,
        name,
        ds,
        hw,
        batch_size=batch_size,
        micro_batch=micro_batch,
        checkpointing=checkpointing,
        peak_flops=peak_flops,
        steps=steps,
    )
    if not sizing.fits:
        raise PlanError(f"{sizing.message} (the plan:\n{sizing.text})")
    return sizing
