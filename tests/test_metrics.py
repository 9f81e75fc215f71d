"""metrics.jsonl, resume trimming, loss plot and the predicted-vs-true patch grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aim_ds.metrics import (
    MetricsLogger,
    flops_per_second_per_device,
    model_flops_utilisation,
    plot_loss,
    read_metrics,
    reconstruct_from_pred,
    save_patch_grid,
)
from aim_ds.model import normalize_patches, patchify


def test_logger_writes_jsonl_and_trims_on_resume(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        logger.log("train", step, {"loss": 1.0 / step, "lr": 1e-3, "grad_norm": torch.tensor(0.5)})
    logger.log("val", 4, {"loss": 0.3})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    first = json.loads(lines[0])
    assert first == {"kind": "train", "step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5}
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "val")] == [4]
    # A run resumed from step 3 drops what came after it, then appends.
    resumed = MetricsLogger(tmp_path, enabled=True, resume_step=3)
    resumed.log("train", 4, {"loss": 0.2})
    steps = [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [("train", 1), ("train", 2), ("train", 3), ("train", 4)]


def test_logger_disabled_off_rank_zero(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "r1", enabled=False)
    logger.log("train", 1, {"loss": 1.0})
    assert not (tmp_path / "r1").exists()


def test_non_finite_values_stay_valid_json(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log("train", 1, {"loss": float("nan")})
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == "nan"


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "tra')
    assert len(read_metrics(path)) == 1


def test_plot_loss_writes_png(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, enabled=True)
    assert not plot_loss(tmp_path / "metrics.jsonl", tmp_path / "empty.png")
    for step in range(1, 11):
        logger.log("train", step, {"loss": 2.0 / step})
    logger.log("val", 5, {"loss": 0.5})
    logger.log("val", 10, {"loss": 0.3})
    assert plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as image:
        assert image.format == "PNG" and image.size == (700, 450)


def test_mfu_arithmetic() -> None:
    flops = flops_per_second_per_device(6e9, images_per_second=1000.0, world_size=8)
    assert flops == pytest.approx(7.5e11)
    assert model_flops_utilisation(494.5e12, 989e12) == pytest.approx(0.5)


def test_reconstruction_of_perfect_predictions_is_the_image() -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 16, 16)
    targets = normalize_patches(patchify(images, 4))  # [B, N, P]
    pred = torch.zeros_like(targets)
    pred[:, :-1] = targets[:, 1:]  # row k predicts patch k+1
    recon = reconstruct_from_pred(images, pred, patch_size=4)
    torch.testing.assert_close(recon, images, atol=1e-4, rtol=1e-4)


def test_save_patch_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    pred = torch.randn(6, 64, 48)
    path = save_patch_grid(images, pred, 4, tmp_path / "patches.png", num_images=3, prefix_len=torch.full((6,), 8))
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    # 3 rows of (true | predicted), each 32 px upscaled x4 to 128, with 4 px gaps.
    assert array.shape == (3 * (128 + 4) + 4, 2 * (128 + 4) + 4, 3)
    left = array[4 : 4 + 128, 4 : 4 + 128]
    right = array[4 : 4 + 128, 136 : 136 + 128]
    assert not np.array_equal(left, right)
    # The first patch has no prediction and is copied from the image (before the prefix wash-out).
    assert left.std() > 0


def test_wandb_offline_without_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = MetricsLogger(tmp_path, enabled=True, wandb=True, wandb_project="aim-ds-test", config={"a": 1})
    logger.log("train", 1, {"loss": 1.5, "lr": 1e-3})
    logger.log("val", 1, {"loss": 1.4})
    logger.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")), "no offline run folder"
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2
