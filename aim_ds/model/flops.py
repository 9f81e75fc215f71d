"""Training FLOPs per image, for throughput and MFU.

Convention (PaLM appendix B, nanoGPT): a matmul with ``n`` parameters costs ``2n`` FLOPs per token
forward and ``4n`` backward, so ``6 * params * tokens`` for a training step; attention's two
score/value matmuls add ``12 * depth * width * tokens**2`` per sequence (forward + backward,
counting the full ``N x N`` product even though the prefix-causal mask skips part of it).
Parameters here are the matmul weights: the patch conv, qkv/proj/fc1/fc2, and the head's linears;
norms, biases and position embeddings are left out as negligible.
"""

from __future__ import annotations

from ..devices import H100_BF16_DENSE_FLOPS  # noqa: F401  (re-exported: the MFU's default denominator)
from .aim import AIMConfig


def matmul_params(cfg: AIMConfig) -> tuple[int, int]:
    """(trunk incl. patch embed, pixel head) matmul parameter counts."""
    d, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    patch = cfg.patch_dim * d
    trunk = cfg.depth * (4 * d * d + 2 * d * hidden)
    hw, hh = cfg.head_width, int(cfg.head_width * cfg.head_mlp_ratio)
    head = d * hw + cfg.head_depth * 2 * hw * hh + hw * cfg.patch_dim
    return patch + trunk, head


def train_flops_per_image(cfg: AIMConfig) -> float:
    """Forward + backward FLOPs for one image (trunk + head)."""
    tokens = cfg.num_patches
    trunk, head = matmul_params(cfg)
    attention = 12 * cfg.depth * cfg.width * tokens**2
    return float(6 * (trunk + head) * tokens + attention)
