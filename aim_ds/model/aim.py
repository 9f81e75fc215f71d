"""The AIM pretraining model: preprocessor, prefix-causal trunk, pixel-prediction head, loss.

Module and parameter names follow the authors' inference code (apple/ml-aim, ``aim-v1``) for the
preprocessor and the trunk, so released backbones load through :mod:`aim_ds.weights.interop` with a thin
mapping. Shapes: ``B`` batch, ``N`` patches (raster order), ``D`` trunk width, ``P = p*p*3``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttentionImpl, build_mask
from .layers import LayerNorm, Linear, PatchConv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASED_NORM_EPS = 1e-6  # LayerNorm eps of the released ml-aim weights (docs/recipe.md, "Trunk")
HeadBlockKind = Literal["transformer", "mlp"]
HEAD_BLOCKS: tuple[str, ...] = ("transformer", "mlp")


@dataclass(frozen=True)
class AIMConfig:
    """Architecture of one AIM model (trunk + pixel head)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1536
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    head_width: int = 2048
    head_depth: int = 12
    head_mlp_ratio: float = 4.0
    # The authors' training config (docs/recipe.md, "Trunk"); released weights load with
    # RELEASED_NORM_EPS (aim_ds.weights.load sets it for ml-aim files).
    norm_eps: float = 1e-5
    target_eps: float = 1e-6  # per-patch target normalisation
    target_unbiased: bool = True  # the authors' training code normalises targets by the unbiased variance
    head_block: HeadBlockKind = "transformer"  # see HeadBlock: the authors' code; "mlp": the paper's wording
    attn_impl: AttentionImpl = "auto"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads != 0:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        for name in ("width", "head_width"):
            if getattr(self, name) % 4 != 0:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of 4 for the 2D sin-cos embedding")
        if self.head_block not in HEAD_BLOCKS:
            raise ValueError(f"head_block {self.head_block!r} is not one of {', '.join(HEAD_BLOCKS)}")
        if self.attn_impl not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attn_impl {self.attn_impl!r} is not one of 'auto', 'sdpa', 'flex'")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    def replace(self, **overrides) -> AIMConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(self))
            raise TypeError(f"unknown model override(s) {sorted(unknown)}; valid: {valid}")
        return dataclasses.replace(self, **overrides)


def sincos_pos_embed_2d_float64(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding ``[grid_size**2, dim]`` in raster order, float64 NumPy.

    The first half of ``dim`` encodes the column index, the second half the row index; each half
    is ``[sin(pos * w_k) for k] + [cos(pos * w_k) for k]`` with ``w_k = 10000 ** (-k / (dim / 4))``.
    Computed in NumPy so that no build context can change its precision: ``deepspeed.zero.Init``
    replaces ``torch.arange`` (and the other tensor constructors) and casts every floating result to
    the engine's dtype, so under bf16 a torch-built table loses the integers above 256 and is off by
    up to 0.06 (docs/recipe.md, "Readings").
    """
    quarter = dim // 4
    omega = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)  # [D/4]
    pos = np.arange(grid_size, dtype=np.float64)
    rows, cols = np.meshgrid(pos, pos, indexing="ij")  # [G, G]

    def encode(p: np.ndarray) -> np.ndarray:
        angles = p.reshape(-1, 1) * omega[None]  # [G*G, D/4]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [G*G, D/2]

    return np.concatenate([encode(cols), encode(rows)], axis=1)  # [G*G, D]


def sincos_pos_embed_2d(dim: int, grid_size: int, device: torch.device | str | None = None) -> Tensor:
    """:func:`sincos_pos_embed_2d_float64` as an fp32 tensor ``[grid_size**2, dim]`` on ``device``
    (None: where tensor constructors put tensors in the current context, e.g. the meta device or
    zero.Init's device). Built through ``torch.from_numpy`` and ``Tensor.to``, which zero.Init
    leaves alone (it wraps the constructors only), so it is fp32 under every build context."""
    if device is None:
        device = torch.empty(0).device  # the device only: zero.Init's wrapper may cast this to bf16
    table = torch.from_numpy(sincos_pos_embed_2d_float64(dim, grid_size))
    return table.to(device=device, dtype=torch.float32)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, 3, H, W]`` -> ``[B, N, p*p*3]``, patches in raster order, each flattened as
    (row-in-patch, col-in-patch, channel)."""
    batch, channels, height, width = images.shape
    p = patch_size
    x = images.reshape(batch, channels, height // p, p, width // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: Tensor, patch_size: int, grid_size: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, N, p*p*3]`` -> ``[B, 3, H, W]``."""
    batch = patches.shape[0]
    p = patch_size
    x = patches.reshape(batch, grid_size, grid_size, p, p, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(batch, 3, grid_size * p, grid_size * p)


def normalize_patches(patches: Tensor, eps: float = 1e-6, unbiased: bool = False) -> Tensor:
    """Per-patch target normalisation over the last dim: ``(t - mean) / sqrt(var + eps)``, with the
    unbiased (``/(P-1)``) or the population (``/P``) variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=unbiased, keepdim=True)
    return (patches - mean) / torch.sqrt(var + eps)


class PatchEmbed(nn.Module):
    """Conv2d(3, D, p, stride p) with bias, then LayerNorm (ml-aim's ``patchifier``)."""

    def __init__(self, patch_size: int, width: int, eps: float) -> None:
        super().__init__()
        self.proj = PatchConv(3, width, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm(width, eps=eps)

    def forward(self, images: Tensor) -> Tensor:
        # Images stay fp32 outside (the pixel targets are computed from them); the conv takes
        # them in its own dtype (bf16 under DeepSpeed's bf16 mode).
        x = self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        return self.norm(x)


def add_position(x: Tensor, pos_embed: Tensor) -> Tensor:
    """``x + pos_embed`` computed in fp32 and rounded once to ``x``'s dtype: the table (an fp32
    buffer) is never rounded to bf16 on its own before the sum."""
    return (x.float() + pos_embed.float()).to(x.dtype)


class Preprocessor(nn.Module):
    """Patchify and add the fixed 2D sin-cos position embedding: a non-persistent fp32 buffer (not in
    the state dict, so exports and released files rebuild it; DeepSpeed engines leave buffers in
    their dtype unless ``data_types.buffer_dtype`` is set)."""

    def __init__(self, cfg: AIMConfig) -> None:
        super().__init__()
        self.patchifier = PatchEmbed(cfg.patch_size, cfg.width, cfg.norm_eps)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.width, cfg.grid_size), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, N, D]``."""
        x = self.patchifier(images)
        return add_position(x, self.pos_embed)


class MLP(nn.Module):
    """fc1 -> exact GELU -> fc2, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=False)
        self.fc2 = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm_1(x))``, then ``x + mlp(norm_2(x))``."""

    def __init__(self, cfg: AIMConfig) -> None:
        super().__init__()
        self.norm_1 = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads)
        self.norm_2 = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: Tensor, mask=None) -> Tensor:
        x = x + self.attn(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """The stack of blocks and the final LayerNorm (``post_trunk_norm``)."""

    def __init__(self, cfg: AIMConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.post_trunk_norm = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.grad_checkpointing = False

    def forward(self, x: Tensor, mask=None) -> Tensor:
        """``[B, N, D]`` -> the normed output ``[B, N, D]`` (``mask``: see :mod:`aim_ds.model.attention`)."""
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.post_trunk_norm(x)

    def block_outputs(self, x: Tensor, indices: Sequence[int]) -> dict[int, Tensor]:
        """Raw outputs ``{i: [B, N, D]}`` of blocks ``indices`` (0-based, non-negative) under full
        attention. Stops after the last block asked for: the later blocks and the final norm do
        not change these outputs, and would cost the probe their whole forward."""
        wanted = set(indices)
        last = max(wanted)
        if last >= len(self.blocks):
            raise IndexError(f"block {last} asked for; the trunk holds {len(self.blocks)} blocks")
        out = {}
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in wanted:
                out[i] = x
        return out


class HeadBlock(nn.Module):
    """Residual MLP block of the pixel head, no attention (docs/recipe.md, "Pretraining head").

    ``"mlp"`` (the paper's wording): ``x + mlp(norm(x))``. ``"transformer"`` (the authors' training
    code: a transformer block whose attention is an identity): ``x = x + norm_1(x)``, then
    ``x + mlp(norm_2(x))``. The default is the training code's, since it produced the paper's numbers.
    """

    def __init__(self, width: int, hidden: int, eps: float, kind: HeadBlockKind = "transformer") -> None:
        super().__init__()
        self.kind = kind
        if kind == "transformer":
            self.norm_1 = LayerNorm(width, eps=eps)
            self.norm_2 = LayerNorm(width, eps=eps)
        else:
            self.norm = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "transformer":
            x = x + self.norm_1(x)  # the identity "attention" of the normed input, added back
            return x + self.mlp(self.norm_2(x))
        return x + self.mlp(self.norm(x))


class PixelHead(nn.Module):
    """Linear(D -> W) + sin-cos position, ``head_depth`` residual MLP blocks, LayerNorm,
    Linear(W -> p*p*3). Each patch is processed on its own."""

    def __init__(self, cfg: AIMConfig) -> None:
        super().__init__()
        self.embed = Linear(cfg.width, cfg.head_width)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.head_width, cfg.grid_size), persistent=False)
        hidden = int(cfg.head_width * cfg.head_mlp_ratio)
        self.blocks = nn.ModuleList(
            [HeadBlock(cfg.head_width, hidden, cfg.norm_eps, cfg.head_block) for _ in range(cfg.head_depth)]
        )
        self.norm = LayerNorm(cfg.head_width, eps=cfg.norm_eps)
        self.out = Linear(cfg.head_width, cfg.patch_dim)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, D]`` -> ``[B, N, p*p*3]``."""
        x = add_position(self.embed(x), self.pos_embed)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Each block's [B, N, 4W] hidden activation is the head's largest; recompute it.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.out(self.norm(x))


class AIM(nn.Module):
    """AIM pretraining model. ``forward(images, prefix_len)`` returns ``{"loss", "pred"}``."""

    def __init__(self, cfg: AIMConfig, name: str | None = None, *, pixel_head: bool = True) -> None:
        """``pixel_head=False``: the preprocessor and trunk only (a feature extractor; ``forward``,
        which needs the head for its loss, then raises)."""
        super().__init__()
        self.config = cfg
        self.name = name
        self.preprocessor = Preprocessor(cfg)
        self.trunk = Trunk(cfg)
        self.head: PixelHead | None = PixelHead(cfg) if pixel_head else None

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        pixel_head: bool | None = None,
        **overrides: Any,
    ) -> AIM:
        """The model saved at ``path`` (an export folder with ``config.json`` + ``model.safetensors``,
        an older export with ``model.json``, a run folder, or an ml-aim folder/file), in eval mode.
        Needs neither DeepSpeed nor the run folder. See :func:`aim_ds.model.pretrained.load_pretrained`."""
        from .pretrained import load_pretrained

        return load_pretrained(path, device=device, pixel_head=pixel_head, **overrides)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (fp32) into the folder ``path``."""
        from .pretrained import save_pretrained

        return save_pretrained(self, path)

    def rebuild_buffers(self) -> None:
        """Recompute the position tables (non-persistent buffers, never in a state dict) on the
        parameters' device: after a build on the meta device and a load with ``assign=True``."""
        device = self.preprocessor.patchifier.proj.weight.device
        cfg = self.config
        self.preprocessor.pos_embed = sincos_pos_embed_2d(cfg.width, cfg.grid_size, device)
        if self.head is not None:
            self.head.pos_embed = sincos_pos_embed_2d(cfg.head_width, cfg.grid_size, device)

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def set_grad_checkpointing(self, enabled: bool = True, *, head: bool = False) -> None:
        """Recompute each trunk block (``enabled``) and each pixel-head block (``head``) in the
        backward pass instead of storing their activations."""
        self.trunk.grad_checkpointing = enabled
        if self.head is not None:
            self.head.grad_checkpointing = head

    def sample_prefix_len(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Prefix lengths drawn uniformly from ``[1, N-1]``, ``[B]`` int64 on the CPU."""
        return torch.randint(1, self.num_patches, (batch_size,), generator=generator)

    def forward_trunk(self, images: Tensor, prefix_len: Tensor | None) -> Tensor:
        """``[B, 3, H, W]`` -> normed trunk output ``[B, N, D]`` under the prefix-causal mask."""
        x = self.preprocessor(images)
        mask = build_mask(prefix_len, x.shape[1], self.config.attn_impl, x.device)
        out = self.trunk(x, mask)
        return out

    def targets(self, images: Tensor) -> Tensor:
        """Per-patch normalised pixel targets ``[B, N, p*p*3]`` in fp32."""
        patches = patchify(images.float(), self.config.patch_size)
        return normalize_patches(patches, self.config.target_eps, self.config.target_unbiased)

    def loss_mask(self, prefix_len: Tensor, num_patches: int) -> Tensor:
        """``[B, N-1]`` bool: prediction row ``k`` (of patch ``k+1``) counts iff ``k + 1 >= S``."""
        rows = torch.arange(num_patches - 1, device=prefix_len.device)
        return rows[None, :] + 1 >= prefix_len[:, None]

    def forward_loss(self, pred: Tensor, images: Tensor, prefix_len: Tensor) -> Tensor:
        """Token-level mean over the batch of the per-patch MSE on non-prefix targets, in fp32."""
        with torch.autocast(device_type=pred.device.type, enabled=False):
            target = self.targets(images)[:, 1:]  # [B, N-1, P]: patch k+1 for row k
            per_patch = (pred[:, :-1].float() - target).pow(2).mean(dim=-1)  # [B, N-1]
            mask = self.loss_mask(prefix_len.to(pred.device), target.shape[1] + 1).float()
            return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, images: Tensor, prefix_len: Tensor | None = None) -> dict[str, Tensor]:
        """``images`` ``[B, 3, H, W]`` ImageNet-normalised; ``prefix_len`` ``[B]`` int64 in ``[1, N-1]``
        or None (drawn from torch's default generator). Returns ``loss`` (scalar) and ``pred``
        ``[B, N, p*p*3]``, row ``k`` predicting patch ``k+1`` (the last row predicts nothing)."""
        batch = images.shape[0]
        if prefix_len is None:
            prefix_len = self.sample_prefix_len(batch)
        if prefix_len.shape != (batch,):
            raise ValueError(f"prefix_len must have shape [{batch}], got {tuple(prefix_len.shape)}")
        if prefix_len.device.type == "cpu":
            # Checked on the host, before the copy: a check of a device tensor would stall the
            # host until the GPU catches up, every step. Device tensors are the caller's to check.
            check_prefix_len(prefix_len, self.num_patches)
        prefix_len = prefix_len.to(images.device, torch.long, non_blocking=True)
        if self.head is None:
            raise RuntimeError(
                f"{self.name or 'this AIM'} was built without its pixel head (pixel_head=False): it has no loss; "
                "use forward_features"
            )
        features = self.forward_trunk(images, prefix_len)
        pred = self.head(features)
        return {"loss": self.forward_loss(pred, images, prefix_len), "pred": pred}

    def extract_features(self, images: Tensor, layers: Sequence[int] | None = None) -> Tensor:
        """Full bidirectional attention. ``layers=None``: the final normed output ``[B, N, D]``;
        a list of block indices: the mean of those blocks' raw outputs ``[B, N, D]``, computed
        without running the blocks after the last one listed (a probe on blocks 14-19 of 32 runs
        20 blocks, not 32)."""
        x = self.preprocessor(images)
        if layers is None:
            out = self.trunk(x, None)
            return out
        layers = [int(i) for i in layers]
        depth = self.config.depth
        bad = [i for i in layers if not -depth <= i < depth]
        if bad or not layers:
            raise ValueError(f"layers {layers} must be a non-empty list of block indices in [0, {depth - 1}]")
        layers = [i % depth for i in layers]
        by_index = self.trunk.block_outputs(x, layers)
        # A layer listed twice counts twice in the mean, as the caller asked.
        return torch.stack([by_index[i] for i in layers]).mean(dim=0)

    def forward_features(self, images: Tensor, blocks: str | Sequence[int] | None = None) -> Tensor:
        """The trunk as a feature extractor, under full bidirectional attention (as at evaluation).

        ``images`` ``[B, 3, H, W]``, ImageNet-normalised (mean 0.485 0.456 0.406, std 0.229 0.224 0.225),
        ``H = W = config.image_size``. Returns tokens ``[B, N, D]``:

        - ``blocks=None``: the final normed output (after ``post_trunk_norm``), as timm's
          ``forward_features``;
        - ``"last"``, ``"best"`` or block indices: the mean of those blocks' raw outputs, the
          features the attentive probe trains on (``"last"``: the final 6 blocks; ``"best"``: the
          paper's best 6 for this size, see :func:`aim_ds.model.registry.probe_blocks`).

        Gradients flow (fine-tuning); wrap in ``torch.inference_mode()`` to extract only.
        """
        if blocks is None:
            return self.extract_features(images)
        from .registry import probe_blocks

        return self.extract_features(images, probe_blocks(blocks, self.name, self.config.depth))


def check_prefix_len(prefix_len: Tensor, num_patches: int) -> None:
    """Raise ValueError unless every value of the host tensor ``prefix_len`` ``[B]`` lies in
    ``[1, num_patches - 1]``. Reads through NumPy: no tensor scalar read, no device sync."""
    values = prefix_len.detach().numpy()
    if values.size and (values.min() < 1 or values.max() >= num_patches):
        raise ValueError(f"prefix_len values must lie in [1, {num_patches - 1}], got {values.tolist()}")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def trunk_parameter_count(model: AIM) -> int:
    """Preprocessor + trunk parameters: the figure Table 1 quotes."""
    return count_parameters(model.preprocessor) + count_parameters(model.trunk)
