"""Checks that need a CUDA GPU (marked `gpu`; skipped without one)."""

from __future__ import annotations

import pytest
import torch

import aim_ds
from aim_ds.model.attention import build_mask

pytestmark = pytest.mark.gpu


def test_flex_attention_kernel_matches_sdpa_reference_in_bf16() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-small").cuda().eval()
    cfg = model.config
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size, device="cuda")
    prefix = torch.tensor([1, 7, 33, cfg.num_patches - 1], device="cuda")
    mask = build_mask(prefix, cfg.num_patches, "flex", images.device)
    assert not isinstance(mask, torch.Tensor), "flex must build FlexAttention's BlockMask"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.config = cfg.replace(attn_impl="flex")
        flex = model(images, prefix)["pred"].float()
        model.config = cfg.replace(attn_impl="sdpa")
        sdpa = model(images, prefix)["pred"].float()
    assert (flex - sdpa).abs().max() < 5e-2


def test_bf16_training_step_is_finite() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-small").cuda()
    images = torch.randn(8, 3, 112, 112, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
