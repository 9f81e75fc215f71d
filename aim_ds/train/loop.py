"""The run: set-up on every rank, resume, the optimizer-step loop, and the end of the run.

:func:`run` is what ``run/pretrain.py`` calls after parsing. It raises :class:`ConfigError` for a
configuration that cannot run and :class:`NonFiniteLossError` (on every rank at once) when the loss
or gradient norm stops being finite; the driver maps them to exit codes 2 and 3.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import checkpoint as ckpt
from ..config import ConfigError, save_config, to_dict
from ..distributed import all_reduce_, init_distributed
from ..flops import train_flops_per_image
from ..io import atomic_write_json
from ..metrics import MetricsLogger, flops_per_second_per_device, model_flops_utilisation
from ..model import AIMConfig
from ..optim import lr_at_step, set_lr
from .config import NonFiniteLossError, PretrainConfig, RunPlan, resolve_plan, resolved_config
from .data import _batches_per_epoch, build_loaders, draw_prefix_len, iterate_batches
from .engine import build_ds_config, build_engine, build_model, count_parameters, model_config, shard_report
from .evaluate import validate
from .finish import finish
from .job import Job
from .live_probe import check_live_probe, live_probe, live_probe_due
from .stopping import StopRequest, save_or_stop

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    status: str  # "finished", "stopped" (signal or train.stop_after_steps), "already_finished"
    step: int
    out_dir: Path


def run(cfg: PretrainConfig, ds_base: dict[str, Any], *, ds_source: str = "the DeepSpeed config") -> RunResult:
    """Train (or resume) the run described by ``cfg`` on every rank of the launched job."""
    rank, world, device = init_distributed()
    model_cfg = model_config(cfg)  # the one resolution of the architecture; passed down from here
    cfg, plan = _plan(cfg, model_cfg, world)
    ds, notes = build_ds_config(ds_base, cfg, plan, on_cpu=device.type != "cuda", source=ds_source)
    model = build_model(model_cfg, cfg, ds)
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        _write_run_files(cfg, ds, out_dir)
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
    logger = MetricsLogger(
        out_dir,
        enabled=rank == 0,
        resume_step=step,
        wandb=cfg.log.wandb,
        wandb_project=cfg.log.wandb_project,
        wandb_run_name=cfg.log.wandb_run_name,
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
            finish(job, step)
        return RunResult(status, step, out_dir)
    finally:
        logger.close()


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
    epoch, batch_in_epoch = int(client["epoch"]), int(client["batch_in_epoch"])
    if is_main:
        _warn_config_changes(client.get("config", {}), to_dict(cfg))
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)", ckpt.tag_for_step(step), step, epoch, batch_in_epoch
        )
    return step, epoch, batch_in_epoch


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any]) -> None:
    ignored = {"train.stop_after_steps", "checkpoint", "log", "export", "probe", "out_dir", "data.num_workers"}
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


class _LogWindow:
    """Images, summed loss and wall time since the last log line: the logged loss is the mean over
    the window's steps (the step's own loss at ``log.every_steps=1``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.loss, self.steps = time.perf_counter(), 0, 0.0, 0

    def restart_clock(self) -> None:
        """Keep validation and checkpoint time out of images/s."""
        self.start = time.perf_counter()

    def add(self, images: int, loss: float) -> None:
        self.images, self.loss, self.steps = self.images + images, self.loss + loss, self.steps + 1

    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def _train_loop(job: Job, step: int, epoch: int, batch_in_epoch: int) -> tuple[str, int]:
    """Optimizer steps from ``step`` to the end, or to a stop. Returns ``(status, step)``."""
    cfg, plan, engine = job.cfg, job.plan, job.engine
    per_epoch = _batches_per_epoch(job.train_loader)
    if per_epoch == 0:
        raise ConfigError(f"the training data gives no full micro-batch of {plan.micro_batch_size} images per rank")
    batches = iterate_batches(job.train_loader, epoch, batch_in_epoch, per_epoch)
    flops_per_image = train_flops_per_image(job.model_cfg)
    probe_settings = check_live_probe(cfg, Path(__file__).resolve().parents[2])
    stop = StopRequest()
    stop.install()
    window = _LogWindow()
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
            step_loss, stop_now, epoch, batch_in_epoch = _optimizer_step(job, step, batches, stop)
            step += 1
            window.add(cfg.train.batch_size, step_loss)
            grad_norm = _grad_norm(engine)
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise NonFiniteLossError(step, "gradient norm", grad_norm)
            if step % max(cfg.log.every_steps, 1) == 0 or step == plan.total_steps:
                _log_step(
                    job,
                    step,
                    window.loss / window.steps,
                    lr,
                    grad_norm,
                    window.images_per_second(),
                    epoch,
                    flops_per_image,
                )
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
            job.save(step, epoch, batch_in_epoch)
        return "finished", step
    finally:
        stop.restore()


def _optimizer_step(job: Job, step: int, batches: Any, stop: StopRequest) -> tuple[float, bool, int, int]:
    """The forward/backward passes of one optimizer step and the update. Returns ``(loss, stop_now,
    epoch, batch_in_epoch)``: the loss averaged over micro-steps and ranks, whether any rank was
    asked to stop, and the data position after the step's last micro-batch."""
    plan, engine = job.plan, job.engine
    loss_sum = torch.zeros((), dtype=torch.float32, device=job.device)
    for micro in range(plan.grad_accum_steps):
        epoch, index, images = next(batches)
        prefix_len = draw_prefix_len(images.shape[0], plan.num_patches, job.cfg.train.seed, job.rank, step, micro)
        loss = engine(images, prefix_len=prefix_len.to(images.device))["loss"]
        engine.backward(loss)
        loss_sum += loss.detach().float()
        if micro == plan.grad_accum_steps - 1:
            # Before the update: one all-reduce carries the loss for the log, the non-finite check
            # (NaN on any rank makes the sum NaN) and the stop flag, so that all ranks agree.
            flag = torch.tensor(float(stop.requested), device=job.device)
            stats = all_reduce_(torch.stack([loss_sum / plan.grad_accum_steps, flag]), "sum")
            step_loss = float(stats[0]) / job.world
            stop_now = float(stats[1]) > 0
            if not math.isfinite(step_loss):
                raise NonFiniteLossError(step + 1, "loss", step_loss)
        engine.step()
    return step_loss, stop_now, epoch, index + 1


def _log_step(
    job: Job,
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
        flops = flops_per_second_per_device(flops_per_image, images_per_second, job.world)
        mfu = model_flops_utilisation(flops, job.cfg.log.peak_flops_per_device)
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
