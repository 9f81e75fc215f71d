"""The pretraining run config (YAML + dotted overrides, see :func:`aim_ds.config.load_config`) and the
numbers derived from it. No process group and no DeepSpeed are needed here.

Optimiser and batch defaults come from :data:`aim_ds.model.registry.PAPER_RECIPE` (docs/recipe.md, Table 1
and Table 10), so the paper's numbers live in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..distributed import DistSection
from ..model.registry import PAPER_RECIPE
from ..optim import resolve_warmup_steps, steps_from_patches


@dataclass
class ModelSection:
    """Which registered model, with which AIMConfig overrides."""

    name: str = "aim-test"
    overrides: dict[str, Any] = field(default_factory=dict)  # AIMConfig fields, e.g. {head_depth: 8}
    grad_checkpointing: bool = False  # recompute trunk blocks in backward (activation checkpointing)
    head_grad_checkpointing: bool = False  # the same for the pixel head's blocks (0.4B parameters at 7B)
    # Build under deepspeed.zero.Init (ZeRO-3 only): each rank allocates only its shard instead of a
    # full fp32 copy first (AIM-7B + head: 27 GB of host memory per rank otherwise).
    zero_init: bool = False
    # torch.compile each trunk and pixel-head block (aim_ds.train.engine.compile_blocks; inductor on
    # CPU and CUDA). Off by default: README "Compile" gives the measured ratios and when to turn it on.
    compile: bool = False


@dataclass
class SourceSection:
    """One pretraining source: a .beton file, a folder or a glob of shards, drawn with ``prob``."""

    path: str = ""
    prob: float = 1.0


@dataclass
class DataSection:
    sources: list[SourceSection] = field(default_factory=list)
    val_path: str = ""  # held-out .beton for the validation loss; empty: no validation
    image_size: int = 0  # pixels; 0: the model's image_size
    resize_size: int = 0  # validation: resize shorter side, then centre crop; 0: image_size * 256 / 224
    scale: tuple[float, float] = (0.4, 1.0)  # RandomResizedCrop area fraction (paper: 0.4-1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip: bool = True
    # Off in the paper (Table 10, DFN-2B+); the authors' ImageNet-only config has ColorJitter(0.4, 0.4, 0.2, 0.1)
    # with p = 0.8 (aim_ds.data.color_jitter), for ImageNet-only ablations.
    color_jitter: bool = False
    color_jitter_values: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, sat., hue
    color_jitter_prob: float = 0.8
    num_workers: int = 2  # decode threads per rank


@dataclass
class TrainSection:
    batch_size: int = PAPER_RECIPE.batch_size  # global images per optimizer step (all ranks, all micro-steps)
    micro_batch_size: int = 0  # images per rank per forward; 0: batch_size // world_size
    steps: int = 0  # optimizer steps; 0: from patches_seen
    patches_seen: float = 0.0  # used when steps == 0: steps = patches_seen / (batch_size * num_patches)
    seed: int = 0
    stop_after_steps: int = 0  # >0: checkpoint and end the process after this step, as a kill would


@dataclass
class OptimSection:
    peak_lr: float = PAPER_RECIPE.peak_lr
    min_lr: float = PAPER_RECIPE.min_lr
    warmup_fraction: float = PAPER_RECIPE.warmup_fraction  # of train.steps, as the authors' code states it
    warmup_steps: int = -1  # -1: round(steps * warmup_fraction); >= 0: a fixed count that overrides the fraction
    weight_decay: float = PAPER_RECIPE.weight_decay  # matrices only; biases, norms and pos_embed get none
    betas: tuple[float, float] = PAPER_RECIPE.betas
    eps: float = 1e-8
    grad_clip: float = PAPER_RECIPE.grad_clip  # global 2-norm; goes into the DeepSpeed config's gradient_clipping


@dataclass
class ValSection:
    every_steps: int = 0  # 0: only at the end (when data.val_path is set)
    batch_size: int = 0  # per rank; 0: train.micro_batch_size
    max_batches: int = 0  # per rank; 0: the whole held-out set
    seed: int = 1234  # fixed prefix draw, so that values compare across checkpoints
    patch_grid_images: int = 4  # images in out_dir/patches.png at the end; 0: none


@dataclass
class LogSection:
    every_steps: int = 10
    wandb: bool = False  # offline unless WANDB_MODE is set
    wandb_project: str = "aim-ds"
    wandb_run_name: str = ""  # empty: the out_dir's name
    tensorboard: bool = False  # event files under out_dir/tensorboard: every scalar of the step log
    peak_flops_per_device: float = 0.0  # FLOP/s, for MFU; 0: the device's bf16 dense peak (aim_ds.devices)
    shard_report: bool = False  # debug: write out_dir/shards_rank{r}.json (ZeRO-3 partition sizes)


@dataclass
class CheckpointSection:
    every_steps: int = 1000  # 0: only at the end and on a stop
    keep_last: int = 3  # complete checkpoints kept; <= 0 keeps all
    # Resume from the newest complete checkpoint in out_dir/checkpoints (false: out_dir must hold none).
    resume: bool = True


@dataclass
class LockSection:
    # A holder (rank 0 of the job in out_dir) touches run.lock every quarter of this; a lock not
    # touched for this long is taken over by the next job, whichever host it ran on.
    stale_after_s: float = 120.0


@dataclass
class StopSection:
    # After a first SIGTERM/SIGINT: a second one at least this much later ends the process at once
    # (earlier ones are the same request forwarded by a launcher).
    repeat_after_s: float = 2.0
    # After a first signal, end the process (no checkpoint) when the stop has not ended it within this
    # many seconds: one step plus the stop checkpoint must fit. 0: never.
    timeout_s: float = 900.0


@dataclass
class ExportSection:
    enabled: bool = True  # consolidated fp32 safetensors in out_dir/export at the end
    ml_aim: bool = False  # also trunk_ml_aim.safetensors in the released ml-aim layout


@dataclass
class LiveProbeSection:
    """A quick probe during pretraining (:mod:`aim_ds.train.live_probe`): every ``every_steps``, rank 0
    probes the current trunk on a small labelled set (cached features, a fresh process) and logs its
    top-1 beside the val loss (``metrics.jsonl`` kind ``probe``, W&B ``probe/``, ``loss.png``)."""

    every_steps: int = 0  # 0: off
    config: str = ""  # probe YAML path or shipped name; "": the shipped probe_<model.name>
    train_path: str = ""  # labelled .beton (python -m data_prep imagefolder ...)
    val_path: str = ""
    overrides: list[str] = field(default_factory=lambda: ["train.epochs=10", "train.weight_decays=[0.05]"])
    # Where the probe process runs. auto: a GPU of this node that no training rank uses, else the CPU
    # (never beside rank 0's full training GPU); cpu; cuda:N: the N-th GPU the launcher made visible.
    device: str = "auto"
    # A bounded subset (0: every image), spread evenly over each beton: every probe extracts features of
    # these images (all tokens: 0.8 MB an image at 0.6B in bf16) and trains its heads on them.
    max_train_images: int = 10000
    max_val_images: int = 5000
    # The probe's scratch feature cache, removed after each probe; "": out_dir/live_probe/<step>. A node-local
    # disk (e.g. /tmp or $TMPDIR) spares the shared storage. A cache that would not fit is refused.
    cache_dir: str = ""


@dataclass
class PretrainConfig:
    """The whole run: every section has defaults, a YAML sets what differs."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    val: ValSection = field(default_factory=ValSection)
    log: LogSection = field(default_factory=LogSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    lock: LockSection = field(default_factory=LockSection)
    stop: StopSection = field(default_factory=StopSection)
    export: ExportSection = field(default_factory=ExportSection)
    probe: LiveProbeSection = field(default_factory=LiveProbeSection)
    dist: DistSection = field(default_factory=DistSection)
    out_dir: str = "runs/aim"


class BatchConfigError(ConfigError):
    """Batch sizes that do not fit together (run config vs DeepSpeed config vs world size)."""


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; raised on every rank at once."""

    def __init__(self, step: int, what: str, value: float) -> None:
        super().__init__(
            f"non-finite {what} ({value}) at optimizer step {step}; stopping without saving "
            "(the last complete checkpoint is untouched)"
        )
        self.step = step


@dataclass(frozen=True)
class RunPlan:
    """Numbers derived from the run config, the model and the world size."""

    world_size: int
    micro_batch_size: int  # images per rank per forward
    grad_accum_steps: int
    total_steps: int
    warmup_steps: int
    image_size: int  # pixels
    num_patches: int  # tokens per image
    micro_batch_note: str = ""  # why the micro-batch differs from train.micro_batch_size (logged at start-up)


def largest_divisor_at_most(number: int, limit: int) -> int:
    """The largest divisor of ``number`` (> 0) that is ``<= limit`` (1 at least)."""
    return max(d for d in range(1, min(number, max(limit, 1)) + 1) if number % d == 0)


def _micro_batch(cfg: PretrainConfig, world_size: int) -> tuple[int, int, str]:
    """``(micro_batch_size, grad_accum_steps, note)``, or :class:`BatchConfigError` naming the knob.

    The global batch is the recipe (the paper's 4096) and stays as configured; the micro-batch is a
    memory knob that must divide the per-rank batch. When the configured one does not (micro-batch
    128 with 4096 over 64 GPUs: 64 images per rank), the largest divisor below it is used and
    ``note`` says so; a smaller micro-batch needs less memory, and the ZeRO-3 memory plan at start-up
    checks the one used."""
    batch = cfg.train.batch_size
    if batch <= 0:
        raise BatchConfigError(f"train.batch_size must be positive, got {batch}")
    if batch < world_size:
        raise BatchConfigError(
            f"train.batch_size={batch} is smaller than the world size {world_size}; "
            f"raise train.batch_size to at least {world_size}"
        )
    if batch % world_size:
        lower = batch // world_size * world_size
        raise BatchConfigError(
            f"train.batch_size={batch} does not split evenly over world size {world_size} "
            f"(train.micro_batch_size={cfg.train.micro_batch_size} x gradient accumulation x world size must "
            f"equal it); set train.batch_size to {lower} or {lower + world_size}, or run on a world size that "
            f"divides {batch}"
        )
    per_rank = batch // world_size
    configured = cfg.train.micro_batch_size or per_rank
    micro = largest_divisor_at_most(per_rank, configured)
    note = ""
    if micro != configured:
        note = (
            f"train.micro_batch_size={configured} does not divide the {per_rank} images per rank "
            f"(train.batch_size={batch} over world size {world_size}): using micro-batch {micro} x "
            f"gradient accumulation {per_rank // micro}; set train.micro_batch_size to choose another divisor"
        )
    return micro, per_rank // micro, note


def resolve_plan(cfg: PretrainConfig, world_size: int, image_size: int, num_patches: int) -> RunPlan:
    """Derive steps, warmup and the micro-batch / accumulation split (the micro-batch follows the world
    size, see :func:`_micro_batch`); raise :class:`BatchConfigError` naming the knob to change when
    ``train.batch_size`` does not split over ``world_size`` ranks."""
    micro, accumulation, note = _micro_batch(cfg, world_size)
    steps = cfg.train.steps
    if steps <= 0:
        if cfg.train.patches_seen <= 0:
            raise ConfigError("set train.steps or train.patches_seen (both are 0)")
        steps = steps_from_patches(cfg.train.patches_seen, cfg.train.batch_size, num_patches)
    try:
        warmup = resolve_warmup_steps(steps, cfg.optim.warmup_fraction, cfg.optim.warmup_steps)
    except ValueError:
        raise ConfigError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds train.steps={steps}; set optim.warmup_steps=-1 "
            f"to warm up over optim.warmup_fraction={cfg.optim.warmup_fraction:g} of the run"
        ) from None
    return RunPlan(
        world_size=world_size,
        micro_batch_size=micro,
        grad_accum_steps=accumulation,
        total_steps=steps,
        warmup_steps=warmup,
        image_size=image_size,
        num_patches=num_patches,
        micro_batch_note=note,
    )


def resolved_config(cfg: PretrainConfig, plan: RunPlan) -> PretrainConfig:
    """``cfg`` with the derived numbers written in (steps, micro-batch, image size), so the saved
    config states what actually ran. Warmup stays as configured (a fraction unless fixed): written
    as a count, a rerun of the saved config with another ``train.steps`` would keep the old warmup
    (the plan and the start-up log give the count)."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, steps=plan.total_steps, micro_batch_size=plan.micro_batch_size),
        data=dataclasses.replace(cfg.data, image_size=plan.image_size),
    )


# DeepSpeed config key -> (the run-config knob that sets it, its value). The driver fills these keys;
# a DeepSpeed JSON may leave them out, say "auto", or repeat the same value.
_BATCH_KEYS: dict[str, tuple[str, Callable[[PretrainConfig, RunPlan], float]]] = {
    "train_batch_size": ("train.batch_size", lambda cfg, plan: cfg.train.batch_size),
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", lambda cfg, plan: plan.micro_batch_size),
    "gradient_accumulation_steps": (
        "train.batch_size / (train.micro_batch_size x world size)",
        lambda cfg, plan: plan.grad_accum_steps,
    ),
    "gradient_clipping": ("optim.grad_clip", lambda cfg, plan: cfg.optim.grad_clip),
}
