"""metrics.jsonl, resume trimming, loss plot and the predicted-vs-true patch grid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aim_ds
from aim_ds.metrics import (
    MetricsLogger,
    flops_per_second_per_device,
    model_flops_utilisation,
    plot_loss,
    read_metrics,
    reconstruct_from_pred,
    save_patch_grid,
)
from aim_ds.model.aim import IMAGENET_MEAN, IMAGENET_STD, normalize_patches, patchify
from aim_ds.model.flops import H100_BF16_DENSE_FLOPS, train_flops_per_image


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
    # aim-test: N = (32/4)^2 = 64 tokens, patch_dim 48, width 64, 4 blocks (MLP 256), head 64 wide,
    # 2 blocks (MLP 256). Matmul parameters: trunk 48*64 + 4*(4*64*64 + 2*64*256) = 199,680;
    # head 64*64 + 2*2*64*256 + 64*48 = 72,704. Training FLOPs per image:
    # 6 * 272,384 * 64 + 12 * 4 * 64 * 64**2 = 104,595,456 + 12,582,912 = 117,178,368.
    flops_per_image = train_flops_per_image(aim_ds.get_model_spec("aim-test").config)
    assert flops_per_image == 117_178_368
    # 1000 images/s over 8 devices: 117,178,368 * 1000 / 8 = 14,647,296,000 FLOP/s per device.
    flops = flops_per_second_per_device(flops_per_image, images_per_second=1000.0, world_size=8)
    assert flops == pytest.approx(14_647_296_000)
    # Against an H100's 989 TFLOP/s: 14.647296e9 / 989e12 = 1.4810208e-5.
    assert model_flops_utilisation(flops, H100_BF16_DENSE_FLOPS) == pytest.approx(1.4810208e-5, rel=1e-7)
    assert model_flops_utilisation(741.75e12, 989e12) == pytest.approx(0.75)


def test_reconstruction_of_perfect_predictions_is_the_image() -> None:
    torch.manual_seed(0)
    images = torch.randn(3, 3, 16, 16)
    for unbiased in (True, False):  # the authors' unbiased target variance, and the population one
        targets = normalize_patches(patchify(images, 4), unbiased=unbiased)  # [B, N, P]
        pred = torch.zeros_like(targets)
        pred[:, :-1] = targets[:, 1:]  # row k predicts patch k+1
        recon = reconstruct_from_pred(images, pred, patch_size=4, unbiased=unbiased)
        torch.testing.assert_close(recon, images, atol=1e-4, rtol=1e-4)
        wrong = reconstruct_from_pred(images, pred, patch_size=4, unbiased=not unbiased)
        assert (wrong - images).abs().max() > 1e-2  # the variance convention must match the targets


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> ImageNet-normalised float ``[B, 3, H, W]`` (the loader's output)."""
    x = torch.from_numpy(pixels).float().permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_save_patch_grid(tmp_path: Path) -> None:
    """The PNG shows, per image row, the true image (left) and the predictions (right) in the
    right cells: prefix cells washed halfway to white, a wrong prediction where it was made."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)  # 8 x 8 patches of 4 px
    images = _normalised(pixels)
    pred = torch.zeros(6, 64, 48)
    pred[:, :-1] = normalize_patches(patchify(images, 4), unbiased=True)[:, 1:]  # perfect: row k predicts k+1
    wrong = 2 * 8 + 5  # patch (row 2, col 5) of image 1: predicted flat (its normalised mean, 0)
    pred[1, wrong - 1] = 0.0
    prefix_len = torch.tensor([8, 20, 1, 5, 5, 5])
    path = save_patch_grid(images, pred, 4, tmp_path / "patches.png", num_images=3, prefix_len=prefix_len)
    with Image.open(path) as image:
        canvas = np.asarray(image.convert("RGB"))
    # 3 rows of (true | predicted), each 32 px upscaled x4 to 128, with 4 px gaps on white.
    assert canvas.shape == (3 * (128 + 4) + 4, 2 * (128 + 4) + 4, 3)
    assert (canvas[:4] == 255).all() and (canvas[:, 132:136] == 255).all()

    def panel(b: int, column: int) -> np.ndarray:  # back to 32 x 32 from the x4 upscale
        top, left = 4 + b * 132, 4 + column * 132
        big = canvas[top : top + 128, left : left + 128]
        assert (big == big[::4, ::4].repeat(4, axis=0).repeat(4, axis=1)).all(), "nearest upscale"
        return big[::4, ::4]

    def cell(picture: np.ndarray, index: int) -> np.ndarray:
        row, col = divmod(index, 8)
        return picture[row * 4 : (row + 1) * 4, col * 4 : (col + 1) * 4]

    for b in range(3):
        true, predicted = panel(b, 0), panel(b, 1)
        assert np.array_equal(true, pixels[b])
        for index in range(64):
            expected = cell(pixels[b], index)
            if index < prefix_len[b]:  # no loss there: washed out, x / 2 + 127.5
                expected = (expected.astype(np.float32) * 0.5 + 127.5).astype(np.uint8)
            if (b, index) == (1, wrong):
                got = cell(predicted, index)
                assert not np.array_equal(got, expected)
                assert (got == got[0, 0]).all(), "a flat prediction gives one colour"
                continue
            assert np.array_equal(cell(predicted, index), expected), (b, index)


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


# ----------------------------------------------------------------------------- TensorBoard and W&B


def _scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """A tag's ``{step: value}`` as TensorBoard shows it (every event file of the folder, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_tensorboard_scalars_and_resume_purge(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    for step in range(1, 11):
        logger.log("train", step, {"loss": 1.0 / step, "lr": torch.tensor(1e-3), "grad_norm": None, "epoch": 0})
    logger.log("val", 8, {"loss": 0.25})
    logger.log("probe", 8, {"top1": {"linear": 0.5, "attentive": 0.75}, "note": "text is skipped"})
    # The launch ends at step 10 with its last checkpoint at 6; the next launch redoes 7-10 with other values.
    logger.close()
    resumed = MetricsLogger(tmp_path, enabled=True, resume_step=6, tensorboard=True)
    for step in range(7, 13):
        resumed.log("train", step, {"loss": 100.0 + step})
    resumed.close()
    loss = _scalars(tmp_path / "tensorboard", "train/loss")
    assert sorted(loss) == list(range(1, 13))  # each step once: the first launch's 7-10 are purged
    assert all(loss[s] == pytest.approx(1.0 / s) for s in range(1, 7))
    assert all(loss[s] == 100.0 + s for s in range(7, 13))
    assert _scalars(tmp_path / "tensorboard", "train/lr") == pytest.approx({s: 1e-3 for s in range(1, 7)})
    # val at step 8 came after the purge step 7: gone with the steps it belonged to.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "train/grad_norm" not in tags and "probe/note" not in tags
    assert not events.Scalars("val/loss") and not events.Scalars("probe/top1/attentive")


def test_tensorboard_probe_tags(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    logger.log("probe", 8, {"top1": {"linear": 0.5, "attentive": 0.75}, "seconds": 3})
    logger.log("val", 8, {"loss": 0.25})
    logger.close()
    assert _scalars(tmp_path / "tensorboard", "probe/top1/attentive") == {8: 0.75}
    assert _scalars(tmp_path / "tensorboard", "probe/seconds") == {8: 3.0}
    assert _scalars(tmp_path / "tensorboard", "val/loss") == {8: 0.25}


def test_tensorboard_off_by_default_and_off_rank_zero(tmp_path: Path) -> None:
    MetricsLogger(tmp_path / "a", enabled=True).log("train", 1, {"loss": 1.0})
    MetricsLogger(tmp_path / "b", enabled=False, tensorboard=True).log("train", 1, {"loss": 1.0})
    assert not (tmp_path / "a" / "tensorboard").exists() and not (tmp_path / "b").exists()


def test_wandb_id_kept_and_checked(tmp_path: Path) -> None:
    from aim_ds.metrics import wandb_run_id

    run_id = wandb_run_id(tmp_path)
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id and wandb_run_id(tmp_path) == run_id
    (tmp_path / "wandb_id.txt").write_text("../../etc\n")
    with pytest.raises(ValueError, match=r"wandb_id\.txt: '\.\./\.\./etc' is not a W&B run id"):
        wandb_run_id(tmp_path)


def test_wandb_offline_one_run_across_launches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """The real wandb package offline: a relaunch continues the run id; a crash past the checkpoint is
    said; a W&B that fails mid-run (here: its run finished under it) turns W&B off, not the logging."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = MetricsLogger(tmp_path, enabled=True, wandb=True)
    for step in range(1, 6):
        first.log("train", step, {"loss": 1.0 / step})
    first.close()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    with caplog.at_level("WARNING", logger="aim_ds.metrics"):
        second = MetricsLogger(tmp_path, enabled=True, wandb=True, resume_step=3)  # the crash lost steps 4-5
    assert "W&B already holds steps 4-5 of this run" in caplog.text
    second._wandb_run.finish()  # W&B gone under the logger (as when its service dies)
    with caplog.at_level("WARNING", logger="aim_ds.metrics"):
        second.log("train", 4, {"loss": 0.2})
        second.log("train", 5, {"loss": 0.1})
    assert caplog.text.count("W&B logging is off") == 1
    second.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    # Two offline launches within one second: wandb names the second folder <time>-<id>-1.
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", f.name) for f in folders)


_SERVICE_KILLED = """
import os, signal, sys, time
from pathlib import Path
from aim_ds.metrics import MetricsLogger

def children(pid):
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
            found.append(int(proc.name))
    return found

logger = MetricsLogger(sys.argv[1], enabled=True, wandb=True)
logger.log("train", 1, {"loss": 1.0})
services = children(os.getpid())
assert services, "no W&B service process"
for pid in services:  # what DeepSpeed's launcher does to a rank's process tree on SIGTERM
    os.kill(pid, signal.SIGKILL)
time.sleep(0.5)
if sys.argv[2] == "log":
    logger.log("train", 2, {"loss": 0.5})  # meets the dead service: W&B is turned off
logger.close()
print("closed", flush=True)
"""


@pytest.mark.parametrize("after_kill", ["log", "close"])
def test_wandb_service_killed_leaves_no_traceback_at_exit(tmp_path: Path, after_kill: str) -> None:
    """W&B's service killed under a live logger (a launcher's SIGTERM): close() shuts W&B down itself,
    with one warning, and W&B's exit hook finds nothing left to tear down (it used to print a
    ConnectionResetError traceback from teardown_atexit at interpreter exit)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, "-c", _SERVICE_KILLED, str(tmp_path), after_kill],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0 and out.stdout.strip() == "closed", out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.count("W&B did not close cleanly") == 1, out.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2][: 2 if after_kill == "log" else 1]


def test_preflight_checks_the_monitoring_set_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any rank starts: a damaged W&B id file, or a logger whose package is missing, is exit 2."""
    import importlib.util

    from aim_ds.config import ConfigError, load_config
    from aim_ds.train.config import PretrainConfig
    from aim_ds.train.preflight import check_logging

    config = Path(aim_ds.__file__).resolve().parents[1] / "run/configs/aim-test.yaml"
    cfg = load_config(
        PretrainConfig, config, overrides=[f"out_dir={tmp_path}", "log.wandb=true", "log.tensorboard=true"]
    )
    check_logging(cfg)
    (tmp_path / "wandb_id.txt").write_text("not an id!\n")
    with pytest.raises(ConfigError, match=r"log\.wandb=True: .*wandb_id\.txt: 'not an id!' is not a W&B run id"):
        check_logging(cfg)
    (tmp_path / "wandb_id.txt").unlink()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"log\.tensorboard=True: needs the tensorboard package"):
        check_logging(cfg)
