"""What the step loop, validation, stopping and the end of the run share on one rank."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..metrics import MetricsLogger
from ..model.aim import AIMConfig
from ..weights import checkpoint as ckpt
from .config import PretrainConfig, RunPlan


@dataclass
class Job:
    """One rank's run: the resolved config and plan, the model's architecture (resolved once from
    the registry), the engine, the loaders and the metrics sink."""

    cfg: PretrainConfig
    plan: RunPlan
    model_cfg: AIMConfig
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any  # ours, whose groups set_lr writes
    train_loader: Any
    val_loader: Any  # None without data.val_path
    logger: MetricsLogger
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
        """A complete checkpoint for ``step`` with the data position and the config (every rank)."""
        # The position also in images: a resume with another world size or micro-batch maps it back.
        images_in_epoch = batch_in_epoch * self.plan.micro_batch_size * self.world
        client_state = {
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "images_in_epoch": images_in_epoch,
            "world_size": self.world,
            "config": to_dict(self.cfg),
        }
        ckpt.save(self.engine, self.ckpt_dir, step, client_state, self.cfg.checkpoint.keep_last)
