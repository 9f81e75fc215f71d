"""End-to-end probe runs on a real labelled image set: scikit-learn's handwritten digits (1,797
8x8 images, 10 classes) upscaled to 32 px, written as PNG files in ImageFolder layout, converted
to betons with data_prep, probed on a briefly pretrained aim-test trunk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import aim_ds
from aim_ds.datasets import write_digits_imagefolder
from aim_ds.distributed import free_port
from aim_ds.model.aim import IMAGENET_MEAN, IMAGENET_STD
from aim_ds.probe import ProbeConfig, load_head, load_probe_config, run_probe
from aim_ds.weights.export import save_export

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32


def _driver_main():
    """``main`` of run/probe.py, loaded from its file (run/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_driver", REPO / "run" / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


PRETRAIN_STEPS = 100


def _normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _write_export(model: torch.nn.Module, folder: Path, step: int) -> Path:
    return save_export(model.state_dict(), folder, model_name="aim-test", overrides={}, step=step)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Betons of the digits (train 1,397 / val 400 images) and two aim-test exports: one
    pretrained for ``PRETRAIN_STEPS`` AdamW steps on the training images, one at random init."""
    from PIL import Image

    from aim_ds.data.writers import WriteOptions, convert_imagefolder

    root = tmp_path_factory.mktemp("digits")
    counts = write_digits_imagefolder(root / "png", image_size=IMAGE_SIZE, tint=False, val_per_class=40)
    for split in ("train", "val"):
        convert_imagefolder(
            root / "png" / split, root / f"{split}.beton", WriteOptions(write_mode="raw", workers=2), progress=False
        )
    train_files = sorted((root / "png" / "train").glob("*/*.png"))
    assert len(train_files) == counts["train"]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in train_files])

    torch.manual_seed(0)
    random_init = aim_ds.create_model("aim-test")
    _write_export(random_init, root / "random_init", 0)
    model = aim_ds.create_model("aim-test")
    model.load_state_dict(random_init.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    x = _normalise(images)
    generator = torch.Generator().manual_seed(0)
    for _ in range(PRETRAIN_STEPS):
        batch = x[torch.randint(0, len(x), (64,), generator=generator)]
        loss = model(batch, model.sample_prefix_len(64, generator))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _write_export(model, root / "pretrained", PRETRAIN_STEPS)
    return {
        "root": root,
        "train": root / "train.beton",
        "val": root / "val.beton",
        "pretrained": root / "pretrained",
        "random_init": root / "random_init",
    }


def _config(digits: dict[str, Path], out_dir: Path, *overrides: str) -> ProbeConfig:
    base = [
        f"data.train_path={digits['train']}",
        f"data.val_path={digits['val']}",
        f"out_dir={out_dir}",
        "data.num_workers=1",
        "train.log_every_steps=1000",
    ]
    return load_probe_config(REPO / "run" / "configs" / "probe_aim-test.yaml", overrides=base + list(overrides))


@pytest.fixture(scope="module")
def cached_run(digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[ProbeConfig, dict]:
    """The shipped aim-test recipe on cached features of the pretrained trunk."""
    out = tmp_path_factory.mktemp("probe_cached")
    cfg = _config(digits, out, f"features.cache_dir={out / 'cache'}", "train.epochs=12", "train.lrs=[3e-3,1e-2]")
    return cfg, run_probe(cfg, digits["pretrained"])


@pytest.fixture(scope="module")
def random_init_run(digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same probe (recipe, data, seed) on the random-init trunk: what pretraining must beat. Its own
    cache folder, so that test_cache_is_reused_then_invalidated still sees these weights as new."""
    out = tmp_path_factory.mktemp("probe_random_init")
    cfg = _config(digits, out, f"features.cache_dir={out / 'cache'}", "train.epochs=12", "train.lrs=[3e-3,1e-2]")
    return run_probe(cfg, digits["random_init"])


#: How much better the pretrained trunk's linear probe must be, per LR. Measured on this recipe (2 cores,
#: CPU, 2026-12-03): linear 0.8025 / 0.88 (LR 3e-3 / 1e-2) against 0.7175 / 0.80 for the random-init trunk;
#: attentive 0.70 / 0.8425 against 0.69 / 0.84.
LINEAR_MARGIN = 0.05


def test_pretrained_trunk_beats_the_random_init_trunk(
    cached_run: tuple[ProbeConfig, dict], random_init_run: dict
) -> None:
    """A random-init aim-test trunk already reaches ~0.8 on the digits (chance is 0.1), so beating chance
    proves nothing; the same heads on the pretrained trunk must beat the same heads on the random one.
    The linear probe carries the margin: it reads the averaged block outputs as they are, while the
    attentive head learns its own pooling and reaches the random trunk's level after 100 pretraining
    steps, so for it only "not worse" is asserted."""
    cfg, results = cached_run
    pretrained, random_init = results["heads"], random_init_run["heads"]
    assert results["weights_fingerprint"] != random_init_run["weights_fingerprint"]
    for name, row in pretrained["linear"]["per_lr"].items():
        baseline = random_init["linear"]["per_lr"][name]["top1"]
        assert row["top1"] >= baseline + LINEAR_MARGIN, (name, row, baseline)
    assert pretrained["attentive"]["best"]["top1"] >= random_init["attentive"]["best"]["top1"] - 0.02, pretrained
    best = pretrained["attentive"]["best"]
    assert best["images"] == 400 and best["top5"] >= best["top1"]
    written = json.loads((Path(cfg.out_dir) / "results.json").read_text())
    assert written["heads"]["attentive"]["best"]["top1"] == best["top1"]
    assert set(written["heads"]["attentive"]["per_lr"]) == {f"attentive_lr{lr:g}" for lr in cfg.train.lrs}


def test_cache_is_reused_then_invalidated(
    cached_run: tuple[ProbeConfig, dict], digits: dict[str, Path], tmp_path: Path
) -> None:
    cfg, first = cached_run
    assert first["feature_cache"] == {"used": True, "persistent": True, "reused": {"train": False, "val": False}}
    assert first["trunk_images_forwarded"] == 1797  # every image once, whatever the epochs and LRs
    # Same weights, layers and data, another out_dir, same cache_dir: no trunk forward at all.
    again = run_probe(
        _config(
            digits,
            tmp_path / "again",
            f"features.cache_dir={cfg.features.cache_dir}",
            "train.epochs=12",
            "train.lrs=[3e-3,1e-2]",
        ),
        digits["pretrained"],
    )
    assert again["feature_cache"]["reused"] == {"train": True, "val": True}
    assert again["trunk_images_forwarded"] == 0
    for kind in ("attentive", "linear"):
        for name, row in first["heads"][kind]["per_lr"].items():
            assert again["heads"][kind]["per_lr"][name]["top1"] == row["top1"]
    # Other weights: a new key, features extracted again.
    other = run_probe(
        _config(digits, tmp_path / "other", f"features.cache_dir={cfg.features.cache_dir}", "train.epochs=1"),
        digits["random_init"],
    )
    assert other["feature_cache"]["reused"] == {"train": False, "val": False}
    assert other["trunk_images_forwarded"] == 1797
    # Other layers: a new key too.
    layers = run_probe(
        _config(
            digits,
            tmp_path / "layers",
            f"features.cache_dir={cfg.features.cache_dir}",
            "train.epochs=1",
            "features.layers=[0]",
        ),
        digits["pretrained"],
    )
    assert layers["feature_cache"]["reused"] == {"train": False, "val": False}
    # No persistent cache: features still extracted once, in a scratch folder removed afterwards.
    scratch_out = tmp_path / "scratch"
    scratch = run_probe(_config(digits, scratch_out, "features.cache=false", "train.epochs=1"), digits["pretrained"])
    assert scratch["feature_cache"]["persistent"] is False and scratch["trunk_images_forwarded"] == 1797
    assert not list(scratch_out.glob(".features-*")) and not (scratch_out / "feature_cache").exists()


def test_tensorboard_holds_the_probe_log(
    cached_run: tuple[ProbeConfig, dict], digits: dict[str, Path], tmp_path: Path
) -> None:
    """``train.tensorboard=true``: each head's loss and LR, and the mid-run scores, as TensorBoard shows
    them, equal to probe_metrics.jsonl (cached features: no trunk pass)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = cached_run
    out = tmp_path / "tb"
    overrides = (f"features.cache_dir={cfg.features.cache_dir}", "train.epochs=2", "train.lrs=[3e-3]")
    run_probe(
        _config(
            digits, out, *overrides, "train.log_every_steps=5", "train.eval_every_epochs=1", "train.tensorboard=true"
        ),
        digits["pretrained"],
    )
    records = [json.loads(line) for line in (out / "probe_metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard" / "run_0"), size_guidance={"scalars": 0})
    events.Reload()
    train = [r for r in records if r["kind"] == "train"]
    assert train and set(train[0]["loss"]) == {"attentive_lr0.003", "linear_lr0.003"}
    for head in train[0]["loss"]:
        shown = {e.step: e.value for e in events.Scalars(f"train/loss/{head}")}
        assert shown == pytest.approx({r["step"]: r["loss"][head] for r in train}, rel=1e-6)
        assert {e.step for e in events.Scalars(f"train/lr/{head}")} == set(shown)
    (val,) = [r for r in records if r["kind"] == "val"]  # epoch 1 of 2 (the last one is results.json's)
    top1 = events.Scalars("val/scores/attentive_lr0.003/top1")
    assert [(e.step, e.value) for e in top1] == [
        (val["step"], pytest.approx(val["scores"]["attentive_lr0.003"]["top1"]))
    ]
    # A second probe in the same folder gets its own TensorBoard run; off by default.
    run_probe(_config(digits, out, *overrides, "train.tensorboard=true"), digits["pretrained"])
    run_probe(_config(digits, out, *overrides), digits["pretrained"])
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["run_0", "run_1"]


def test_saved_heads_reload_in_ml_aim_layout(
    cached_run: tuple[ProbeConfig, dict], digits: dict[str, Path], tmp_path: Path
) -> None:
    """Evaluation-only from the ml-aim files gives the figures the training run reported."""
    main = _driver_main()

    cfg, results = cached_run
    best = results["heads"]["attentive"]["best"]
    files = results["head_files"][best["name"]]
    kind, head, meta = load_head(files["ml_aim"], num_heads=2)
    assert kind == "attentive" and meta["layout"] == "ml-aim" and meta["layers"] == results["layers"]
    out = tmp_path / "eval"
    code = main(
        [
            "--config",
            str(REPO / "run" / "configs" / "probe_aim-test.yaml"),
            "--weights",
            str(digits["pretrained"] / "model.safetensors"),
            "--eval-only",
            "--head",
            files["ml_aim"],
            "--head",
            files["aim_ds"],
            f"data.val_path={digits['val']}",
            f"out_dir={out}",
            f"features.cache_dir={cfg.features.cache_dir}",
            "data.num_workers=1",
        ]
    )
    assert code == 0
    evaluated = json.loads((out / "results.json").read_text())
    rows = list(evaluated["heads"]["attentive"]["per_lr"].values())
    assert len(rows) == 2
    for row in rows:
        assert row["top1"] == best["top1"] and row["top5"] == best["top5"]


def test_ml_aim_export_of_a_probe_run_reproduces_its_top1(
    cached_run: tuple[ProbeConfig, dict], digits: dict[str, Path], tmp_path: Path
) -> None:
    """``python -m aim_ds.weights.ml_aim`` on the run: the probe's blocks and classes in ml-aim's
    config, the best attentive head beside the trunk; read back as trunk and head, it scores what
    the run reported (its trained LayerNorm eps travels in the file's metadata)."""
    from aim_ds.weights.ml_aim import main as export_main

    cfg, results = cached_run
    best = results["heads"]["attentive"]["best"]
    exported = tmp_path / "ml_aim"
    assert export_main(["--weights", str(digits["pretrained"]), "--head", cfg.out_dir, str(exported)]) == 0
    config = json.loads((exported / "config.json").read_text())
    assert config["probe_layers"] == results["layers"] and config["num_classes"] == 10
    out = tmp_path / "eval"
    code = _driver_main()(
        [
            "--config",
            str(REPO / "run" / "configs" / "probe_aim-test.yaml"),
            "--weights",
            str(exported),
            "--eval-only",
            "--head",
            str(exported / "model.safetensors"),
            f"data.val_path={digits['val']}",
            f"out_dir={out}",
            f"features.cache_dir={tmp_path / 'cache'}",
            "data.num_workers=1",
        ]
    )
    assert code == 0
    (row,) = json.loads((out / "results.json").read_text())["heads"]["attentive"]["per_lr"].values()
    assert row["top1"] == best["top1"] and row["top5"] == best["top5"]


def test_one_trunk_forward_per_batch_with_augmentation(digits: dict[str, Path], tmp_path: Path) -> None:
    """Augmented training: the trunk runs once per batch however many heads and LRs."""
    cfg = _config(
        digits, tmp_path, "train.augment=true", "train.epochs=1", "train.batch_size=256", "train.lrs=[1e-3,1e-2]"
    )
    results = run_probe(cfg, digits["pretrained"])
    steps = results["steps"]
    assert steps == 1397 // 256
    assert results["feature_cache"]["used"] is False
    # 4 heads (2 types x 2 LRs) trained, yet one trunk pass per training batch, plus the val set once.
    assert results["trunk_images_forwarded"] == steps * 256 + 400
    # Counted in trunk forwards too: one per training batch, and 2 for the val set (400 images in
    # batches of data.eval_batch_size 256); no extra batch is drawn past the last step.
    assert cfg.data.eval_batch_size == 256
    assert results["trunk_batches_forwarded"] == steps + 2
    assert len(results["heads"]["attentive"]["per_lr"]) == 2 and len(results["heads"]["linear"]["per_lr"]) == 2
    from safetensors.torch import load_file

    heads = results["head_files"]
    lo, hi = load_file(heads["attentive_lr0.001"]["aim_ds"]), load_file(heads["attentive_lr0.01"]["aim_ds"])
    assert not torch.equal(lo["k.weight"], hi["k.weight"])


def test_driver_rejects_bad_input(digits: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = _driver_main()

    config = str(REPO / "run" / "configs" / "probe_aim-test.yaml")
    assert main(["--config", config, "--weights", str(digits["pretrained"]), "train.epoch=2"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err
    assert main(["--config", config, "--weights", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    wrong = ["--config", str(REPO / "run" / "configs" / "probe_aim-tiny.yaml"), "--weights", str(digits["pretrained"])]
    wrong += [f"data.train_path={digits['train']}", f"data.val_path={digits['val']}", f"out_dir={tmp_path}"]
    assert main(wrong) == 2
    assert "does not match model 'aim-tiny'" in capsys.readouterr().err
    # The model section's old spellings fail naming the new keys, before any weights are read.
    assert main(["--config", config, "--weights", str(digits["pretrained"]), "model_overrides.depth=2"]) == 2
    assert "model_overrides was renamed: use model.overrides" in capsys.readouterr().err
    assert main(["--config", config, "--weights", str(digits["pretrained"]), "model=aim-tiny"]) == 2
    assert "use model.name=aim-tiny" in capsys.readouterr().err


@pytest.fixture(scope="module")
def three_class_val(digits: dict[str, Path]) -> Path:
    """A val beton of three of the ten digit classes: a class list that differs from the train one."""
    from aim_ds.data.writers import WriteOptions, convert_imagefolder

    folder = digits["root"] / "png3" / "val"
    folder.mkdir(parents=True)
    for name in sorted(p.name for p in (digits["root"] / "png" / "val").iterdir())[:3]:
        (folder / name).symlink_to(digits["root"] / "png" / "val" / name)
    out = digits["root"] / "val3.beton"
    convert_imagefolder(folder, out, WriteOptions(write_mode="raw", workers=1), progress=False)
    return out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["device=gpu"], "device='gpu': not one of auto, cpu, cuda"),
        (["data.image_size=64"], "data.image_size=64: differs from aim-test's image_size 32"),
        (["features.layers=[99]"], "features.layers=[99]: "),
        (["VAL3"], "different class lists (10 classes in the train beton, 3 in the val one)"),
        (["MISSING"], "missing.beton: no beton found at "),
        (
            ["data.max_train_images=100", "train.batch_size=128"],
            "train.batch_size=128: larger than the training set (data.train_path=",  # before any feature
        ),
    ],
    ids=["device", "image_size", "layers", "class_lists", "missing_beton", "batch_over_train_set"],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    digits: dict[str, Path], three_class_val: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    """Through the real command (a subprocess): one line on stderr naming the key, exit 2, no traceback."""
    import subprocess
    import sys

    placeholders = {
        "VAL3": f"data.val_path={three_class_val}",
        "MISSING": f"data.train_path={tmp_path / 'missing.beton'}",
    }
    overrides = [placeholders.get(o, o) for o in overrides]
    command = [
        sys.executable, str(REPO / "run" / "probe.py"), "--config", "probe_aim-test",
        "--weights", str(digits["pretrained"]),
        f"data.train_path={digits['train']}", f"data.val_path={digits['val']}", f"out_dir={tmp_path / 'out'}",
        f"features.cache_dir={tmp_path / 'cache'}", "data.num_workers=1", "device=cpu", *overrides,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-3000:]


@pytest.mark.deepspeed
def test_two_ranks_shard_data_and_share_heads(digits: dict[str, Path], tmp_path: Path) -> None:
    """Two CPU ranks (gloo, torchrun-style environment) running the real driver on a DeepSpeed
    ZeRO-3 checkpoint of the pretrained trunk: rank 0 consolidates it once, each rank extracts and
    trains on its half, gradients are averaged, evaluation counts every val image once."""
    import os
    import subprocess
    import sys

    from test_weights import make_deepspeed_run  # tests/ is on sys.path under pytest

    run = make_deepspeed_run(tmp_path / "ds_run", steps=0, init=digits["pretrained"] / "model.safetensors")

    port = free_port()
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        str(REPO / "run" / "probe.py"),
        "--config",
        str(REPO / "run" / "configs" / "probe_aim-test.yaml"),
        "--weights",
        str(run),
        f"data.train_path={digits['train']}",
        f"data.val_path={digits['val']}",
        f"out_dir={out}",
        "data.num_workers=1",
        "train.epochs=8",
        "train.lrs=[1e-2]",
        "heads.types=[attentive]",
    ]
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env["OMP_NUM_THREADS"] = "1"
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["weights_source"] == "deepspeed"
    assert not (out / ".trunk_from_deepspeed.safetensors").exists()  # the hand-over file is removed
    # The ZeRO-3 checkpoint holds the pretrained trunk: same content hash as the export.
    from aim_ds.weights.load import load_trunk_weights

    assert results["weights_fingerprint"] == load_trunk_weights(digits["pretrained"]).fingerprint()
    best = results["heads"]["attentive"]["best"]
    assert best["images"] == 400  # rank 0's 200 + rank 1's 200, summed
    assert results["trunk_images_forwarded"] == 1397 + 400  # each image once, on one of the ranks
    assert results["steps"] == 8 * ((1397 // 2) // 64)  # per-rank batch 64 of the global 128
    assert best["top1"] > 0.5
    assert "probe results" in logs[0] and "probe results" not in logs[1]  # rank 0 reports


_BANK_RANK = """
import sys
import torch
import torch.distributed as dist
from aim_ds.probe.bank import HeadBank
from aim_ds.probe.config import TrainConfig

dist.init_process_group("gloo")
rank = dist.get_rank()
feats, labels = torch.load(sys.argv[1])
half = labels.shape[1] // 2
mine = slice(rank * half, (rank + 1) * half)
bank = HeadBank.create(["attentive", "linear"], [1e-2], dim=64, num_heads=2, num_classes=10, train=TrainConfig(seed=3))
reduce = bank._all_reduce_grads
grads = []

def recorded():
    reduce()
    grads.append([p.grad.clone() for s in bank.slots for p in s.head.parameters()])

bank._all_reduce_grads = recorded
for step in range(3):
    bank.train_step(feats[step][mine], labels[step][mine], {s.name: 1e-2 for s in bank.slots})
params = [p.detach().clone() for s in bank.slots for p in s.head.parameters()]
torch.save({"grads": grads, "params": params}, sys.argv[2] + f"/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_probe_heads_average_gradients_across_ranks(tmp_path: Path) -> None:
    """Two gloo ranks, each training the probe heads on its half of each batch: after the all-reduce
    both hold the mean of the two halves' gradients (computed here one half at a time, each with its
    own BatchNorm statistics as a rank has), and after 3 AdamW steps both hold the same heads as
    that reference. A sum instead of a mean, or no all-reduce, fails."""
    import os
    import subprocess
    import sys

    import torch.nn.functional as F

    from aim_ds.probe.bank import HeadBank
    from aim_ds.probe.config import TrainConfig

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (3, 32), generator=generator)
    # Features that carry the label, so that the heads have something to learn.
    feats = torch.randn(3, 32, 16, 64, generator=generator) + torch.nn.functional.one_hot(labels, 64)[:, :, None] * 2
    torch.save((feats, labels), tmp_path / "batches.pt")
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        command = [sys.executable, "-c", _BANK_RANK, str(tmp_path / "batches.pt"), str(tmp_path)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    reference = HeadBank.create(
        ["attentive", "linear"], [1e-2], dim=64, num_heads=2, num_classes=10, train=TrainConfig(seed=3)
    )
    reference.train(True)
    params = [p for s in reference.slots for p in s.head.parameters()]
    for step in range(3):
        halves = []
        for half in (slice(0, 16), slice(16, 32)):
            loss = sum(F.cross_entropy(s.head(feats[step][half]), labels[step][half]) for s in reference.slots)
            grads = torch.autograd.grad(loss, params)
            halves.append(grads)
        mean = [(a + b) / 2 for a, b in zip(*halves, strict=True)]
        for got in ranks:
            for expected, actual in zip(mean, got["grads"][step], strict=True):
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)
        for p, g in zip(params, mean, strict=True):
            p.grad = g.clone()
        for slot in reference.slots:
            torch.nn.utils.clip_grad_norm_(slot.head.parameters(), TrainConfig().grad_clip)
            slot.optimizer.step()
            slot.optimizer.zero_grad(set_to_none=True)
    for got in ranks:
        for expected, actual in zip(params, got["params"], strict=True):
            torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-6)
