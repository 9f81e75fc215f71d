"""Exports written from a state dict load back without DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
    assert (out / "trunk_ml_aim.safetensors").is_file() and not list(out.glob(".*.tmp"))
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
