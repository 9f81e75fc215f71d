"""Memory and time planner for a pretraining run, before any GPU is booked.

    python -m aim_ds.plan --config run/configs/aim-7B.yaml --deepspeed ds_configs/zero3.json --gpus 8 \
        [--nodes 4] [--gpu-memory-gb 80] [--host-memory-gb 1000] [--mfu 0.4] [key=value ...]

Per GPU (per rank on the CPU accelerator, where everything lives in host memory) the peak is the sum of

- model states: DeepSpeed's own ZeRO-3 estimator (``estimate_zero3_model_states_mem_needs``: 16-bit
  parameter and gradient partitions, fp32 master weights and Adam moments, the largest layer
  gathered). An fp32 config (``ds_configs/zero3_fp32.json``) keeps the parameter and gradient
  partitions in 4 bytes instead of 2: :func:`model_state_bytes` adds them.
- activations: what autograd saves, *measured* by running one real trunk block, and the
  preprocessor + head + loss, under ``FakeTensorMode`` (shapes and dtypes, no memory) with
  ``saved_tensors_hooks`` counting each saved storage once, parameters excluded. Without activation
  checkpointing every block keeps its saved tensors; with it each block keeps only its input and
  one block at a time is recomputed in backward. The backward's working set (the gradients of one
  block's activations) is counted as one more block's saved bytes.
- buffers: parameters ZeRO-3 keeps gathered beyond the largest layer (``stage3_max_live_parameters``,
  and ``stage3_max_reuse_distance``: a parameter used again within that many parameters of the trace
  stays gathered; a block's forward and backward uses are about twice its distance to the end of the
  forward apart) and the gradient reduce bucket (doubled with ``overlap_comm``).
- runtime: the process's own footprint (torch + DeepSpeed imported; measured in this process on
  the CPU, ``--runtime-gb`` on a GPU, where the CUDA context and allocator slack live).

Step time is ``train_flops_per_image`` (:mod:`aim_ds.flops`, forward + backward) times the batch,
plus a trunk forward per image when blocks are recomputed, over ``world x peak x MFU``.
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
