"""AIM pretraining with DeepSpeed: the run config, the DeepSpeed config merge, the loop, validation.

The driver ``run/pretrain.py`` only parses arguments and calls :func:`run`. Everything here is
usable from another driver: :func:`resolve_plan` and :func:`build_ds_config` need no process group,
:func:`build_engine` wraps any model, :func:`evaluate` any engine and loader.

Conventions. ``step`` counts completed optimizer steps (the first update is step 0's, after which
``step == 1``); checkpoints, logs and ``train.steps`` use that count. One optimizer step consumes
``grad_accum_steps`` micro-batches of ``micro_batch_size`` images on each of ``world_size`` ranks.
The data position is ``(epoch, batch_in_epoch)``, the next micro-batch this rank will read.
Prefix lengths are drawn from a generator seeded by ``(seed, rank, step, micro-step)``, so they are
independent across ranks and a resumed run draws exactly what a straight run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import metrics as metrics_lib
from .config import ConfigError, save_config, to_dict
from .optim import build_optimizer, lr_at_step, param_groups, set_lr, steps_from_patches, warmup_steps_from_fraction

log = logging.getLogger("aim_ds.pretrain")


# --------------------------------------------------------------------------------------------
# The run config (YAML + dotted overrides, see aim_ds.config.load_config)
# --------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    """Which registered model, with which AIMConfig overrides."""

    name: str = "aim-test"
    overrides: dict[str, Any] = field(default_factory=dict)  # AIMConfig fields, e.g. {head_depth: 8}
    grad_checkpointing: bool = False  # recompute trunk blocks in backward (activation checkpointing)
    # Build under deepspeed.zero.Init (ZeRO-3 only): each rank allocates only its shard instead of a
    # full fp32 copy first (AIM-7B + head: 27 GB of host memory per rank otherwise).
    zero_init: bool = False


@dataclass
class SourceSection:
    """One pretraining source: a .beton file, a folder or a glob of shards, drawn with ``prob``."""

    path: str = ""
    prob: float = 1.0


@dataclass
class DataSection:
    sources: list[SourceSection] = field(default_factory=list)
    val_path: str = ""  # held-out .beton for the validation loss; empty: no validation
    image_size: int = 0  # 0: the model's image_size
    resize_size: int = 0  # validation: resize shorter side, then centre crop; 0: image_size * 256 / 224
    scale: tuple[float, float] = (0.4, 1.0)  # RandomResizedCrop area fraction (paper: 0.4-1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip: bool = True
    num_workers: int = 2  # decode threads per rank


@dataclass
class TrainSection:
    batch_size: int = 4096  # global images per optimizer step (all ranks, all micro-steps)
    micro_batch_size: int = 0  # images per rank per forward; 0: batch_size // world_size
    steps: int = 0  # optimizer steps; 0: from patches_seen
    patches_seen: float = 0.0  # used when steps == 0: steps = patches_seen / (batch_size * num_patches)
    seed: int = 0
    stop_after_steps: int = 0  # >0: checkpoint and end the process after this step, as a kill would


@dataclass
class OptimSection:
    peak_lr: float = 1e-3
    min_lr: float = 0.0
    warmup_fraction: float = 0.025
    warmup_steps: int = -1  # -1: round(steps * warmup_fraction)
    weight_decay: float = 0.05  # matrices only; biases, norms and pos_embed get none
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global 2-norm; goes into the DeepSpeed config's gradient_clipping


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
    peak_flops_per_device: float = 989e12  # for MFU; H100 SXM dense bf16
    shard_report: bool = False  # debug: write out_dir/shards_rank{r}.json (ZeRO-3 partition sizes)


@dataclass
class CheckpointSection:
    every_steps: int = 1000  # 0: only at the end and on a stop
    keep_last: int = 3  # complete checkpoints kept; <= 0 keeps all
    resume: bool = (
        True  # resume from the newest complete checkpoint in out_dir/checkpoints (false: out_dir must hold none)
    )


@dataclass
class ExportSection:
    enabled: bool = True  # consolidated fp32 safetensors in out_dir/export at the end
    ml_aim: bool = False  # also trunk_ml_aim.safetensors in the released ml-aim layout


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
    export: ExportSection = field(default_factory=ExportSection)
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


# --------------------------------------------------------------------------------------------
# Planning: steps, batch split, the DeepSpeed config (no process group needed)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """Numbers derived from the run config, the model and the world size."""

    world_size: int
    micro_batch_size: int  # per rank per forward
    grad_accum_steps: int
    total_steps: int
    warmup_steps: int
    image_size: int
    num_patches: int


def resolve_plan(cfg: PretrainConfig, world_size: int, image_size: int, num_patches: int) -> RunPlan:
    """Derive steps, warmup and the micro-batch / accumulation split; raise :class:`BatchConfigError`
    naming the knob to change when ``batch_size != micro_batch_size * accumulation * world_size``."""
    batch = cfg.train.batch_size
    if batch <= 0:
        raise BatchConfigError(f"train.batch_size must be positive, got {batch}")
    micro = cfg.train.micro_batch_size or batch // world_size
    if micro <= 0:
        raise BatchConfigError(
            f"train.batch_size={batch} is smaller than the world size {world_size}; "
            f"raise train.batch_size to at least {world_size}"
        )
    per_step = micro * world_size
    if batch % per_step != 0:
        lower = max(per_step, batch // per_step * per_step)
        raise BatchConfigError(
            f"train.batch_size={batch} is not micro_batch_size x gradient accumulation x world size "
            f"(train.micro_batch_size={micro}, world size {world_size}: a multiple of {per_step} is needed); "
            f"set train.batch_size to {lower} or {lower + per_step}, or pick a train.micro_batch_size "
            f"that divides {batch // world_size if batch % world_size == 0 else batch}/world"
        )
    steps = cfg.train.steps
    if steps <= 0:
        if cfg.train.patches_seen <= 0:
            raise ConfigError("set train.steps or train.patches_seen (both are 0)")
        steps = steps_from_patches(cfg.train.patches_seen, batch, num_patches)
    if cfg.optim.warmup_steps >= 0:
        warmup = cfg.optim.warmup_steps
    else:
        warmup = warmup_steps_from_fraction(steps, cfg.optim.warmup_fraction)
    if warmup > steps:
        raise ConfigError(f"optim.warmup_steps={warmup} exceeds train.steps={steps}")
    return RunPlan(
        world_size=world_size,
        micro_batch_size=micro,
        grad_accum_steps=batch // per_step,
        total_steps=steps,
        warmup_steps=warmup,
        image_size=image_size,
        num_patches=num_patches,
    )


def resolved_config(cfg: PretrainConfig, plan: RunPlan) -> PretrainConfig:
    """``cfg`` with the derived numbers written in (steps, warmup, micro-batch, image size), so the
    saved config states what actually ran."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, steps=plan.total_steps, micro_batch_size=plan.micro_batch_size),
        optim=dataclasses.replace(cfg.optim, warmup_steps=plan.warmup_steps),
        data=dataclasses.replace(cfg.data, image_size=plan.image_size),
    )


_BATCH_KEYS = {
    "train_batch_size": ("train.batch_size", lambda cfg, plan: cfg.train.batch_size),
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", lambda cfg, plan: plan.micro_batch_size),
    "gradient_accumulation_steps": (
        "train.batch_size / (train.micro_batch_size x world size)",
        lambda cfg, plan: plan.grad_accum_steps,
    ),
    "gradient_clipping": ("optim.grad_clip", lambda cfg, plan: cfg.optim.grad_clip),
}


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON config into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON: {exc}") from None


def build_ds_config(
    base: dict[str, Any], cfg: PretrainConfig, plan: RunPlan, *, on_cpu: bool, source: str = "the DeepSpeed config"
) -> tuple[dict[str, Any], list[str]]:
    """Fill batch sizes and clipping from the run config into a copy of ``base``.

    A value the JSON already sets (other than ``"auto"``) must agree with the run config, else
    :class:`BatchConfigError` says which knob to change. On CPU, bf16/fp16 are switched off (fp32):
    DeepSpeed's CPU path trains in fp32 here. Returns the dict and notes for the log.
    """
    ds = json.loads(json.dumps(base))  # deep copy, plain data
    notes: list[str] = []
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{source} sets '{key}'; remove it: the optimizer and LR schedule come from the run "
                "config's optim section"
            )
    for key, (knob, value_of) in _BATCH_KEYS.items():
        want = value_of(cfg, plan)
        have = ds.get(key, "auto")
        if have != "auto" and not math.isclose(float(have), float(want)):
            raise BatchConfigError(
                f"{source} sets {key}={have} but the run config gives {want} "
                f"(from {knob}, world size {plan.world_size}); remove {key} from {source} "
                f"(the driver fills it) or change {knob}"
            )
        ds[key] = want
    if on_cpu:
        for precision in ("bf16", "fp16"):
            if ds.get(precision, {}).get("enabled", False):
                ds[precision]["enabled"] = False
                notes.append(f"no CUDA: {precision} turned off, training in fp32 on CPU")
        zero = ds.get("zero_optimization", {})
        for offload in ("offload_optimizer", "offload_param"):
            if zero.get(offload, {}).get("device", "none") not in ("none", None):
                zero[offload]["device"] = "none"
                notes.append(f"no CUDA: zero_optimization.{offload} turned off (already on the CPU)")
    ds.setdefault("steps_per_print", 10**9)  # our logger reports; silence DeepSpeed's own step prints
    return ds, notes


def optimizer_offloaded(ds: dict[str, Any]) -> bool:
    """True when ZeRO keeps the optimizer on the CPU or NVMe (then DeepSpeedCPUAdam is required)."""
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# --------------------------------------------------------------------------------------------
# Process group, model, engine, data
# --------------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group (NCCL on CUDA, gloo on CPU). Returns ``(rank, world_size, device)``.

    Works under the deepspeed launcher and as a plain ``python`` process (one rank).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # a plain `python run/pretrain.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    on_cuda = get_accelerator().device_name() == "cuda" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)  # before NCCL creates its communicators
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_cuda:
        return rank, world, torch.device("cuda", local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one host share its cores; torch would otherwise give each rank all of them.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return rank, world, torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_config(cfg: PretrainConfig) -> Any:
    """The AIMConfig the run will build (registry entry plus ``model.overrides``), without building."""
    from .registry import get_model_spec

    try:
        spec = get_model_spec(cfg.model.name)
    except KeyError as exc:
        raise ConfigError(f"model.name: {exc.args[0]}") from None
    try:
        return spec.config.replace(**cfg.model.overrides) if cfg.model.overrides else spec.config
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from None


def build_model(cfg: PretrainConfig, ds: dict[str, Any] | None = None) -> nn.Module:
    """The registered model with overrides, initialised from ``train.seed`` (the same on every rank,
    so the ZeRO partitions come from one consistent model). With ``model.zero_init`` and a ZeRO-3
    ``ds`` config, parameters are partitioned as each layer is built."""
    import contextlib

    from .registry import create_model

    torch.manual_seed(cfg.train.seed)
    context: Any = contextlib.nullcontext()
    if cfg.model.zero_init and ds is not None and zero_stage(ds) == 3:
        import deepspeed

        context = deepspeed.zero.Init(config_dict_or_path=ds)
    with context:
        model = create_model(cfg.model.name, **cfg.model.overrides)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, counting ZeRO-3 partitioned ones at their full size."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def build_engine(model: nn.Module, cfg: PretrainConfig, ds: dict[str, Any], plan: RunPlan) -> tuple[Any, Any]:
    """AdamW over decay / no-decay groups, wrapped by ``deepspeed.initialize``. Returns
    ``(engine, optimizer)``; ``optimizer`` is ours, whose groups :func:`set_lr` writes each step."""
    import deepspeed

    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = build_optimizer(
        groups,
        lr=lr_at_step(0, peak_lr=cfg.optim.peak_lr, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps),
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        offload=optimizer_offloaded(ds),
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine, optimizer


def shard_report(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Per parameter: full size ``ds_numel``, this rank's partition ``local_numel`` and whether ZeRO-3
    keeps it gathered (``persist``). Empty unless the parameters are ZeRO-3 partitioned."""
    report = {}
    for name, param in module.named_parameters():
        if hasattr(param, "ds_tensor"):
            report[name] = {
                "ds_numel": int(param.ds_numel),
                "local_numel": int(param.ds_tensor.numel()),
                "persist": bool(getattr(param, "ds_persist", False)),
                "ndim": len(param.ds_shape),
            }
    return report


def build_loaders(cfg: PretrainConfig, plan: RunPlan, rank: int, world: int, device: torch.device) -> tuple[Any, Any]:
    """The training mixture loader and the held-out loader (None without ``data.val_path``)."""
    from .data import build_eval_loader, build_train_loader

    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: give at least one {path, prob}")
    sources = [(s.path, s.prob) for s in cfg.data.sources]
    loader_device = device if device.type == "cuda" else None
    train = build_train_loader(
        sources,
        batch_size=plan.micro_batch_size,
        image_size=plan.image_size,
        scale=tuple(cfg.data.scale),
        ratio=tuple(cfg.data.ratio),
        flip=cfg.data.flip,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.num_workers,
        device=loader_device,
    )
    val = None
    if cfg.data.val_path:
        val = build_eval_loader(
            cfg.data.val_path,
            batch_size=cfg.val.batch_size or plan.micro_batch_size,
            image_size=plan.image_size,
            resize_size=cfg.data.resize_size or round(plan.image_size * 256 / 224),
            rank=rank,
            world_size=world,
            num_workers=cfg.data.num_workers,
            device=loader_device,
        )
    return train, val


# --------------------------------------------------------------------------------------------
# Small pieces of the loop
# --------------------------------------------------------------------------------------------


def _seed_from(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_prefix_len(batch_size: int, num_patches: int, *key: Any) -> Tensor:
    """Prefix lengths ``[batch_size]`` int64, uniform in ``[1, num_patches - 1]``, from a generator
    seeded by ``key`` (e.g. ``(seed, rank, step, micro_step)``): stateless, so reproducible on resume."""
    generator = torch.Generator().manual_seed(_seed_from(*key))
    return torch.randint(1, num_patches, (batch_size,), generator=generator)


def _collective_device() -> torch.device:
    """Where a tensor for a torch.distributed collective must live: NCCL takes only CUDA tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _min_over_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _batches_per_epoch(loader: Any) -> int:
    # Under ZeRO-3 every forward gathers parameters collectively: all ranks must take the same
    # number of steps, so an epoch ends at the shortest rank's end.
    return _min_over_ranks(len(loader))


def iterate_batches(loader: Any, epoch: int, batch_in_epoch: int, per_epoch: int) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(epoch, index_in_epoch, images)`` from position ``(epoch, batch_in_epoch)`` onwards,
    across epoch boundaries, forever."""
    while True:
        if batch_in_epoch < per_epoch:
            index = batch_in_epoch
            for images, _labels in loader.iter_epoch(epoch, start_step=batch_in_epoch):
                yield epoch, index, images
                index += 1
                if index >= per_epoch:
                    break
        epoch, batch_in_epoch = epoch + 1, 0


@torch.no_grad()
def evaluate(
    engine: Any, loader: Any, *, num_patches: int, seed: int, rank: int, max_batches: int = 0
) -> tuple[float, int]:
    """Pretraining loss on the held-out loader with a fixed prefix draw per ``(seed, rank, batch)``.

    Returns ``(loss, images)``: the token-level mean over all ranks (each batch weighted by its
    number of target patches, ``sum(N - S)``) and the number of images seen.
    """
    count = _batches_per_epoch(loader)
    if max_batches > 0:
        count = min(count, max_batches)
    was_training = engine.module.training
    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # weighted loss, weight, images
    for index, (images, _labels) in enumerate(loader):
        if index >= count:
            break
        prefix_len = draw_prefix_len(images.shape[0], num_patches, "val", seed, rank, index)
        loss = engine(images, prefix_len=prefix_len.to(images.device))["loss"]
        weight = float((num_patches - prefix_len).sum())
        totals += torch.tensor([float(loss) * weight, weight, images.shape[0]], dtype=torch.float64)
    if dist.is_initialized():
        totals = totals.to(_collective_device())
        dist.all_reduce(totals)
        totals = totals.cpu()
    engine.train(was_training)
    return float(totals[0] / totals[1].clamp_min(1.0)), int(totals[2])


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the next step boundary and exits.

    Saving inside the handler would run collectives from a signal context on one rank only; the
    flag is instead all-reduced with the step's loss so that every rank stops at the same step.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum


@dataclass
class RunResult:
    status: str  # "finished", "stopped" (signal or train.stop_after_steps), "already_finished"
    step: int
    out_dir: Path


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """What the loop, validation and the end-of-run steps share on one rank."""

    cfg: PretrainConfig
    plan: RunPlan
    engine: Any
    optimizer: Any
    train_loader: Any
    val_loader: Any
    logger: metrics_lib.MetricsLogger
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        client_state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "config": to_dict(self.cfg)}
        ckpt.save(self.engine, self.ckpt_dir, step, client_state, self.cfg.checkpoint.keep_last)


def run(cfg: PretrainConfig, ds_base: dict[str, Any], *, ds_source: str = "the DeepSpeed config") -> RunResult:
    """Train (or resume) the run described by ``cfg`` on every rank of the launched job.

    Raises :class:`NonFiniteLossError` on every rank when the loss or grad norm stops being finite.
    """
    rank, world, device = init_distributed()
    is_main = rank == 0
    out_dir = Path(cfg.out_dir)

    model_cfg = model_config(cfg)
    image_size = cfg.data.image_size or model_cfg.image_size
    if image_size != model_cfg.image_size:
        raise ConfigError(
            f"data.image_size={image_size} differs from the model's image_size={model_cfg.image_size}; "
            "set model.overrides.image_size too"
        )
    plan = resolve_plan(cfg, world, image_size, model_cfg.num_patches)
    cfg = resolved_config(cfg, plan)
    ds, notes = build_ds_config(ds_base, cfg, plan, on_cpu=device.type != "cuda", source=ds_source)
    model = build_model(cfg, ds)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
        for note in notes:
            log.info(note)
        log.info(
            "model %s: %.1fM parameters; world %d x micro-batch %d x accumulation %d = batch %d; %d steps, %d warmup",
            cfg.model.name,
            count_parameters(model) / 1e6,
            world,
            plan.micro_batch_size,
            plan.grad_accum_steps,
            cfg.train.batch_size,
            plan.total_steps,
            plan.warmup_steps,
        )

    engine, optimizer = build_engine(model, cfg, ds, plan)
    if cfg.log.shard_report:
        (out_dir / f"shards_rank{rank}.json").write_text(json.dumps(shard_report(engine.module), indent=1))

    step, epoch, batch_in_epoch = 0, 0, 0
    if not cfg.checkpoint.resume and ckpt.latest_complete(out_dir / "checkpoints") is not None:
        # Starting over beside newer-numbered checkpoints would make pruning delete the new ones.
        raise ConfigError(
            f"checkpoint.resume=false but {out_dir / 'checkpoints'} holds checkpoints; "
            "choose a new out_dir or remove them"
        )
    resumed = ckpt.load_latest(engine, out_dir / "checkpoints") if cfg.checkpoint.resume else None
    if resumed is not None:
        step, client = resumed
        epoch, batch_in_epoch = int(client["epoch"]), int(client["batch_in_epoch"])
        if is_main:
            _warn_config_changes(client.get("config", {}), to_dict(cfg))
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d)", ckpt.tag_for_step(step), step, epoch, batch_in_epoch
            )

    logger = metrics_lib.MetricsLogger(
        out_dir,
        enabled=is_main,
        resume_step=step,
        wandb=cfg.log.wandb,
        wandb_project=cfg.log.wandb_project,
        wandb_run_name=cfg.log.wandb_run_name,
        config=to_dict(cfg),
    )
    train_loader, val_loader = build_loaders(cfg, plan, rank, world, device)
    job = _Job(cfg, plan, engine, optimizer, train_loader, val_loader, logger, rank, world, device)
    try:
        if step >= plan.total_steps:
            if is_main:
                log.info("run already finished at step %d; nothing to train", step)
            _finish(job, step)
            return RunResult("already_finished", step, out_dir)
        status, step = _train_loop(job, step, epoch, batch_in_epoch)
        if status == "finished":
            _finish(job, step)
        return RunResult(status, step, out_dir)
    finally:
        logger.close()


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any]) -> None:
    ignored = {"train.stop_after_steps", "checkpoint", "log", "export", "out_dir", "data.num_workers"}
    changed = []
    for section, values in current.items():
        if section in ignored:
            continue
        if isinstance(values, dict):
            for key, value in values.items():
                name = f"{section}.{key}"
                if name not in ignored and saved.get(section, {}).get(key) != value:
                    changed.append(f"{name}: {saved.get(section, {}).get(key)!r} -> {value!r}")
        elif saved.get(section) != values:
            changed.append(f"{section}: {saved.get(section)!r} -> {values!r}")
    if changed:
        log.warning("resuming with a changed config: %s", "; ".join(changed))


def _train_loop(job: _Job, step: int, epoch: int, batch_in_epoch: int) -> tuple[str, int]:
    """Optimizer steps from ``step`` to the end, or to a stop. Returns ``(status, step)``."""
    from .flops import train_flops_per_image

    cfg, plan, engine = job.cfg, job.plan, job.engine
    per_epoch = _batches_per_epoch(job.train_loader)
    if per_epoch == 0:
        raise ConfigError(f"the training data gives no full micro-batch of {plan.micro_batch_size} images per rank")
    batches = iterate_batches(job.train_loader, epoch, batch_in_epoch, per_epoch)
    flops_per_image = train_flops_per_image(engine.module.config)
    stop = StopRequest()
    stop.install()
    # Logged loss: the mean over the steps since the last log line (the step's own loss at every_steps=1).
    window_start, window_images, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    last_saved = step
    engine.train()
    try:
        while step < plan.total_steps:
            lr = lr_at_step(
                step,
                peak_lr=cfg.optim.peak_lr,
                total_steps=plan.total_steps,
                warmup_steps=plan.warmup_steps,
                min_lr=cfg.optim.min_lr,
            )
            set_lr(job.optimizer, lr)
            loss_sum = torch.zeros((), dtype=torch.float32, device=job.device)
            for micro in range(plan.grad_accum_steps):
                epoch, index, images = next(batches)
                batch_in_epoch = index + 1
                prefix_len = draw_prefix_len(images.shape[0], plan.num_patches, cfg.train.seed, job.rank, step, micro)
                loss = engine(images, prefix_len=prefix_len.to(images.device))["loss"]
                engine.backward(loss)
                loss_sum += loss.detach().float()
                if micro == plan.grad_accum_steps - 1:
                    # Before the update: one all-reduce carries the loss for the log, the non-finite
                    # check (NaN on any rank makes the sum NaN) and the stop flag, so all ranks agree.
                    flag = torch.tensor(float(stop.requested), device=job.device)
                    stats = torch.stack([loss_sum / plan.grad_accum_steps, flag])
                    if dist.is_initialized():
                        dist.all_reduce(stats)
                    step_loss = float(stats[0]) / job.world
                    stop_now = float(stats[1]) > 0
                    if not math.isfinite(step_loss):
                        raise NonFiniteLossError(step + 1, "loss", step_loss)
                engine.step()
            step += 1
            window_images += cfg.train.batch_size
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            grad_norm = _grad_norm(engine)
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise NonFiniteLossError(step, "gradient norm", grad_norm)

            if step % max(cfg.log.every_steps, 1) == 0 or step == plan.total_steps:
                images_per_second = window_images / max(time.perf_counter() - window_start, 1e-9)
                mean_loss = window_loss / window_steps
                _log_step(job, step, mean_loss, lr, grad_norm, images_per_second, epoch, flops_per_image)
                window_start, window_images, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0

            if job.val_loader is not None and cfg.val.every_steps > 0 and step % cfg.val.every_steps == 0:
                if step < plan.total_steps:  # the last one comes with the end of the run
                    _validate(job, step)
                    window_start = time.perf_counter()  # keep validation out of images/s

            stop_after = cfg.train.stop_after_steps > 0 and step >= cfg.train.stop_after_steps
            periodic = cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0
            if step < plan.total_steps and (periodic or stop_now or stop_after):
                job.save(step, epoch, batch_in_epoch)
                last_saved = step
                window_start = time.perf_counter()
            if step < plan.total_steps and (stop_now or stop_after):
                if job.is_main:
                    why = f"signal {signal.Signals(stop.signum).name}" if stop.requested else "train.stop_after_steps"
                    log.info("stopped at step %d (%s); checkpoint %s saved", step, why, ckpt.tag_for_step(step))
                return "stopped", step
        if last_saved != step:
            job.save(step, epoch, batch_in_epoch)
        return "finished", step
    finally:
        stop.restore()


def _log_step(
    job: _Job,
    step: int,
    loss: float,
    lr: float,
    grad_norm: float | None,
    images_per_second: float,
    epoch: int,
    flops_per_image: float,
) -> None:
    values: dict[str, Any] = {
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "images_per_second": images_per_second,
        "epoch": epoch,
    }
    norm = grad_norm if grad_norm is not None else float("nan")
    line = (
        f"step {step}/{job.plan.total_steps} loss {loss:.4f} lr {lr:.3e} grad_norm {norm:.3f} "
        f"{images_per_second:.1f} img/s"
    )
    if job.device.type == "cuda":  # FLOP/s and MFU mean little on CPU
        flops = metrics_lib.flops_per_second_per_device(flops_per_image, images_per_second, job.world)
        mfu = metrics_lib.model_flops_utilisation(flops, job.cfg.log.peak_flops_per_device)
        values.update(tflops_per_device=flops / 1e12, mfu=mfu)
        line += f" {flops / 1e12:.1f} TFLOP/s/GPU MFU {mfu:.1%}"
    job.logger.log("train", step, values)
    if job.is_main:
        log.info(line)


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, Tensor) else norm)


def _validate(job: _Job, step: int) -> float:
    start = time.perf_counter()
    loss, images = evaluate(
        job.engine,
        job.val_loader,
        num_patches=job.plan.num_patches,
        seed=job.cfg.val.seed,
        rank=job.rank,
        max_batches=job.cfg.val.max_batches,
    )
    job.logger.log("val", step, {"loss": loss, "images": images, "seconds": time.perf_counter() - start})
    if job.is_main:
        log.info("step %d val loss %.4f (%d images)", step, loss, images)
        metrics_lib.plot_loss(job.logger.path, job.out_dir / "loss.png")
    return loss


@torch.no_grad()
def _finish(job: _Job, step: int) -> None:
    """End of training: final validation, loss plot, patch grid, reference forward, export."""
    cfg, engine = job.cfg, job.engine
    if job.val_loader is not None:
        _validate(job, step)
    if job.is_main:
        metrics_lib.plot_loss(job.logger.path, job.out_dir / "loss.png")
    engine.eval()
    # Every rank runs the forwards below: under ZeRO-3 each one gathers parameters collectively.
    if cfg.val.patch_grid_images > 0:
        source = job.val_loader if job.val_loader is not None else job.train_loader.iter_epoch(0)
        images = next(iter(source))[0]
        prefix_len = draw_prefix_len(images.shape[0], job.plan.num_patches, "grid", cfg.val.seed).to(images.device)
        pred = engine(images, prefix_len=prefix_len)["pred"]
        if job.is_main:
            metrics_lib.save_patch_grid(
                images,
                pred,
                engine.module.config.patch_size,
                job.out_dir / "patches.png",
                num_images=cfg.val.patch_grid_images,
                prefix_len=prefix_len,
            )
    if cfg.export.enabled:
        _reference_forward(job)
        if dist.is_initialized():
            dist.barrier()
        if job.is_main:
            from .export import export_latest

            overrides = cfg.model.overrides
            path = export_latest(job.out_dir, model_name=cfg.model.name, overrides=overrides, ml_aim=cfg.export.ml_aim)
            log.info("exported fp32 weights to %s", path)
    engine.train()


def _reference_forward(job: _Job) -> None:
    """Save the trained engine's outputs on fixed inputs (``export/reference_forward.safetensors``),
    so that anyone can check that the exported weights reproduce the trained model."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    size = job.plan.image_size
    images = torch.randn(2, 3, size, size, generator=generator)  # [2, 3, S, S]
    prefix_len = torch.randint(1, job.plan.num_patches, (2,), generator=generator)
    out = job.engine(images.to(job.device), prefix_len=prefix_len.to(job.device))
    if job.is_main:
        path = job.out_dir / "export"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "images": images,
            "prefix_len": prefix_len,
            "pred": out["pred"].float().cpu(),  # [2, N, p*p*3]
            "loss": out["loss"].float().cpu().reshape(1),
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "reference_forward.safetensors"))
