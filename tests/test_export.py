"""Exports written from a state dict load back without DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import aim_ds
from aim_ds.model.pretrained import PretrainedError
from aim_ds.weights.export import load_exported, save_export


def test_save_export_round_trip_and_checks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test", head_depth=1).eval()
    out = save_export(
        model.state_dict(), tmp_path / "export", model_name="aim-test", overrides={"head_depth": 1}, step=7, ml_aim=True
    )
    meta = json.loads((out / "model.json").read_text())
    assert meta["model"] == "aim-test" and meta["step"] == 7 and meta["overrides"] == {"head_depth": 1}
    assert (out / "trunk_ml_aim.safetensors").is_file() and not list(out.glob("*.partial"))
    loaded = load_exported(out).eval()
    images = torch.randn(2, 3, 32, 32)
    prefix = torch.tensor([2, 40])
    with torch.no_grad():
        assert torch.equal(loaded(images, prefix)["pred"], model(images, prefix)["pred"])
    bad = dict(model.state_dict())
    bad.pop("trunk.post_trunk_norm.bias")
    with pytest.raises(KeyError, match="post_trunk_norm.bias"):
        save_export(bad, tmp_path / "bad", model_name="aim-test", overrides={"head_depth": 1}, step=0)
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return aim_ds.create_model("aim-test").state_dict()


def test_re_export_pairs_metadata_with_its_weights(tmp_path: Path) -> None:
    """Exporting over an existing export replaces weights and model.json together; files of the
    earlier export that the new one does not write (the ml-aim trunk) go."""
    out = tmp_path / "export"
    save_export(_state(0), out, model_name="aim-test", overrides={}, step=10, ml_aim=True)
    second = _state(1)
    reference = {"images": torch.zeros(1, 3, 32, 32), "loss": torch.ones(1)}
    save_export(second, out, model_name="aim-test", overrides={}, step=20, reference_forward=reference)
    meta = json.loads((out / "model.json").read_text())
    assert meta["step"] == 20
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "20"
        assert all(torch.equal(f.get_tensor(k), second[k]) for k in second)
    assert not (out / "trunk_ml_aim.safetensors").exists()
    assert torch.equal(load_file(out / "reference_forward.safetensors")["loss"], torch.ones(1))
    names = ["config.json", "model.json", "model.safetensors", "reference_forward.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == names


def test_failed_weights_write_leaves_no_stale_metadata(tmp_path: Path) -> None:
    """A failure while the new weights are written (here safetensors refusing two entries that
    share memory, as tied parameters would) leaves no model.json describing weights it was not
    written with, and no temporary file."""
    out = tmp_path / "export"
    save_export(_state(0), out, model_name="aim-test", overrides={}, step=10)
    state = _state(1)
    state["trunk.post_trunk_norm.bias"] = state["trunk.post_trunk_norm.weight"]  # same shape, one storage
    with pytest.raises(RuntimeError, match="share memory"):
        save_export(state, out, model_name="aim-test", overrides={}, step=20)
    assert not (out / "model.json").exists() and not (out / "config.json").exists()
    assert not list(out.glob("*.partial"))
    with pytest.raises(PretrainedError, match="no config.json or model.json"):
        load_exported(out)


def test_ml_aim_export_says_its_eps_and_loads_back_exactly(tmp_path: Path) -> None:
    """The ml-aim layout cannot say which LayerNorm eps the weights were trained with: released files
    are served with 1e-6, our pretraining uses 1e-5. Our ml-aim export records its eps, so loading it
    back gives the native export's features exactly; a file without the record is read as released."""
    from aim_ds.model.aim import RELEASED_NORM_EPS
    from aim_ds.weights import frozen as F
    from aim_ds.weights.export import ML_AIM_FILE
    from aim_ds.weights.interop import to_ml_aim

    model = aim_ds.create_model("aim-test")
    assert model.config.norm_eps != RELEASED_NORM_EPS
    export = save_export(
        model.state_dict(), tmp_path / "export", model_name="aim-test", overrides={}, step=1, ml_aim=True
    )
    with safe_open(str(export / ML_AIM_FILE), framework="pt") as f:
        assert float(f.metadata()["norm_eps"]) == model.config.norm_eps
    images = torch.randn(2, 3, 32, 32)
    native, _ = F.build_frozen_trunk("aim-test", export, layers=[2, 3])
    ours, loaded = F.build_frozen_trunk("aim-test", export / ML_AIM_FILE, layers=[2, 3])
    assert loaded.source == "ml_aim"
    assert torch.equal(ours(images), native(images))
    # The same tensors without the record: a released file, eps 1e-6, so the features differ.
    from safetensors.torch import save_file

    bare = tmp_path / "released_layout.safetensors"
    save_file(to_ml_aim(load_file(str(export / "model.safetensors"))), str(bare))
    released, _ = F.build_frozen_trunk("aim-test", bare, layers=[2, 3])
    assert released.model.config.norm_eps == RELEASED_NORM_EPS
    assert not torch.equal(released(images), native(images))


def test_model_json_holds_the_resolved_architecture_and_loading_uses_it(tmp_path: Path) -> None:
    """A default that changes later (here: norm_eps, head_block) does not change what an export loads as."""
    import dataclasses

    from aim_ds.weights.export import architecture_of

    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test", head_depth=1).eval()
    out = save_export(model.state_dict(), tmp_path / "e", model_name="aim-test", overrides={"head_depth": 1}, step=1)
    arch = json.loads((out / "model.json").read_text())["architecture"]
    assert arch == architecture_of(model.config)
    for key in ("width", "depth", "num_heads", "patch_size", "image_size", "norm_eps", "head_block", "head_width"):
        assert key in arch
    assert arch["target_unbiased"] is True and arch["target_eps"] == 1e-6 and "attn_impl" not in arch
    # An export trained with other values than today's defaults, whose overrides do not say so (as when a
    # default changed under the same name): the architecture still rebuilds it as it was trained.
    changed = aim_ds.create_model("aim-test", head_depth=1, norm_eps=1e-6, head_block="mlp")
    different = {"head_depth": 1, "norm_eps": 1e-6, "head_block": "mlp"}
    save_export(changed.state_dict(), tmp_path / "f", model_name="aim-test", overrides=different, step=1)
    (tmp_path / "f" / "config.json").unlink()  # as written before config.json existed
    meta_f = json.loads((tmp_path / "f" / "model.json").read_text())
    meta_f["overrides"] = {"head_depth": 1}  # overrides no longer say norm_eps / head_block ...
    (tmp_path / "f" / "model.json").write_text(json.dumps(meta_f))
    loaded = load_exported(tmp_path / "f")  # ... the architecture does
    assert dataclasses.replace(loaded.config, attn_impl="auto") == changed.config
    meta_f["architecture"]["widths"] = 3
    (tmp_path / "f" / "model.json").write_text(json.dumps(meta_f))
    with pytest.raises(ValueError, match=r"architecture fields \['widths'\] are unknown"):
        load_exported(tmp_path / "f")


def test_old_style_export_loads_with_its_assumed_values_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An export from before model.json stored the architecture (registry name + overrides only)."""
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test").eval()
    out = save_export(model.state_dict(), tmp_path / "old", model_name="aim-test", overrides={}, step=3)
    (out / "config.json").unlink()
    meta = json.loads((out / "model.json").read_text())
    del meta["architecture"]
    (out / "model.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="aim_ds.model.pretrained"):
        loaded = load_exported(out).eval()
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "has no 'architecture'" in message
    for assumed in ("norm_eps=1e-05", "head_block='transformer'", "width=64", "depth=4", "target_unbiased=True"):
        assert assumed in message
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.extract_features(images), model.extract_features(images), rtol=0, atol=0)
    # The probe's loader takes the same path (and warns the same way).
    from aim_ds.weights.frozen import build_frozen_trunk

    caplog.clear()
    with caplog.at_level("WARNING", logger="aim_ds.model.pretrained"):
        trunk, _ = build_frozen_trunk(None, out)
    assert "has no 'architecture'" in " ".join(r.getMessage() for r in caplog.records)
