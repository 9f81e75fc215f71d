"""The run: set-up on every rank, resume, the optimizer-step loop, and the end of the run.

:func:`run` is what ``run/pretrain.py`` calls after parsing. It raises :class:`ConfigError` for a
configuration that cannot run, :class:`NonFiniteLossError` (on every rank at once) when the loss
or gradient norm stops being finite and :class:`RunLockLostError` (likewise) when another job took
the run lock over; the driver maps them to exit codes 2, 3 and 4.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, save_config, short, to_dict
from ..distributed import all_reduce_, collective_device, fit_host_allocator, init_distributed, is_main, world_size
from ..io import atomic_write_json
from ..metrics import MetricsLogger, device_peak_flops, flops_per_second_per_device, model_flops_utilisation
from ..model.aim import AIMConfig
from ..model.flops import matmul_params, train_flops_per_image
from ..optim import lr_at_step, set_lr
from ..progress import format_duration
from ..weights import checkpoint as ckpt
from .config import NonFiniteLossError, PretrainConfig, RunPlan, resolve_plan, resolved_config
from .data import _batches_per_epoch, build_loaders, draw_prefix_len, iterate_batches
from .engine import (
    build_ds_config,
    build_engine,
    build_model,
    check_runs_here,
    count_parameters,
    model_config,
    shard_report,
    zero_stage,
)
from .evaluate import validate
from .finish import finish
from .job import Job
from .live_probe import check_live_probe, live_probe, live_probe_due
from .lock import RunLockLostError
from .stopping import STOP_FILE, StopRequest, active, ensure_lock_held, save_or_stop

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    status: str  # "finished", "stopped" (signal or train.stop_after_steps), "already_finished"
    step: int
    out_dir: Path


def run(
    cfg: PretrainConfig,
    ds_base: dict[str, Any],
    *,
    ds_source: str = "the DeepSpeed config",
    check_memory: bool = True,
    joined: Callable[[], None] | None = None,
) -> RunResult:
    """Train (or resume) the run described by ``cfg`` on every rank of the launched job.
    ``check_memory``: print the memory plan (ZeRO-3) and stop before building anything when it
    does not fit (:class:`aim_ds.plan.PlanError`, a ConfigError). ``joined``: called on every rank
    once the process group exists (the driver agrees on the run lock there)."""
    rank, world, device = init_distributed(dist_cfg=cfg.dist)
    if joined is not None:
        joined()
    model_cfg = model_config(cfg)  # the one resolution of the architecture; passed down from here
    fit_host_allocator(sum(matmul_params(model_cfg)), device)  # before the model's first allocation
    cfg, plan = _plan(cfg, model_cfg, world)
    ds, notes = build_ds_config(ds_base, cfg, plan, model_cfg, source=ds_source)
    _check_accelerator(ds, ds_source)
    if check_memory and zero_stage(ds) == 3:
        _check_memory(cfg, model_cfg, ds, plan, world, device)
    if cfg.checkpoint.resume:
        _universal_if_resized(cfg, ds, world)
    model = build_model(model_cfg, cfg, ds)
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        if plan.micro_batch_note:
            log.warning("%s", plan.micro_batch_note)
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
        atomic_write_json(out_dir / f"shards_rank{rank}.json", shard_report(engine.module), indent=1)
    step, epoch, batch_in_epoch = _resume(engine, cfg, is_main=rank == 0)
    if rank == 0:  # only once the resume worked: a failing one leaves the run's config.yaml as it was
        _write_run_files(cfg, ds, out_dir)
    logger = MetricsLogger(
        out_dir,
        enabled=rank == 0,
        resume_step=step,
        wandb=cfg.log.wandb,
        wandb_project=cfg.log.wandb_project,
        wandb_run_name=cfg.log.wandb_run_name,
        tensorboard=cfg.log.tensorboard,
        config=to_dict(cfg),
    )
    train_loader, val_loader = build_loaders(cfg, plan, rank, world, device)
    job = Job(cfg, plan, model_cfg, engine, optimizer, train_loader, val_loader, logger, rank, world, device)
    try:
        if step >= plan.total_steps:
            if job.is_main:
                log.info("run already finished at step %d; nothing to train", step)
            finish(job, step)
            return RunResult("already_finished", step, out_dir)
        status, step = _train_loop(job, step, epoch, batch_in_epoch)
        if status == "finished":
            ensure_lock_held(active(), step)  # the end of the run writes into the folder too
            finish(job, step)
        return RunResult(status, step, out_dir)
    finally:
        logger.close()


def _check_accelerator(ds: dict[str, Any], source: str) -> None:
    """:func:`check_runs_here` against the accelerator DeepSpeed picked (DS_ACCELERATOR or auto)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    check_runs_here(ds, accelerator.device_name(), accelerator.supported_dtypes(), source)


def _plan(cfg: PretrainConfig, model_cfg: AIMConfig, world: int) -> tuple[PretrainConfig, RunPlan]:
    """The plan for ``world`` ranks and ``cfg`` with the derived numbers written in."""
    image_size = cfg.data.image_size or model_cfg.image_size
    if image_size != model_cfg.image_size:
        raise ConfigError(
            f"data.image_size={image_size} differs from the model's image_size={model_cfg.image_size}; "
            "set model.overrides.image_size too"
        )
    plan = resolve_plan(cfg, world, image_size, model_cfg.num_patches)
    return resolved_config(cfg, plan), plan


def _check_memory(
    cfg: PretrainConfig, model_cfg: AIMConfig, ds: dict[str, Any], plan: RunPlan, world: int, device: torch.device
) -> None:
    """Rank 0 logs the plan of :mod:`aim_ds.plan`; every rank raises PlanError when it does not fit."""
    from ..plan import check_run, local_hardware

    sizing = check_run(
        model_cfg,
        cfg.model.name,
        ds,
        local_hardware(world, device),
        batch_size=cfg.train.batch_size,
        micro_batch=plan.micro_batch_size,
        checkpointing=cfg.model.grad_checkpointing,
        peak_flops=cfg.log.peak_flops_per_device or None,  # 0: the detected GPU's (aim_ds.devices)
        steps=plan.total_steps,
    )
    if is_main():
        log.info("%s", sizing.text)


def _write_run_files(cfg: PretrainConfig, ds: dict[str, Any], out_dir: Path) -> None:
    """Rank 0: the resolved run config and the DeepSpeed config the engine gets, beside the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    atomic_write_json(out_dir / "ds_config.json", ds)


def _resume(engine: Any, cfg: PretrainConfig, *, is_main: bool) -> tuple[int, int, int]:
    """Load the newest complete checkpoint (every rank). Returns ``(step, epoch, batch_in_epoch)``,
    zeros for a fresh run."""
    ckpt_dir = Path(cfg.out_dir) / "checkpoints"
    if not cfg.checkpoint.resume:
        if ckpt.latest_complete(ckpt_dir) is not None:
            # Starting over beside newer-numbered checkpoints would make pruning delete the new ones.
            raise ConfigError(
                f"checkpoint.resume=false but {ckpt_dir} holds checkpoints; choose a new out_dir or remove them"
            )
        return 0, 0, 0
    resumed = ckpt.load_latest(engine, ckpt_dir)
    if resumed is None:
        return 0, 0, 0
    step, client = resumed
    per_batch = engine.train_micro_batch_size_per_gpu() * world_size()
    epoch, batch_in_epoch = int(client["epoch"]), batch_in_epoch_from(client, per_batch)
    if is_main:
        _warn_config_changes(client.get("config", {}), to_dict(cfg))
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)", ckpt.tag_for_step(step), step, epoch, batch_in_epoch
        )
    return step, epoch, batch_in_epoch


def _universal_if_resized(cfg: PretrainConfig, ds: dict[str, Any], world: int) -> None:
    """A newest checkpoint written with another world size is resumed from DeepSpeed's universal form
    (converted here on rank 0 once): ``checkpoint.load_universal`` goes into the engine config."""
    universal = ckpt.prepare_resume(Path(cfg.out_dir) / "checkpoints", world)
    if universal is not None:
        ds.setdefault("checkpoint", {})["load_universal"] = True
        if is_main():
            log.info("the newest checkpoint was written with another world size: resuming from %s", universal)


def batch_in_epoch_from(client: dict[str, Any], images_per_batch: int) -> int:
    """The micro-batch index in the epoch for ``images_per_batch`` = micro-batch x world size, from a
    checkpoint's position in images, so that a resume with another world size or micro-batch
    neither skips nor repeats an image."""
    images = client.get("images_in_epoch")
    if images is None:  # a checkpoint from before positions were kept in images
        return int(client["batch_in_epoch"])
    if images % images_per_batch:
        raise ConfigError(
            f"the checkpoint stopped {images} images into its epoch, not a multiple of "
            f"train.micro_batch_size x world size = {images_per_batch}; pick a micro-batch that divides it"
        )
    return images // images_per_batch


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any]) -> None:
    ignored = {"train.stop_after_steps", "checkpoint", "log", "export", "probe", "dist", "out_dir", "data.num_workers"}
    changed = []
    for section, values in current.items():
        if section in ignored:
            continue
        if isinstance(values, dict):
            prior = saved.get(section)
            prior = prior if isinstance(prior, dict) else {}  # a checkpoint's config is read, not trusted
            for key, value in values.items():
                name = f"{section}.{key}"
                if name not in ignored and prior.get(key) != value:
                    changed.append(f"{name}: {short(prior.get(key))} -> {value!r}")
        elif saved.get(section) != values:
            changed.append(f"{section}: {short(saved.get(section))} -> {values!r}")
    if changed:
        log.warning("resuming with a changed config: %s", "; ".join(changed))


class _LogWindow:
    """Images, summed loss, wall time and time spent waiting for the loader since the last log line:
    the logged loss is the mean over the window's steps (the step's own loss at
    ``log.every_steps=1``). The loss sum stays on the device; it is read only when a line is logged."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.steps, self.data_wait = time.perf_counter(), 0, 0, 0.0
        self.loss = torch.zeros((), dtype=torch.float32, device=self.device)

    def restart_clock(self) -> None:
        """Keep validation and checkpoint time out of images/s."""
        self.start = time.perf_counter()

    def add(self, images: int, loss: Tensor, data_wait: float) -> None:
        self.images, self.steps = self.images + images, self.steps + 1
        self.loss += loss
        self.data_wait += data_wait

    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def step_seconds(self) -> float:
        """Mean wall time of the window's optimizer steps (validation and checkpoints left out)."""
        return (time.perf_counter() - self.start) / max(self.steps, 1)


class _Eta:
    """Time left, from this launch's pace since its first log line: everything the run does between
    steps (validation, checkpoints, live probes) is in it, and the first window's start-up (numba,
    DeepSpeed's first gathers, cuDNN tuning) is not. Before the second line: the first window's
    step time."""

    def __init__(self) -> None:
        self.since: tuple[int, float] | None = None  # (step, time) of this launch's first log line

    def seconds(self, step: int, total_steps: int, step_seconds: float) -> float:
        now = time.perf_counter()
        if self.since is None or step <= self.since[0]:
            self.since = self.since or (step, now)
            per_step = step_seconds
        else:
            per_step = (now - self.since[1]) / (step - self.since[0])
        return max(total_steps - step, 0) * per_step


def _window_maxima(data_wait: float, device: torch.device) -> tuple[float, float]:
    """``(data wait per step, peak GiB allocated since the last line)``, each the largest over the
    ranks (the slowest loader holds every rank back; the fullest device is the one that runs out).
    Every rank calls this at the same step. Peak memory is 0.0 off CUDA; the peak counter restarts."""
    peak = 0.0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    maxima = all_reduce_(torch.tensor([data_wait, peak], dtype=torch.float64, device=collective_device()), "max")
    data_wait, peak = maxima.tolist()
    return data_wait, peak


class _StepStats:
    """One optimizer step's ``[loss, stop flag, lock-lost flag, gradient norm]`` (loss averaged over
    micro-steps and ranks, flags summed over ranks), copied to the host without waiting for the device: a
    CUDA tensor goes to pinned memory with an event, read later by :meth:`values`. Reading a step's
    stats one step late keeps the host from waiting on the device every step."""

    def __init__(self, step: int, stats: Tensor, *, has_grad_norm: bool, stop: StopRequest) -> None:
        self.step, self.has_grad_norm, self.stop = step, has_grad_norm, stop
        self.event = None
        if stats.device.type == "cuda":
            self.host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.host.copy_(stats, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = stats.detach()

    def values(self) -> tuple[float, bool, bool, float | None]:
        """``(loss, stop_requested, lock_lost, grad_norm)``, ``grad_norm`` None when the engine
        computes none. Waits for the copy (not for later steps' work)."""
        if self.event is not None:
            self.event.synchronize()
        loss, flag, lost, norm = self.host.numpy().tolist()  # a host array: no tensor read, no device sync
        return loss, flag > 0, lost > 0, norm if self.has_grad_norm else None

    def check(self) -> bool:
        """Raise :class:`RunLockLostError` when rank 0's run lock was taken over by this step (the
        folder is another job's: nothing more is written, whatever the loss), then
        :class:`NonFiniteLossError` naming this step when its loss or gradient norm is not finite;
        else return whether any rank asked to stop."""
        loss, stop_requested, lock_lost, norm = self.values()
        if lock_lost:
            raise RunLockLostError(self.step, self.stop.lock_lost_why())
        if not math.isfinite(loss):
            raise NonFiniteLossError(self.step, "loss", loss)
        if norm is not None and not math.isfinite(norm):
            raise NonFiniteLossError(self.step, "gradient norm", norm)
        return stop_requested


def _sync_due(cfg: PretrainConfig, plan: RunPlan, step: int) -> bool:
    """Whether optimizer step ``step`` logs, validates, checkpoints or ends the run: then its stats
    are read at once (a checkpoint must never hold a non-finite step). Other steps read theirs one
    step later."""

    def every(n: int) -> bool:
        return n > 0 and step % n == 0

    stop_after = cfg.train.stop_after_steps > 0 and step >= cfg.train.stop_after_steps
    return (
        step >= plan.total_steps
        or stop_after
        or every(max(cfg.log.every_steps, 1))
        or every(cfg.checkpoint.every_steps)
        or every(cfg.val.every_steps)
    )


def _train_loop(job: Job, step: int, epoch: int, batch_in_epoch: int) -> tuple[str, int]:
    """Optimizer steps from ``step`` to the end, or to a stop. Returns ``(status, step)``."""
    cfg, plan, engine = job.cfg, job.plan, job.engine
    per_epoch = _batches_per_epoch(job.train_loader)
    if per_epoch == 0:
        raise ConfigError(f"the training data gives no full micro-batch of {plan.micro_batch_size} images per rank")
    batches = iterate_batches(job.train_loader, epoch, batch_in_epoch, per_epoch)
    flops_per_image = train_flops_per_image(job.model_cfg)
    probe_settings = check_live_probe(cfg)
    stop = active()  # the driver's (installed before the engine was built), else this loop's own
    own_stop = stop is None
    if stop is None:
        stop = StopRequest(Path(cfg.out_dir) / STOP_FILE, repeat_after_s=cfg.stop.repeat_after_s)
        stop.install()
    window, eta = _LogWindow(job.device), _Eta()
    if job.device.type == "cuda":  # the first line's peak covers its own steps, not the set-up before them
        torch.cuda.reset_peak_memory_stats(job.device)
    pending: _StepStats | None = None  # the previous step's stats, not yet read
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
            loss, flags, epoch, batch_in_epoch, data_wait = _optimizer_step(job, step, batches, stop)
            step += 1
            window.add(cfg.train.batch_size, loss, data_wait)
            grad_norm = _grad_norm(engine, job.device)
            norm = grad_norm.reshape(1) if grad_norm is not None else torch.zeros_like(flags[:1])
            stats = torch.cat([loss.reshape(1), flags, norm])
            stats = _StepStats(step, stats, has_grad_norm=grad_norm is not None, stop=stop)
            # The previous step first: a non-finite value there names that step, one step late.
            stop_now = pending.check() if pending is not None else False
            pending = None
            if stop_now or _sync_due(cfg, plan, step):
                stop_now = stats.check() or stop_now
            else:
                pending = stats
            if step % max(cfg.log.every_steps, 1) == 0 or step == plan.total_steps:
                grad_norm = stats.values()[3]
                mean_loss = float(window.loss) / window.steps  # the one host read of the window
                step_seconds = window.step_seconds()
                data_wait, peak_gib = _window_maxima(window.data_wait / window.steps, job.device)
                timing = _Timing(
                    images_per_second=window.images_per_second(),
                    step_seconds=step_seconds,
                    data_wait_seconds=data_wait,
                    eta_seconds=eta.seconds(step, plan.total_steps, step_seconds),
                    peak_memory_gib=peak_gib,
                )
                _log_step(job, step, mean_loss, lr, grad_norm, timing, epoch, flops_per_image)
                window.reset()
            if job.val_loader is not None and cfg.val.every_steps > 0 and step % cfg.val.every_steps == 0:
                if step < plan.total_steps:  # the last one comes with the end of the run
                    validate(job, step)
                    window.restart_clock()
            if probe_settings is not None and live_probe_due(cfg, step):
                live_probe(job, step, probe_settings)
                window.restart_clock()
            saved, stopping = save_or_stop(job, step, epoch, batch_in_epoch, stop_now=stop_now, stop=stop)
            if saved:
                last_saved = step
                window.restart_clock()
            if stopping:
                return "stopped", step
        if last_saved != step:
            ensure_lock_held(stop, step)
            job.save(step, epoch, batch_in_epoch)
        return "finished", step
    finally:
        if own_stop:
            stop.restore()


def _optimizer_step(job: Job, step: int, batches: Any, stop: StopRequest) -> tuple[Tensor, Tensor, int, int, float]:
    """The forward/backward passes of one optimizer step and the update. Returns ``(loss, flags,
    epoch, batch_in_epoch, data_wait)``: the loss averaged over micro-steps and ranks (0-d) and
    ``[ranks asked to stop, ranks whose run lock was taken over]`` (``[2]``; fp32 device tensors,
    not read here), the data position after the
    step's last micro-batch, and the seconds this rank waited for the loader's micro-batches."""
    plan, engine = job.plan, job.engine
    loss_sum = torch.zeros((), dtype=torch.float32, device=job.device)
    data_wait = 0.0
    for micro in range(plan.grad_accum_steps):
        # The loader prefetches: this is the time the step stood still for data, not the loading time.
        asked = time.perf_counter()
        epoch, index, images = next(batches)
        data_wait += time.perf_counter() - asked
        # Drawn on the host; the model checks it there before copying it to the images' device.
        prefix_len = draw_prefix_len(images.shape[0], plan.num_patches, job.cfg.train.seed, job.rank, step, micro)
        loss = engine(images, prefix_len=prefix_len)["loss"]
        engine.backward(loss)
        loss_sum += loss.detach().float()
        if micro == plan.grad_accum_steps - 1:
            # One all-reduce carries the loss for the log, the non-finite check (NaN on any rank
            # makes the sum NaN) and the stop flags, so that all ranks decide alike. Only rank 0
            # holds the lock: its lost flag is what stops the others.
            flags = _stop_flags(job.device, stop.requested, stop.lock_lost)
            stats = all_reduce_(torch.cat([(loss_sum / plan.grad_accum_steps).reshape(1), flags]), "sum")
        engine.step()
    return stats[0] / job.world, stats[1:], epoch, index + 1, data_wait


@dataclass(frozen=True)
class _Timing:
    """A log window's pace: images/s, mean seconds per optimizer step, seconds per step spent
    waiting for the loader (the most over ranks), seconds left, and the peak GiB allocated on the
    fullest GPU since the last line (0.0 off CUDA)."""

    images_per_second: float
    step_seconds: float
    data_wait_seconds: float
    eta_seconds: float
    peak_memory_gib: float


def _log_step(
    job: Job,
    step: int,
    loss: float,
    lr: float,
    grad_norm: float | None,
    timing: _Timing,
    epoch: int,
    flops_per_image: float,
) -> None:
    values: dict[str, Any] = {
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "images_per_second": timing.images_per_second,
        "epoch": epoch,
        "world_size": job.world,
        "step_time_s": timing.step_seconds,
        "data_wait_s": timing.data_wait_seconds,
        "eta_s": timing.eta_seconds,
    }
    norm = grad_norm if grad_norm is not None else float("nan")
    line = (
        f"step {step}/{job.plan.total_steps} loss {loss:.4f} lr {lr:.3e} grad_norm {norm:.3f} "
        f"{timing.images_per_second:.1f} img/s {timing.step_seconds:.3f} s/step "
        f"(data wait {timing.data_wait_seconds:.3f} s) ranks {job.world}"
    )
    if job.device.type == "cuda":  # FLOP/s and MFU mean little on CPU
        flops = flops_per_second_per_device(flops_per_image, timing.images_per_second, job.world)
        peak = device_peak_flops(job.cfg.log.peak_flops_per_device, job.device)
        mfu = model_flops_utilisation(flops, peak)
        values.update(
            tflops_per_device=flops / 1e12, mfu=mfu, peak_tflops=peak / 1e12, peak_memory_gib=timing.peak_memory_gib
        )
        line += f" {flops / 1e12:.1f} TFLOP/s/GPU MFU {mfu:.1%} peak mem {timing.peak_memory_gib:.2f} GiB"
    line += f" ETA {format_duration(timing.eta_seconds)}"
    job.logger.log("train", step, values)
    if job.is_main:
        log.info(line)


@functools.lru_cache(maxsize=16)
def _stop_flags(device: torch.device, requested: bool, lock_lost: bool) -> Tensor:
    """The fp32 flags ``[stop requested, lock lost]`` (each 1 or 0) on ``device``, made once per
    device and values: building them each step (``torch.tensor(x, device=cuda)``) would copy from
    pageable host memory and wait for the stream every step. Never written to: the all-reduce
    takes a concatenated copy."""
    return torch.tensor([float(requested), float(lock_lost)], dtype=torch.float32, device=device)


def _grad_norm(engine: Any, device: torch.device) -> Tensor | None:
    """The last step's global gradient norm as a 0-d fp32 tensor on ``device``, without reading it
    (None when the engine computes none)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    if isinstance(norm, Tensor):
        return norm.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(norm), dtype=torch.float32, device=device)
