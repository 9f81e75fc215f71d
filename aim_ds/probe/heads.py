"""Probe heads: the paper's attentive pooling classifier and a linear probe, their ml-aim layout,
and their files.

Shapes: ``B`` batch, ``N`` patch tokens, ``D`` trunk width, ``C`` classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import atomic_path, check_regular_file
from ..weights.load import WeightsError, read_errors, read_state_dict_file
from .config import HEAD_TYPES

_BACKBONE_PREFIXES = ("preprocessor.", "trunk.")


class AttentiveProbe(nn.Module):
    """The paper's attentive pooling classifier (ml-aim's names: ``bn``, ``cls_token``, ``k``, ``v``,
    ``linear``, so ``"head." + key`` is the released layout; docs/recipe.md, "Attentive probe").

    BatchNorm1d(D, affine=False, eps 1e-6) over the tokens; ``num_queries`` learnable queries
    (init ``0.02 * randn``) attend, per head, over the keys ``k(x)`` and values ``v(x)`` (no
    bias); the query outputs are averaged, then ``linear`` maps ``D -> C`` (without a bias by default, as
    the authors' current probe; older released heads with ``head.linear.bias`` load with ``bias=True``).
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, *, num_queries: int = 1, bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, num_queries, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, D]`` -> logits ``[B, C]``."""
        batch, tokens, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        # BatchNorm1d wants channels second: statistics per channel over batch and tokens.
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        queries = self.cls_token.shape[1]
        q = self.cls_token.expand(batch, -1, -1).reshape(batch, queries, heads, head_dim).transpose(1, 2)
        k = self.k(x).reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # [B, H, N, hd]
        v = self.v(x).reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)  # [B, H, Q, hd]
        pooled = pooled.transpose(1, 2).reshape(batch, queries, dim).mean(dim=1)  # [B, D]
        return self.linear(pooled)


class LinearProbe(nn.Module):
    """Mean over tokens, BatchNorm1d(D, affine=False, eps 1e-6), Linear(D -> C): the usual linear
    probe, trained beside the attentive one to show what attention pooling adds."""

    def __init__(self, dim: int, num_classes: int, *, bias: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, D]`` -> logits ``[B, C]``."""
        return self.linear(self.bn(x.mean(dim=1)))


def build_head(
    kind: str, dim: int, num_heads: int, num_classes: int, *, num_queries: int = 1, seed: int = 0, bias: bool = False
) -> nn.Module:
    """A freshly initialised head. The init depends on ``seed`` and ``kind`` only, so that heads
    of different LRs start from the same point and differ by their LR alone. ``bias``: a bias on the
    classifier; the authors' current probe has none (docs/recipe.md, "Attentive probe")."""
    if kind not in HEAD_TYPES:
        raise ValueError(f"unknown head type {kind!r}; known: {', '.join(HEAD_TYPES)}")
    # fork_rng: seeding here must not move the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + HEAD_TYPES.index(kind))
        if kind == "attentive":
            head: nn.Module = AttentiveProbe(dim, num_heads, num_classes, num_queries=num_queries, bias=bias)
        else:
            head = LinearProbe(dim, num_classes, bias=bias)
        # A small classifier init keeps the first logits near uniform (as MAE's probes do).
        nn.init.trunc_normal_(head.linear.weight, std=0.01)
        if head.linear.bias is not None:
            nn.init.zeros_(head.linear.bias)
    return head


def head_to_ml_aim(head: AttentiveProbe) -> dict[str, Tensor]:
    """Our attentive head -> the released ml-aim key layout (``head.cls_token`` ...)."""
    if not isinstance(head, AttentiveProbe):
        raise TypeError("only the attentive head has an ml-aim layout")
    return {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}


def head_from_state_dict(state_dict: dict[str, Tensor], num_heads: int) -> tuple[str, nn.Module]:
    """A head from our layout or the ml-aim one (``head.`` prefix, optional ``head.linear.bias``).

    The head type, width, class count, query count and bias are read off the keys and shapes;
    ``num_heads`` (not stored in the file) comes from the trunk. Returns ``(kind, head)``.
    """
    sd = dict(state_dict)
    if any(k.startswith("head.") for k in sd):
        sd = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "linear.weight" not in sd:
        raise KeyError(f"not a probe head: no (head.)linear.weight among keys {sorted(sd)[:10]}")
    num_classes, dim = sd["linear.weight"].shape
    bias = "linear.bias" in sd
    if "cls_token" in sd:
        kind = "attentive"
        head: nn.Module = AttentiveProbe(dim, num_heads, num_classes, num_queries=sd["cls_token"].shape[1], bias=bias)
    else:
        kind = "linear"
        head = LinearProbe(dim, num_classes, bias=bias)
    expected = set(head.state_dict())
    # Older BatchNorm states lack num_batches_tracked; it does not affect evaluation.
    sd.setdefault("bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(f"{kind} probe head: missing keys {missing}, unexpected keys {unexpected}")
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return kind, head


def save_head(head: nn.Module, path: str | os.PathLike, metadata: dict[str, Any], *, ml_aim: bool = False) -> None:
    """Write ``head`` as safetensors (ours, or the ml-aim layout), atomically; ``metadata``
    values are stored as JSON strings."""
    from safetensors.torch import save_file

    state = head_to_ml_aim(head) if ml_aim else {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta["layout"] = json.dumps("ml-aim" if ml_aim else "aim-ds")
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and JSON-decoded metadata of a safetensors file, in one open."""
    from safetensors import safe_open

    metadata: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as f:
        for key, value in (f.metadata() or {}).items():
            try:
                metadata[key] = json.loads(value)
            except json.JSONDecodeError:
                metadata[key] = value
        # A released file may hold backbone and head together: read only the head's tensors.
        state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(_BACKBONE_PREFIXES)}
    return state, metadata


def check_head_file(path: str | os.PathLike) -> Path:
    """``path`` when it is a regular file; else :class:`~aim_ds.weights.load.WeightsError` naming it and
    what it is (missing, a FIFO, a socket, a device, a folder). Reading a FIFO would block forever (the
    safetensors reader opens the file blocking), so every ``--head`` passes this before anything opens it."""
    return check_regular_file(path, "head file", WeightsError)


def load_head(path: str | os.PathLike, num_heads: int) -> tuple[str, nn.Module, dict[str, Any]]:
    """``(kind, head, metadata)`` from a safetensors or torch file in either layout. A released
    ml-aim checkpoint holding backbone and head together works too (the backbone keys are ignored).
    Anything but a regular file holding a head raises :class:`~aim_ds.weights.load.WeightsError` naming
    ``path``."""
    path = check_head_file(path)
    if path.suffix == ".safetensors":
        with read_errors(path, "a safetensors file"):
            state, metadata = _read_safetensors(path)
    else:
        state, metadata = read_state_dict_file(path), {}
        state = {k: v for k, v in state.items() if not k.startswith(_BACKBONE_PREFIXES)}
    try:
        kind, head = head_from_state_dict(state, num_heads)
    except KeyError as exc:  # a weights file without a head, or a head of another layout
        raise WeightsError(f"{path}: {exc.args[0]}") from None
    return kind, head, metadata
