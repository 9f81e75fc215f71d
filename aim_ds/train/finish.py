"""The end of a run: final validation, the loss plot, the patch grid, the reference forward, the export."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..distributed import barrier
from ..export import export_latest
from ..metrics import plot_loss, save_patch_grid
from .data import draw_prefix_len
from .evaluate import validate
from .job import Job

log = logging.getLogger(__name__)


@torch.no_grad()
def finish(job: Job, step: int) -> None:
    """Every rank: final validation, ``loss.png``, ``patches.png`` and, with ``export.enabled``, the
    fp32 export of the newest checkpoint with ``reference_forward.safetensors`` beside it."""
    if job.val_loader is not None:
        validate(job, step)
    if job.is_main:
        plot_loss(job.logger.path, job.out_dir / "loss.png")
    job.engine.eval()
    # Every rank runs the forwards below: under ZeRO-3 each one gathers parameters collectively.
    if job.cfg.val.patch_grid_images > 0:
        _patch_grid(job)
    if job.cfg.export.enabled:
        reference = _reference_forward(job)
        barrier()
        if job.is_main:
            cfg = job.cfg
            path = export_latest(
                job.out_dir,
                model_name=cfg.model.name,
                overrides=cfg.model.overrides,
                ml_aim=cfg.export.ml_aim,
                reference_forward=reference,
            )
            log.info("exported fp32 weights to %s", path)
    job.engine.train()


def _patch_grid(job: Job) -> None:
    """``patches.png``: true vs predicted patches of the first held-out (else training) batch."""
    source = job.val_loader if job.val_loader is not None else job.train_loader.iter_epoch(0)
    images = next(iter(source))[0]  # [B, 3, H, W]
    prefix_len = draw_prefix_len(images.shape[0], job.plan.num_patches, "grid", job.cfg.val.seed).to(images.device)
    pred = job.engine(images, prefix_len=prefix_len)["pred"]  # [B, N, p*p*3]
    if job.is_main:
        save_patch_grid(
            images,
            pred,
            job.model_cfg.patch_size,
            job.out_dir / "patches.png",
            num_images=job.cfg.val.patch_grid_images,
            prefix_len=prefix_len,
        )


def _reference_forward(job: Job) -> dict[str, Tensor]:
    """The trained engine's outputs on fixed inputs (every rank computes; the export writes them as
    ``reference_forward.safetensors``), so that anyone can check that the exported weights
    reproduce the trained model."""
    generator = torch.Generator().manual_seed(0)
    size = job.plan.image_size
    images = torch.randn(2, 3, size, size, generator=generator)  # [2, 3, S, S]
    prefix_len = torch.randint(1, job.plan.num_patches, (2,), generator=generator)
    out = job.engine(images.to(job.device), prefix_len=prefix_len.to(job.device))
    return {
        "images": images,
        "prefix_len": prefix_len,
        "pred": out["pred"].float().cpu(),  # [2, N, p*p*3]
        "loss": out["loss"].float().cpu().reshape(1),
    }
