"""Prefix-causal self-attention for AIM.

During pretraining each sample ``b`` has a prefix length ``S_b``: query ``i`` may attend key ``j``
iff ``j <= i`` (causal) or ``j < S_b`` (the prefix is bidirectional within itself). During
probing the mask is dropped and attention is fully bidirectional.

Kernels:

* ``sdpa`` (the default, ``auto``, on every device): :func:`torch.nn.functional.scaled_dot_product_attention`
  with a boolean mask of shape ``[B, 1, N, N]`` that broadcasts over heads (no float mask per head
  is built). Its forward and backward run everywhere.
* ``flex`` (an option): FlexAttention with a block mask built from the ``mask_mod`` below. The kernel
  is fused and skips fully-masked blocks, but at AIM's 256 tokens (two 128-blocks per side) at most
  one block in four can be skipped, attention is 1-2% of the FLOPs, and its backward does not run on
  CPU ("FlexAttention does not support backward on CPU"), so it is not the default.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import FusedLinear, Linear

AttentionImpl = Literal["auto", "sdpa", "flex"]


def prefix_causal_mask(prefix_len: Tensor, num_tokens: int) -> Tensor:
    """Boolean mask ``[B, 1, N, N]``; True where query ``i`` may attend key ``j``."""
    idx = torch.arange(num_tokens, device=prefix_len.device)
    causal = idx[None, :] <= idx[:, None]  # [N, N]: key j <= query i
    prefix = idx[None, None, :] < prefix_len[:, None, None]  # [B, 1, N]: key j < S_b
    return (causal[None] | prefix)[:, None]  # [B, 1, N, N]


@functools.lru_cache(maxsize=1)
def _flex() -> tuple:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention, dynamic=False), create_block_mask


def flex_block_mask(prefix_len: Tensor, num_tokens: int):
    """A FlexAttention ``BlockMask`` for the prefix-causal pattern (heads broadcast)."""
    _, create_block_mask = _flex()

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) | (kv_idx < prefix_len[b])

    return create_block_mask(
        mask_mod, B=prefix_len.shape[0], H=None, Q_LEN=num_tokens, KV_LEN=num_tokens, device=prefix_len.device
    )


class Attention(nn.Module):
    """Multi-head self-attention, no biases (``qkv`` stacks q, k, v in that order as ml-aim does)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = FusedLinear(dim, 3 * dim, parts=3, bias=False)  # q, k, v each initialised as D x D
        self.proj = Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | object | None = None) -> Tensor:
        """``x``: ``[B, N, D]``. ``mask``: None (full attention), a boolean ``[B, 1, N, N]`` tensor
        (SDPA) or a FlexAttention ``BlockMask``; :func:`build_mask` makes either, once per forward."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, hd]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        elif isinstance(mask, Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            flex_attention, _ = _flex()
            out = flex_attention(q, k, v, block_mask=mask)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)  # [B, N, D]
        return self.proj(out)


def build_mask(prefix_len: Tensor | None, num_tokens: int, impl: AttentionImpl, device: torch.device):
    """The mask object :class:`Attention` takes: None for full attention, else per ``impl``
    (``auto`` and ``sdpa``: the boolean SDPA mask, on every device; ``flex``: a FlexAttention
    ``BlockMask``)."""
    if prefix_len is None:
        return None
    prefix_len = prefix_len.to(device)
    if impl == "auto":
        impl = "sdpa"
    if impl == "flex":
        return flex_block_mask(prefix_len, num_tokens)
    if impl != "sdpa":
        raise ValueError(f"attention impl {impl!r} is not one of 'auto', 'sdpa', 'flex'")
    return prefix_causal_mask(prefix_len, num_tokens)
