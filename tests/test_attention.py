"""The prefix-causal mask and the SDPA attention path against naive loops (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from aim_ds.model.attention import Attention, build_mask, prefix_causal_mask


def test_prefix_causal_mask_matches_a_loop() -> None:
    prefix_len = torch.tensor([1, 3, 9, 15])
    tokens = 16
    mask = prefix_causal_mask(prefix_len, tokens)
    assert mask.dtype == torch.bool and mask.shape == (4, 1, tokens, tokens)
    for b, length in enumerate(prefix_len.tolist()):
        for i in range(tokens):
            for j in range(tokens):
                assert bool(mask[b, 0, i, j]) == (j <= i or j < length), (b, i, j)


def test_bool_mask_broadcasts_over_heads() -> None:
    """The ``[B, 1, N, N]`` mask given to SDPA masks every head the same way: compare the module's
    output with attention computed head by head and sample by sample, with the mask spelled out."""
    torch.manual_seed(0)
    batch, tokens, width, heads = 3, 12, 32, 4
    attn = Attention(width, heads).eval()
    x = torch.randn(batch, tokens, width)
    prefix_len = torch.tensor([1, 5, 11])
    mask = build_mask(prefix_len, tokens, "sdpa", x.device)
    assert isinstance(mask, torch.Tensor) and mask.shape == (batch, 1, tokens, tokens)
    with torch.no_grad():
        got = attn(x, mask)  # [B, N, D]
        qkv = attn.qkv(x).view(batch, tokens, 3, heads, width // heads)
        head_dim = width // heads
        out = torch.zeros(batch, tokens, heads, head_dim)
        for b in range(batch):
            for h in range(heads):
                q, k, v = qkv[b, :, 0, h], qkv[b, :, 1, h], qkv[b, :, 2, h]  # each [N, hd]
                scores = q @ k.T / math.sqrt(head_dim)  # [N, N]
                for i in range(tokens):
                    for j in range(tokens):
                        if not (j <= i or j < prefix_len[b]):
                            scores[i, j] = float("-inf")
                out[b, :, h] = torch.softmax(scores, dim=-1) @ v
        expected = attn.proj(out.reshape(batch, tokens, width))
        full = attn(x, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3), "the mask must change the output"


def test_auto_is_sdpa_on_every_device() -> None:
    prefix_len = torch.tensor([1, 5])
    for device in ("cpu", "meta"):
        mask = build_mask(prefix_len, 8, "auto", torch.device(device))
        assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_flex_matches_sdpa_outputs_and_gradients(device: str) -> None:
    """FlexAttention (the option) against SDPA (the default): same outputs and gradients wherever
    FlexAttention's backward runs. Where it does not (CPU), the test skips with PyTorch's reason."""
    torch.manual_seed(0)
    batch, tokens, width, heads = 3, 256, 128, 2  # AIM's 256 tokens: two 128-blocks per side
    attn = Attention(width, heads).to(device)
    x = torch.randn(batch, tokens, width, device=device, requires_grad=True)
    prefix_len = torch.tensor([1, 100, 255])
    try:
        flex = attn(x, build_mask(prefix_len, tokens, "flex", x.device))
    except NotImplementedError as exc:
        if "does not support backward" in str(exc):
            pytest.skip(str(exc).split(".")[0])  # "FlexAttention does not support backward on CPU"
        raise
    grad_out = torch.randn_like(flex)
    flex_grads = torch.autograd.grad(flex, [x, *attn.parameters()], grad_out)
    sdpa = attn(x, build_mask(prefix_len, tokens, "sdpa", x.device))
    sdpa_grads = torch.autograd.grad(sdpa, [x, *attn.parameters()], grad_out)
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)
    for got, want in zip(flex_grads, sdpa_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
