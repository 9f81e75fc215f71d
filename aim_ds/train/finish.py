"""The end of a run: final validation, the loss plot, the patch grid, the reference forward, the export."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..distributed import rank0_phase
from ..metrics import plot_loss, save_patch_grid
from ..weights.export import export_latest
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

        def export() -> None:
            cfg = job.cfg
            path = export_latest(
                job.out_dir,
                model_name=cfg.model.name,
                overrides=cfg.model.overrides,
                ml_aim=cfg.export.ml_aim,
                reference_forward=reference,
            )
            log.info("exported fp32 weights to %s", path)

        # Consolidating a 7B checkpoint on rank 0 can outlast the process group's timeout: the other
        # ranks wait for it outside any collective.
        rank0_phase("export", job.out_dir, export)
    job.engine.train()


def _grid_images(source: Any, count: int, max_batches: int = 64) -> tuple[Tensor, list[int]]:
    """Up to ``count`` images ``[b, 3, H, W]`` and their labels, one per class first: a held-out set
    in file order starts with a whole batch of one class. Unlabelled images (label -1) fill in."""
    picked: list[tuple[Tensor, int]] = []
    spare: list[tuple[Tensor, int]] = []
    for index, (images, labels) in enumerate(source):
        for image, label in zip(images, labels.tolist(), strict=True):
            seen = {lab for _, lab in picked}
            (picked if label >= 0 and label not in seen else spare).append((image, int(label)))
        if len(picked) >= count or index + 1 >= max_batches:
            break
    chosen = (picked + spare)[:count]
    return torch.stack([image for image, _ in chosen]), [label for _, label in chosen]


def _patch_grid(job: Job) -> None:
    """``patches.png``: true vs predicted patches of held-out (else training) images of different
    classes, captioned with the class and the prefix length."""
    source = job.val_loader if job.val_loader is not None else job.train_loader.iter_epoch(0)
    images, labels = _grid_images(source, job.cfg.val.patch_grid_images)  # [b, 3, H, W]
    prefix_len = draw_prefix_len(images.shape[0], job.plan.num_patches, "grid", job.cfg.val.seed).to(images.device)
    pred = job.engine(images, prefix_len=prefix_len)["pred"]  # [b, N, p*p*3]
    if job.is_main:
        names = _class_names(job.cfg.data.val_path if job.val_loader is not None else "")
        captions = [
            f"{'class ' + names.get(label, str(label)) if label >= 0 else 'unlabelled'}, prefix {int(length)} patches"
            for label, length in zip(labels, prefix_len.tolist(), strict=True)
        ]
        save_patch_grid(
            images,
            pred,
            job.model_cfg.patch_size,
            job.out_dir / "patches.png",
            num_images=job.cfg.val.patch_grid_images,
            prefix_len=prefix_len,
            captions=captions,
            target_eps=job.model_cfg.target_eps,
            target_unbiased=job.model_cfg.target_unbiased,
        )


def _class_names(beton: str) -> dict[int, str]:
    """``{label: class name}`` written beside a labelled beton; empty when there is none."""
    if not beton:
        return {}
    try:
        from ..data import read_class_names

        return dict(enumerate(read_class_names(beton)))
    except (OSError, ValueError, KeyError):
        return {}


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
