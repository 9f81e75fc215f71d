"""Memory and time planner for a pretraining run, before any GPU is booked.

    python -m aim_ds.plan --config run/configs/aim-7B.yaml --deepspeed ds_configs/zero3.json --gpus 8 \
        [--nodes 4] [--gpu-memory-gb 80] [--host-memory-gb 1000] [--mfu 0.4] [key=value ...]

What the peak is made of, and how each term is obtained, is in :mod:`aim_ds.plan.memory`; the
printed plan, the does-not-fit message and the driver's start-up check in :mod:`aim_ds.plan.report`.
"""

from .memory import (
    GIB,
    Activations,
    EngineSettings,
    Hardware,
    MemoryPlan,
    Parameters,
    PlanError,
    buffer_bytes,
    choices_that_fit,
    count_parameters,
    engine_settings,
    fits,
    measure_activations,
    model_state_bytes,
    optimizer_step_bytes,
    plan_memory,
    saved_bytes,
    step_seconds,
)
from .report import RunSizing, check_run, local_hardware, make_plan


def main(argv: list[str] | None = None) -> int:
    """The CLI (:mod:`aim_ds.plan.__main__`)."""
    from .__main__ import main as cli

    return cli(argv)


__all__ = [
    "GIB",
    "fits",
    "main",
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
]
