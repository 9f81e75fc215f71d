"""Exports written from a state dict load back without DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import aim_ds
from aim_ds.export import load_exported, save_export


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
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "reference_forward.safetensors"]


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
    assert not (out / "model.json").exists()
    assert not list(out.glob("*.partial"))
    with pytest.raises(FileNotFoundError):
        load_exported(out)


def test_ml_aim_export_says_its_eps_and_loads_back_exactly(tmp_path: Path) -> None:
    """The ml-aim layout cannot say which LayerNorm eps the weights were trained with: released files
    are served with 1e-6, our pretraining uses 1e-5. Our ml-aim export records its eps, so loading it
    back gives the native export's features exactly; a file without the record is read as released."""
    from aim_ds import frozen as F
    from aim_ds.export import ML_AIM_FILE
    from aim_ds.interop import to_ml_aim
    from aim_ds.model import RELEASED_NORM_EPS

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
