"""The study (aim_ds.study, run/study.py) and the live probe (aim_ds.train.live_probe) on a real 2-rank
ZeRO-3 CPU run of aim-test over scikit-learn's digits: one launch with 3 checkpoints and 3 live probes
(3 points, the fewest with a defined Spearman), then the study over its checkpoints."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aim_ds.datasets import write_digits_imagefolder
from aim_ds.distributed import free_port
from aim_ds.metrics import read_metrics
from aim_ds.model.aim import trunk_parameter_count
from aim_ds.model.registry import create_model
from aim_ds.study import ProbeSettings, spearman, study_checkpoints, study_sizes
from aim_ds.weights import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEEPSPEED = shutil.which("deepspeed", path=str(VENV_BIN)) or shutil.which("deepspeed")
STEPS, EVERY = 3, 1
STEPS_SEEN = [1, 2, 3]
# A quick probe: one LR, one decay, one epoch (the study's code path, not its figures).
PROBE_OVERRIDES = ["train.epochs=1", "train.lrs=[1e-2]", "train.weight_decays=[0.05]", "data.num_workers=1"]


def test_spearman_against_scipy() -> None:
    from scipy.stats import spearmanr

    rng = random.Random(0)
    xs = [rng.randint(0, 5) for _ in range(30)]  # ties
    ys = [rng.random() for _ in range(30)]
    result = spearmanr(xs, ys)
    assert spearman(xs, ys).rho == pytest.approx(result.statistic, abs=1e-12)
    assert spearman(xs, ys).p_value == pytest.approx(result.pvalue, abs=1e-12)
    assert spearman([1.0, 2.0, 3.0, 4.0], [0.9, 0.8, 0.5, 0.1]).rho == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, float("nan"), 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]).rho == pytest.approx(1.0)
    assert math.isnan(spearman([1.0, 2.0], [1.0, 2.0]).rho)  # NaN under 3 pairs


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from aim_ds.data.writers import WriteOptions, convert_imagefolder

    root = tmp_path_factory.mktemp("study_digits")
    write_digits_imagefolder(root / "png", image_size=32, tint=False, val_per_class=20)
    for split in ("train", "val"):
        convert_imagefolder(
            root / "png" / split, root / f"{split}.beton", WriteOptions(write_mode="raw", workers=1), progress=False
        )
    return {"root": root, "train": root / "train.beton", "val": root / "val.beton"}


@pytest.fixture(scope="module")
def settings(digits: dict[str, Path]) -> ProbeSettings:
    config = str(ROOT / "run" / "configs" / "probe_aim-test.yaml")
    return ProbeSettings(config, str(digits["train"]), str(digits["val"]), tuple(PROBE_OVERRIDES))


@pytest.fixture(scope="module")
def run(digits: dict[str, Path], settings: ProbeSettings) -> Path:
    """aim-test for 3 steps on 2 CPU ranks: a checkpoint, a val loss and a live probe every step."""
    root = digits["root"]
    cfg = yaml.safe_load((ROOT / "run/configs/aim-test.yaml").read_text())
    cfg["data"].update(sources=[{"path": str(digits["train"]), "prob": 1.0}], val_path=str(digits["val"]))
    cfg["data"]["num_workers"] = 1
    cfg["train"].update(batch_size=16, micro_batch_size=8, steps=STEPS)
    cfg["val"] = {"every_steps": EVERY, "max_batches": 2}
    cfg["log"] = {"every_steps": 1}
    cfg["checkpoint"] = {"every_steps": EVERY, "keep_last": 0}
    cfg["export"] = {"enabled": False}
    cfg["probe"] = {
        "every_steps": EVERY,
        "config": settings.config,
        "train_path": settings.train_path,
        "val_path": settings.val_path,
        "overrides": list(settings.overrides),
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    # Matrices above the persistence threshold: the live probe's gather goes through ZeRO-3's path.
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 1024
    (root / "zero3.json").write_text(json.dumps(ds))
    out = root / "run"
    assert DEEPSPEED, "the deepspeed launcher is not installed next to this Python"
    command = [
        DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "run/pretrain.py"),
        "--deepspeed", str(root / "zero3.json"), "--config", str(root / "run.yaml"), f"out_dir={out}",
    ]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.mark.deepspeed
def test_live_probe_logged_beside_val_loss(run: Path) -> None:
    probes = read_metrics(run / "metrics.jsonl", "probe")
    assert [r["step"] for r in probes] == STEPS_SEEN
    for record in probes:
        assert 0.0 <= record["top1_attentive"] <= 1.0 and 0.0 <= record["top1_linear"] <= 1.0
    assert {r["step"] for r in read_metrics(run / "metrics.jsonl", "val")} >= set(STEPS_SEEN)
    assert (run / "loss.png").is_file()
    assert (run / "live_probe" / "step_0000002" / "results.json").is_file()
    assert not (run / "live_probe" / "weights").exists()  # the probe's temporary export is removed


@pytest.mark.deepspeed
def test_study_over_checkpoints_and_sizes(
    run: Path, settings: ProbeSettings, digits: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    out = digits["root"] / "study"
    summary = study_checkpoints(run, settings, out)
    # One whole line per checkpoint probed (its step and result), then a closing one.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[study] checkpoints probed")]
    n = len(STEPS_SEEN)
    assert [line.split(",")[0].split(": ")[1] for line in lines] == [
        *(f"{k}/{n} ckpt ({100 * k / n:.0f}%)" for k in range(1, n + 1)),
        f"done {n}/{n} ckpt (100%)",
    ]
    assert f"step={STEPS_SEEN[-1]}, val_loss=" in lines[-2] and "top1_attentive=" in lines[-2]
    with open(out / "checkpoints.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == STEPS_SEEN
    val = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl", "val")}
    assert [float(r["val_loss"]) for r in rows] == pytest.approx([val[s] for s in STEPS_SEEN])
    top1 = {f"top1_{k}{suffix}" for k in ("attentive", "linear") for suffix in ("", "_low", "_high")}
    assert set(rows[0]) == {"step", "val_loss", "val_images", *top1}
    for row in rows:
        for kind in ("attentive", "linear"):
            low, value, high = (float(row[f"top1_{kind}{s}"]) for s in ("_low", "", "_high"))
            assert low <= value <= high and high - low > 0  # 200 val images: a real interval
        assert int(row["val_images"]) == 200
    # The Spearman correlation, computed end to end: scipy's on the same logged values (NaN only
    # where a column is constant, which scipy also answers with NaN; at least one is a number).
    from scipy.stats import spearmanr

    correlation = summary["spearman_val_loss_vs_top1"]
    assert set(correlation) == {"attentive", "linear"}
    for kind, value in correlation.items():
        assert set(value) == {"rho", "p_value", "n"} and value["n"] == len(STEPS_SEEN)
        expected = spearmanr([float(r["val_loss"]) for r in rows], [float(r[f"top1_{kind}"]) for r in rows])
        assert value["rho"] == pytest.approx(expected.statistic, abs=1e-12, nan_ok=True), (kind, rows)
        assert value["p_value"] == pytest.approx(expected.pvalue, abs=1e-12, nan_ok=True), (kind, rows)
    assert any(math.isfinite(value["rho"]) for value in correlation.values()), rows
    assert (out / "loss_vs_probe.png").stat().st_size > 0 and (out / "checkpoints.json").is_file()
    # The checkpoint probe sees the weights the live probe saw (fp32 masters on the CPU): same top-1,
    # up to an image flipped by a different summation order.
    live = {r["step"]: r for r in read_metrics(run / "metrics.jsonl", "probe")}
    assert json.loads((out / "probes" / run.name / "step_0000002" / "results.json").read_text())["num_classes"] == 10
    for row in rows:
        for kind in ("attentive", "linear"):
            assert float(row[f"top1_{kind}"]) == pytest.approx(
                live[int(row["step"])][f"top1_{kind}"], abs=1 / 200 + 1e-9
            )

    # Sizes: the final checkpoint, whose probe above is reused (newer than the checkpoint).
    result = out / "probes" / run.name / ckpt.tag_for_step(STEPS) / "results.json"
    before = result.stat().st_mtime
    sizes = study_sizes([run], dataclasses.replace(settings, seeds=(0, 1)), out)
    assert result.stat().st_mtime == before
    assert [(r["model"], r["step"]) for r in sizes] == [("aim-test", STEPS)]
    # A second probe seed: its own probe, and the top-1 is the mean over both seeds.
    second = json.loads((out / "probes" / run.name / f"{ckpt.tag_for_step(STEPS)}_seed1" / "results.json").read_text())
    assert second["config"]["train"]["seed"] == 1
    # Several seeds share one trunk pass through a scratch cache of this checkpoint, removed afterwards.
    assert second["feature_cache"]["persistent"] is True
    assert not list((out / "probes" / run.name).glob(".features_*"))
    first = json.loads(result.read_text())
    for kind in ("attentive", "linear"):
        mean = (first["heads"][kind]["best"]["top1"] + second["heads"][kind]["best"]["top1"]) / 2
        assert sizes[0][f"top1_{kind}"] == pytest.approx(mean)
    assert sizes[0]["params"] == trunk_parameter_count(create_model("aim-test", device="meta"))
    assert (out / "sizes.csv").is_file() and (out / "loss_vs_size.png").stat().st_size > 0
    assert [s for s, _ in ckpt.list_complete(run / "checkpoints")] == STEPS_SEEN  # keep_last=0 kept every one

    # The driver over the same folders reuses every probe and writes the summary.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run" / "study.py"), "--out", str(digits["root"]), "--checkpoints-run", str(run)]
        + ["--size-runs", str(run), "--probe-config", settings.config]
        + ["--train-beton", settings.train_path, "--val-beton", settings.val_path, *PROBE_OVERRIDES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "summary.md").read_text()
    assert "Spearman rho(val loss, top-1)" in text and "two-sided p" in text and "aim-test" in text
    assert "95% CI" in text and "What it does not show" in text


def test_patch_grid_samples_across_classes_with_captions(tmp_path: Path) -> None:
    """patches.png: a held-out set in file order starts with one class; the grid picks one image per
    class first and captions each row."""
    import torch
    from PIL import Image

    from aim_ds.metrics import save_patch_grid
    from aim_ds.train.finish import _grid_images

    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, 32, 32, generator=generator), torch.tensor(labels))
        for labels in ([0, 0, 0, 0], [0, 1, 1, 1], [2, 2, 3, 3])
    ]
    images, labels = _grid_images(iter(batches), 3)
    assert labels == [0, 1, 2] and torch.equal(images[1], batches[1][0][1])
    images, labels = _grid_images(iter(batches[:1]), 2)  # one class only: the others fill in
    assert labels == [0, 0]
    pred = torch.zeros(2, 64, 48)
    plain = save_patch_grid(images, pred, 4, tmp_path / "plain.png", num_images=2)
    captioned = save_patch_grid(images, pred, 4, tmp_path / "captioned.png", num_images=2, captions=["a", "b"])
    with Image.open(plain) as a, Image.open(captioned) as b:
        assert b.width == a.width and b.height == a.height + 14 * 3  # a header and a caption per row
