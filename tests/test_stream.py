"""Streamed backbone reads (aim_ds.stream) against the whole-file read, on a real safetensors export."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from aim_ds import weights
from aim_ds.registry import create_model
from aim_ds.stream import read_backbone


def test_read_backbone_casts_each_tensor_and_skips_the_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("aim-test")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    file = tmp_path / "model.safetensors"
    save_file(state, str(file))
    streamed = read_backbone(file, torch.bfloat16)
    backbone = {k: v for k, v in state.items() if k.startswith(("preprocessor.", "trunk."))}
    assert streamed.keys() == backbone.keys() and not any(k.startswith("head.") for k in streamed)
    for key, value in backbone.items():
        assert streamed[key].dtype == torch.bfloat16
        assert torch.equal(streamed[key], value.to(torch.bfloat16)), key
    trunk = weights.FrozenTrunk(weights.build_trunk("aim-test", streamed), None)
    assert all(p.dtype == torch.bfloat16 for p in trunk.parameters())
    images = torch.randn(2, 3, 32, 32)
    full = weights.FrozenTrunk(weights.build_trunk("aim-test", backbone), None)
    torch.testing.assert_close(trunk(images), full(images), rtol=0.05, atol=0.05)  # bf16 against fp32
