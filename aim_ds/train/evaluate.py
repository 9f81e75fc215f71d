"""The held-out pretraining loss: a fixed prefix draw per batch, so values compare across checkpoints."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..distributed import all_reduce_, collective_device
from ..metrics import plot_loss
from .data import _batches_per_epoch, draw_prefix_len
from .job import Job

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    engine: Any, loader: Any, *, num_patches: int, seed: int, rank: int, max_batches: int = 0
) -> tuple[float, int]:
    """Pretraining loss on the held-out loader with a fixed prefix draw per ``(seed, rank, batch)``.

    Returns ``(loss, images)``: the token-level mean over all ranks (each batch weighted by its
    number of target patches, ``sum(N - S)``) and the number of images seen. Every rank must call it.
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
    totals = all_reduce_(totals.to(collective_device()), "sum").cpu()
    engine.train(was_training)
    return float(totals[0] / totals[1].clamp_min(1.0)), int(totals[2])


def validate(job: Job, step: int) -> float:
    """:func:`evaluate` on the job's held-out loader, logged as a ``val`` record (and the loss plot
    redrawn on rank 0). Returns the loss."""
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
        plot_loss(job.logger.path, job.out_dir / "loss.png")
    return loss
