"""Memory and time planner for a pretraining run, before any GPU is booked.

    aim-plan --config aim-7B --deepspeed zero3 --gpus 8 \           # or python -m aim_ds.plan, same arguments
        [--nodes 4] [--gpu A100-80GB] [--gpu-memory-gb 80] [--host-memory-gb 1000] [--mfu 0.4] \
        [--pcie-gbs 50] [--nvlink-gbs 360] [--network-gbs 360] [--zeropp] [key=value ...]

What the peak is made of, and how each term is obtained, is in :mod:`aim_ds.plan.memory`
(the bytes each step moves over PCIe, NVLink and the network: :func:`traffic`); the GPUs known by
name in :mod:`aim_ds.devices`; the command line in :mod:`aim_ds.cli.plan` (a driver: it reads the
pretraining run config); the printed plan, the does-not-fit message and the driver's start-up
check in :mod:`aim_ds.plan.report`. Memory figures are counted (DeepSpeed's estimator, the ZeRO
knobs) or measured (activations); step times and run hours are predictions at an assumed MFU.
"""

from .memory import (
    GIB,
    Activations,
    EngineSettings,
    Hardware,
    MemoryPlan,
    Parameters,
    PlanError,
    StepTime,
    Traffic,
    buffer_bytes,
    choices_that_fit,
    count_parameters,
    default_headroom,
    engine_settings,
    fastest_that_fits,
    fits,
    gathered_parameters,
    measure_activations,
    model_state_bytes,
    optimizer_step_bytes,
    plan_memory,
    saved_bytes,
    step_seconds,
    step_time,
    traffic,
)
from .report import RunSizing, check_run, local_hardware, make_plan

__all__ = [
    "GIB",
    "fits",
    "Activations",
    "EngineSettings",
    "Hardware",
    "MemoryPlan",
    "Parameters",
    "PlanError",
    "RunSizing",
    "buffer_bytes",
    "optimizer_step_bytes",
    "check_run",
    "local_hardware",
    "choices_that_fit",
    "count_parameters",
    "engine_settings",
    "make_plan",
    "measure_activations",
    "model_state_bytes",
    "plan_memory",
    "saved_bytes",
    "step_seconds",
    "step_time",
    "traffic",
    "StepTime",
    "Traffic",
    "default_headroom",
    "fastest_that_fits",
    "gathered_parameters",
]
