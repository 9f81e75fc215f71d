"""Weights out: exports that stand alone (config.json + model.safetensors), loaded by timm's and
Hugging Face's conventions without DeepSpeed or the run folder; the trunk as a feature extractor
giving the probe's features; the ml-aim export (trunk + probe head + ml-aim's constructor config)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import aim_ds
from aim_ds.model.pretrained import PretrainedError
from aim_ds.probe.config import resolve_layers
from aim_ds.probe.heads import AttentiveProbe, load_head, save_head
from aim_ds.weights.export import save_export
from aim_ds.weights.frozen import build_frozen_trunk
from aim_ds.weights.interop import to_ml_aim
from aim_ds.weights.load import WeightsError, load_trunk_weights
from aim_ds.weights.ml_aim import export_ml_aim, main, ml_aim_config, ml_aim_head

REPO = Path(__file__).resolve().parents[1]
RELEASED_600M = json.loads((REPO / "tests" / "data" / "ml_aim_aim-600M.json").read_text())


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(11))


def _model(seed: int = 0, **overrides) -> aim_ds.AIM:
    torch.manual_seed(seed)
    model = aim_ds.create_model("aim-test", **overrides).eval()
    with torch.no_grad():  # LayerNorm affines away from 1/0, so a norm left out or swapped would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _export(model: aim_ds.AIM, folder: Path, overrides: dict | None = None) -> Path:
    return save_export(model.state_dict(), folder, model_name="aim-test", overrides=overrides or {}, step=5)


def test_export_loads_by_both_conventions_without_deepspeed_or_run_folder(tmp_path: Path) -> None:
    """An export copied out of its run folder (then deleted) loads in a fresh process by
    ``create_model(folder)``, ``create_model(name, pretrained=folder)`` and ``AIM.from_pretrained``,
    with DeepSpeed never imported, and reproduces the model."""
    model = _model(head_depth=1, norm_eps=1e-6)
    run = tmp_path / "run"
    export = _export(model, run / "export", {"head_depth": 1, "norm_eps": 1e-6})
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "aim" and config["model_name"] == "aim-test"
    assert config["head_depth"] == 1 and config["norm_eps"] == 1e-6 and config["width"] == 64
    moved = shutil.move(str(export), tmp_path / "shared")
    shutil.rmtree(run)
    script = textwrap.dedent(
        f"""
        import sys, torch
        from safetensors.torch import save_file
        import aim_ds
        path = {str(moved)!r}
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
        prefix = torch.tensor([1, 30, 63])
        out = {{}}
        for i, model in enumerate([aim_ds.create_model(path), aim_ds.create_model("aim-test", pretrained=path),
                                   aim_ds.AIM.from_pretrained(path)]):
            assert not model.training
            with torch.no_grad():
                out[f"pred{{i}}"] = model(images, prefix)["pred"]
                out[f"feat{{i}}"] = model.forward_features(images, "last")
        save_file(out, sys.argv[1])
        print("deepspeed" in sys.modules, "ffcv" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out.safetensors")],
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "False"]  # neither DeepSpeed nor FFCV was imported
    out = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        pred = model(_images(), torch.tensor([1, 30, 63]))["pred"]
        feat = model.forward_features(_images(), "last")
    for i in range(3):
        assert torch.equal(out[f"pred{i}"], pred) and torch.equal(out[f"feat{i}"], feat)


def test_save_pretrained_round_trip_and_pixel_head_choice(tmp_path: Path) -> None:
    model = _model()
    folder = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    back = aim_ds.AIM.from_pretrained(folder)
    assert back.name == "aim-test" and back.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    # The trunk alone: no pixel head parameters, forward (the loss) refused, features unchanged.
    trunk = aim_ds.create_model("aim-test", pretrained=folder / "model.safetensors", pixel_head=False)
    assert trunk.head is None and not any(k.startswith("head.") for k in trunk.state_dict())
    with pytest.raises(RuntimeError, match="pixel head"):
        trunk(_images())
    with torch.no_grad():
        assert torch.equal(trunk.forward_features(_images()), model.forward_features(_images()))
    # The folder without model.json is still a weights source for the probe (config.json names it).
    weights = load_trunk_weights(folder)
    assert weights.source == "export" and weights.meta["model"] == "aim-test"
    # A trunk-only save loads back without a head, and refuses pixel_head=True.
    trunk.save_pretrained(tmp_path / "trunk")
    assert aim_ds.AIM.from_pretrained(tmp_path / "trunk").head is None
    with pytest.raises(PretrainedError, match="no pixel head"):
        aim_ds.AIM.from_pretrained(tmp_path / "trunk", pixel_head=True)


def test_older_exports_keep_loading(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Exports written before config.json (model.json with the architecture, or older still with a
    name and overrides only) load as before; config.json wins when both are there."""
    model = _model(head_depth=1)
    export = _export(model, tmp_path / "export", {"head_depth": 1})
    (export / "config.json").unlink()
    with torch.no_grad():
        expected = model.forward_features(_images(), [0, 2])
        assert torch.equal(aim_ds.AIM.from_pretrained(export).forward_features(_images(), [0, 2]), expected)
        meta = json.loads((export / "model.json").read_text())
        del meta["architecture"]
        (export / "model.json").write_text(json.dumps(meta))
        with caplog.at_level("WARNING"):
            old = aim_ds.create_model(export)
        assert "has no 'architecture'" in caplog.text
        assert torch.equal(old.forward_features(_images(), [0, 2]), expected)


def test_forward_features_are_the_probe_features(tmp_path: Path) -> None:
    """``forward_features(images, blocks)`` equals what the probe's frozen trunk computes from the
    same export for "last", "best" and a list; ``None`` is the final normed output."""
    model = _model(depth=8)  # at depth 8 aim-test's "best" (blocks 0-3) and "last" (2-7) differ
    export = _export(model, tmp_path / "export", {"depth": 8})
    loaded = aim_ds.create_model(export)
    images = _images()
    seen = []
    for blocks in ("last", "best", [1, 5, -1]):
        layers = resolve_layers(blocks, "aim-test", 8)
        frozen, _ = build_frozen_trunk(None, export, layers=layers)
        with torch.no_grad():
            mine = loaded.forward_features(images, blocks)
        assert torch.equal(mine, frozen(images)), blocks
        seen.append(mine)
    assert not torch.equal(seen[0], seen[1])
    with torch.no_grad():
        normed = loaded.forward_features(images)
        assert torch.equal(normed, loaded.trunk(loaded.preprocessor(images)))
    with pytest.raises(ValueError, match="not 'last', 'best'"):
        loaded.forward_features(images, "first")
    with pytest.raises(ValueError, match="out of range"):
        loaded.forward_features(images, [8])


def test_bad_pretrained_paths_are_named(tmp_path: Path) -> None:
    model = _model()
    export = _export(model, tmp_path / "export")
    with pytest.raises(PretrainedError, match="no such file"):
        aim_ds.create_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="not an export"):
        aim_ds.AIM.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="downloads nothing"):
        aim_ds.create_model("aim-test", pretrained=True)
    with pytest.raises(KeyError, match="unknown model 'aim-nope'"):
        aim_ds.create_model("aim-nope", pretrained=export)
    with pytest.raises(PretrainedError, match="stores width=64"):
        aim_ds.AIM.from_pretrained(export, width=128)
    aim_ds.AIM.from_pretrained(export, attn_impl="sdpa")  # how attention runs is no architecture change
    bare = tmp_path / "bare.safetensors"
    shutil.copy(export / "model.safetensors", bare)
    with pytest.raises(PretrainedError, match="pass a registry name"):
        aim_ds.AIM.from_pretrained(bare)
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "widht": 3}))
    with pytest.raises(PretrainedError, match="widht"):
        aim_ds.AIM.from_pretrained(export)
    (export / "config.json").write_text(json.dumps({**config, "width": 128, "num_heads": 2}))
    with pytest.raises(PretrainedError, match="shape mismatch preprocessor.patchifier.proj.weight"):
        aim_ds.AIM.from_pretrained(export)
    (export / "config.json").write_text("{")
    with pytest.raises(PretrainedError, match="not readable JSON"):
        aim_ds.AIM.from_pretrained(export)


# ---------------------------------------------------------------------------------------------
# The ml-aim export


def _probe_head(width: int = 64, heads: int = 2, classes: int = 10, **kwargs) -> AttentiveProbe:
    torch.manual_seed(3)
    head = AttentiveProbe(width, heads, classes, **kwargs)
    head.bn.running_mean.normal_()
    head.bn.running_var.uniform_(0.5, 2.0)
    head.bn.num_batches_tracked.fill_(9)
    return head.eval()


def test_ml_aim_layout_of_aim_600M_is_the_released_one() -> None:
    """Our aim-0.6B backbone in the ml-aim layout plus an ImageNet attentive head gives exactly the
    released apple/aim-600M keys and shapes (tests/data, from docs/recipe.md's naming), and the
    constructor config is aim_600M's arguments with the best blocks."""
    with torch.device("meta"):
        model = aim_ds.create_model("aim-0.6B")
        head = AttentiveProbe(1536, 12, 1000)
    state = {**to_ml_aim(model.state_dict()), **ml_aim_head(head.state_dict(), 1536, "head")}
    assert {k: list(v.shape) for k, v in state.items()} == RELEASED_600M["keys"]
    blocks = resolve_layers("best", "aim-0.6B", 24)
    assert ml_aim_config(model.config, blocks, 1000) == RELEASED_600M["config"]


def test_ml_aim_export_writes_trunk_head_and_config(tmp_path: Path) -> None:
    model = _model(depth=8)
    export = _export(model, tmp_path / "export", {"depth": 8})
    head = _probe_head()
    layers = resolve_layers("best", "aim-test", 8)
    save_head(head, tmp_path / "head_ml_aim.safetensors", {"layers": layers, "num_heads": 2}, ml_aim=True)
    out = export_ml_aim(export, tmp_path / "head_ml_aim.safetensors", tmp_path / "ml_aim")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config == {
        "img_size": 32,
        "patch_size": 4,
        "embed_dim": 64,
        "num_blocks": 8,
        "num_heads": 2,
        "num_channels": 3,
        "probe_layers": [0, 1, 2, 3],
        "num_classes": 10,
    }
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["norm_eps"] == "1e-05"  # ml-aim's classes use 1e-6: the trained eps is kept here
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    # The released naming at this size: the 600M layout with D=64, depth 8, 4 px patches, 10 classes.
    dims = {1536: 64, 4608: 192, 6144: 256, 14: 4, 1000: 10}
    expected = {}
    for key, shape in RELEASED_600M["keys"].items():
        if key.startswith("trunk.blocks.") and int(key.split(".")[2]) >= 8:
            continue
        expected[key] = [dims.get(d, d) for d in shape]
    assert shapes == expected
    # Read back: the probe's loaders and from_pretrained take the trunk (eps from the metadata), the head too.
    weights = load_trunk_weights(out)
    assert weights.source == "ml_aim" and weights.meta["norm_eps"] == 1e-5
    back = aim_ds.AIM.from_pretrained(out)
    assert back.head is None and back.config.norm_eps == 1e-5
    with torch.no_grad():
        assert torch.equal(back.forward_features(_images(), layers), model.forward_features(_images(), layers))
        _, loaded_head, _ = load_head(out / "model.safetensors", num_heads=2)
        loaded_head.eval()
        feats = model.forward_features(_images(), layers)
        assert torch.equal(loaded_head(feats), head(feats))


def test_ml_aim_export_from_a_probe_run_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``python -m aim_ds.weights.ml_aim`` takes a probe run's best attentive head; a head ml-aim's
    classes cannot hold is exit 2 naming the file and the reason, with nothing written."""
    model = _model()
    export = _export(model, tmp_path / "export")
    probe = tmp_path / "probe"
    (probe / "heads").mkdir(parents=True)
    best, worse = _probe_head(), _probe_head(classes=10)
    with torch.no_grad():
        worse.k.weight.zero_()
    for name, head in (("attentive_lr0.001", best), ("attentive_lr0.0001", worse)):
        save_head(head, probe / "heads" / f"{name}_ml_aim.safetensors", {"layers": [1, 2, 3]}, ml_aim=True)
    rows = {"attentive_lr0.001": 71.0, "attentive_lr0.0001": 60.0}
    results = {
        "heads": {
            "attentive": {
                "per_lr": {n: {"name": n, "top1": t} for n, t in rows.items()},
                "best": {"name": "attentive_lr0.001", "top1": 71.0},
            }
        }
    }
    (probe / "results.json").write_text(json.dumps(results))
    assert main(["--weights", str(export), "--head", str(probe), str(tmp_path / "out")]) == 0
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(state["head.k.weight"], best.k.weight)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["probe_layers"] == [1, 2, 3]

    cases = {
        "biased": (_probe_head(bias=True), {"layers": [3]}, "linear.bias"),
        "two_queries": (_probe_head(num_queries=2), {"layers": [3]}, "one query"),
        "wide": (_probe_head(width=128, heads=2), {"layers": [3]}, "has shape"),
        "no_layers": (_probe_head(), {}, "--layers"),
    }
    for name, (head, meta, message) in cases.items():
        save_head(head, tmp_path / f"{name}.safetensors", meta)
        out = tmp_path / f"out_{name}"
        assert main(["--weights", str(export), "--head", str(tmp_path / f"{name}.safetensors"), str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and f"{name}.safetensors" in err, err
        assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert main(["--weights", str(export), "--head", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "results.json" in capsys.readouterr().err
    with pytest.raises(WeightsError, match="pass --model"):
        bare = tmp_path / "bare_ml_aim.safetensors"
        save_file(to_ml_aim(model.state_dict()), str(bare))
        export_ml_aim(bare, tmp_path / "biased.safetensors", tmp_path / "y")
