"""Attentive and linear probes on a frozen AIM trunk: config, heads, features, training, evaluation.

The paper evaluates a frozen trunk with an *attentive probe*: the mean of 6 consecutive blocks'
outputs, BatchNorm over tokens, one learnable query attending over the patch tokens, a linear
classifier (AIM_FACTS, "Attentive probe"). A linear probe on mean-pooled features is trained beside
it for comparison. Since the paper sweeps the learning rate, one run trains one head per (head
type, LR), every head fed the same trunk output, each with its own AdamW and schedule.

Shapes: ``B`` batch, ``N`` patch tokens, ``D`` trunk width, ``C`` classes.

With ``train.augment=false`` the trunk sees every image once: features are written to an on-disk
cache keyed by the trunk's weights, the layers and the data, and every epoch and every LR reads
them back. With augmentation the trunk runs on every training batch (random crops differ).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .optim import lr_at_step
from .registry import get_model_spec

HEAD_TYPES = ("attentive", "linear")
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE_FORMAT = 1  # bump when the cache file layout or the feature definition changes


# =============================================================================================
# Config


@dataclass
class DataConfig:
    """Where the labelled betons are and how images are cut."""

    train_path: str = ""  # labelled .beton (python -m data_prep imagefolder ...)
    val_path: str = ""
    image_size: int = 0  # 0: the model's image_size
    resize_size: int = 0  # eval transform's shorter side before the centre crop; 0: image_size * 256 / 224
    scale: tuple[float, float] = (0.08, 1.0)  # training random-resized-crop area range
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip: bool = True
    num_workers: int = 8
    eval_batch_size: int = 0  # images per rank for feature extraction and evaluation; 0: train per-rank batch


@dataclass
class FeaturesConfig:
    """Which trunk blocks feed the heads, and the on-disk feature cache."""

    layers: list[int] | str = "last"  # "last" (final 6 blocks), "best" (AIM_FACTS), or block indices
    cache: bool = True  # keep extracted features (train.augment=false) for later runs; false: scratch, removed
    cache_dir: str = ""  # "": <out_dir>/feature_cache
    cache_dtype: str = "bfloat16"  # float32 | bfloat16 | float16 on disk


@dataclass
class HeadsConfig:
    """Which heads to train."""

    types: list[str] = field(default_factory=lambda: ["attentive", "linear"])
    num_queries: int = 1  # learnable queries of the attentive head (the paper: 1)


@dataclass
class TrainConfig:
    """The probe recipe (AIM_FACTS: the authors' AIMv2 probe recipe)."""

    epochs: int = 100
    warmup_epochs: float = 5.0
    batch_size: int = 1024  # global, over all ranks
    lrs: list[float] = field(default_factory=lambda: [5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3])
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 3.0  # max global grad norm per head; 0 disables
    label_smoothing: float = 0.0
    augment: bool = True  # random-resized crop + flip; false: eval transform, cached features
    seed: int = 0
    eval_every_epochs: int = 0  # 0: evaluate once, at the end
    log_every_steps: int = 50


@dataclass
class ProbeConfig:
    """A probe run. Load with ``aim_ds.config.load_config(ProbeConfig, path, overrides)``."""

    model: str = "aim-test"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    out_dir: str = "runs/probe"
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def validate_config(cfg: ProbeConfig, *, eval_only: bool = False) -> None:
    """Raise ``ValueError`` naming the key for a config that cannot run."""
    from .config import ConfigError

    for kind in cfg.heads.types:
        if kind not in HEAD_TYPES:
            raise ConfigError(f"heads.types: unknown head type {kind!r}; known: {', '.join(HEAD_TYPES)}")
    if not cfg.heads.types and not eval_only:
        raise ConfigError("heads.types is empty; give at least one of " + ", ".join(HEAD_TYPES))
    if not eval_only and cfg.train.epochs > 0:
        if not cfg.train.lrs:
            raise ConfigError("train.lrs is empty; give at least one peak learning rate")
        if any(lr <= 0 for lr in cfg.train.lrs):
            raise ConfigError(f"train.lrs must be positive, got {cfg.train.lrs}")
        if len(set(cfg.train.lrs)) != len(cfg.train.lrs):
            raise ConfigError(f"train.lrs has duplicates: {cfg.train.lrs}")
        if not cfg.data.train_path:
            raise ConfigError("data.train_path is not set (a labelled .beton)")
    if not cfg.data.val_path:
        raise ConfigError("data.val_path is not set (a labelled .beton)")
    if cfg.features.cache_dtype not in CACHE_DTYPES:
        raise ConfigError(f"features.cache_dtype {cfg.features.cache_dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
    if cfg.train.batch_size <= 0:
        raise ConfigError(f"train.batch_size must be positive, got {cfg.train.batch_size}")
    if cfg.train.epochs < 0:
        raise ConfigError(f"train.epochs must be >= 0, got {cfg.train.epochs}")
    if cfg.heads.num_queries < 1:
        raise ConfigError(f"heads.num_queries must be >= 1, got {cfg.heads.num_queries}")


def resolve_layers(layers: Sequence[int] | str, model_name: str, depth: int) -> list[int]:
    """Block indices (0-based) whose outputs are averaged into the probe features.

    ``"last"``: the final 6 blocks (all of them when ``depth < 6``). ``"best"``: the registry's
    ``best_probe_layers`` (AIM_FACTS: 14-19 for 0.6B and 7B, 12-17 for 1B and 3B), falling back to
    ``"last"`` for a model without one. A list: those indices (negative ones count from the end).
    """
    if isinstance(layers, str):
        choice = layers.strip().lower()
        if choice == "last":
            return list(range(max(0, depth - 6), depth))
        if choice == "best":
            best = tuple(getattr(get_model_spec(model_name), "best_probe_layers", ()) or ())
            if best and max(best) < depth:
                return list(best)
            return list(range(max(0, depth - 6), depth))
        raise ValueError(f"features.layers: {layers!r} is not 'last', 'best' or a list of block indices")
    out = []
    for i in layers:
        if not -depth <= int(i) < depth:
            raise ValueError(f"features.layers: block {i} out of range for depth {depth}")
        out.append(int(i) % depth)
    if not out:
        raise ValueError("features.layers: empty list")
    return out


# =============================================================================================
# Heads


class AttentiveProbe(nn.Module):
    """The paper's attentive pooling classifier (ml-aim's names: ``bn``, ``cls_token``, ``k``, ``v``,
    ``linear``, so ``"head." + key`` is the released layout).

    BatchNorm1d(D, affine=False, eps 1e-6) over the tokens; ``num_queries`` learnable queries
    (init ``0.02 * randn``) attend, per head, over the keys ``k(x)`` and values ``v(x)`` (no
    bias); the query outputs are averaged, then ``linear`` maps ``D -> C``.
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, *, num_queries: int = 1, bias: bool = True) -> None:
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

    def __init__(self, dim: int, num_classes: int, *, bias: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, D]`` -> logits ``[B, C]``."""
        return self.linear(self.bn(x.mean(dim=1)))


def build_head(
    kind: str, dim: int, num_heads: int, num_classes: int, *, num_queries: int = 1, seed: int = 0
) -> nn.Module:
    """A freshly initialised head. The init depends on ``seed`` and ``kind`` only, so that heads
    of different LRs start from the same point and differ by their LR alone."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed * 1000 + HEAD_TYPES.index(kind))
    try:
        if kind == "attentive":
            head: nn.Module = AttentiveProbe(dim, num_heads, num_classes, num_queries=num_queries)
        elif kind == "linear":
            head = LinearProbe(dim, num_classes)
        else:
            raise ValueError(f"unknown head type {kind!r}; known: {', '.join(HEAD_TYPES)}")
        # A small classifier init keeps the first logits near uniform (as MAE's probes do).
        nn.init.trunc_normal_(head.linear.weight, std=0.01)
        if head.linear.bias is not None:
            nn.init.zeros_(head.linear.bias)
    finally:
        torch.random.set_rng_state(generator_state)
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
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
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
    if "bn.num_batches_tracked" not in sd:
        sd["bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(f"{kind} probe head: missing keys {missing}, unexpected keys {unexpected}")
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return kind, head


def save_head(head: nn.Module, path: str | os.PathLike, metadata: dict[str, Any], *, ml_aim: bool = False) -> None:
    """Write ``head`` as safetensors (ours, or the ml-aim layout), atomically; ``metadata``
    values are stored as JSON strings."""
    from safetensors.torch import save_file

    path = Path(path)
    state = head_to_ml_aim(head) if ml_aim else {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta["layout"] = json.dumps("ml-aim" if ml_aim else "aim-ds")
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_head(path: str | os.PathLike, num_heads: int) -> tuple[str, nn.Module, dict[str, Any]]:
    """``(kind, head, metadata)`` from a safetensors or torch file in either layout. A released
    ml-aim checkpoint holding backbone and head together works too (the backbone keys are ignored)."""
    from .weights import read_state_dict_file

    path = Path(path)
    metadata: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key, value in (f.metadata() or {}).items():
                try:
                    metadata[key] = json.loads(value)
                except json.JSONDecodeError:
                    metadata[key] = value
    state = read_state_dict_file(path)
    state = {k: v for k, v in state.items() if not k.startswith(("preprocessor.", "trunk."))}
    kind, head = head_from_state_dict(state, num_heads)
    return kind, head, metadata


# =============================================================================================
# Distributed helpers (torch.distributed, when launched with WORLD_SIZE > 1)


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the process group set up by ``deepspeed``/``torchrun`` (env ``WORLD_SIZE > 1``): NCCL
    on CUDA, gloo on the CPU. Returns ``(rank, world_size)``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return world()


def _all_reduce_(tensor: Tensor, op: Any = None) -> Tensor:
    if world()[1] > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _min_across_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    return int(_all_reduce_(t, dist.ReduceOp.MIN if world()[1] > 1 else None).item())


# =============================================================================================
# The bank of heads: one per (type, LR), one optimizer each


@dataclass
class HeadSlot:
    """One trained head: its type, peak LR, module and optimizer."""

    name: str  # "attentive_lr0.001": file stem and results key
    kind: str
    lr: float | None  # None: a loaded head whose file does not say
    head: nn.Module
    optimizer: torch.optim.Optimizer | None


def _param_groups(head: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay the projection and classifier matrices only; the query token and biases are
    # offsets that weight decay would pull towards an arbitrary zero.
    decay = [p for n, p in head.named_parameters() if p.ndim >= 2 and n != "cls_token"]
    no_decay = [p for n, p in head.named_parameters() if not (p.ndim >= 2 and n != "cls_token")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class HeadBank:
    """Every head of a run, trained together on the same features.

    :meth:`train_step` takes one batch of trunk features and updates every head with its own LR
    (a pure function of the step), gradient clipping and AdamW. Across ranks the heads' gradients
    are averaged with one all-reduce per step (a DDP-style sync; the trunk needs none).
    """

    def __init__(self, slots: list[HeadSlot], *, label_smoothing: float = 0.0, grad_clip: float = 3.0) -> None:
        self.slots = slots
        self.label_smoothing = label_smoothing
        self.grad_clip = grad_clip

    @classmethod
    def create(
        cls,
        kinds: Sequence[str],
        lrs: Sequence[float],
        *,
        dim: int,
        num_heads: int,
        num_classes: int,
        train: TrainConfig,
        num_queries: int = 1,
        device: torch.device | str = "cpu",
    ) -> HeadBank:
        slots = []
        for kind in kinds:
            for lr in lrs:
                head = build_head(kind, dim, num_heads, num_classes, num_queries=num_queries, seed=train.seed).to(
                    device
                )
                optimizer = torch.optim.AdamW(
                    _param_groups(head, train.weight_decay), lr=lr, betas=tuple(train.betas), eps=1e-8
                )
                slots.append(HeadSlot(f"{kind}_lr{lr:g}", kind, float(lr), head, optimizer))
        bank = cls(slots, label_smoothing=train.label_smoothing, grad_clip=train.grad_clip)
        bank.broadcast_parameters()
        return bank

    def broadcast_parameters(self) -> None:
        """Make every rank start from rank 0's heads (they are seeded alike; this makes sure)."""
        if world()[1] > 1:
            for slot in self.slots:
                for tensor in list(slot.head.parameters()) + list(slot.head.buffers()):
                    dist.broadcast(tensor.data, src=0)

    def train(self, mode: bool = True) -> None:
        for slot in self.slots:
            slot.head.train(mode)

    def train_step(self, feats: Tensor, labels: Tensor, lrs: dict[str, float]) -> dict[str, float]:
        """Update every head on ``feats`` ``[B, N, D]`` (fp32, no grad) and ``labels`` ``[B]``
        with learning rate ``lrs[slot.name]``. Returns each head's loss (this rank's batch)."""
        self.train(True)
        losses = []
        for slot in self.slots:
            logits = slot.head(feats)
            losses.append(F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing))
        # Heads share no parameters, so one backward of the sum gives each head its own gradient.
        torch.stack(losses).sum().backward()
        losses = [loss.detach() for loss in losses]
        self._all_reduce_grads()
        for slot in self.slots:
            assert slot.optimizer is not None
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(slot.head.parameters(), self.grad_clip)
            for group in slot.optimizer.param_groups:
                group["lr"] = lrs[slot.name]
            slot.optimizer.step()
            slot.optimizer.zero_grad(set_to_none=True)
        return {slot.name: loss.item() for slot, loss in zip(self.slots, losses, strict=True)}

    def _all_reduce_grads(self) -> None:
        _, world_size = world()
        if world_size == 1:
            return
        grads = [p.grad for slot in self.slots for p in slot.head.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sync_batchnorm_stats(self) -> None:
        """Average BatchNorm running statistics over ranks (each rank normalised its own shard's
        batches), so that evaluation and saved heads are the same on every rank."""
        _, world_size = world()
        if world_size == 1:
            return
        for slot in self.slots:
            for buffer in slot.head.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer)
                    buffer /= world_size

    @torch.no_grad()
    def evaluate(self, batches: Iterator[tuple[Tensor, Tensor]]) -> dict[str, dict[str, float]]:
        """Top-1 and top-5 accuracy (fractions) of every head over all ranks' ``(feats, labels)``."""
        self.train(False)
        counts = torch.zeros(len(self.slots), 2, dtype=torch.float64)
        total = torch.zeros(1, dtype=torch.float64)
        for feats, labels in batches:
            total += labels.shape[0]
            for i, slot in enumerate(self.slots):
                logits = slot.head(feats)
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices  # [B, k]
                hit = top == labels[:, None]
                counts[i, 0] += hit[:, 0].sum().item()
                counts[i, 1] += hit.any(dim=1).sum().item()
        if world()[1] > 1:
            device = feats_device(self)
            stacked = torch.cat([counts.flatten(), total]).to(device)
            dist.all_reduce(stacked)
            stacked = stacked.cpu()
            counts, total = stacked[:-1].view_as(counts), stacked[-1:]
        n = max(1.0, float(total.item()))
        return {
            slot.name: {"top1": counts[i, 0].item() / n, "top5": counts[i, 1].item() / n, "images": int(total.item())}
            for i, slot in enumerate(self.slots)
        }


def feats_device(bank: HeadBank) -> torch.device:
    return next(bank.slots[0].head.parameters()).device


# =============================================================================================
# Feature cache


def data_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a beton cheaply: its resolved path, size and modification time (hashing
    a 100+ GB beton would cost more than the features; rewriting it changes the mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of ``parts`` (plain JSON data)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


class FeatureStore:
    """Features ``[M, N, D]`` and labels ``[M]`` of one split (this rank's shard) on disk.

    Files: ``<stem>.features`` (raw rows, ``dtype``), ``<stem>.labels.npy``, ``<stem>.json``. The
    JSON is written last, after the data files are renamed into place, so a store counts only
    when complete; a run killed mid-extraction leaves ``.tmp`` files that are rewritten.
    """

    def __init__(self, stem: Path) -> None:
        self.stem = stem
        meta = json.loads(stem.with_suffix(".json").read_text())
        self.meta = meta
        self.count = int(meta["count"])
        self.shape = tuple(meta["shape"])  # (N, D)
        self.dtype = CACHE_DTYPES[meta["dtype"]]
        np_dtype = np.float32 if self.dtype == torch.float32 else np.uint16
        self._rows = np.memmap(stem.with_suffix(".features"), dtype=np_dtype, mode="r", shape=(self.count, *self.shape))
        self.labels = torch.from_numpy(np.load(stem.with_suffix(".labels.npy")))

    @staticmethod
    def exists(stem: Path) -> bool:
        return stem.with_suffix(".json").is_file()

    def rows(self, index: Tensor | slice) -> Tensor:
        """Rows ``[b, N, D]`` as fp32 for ``index`` (sorted indices read faster from disk)."""
        idx = index.numpy() if isinstance(index, Tensor) else index
        raw = torch.from_numpy(np.ascontiguousarray(self._rows[idx]))
        if self.dtype != torch.float32:
            raw = raw.view(self.dtype)
        return raw.float()

    @classmethod
    def write(
        cls, stem: Path, batches: Iterator[tuple[Tensor, Tensor]], dtype: str, info: dict[str, Any]
    ) -> FeatureStore:
        """Stream ``(feats [B, N, D], labels [B])`` to disk and return the finished store."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        tmp_rows = stem.with_suffix(".features.tmp")
        torch_dtype = CACHE_DTYPES[dtype]
        labels: list[Tensor] = []
        shape: tuple[int, ...] | None = None
        count = 0
        with open(tmp_rows, "wb") as f:
            for feats, lab in batches:
                rows = feats.detach().to("cpu", torch_dtype).contiguous()
                if torch_dtype != torch.float32:
                    rows = rows.view(torch.int16)  # numpy has no bf16: store the raw 16-bit patterns
                f.write(rows.numpy().tobytes())
                labels.append(lab.detach().cpu().long())
                shape = tuple(feats.shape[1:])
                count += feats.shape[0]
        if shape is None:
            raise RuntimeError(f"no images to extract features from for {stem.name}")
        tmp_labels = stem.with_suffix(".labels.tmp.npy")
        np.save(tmp_labels, torch.cat(labels).numpy())
        os.replace(tmp_rows, stem.with_suffix(".features"))
        os.replace(tmp_labels, stem.with_suffix(".labels.npy"))
        meta = {"count": count, "shape": list(shape), "dtype": dtype, **info}
        tmp_meta = stem.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, stem.with_suffix(".json"))
        return cls(stem)


def iterate_store(
    store: FeatureStore,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches ``(feats [b, N, D] fp32, labels [b])`` from a store; a seeded shuffle per call."""
    if shuffle:
        order = torch.randperm(store.count, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(store.count)
    stop = (store.count // batch_size) * batch_size if drop_last else store.count
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        idx_sorted, _ = idx.sort()  # read in file order; the batch's order does not matter
        yield (
            store.rows(idx_sorted).to(device, non_blocking=True),
            store.labels[idx_sorted].to(device, non_blocking=True),
        )


# =============================================================================================
# The run


@dataclass
class ProbeContext:
    """Everything a run builds before training: trunk, data sources, geometry."""

    cfg: ProbeConfig
    trunk: Any  # aim_ds.weights.FrozenTrunk
    weights_fingerprint: str
    weights_path: str
    weights_source: str
    layers: list[int]
    class_names: list[str]
    device: torch.device
    rank: int
    world_size: int
    image_size: int
    resize_size: int
    per_rank_batch: int
    eval_batch: int


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def _is_main() -> bool:
    return world()[0] == 0


def _log(msg: str) -> None:
    if _is_main():
        print(msg, flush=True)


def _progress(iterable: Any = None, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not _is_main(), dynamic_ncols=True, **kwargs)


def prepare(cfg: ProbeConfig, weights: str | os.PathLike, *, train: bool = True) -> ProbeContext:
    """Set up devices, the process group, the frozen trunk and the data geometry. ``train=False``
    (evaluation only) reads the class list from the val beton and leaves the train one alone."""
    from .data import read_class_names
    from .weights import build_frozen_trunk, detect_source, load_trunk_state_dict

    device = _resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world_size = init_distributed(device.type)
    spec_cfg = get_model_spec(cfg.model).config.replace(**cfg.model_overrides)
    layers = resolve_layers(cfg.features.layers, cfg.model, spec_cfg.depth)
    load_from, source = Path(weights), None
    if world_size > 1 and detect_source(weights) == "deepspeed":
        # Consolidating ZeRO shards reads every optimizer state (~12 bytes per parameter): do it
        # once on rank 0, hand the backbone to the other ranks as a file.
        load_from = Path(cfg.out_dir) / ".trunk_from_deepspeed.safetensors"
        if rank == 0:
            from safetensors.torch import save_file

            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            tmp = load_from.with_name(load_from.name + ".tmp")
            save_file(load_trunk_state_dict(weights), str(tmp))
            os.replace(tmp, load_from)
        dist.barrier()
        source = "deepspeed"
    trunk, loaded = build_frozen_trunk(cfg.model, load_from, layers=layers, device=device, **cfg.model_overrides)
    if source is not None:
        dist.barrier()  # every rank has read the hand-over file
        if rank == 0:
            load_from.unlink(missing_ok=True)
    image_size = cfg.data.image_size or spec_cfg.image_size
    if image_size != spec_cfg.image_size:
        raise ValueError(
            f"data.image_size {image_size} differs from {cfg.model}'s image_size {spec_cfg.image_size} "
            "(the fixed position embedding is built for that grid); set model_overrides.image_size too"
        )
    resize_size = cfg.data.resize_size or int(round(image_size * 256 / 224))
    if cfg.train.batch_size % world_size:
        raise ValueError(
            f"train.batch_size {cfg.train.batch_size} is not divisible by the world size {world_size}; "
            f"set train.batch_size to a multiple of {world_size}"
        )
    per_rank = cfg.train.batch_size // world_size
    class_names = list(read_class_names(cfg.data.train_path if train else cfg.data.val_path))
    if train:
        val_names = list(read_class_names(cfg.data.val_path))
        if val_names != class_names:
            raise ValueError(
                f"the train and val betons have different class lists ({len(class_names)} vs {len(val_names)} classes); "
                "write both from folders with the same class sub-folders"
            )
    return ProbeContext(
        cfg=cfg,
        trunk=trunk,
        weights_fingerprint=loaded.fingerprint(),
        weights_path=str(weights),
        weights_source=source or loaded.source,
        layers=layers,
        class_names=class_names,
        device=device,
        rank=rank,
        world_size=world_size,
        image_size=image_size,
        resize_size=resize_size,
        per_rank_batch=per_rank,
        eval_batch=cfg.data.eval_batch_size or per_rank,
    )


def _loader_device(ctx: ProbeContext) -> torch.device | None:
    return ctx.device if ctx.device.type == "cuda" else None


def _eval_images(ctx: ProbeContext, path: str) -> Any:
    from .data import build_eval_loader

    return build_eval_loader(
        path,
        batch_size=ctx.eval_batch,
        image_size=ctx.image_size,
        resize_size=ctx.resize_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=ctx.cfg.data.num_workers,
        device=_loader_device(ctx),
    )


def _iterate_loader(loader: Any, epoch: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    if epoch is not None and hasattr(loader, "iter_epoch"):
        yield from loader.iter_epoch(epoch)
    elif hasattr(loader, "iter_epoch"):
        yield from loader.iter_epoch(0)
    else:
        yield from loader


def _trunk_batches(
    ctx: ProbeContext, images: Iterator[tuple[Tensor, Tensor]], desc: str | None, total: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` -> ``(features, labels)`` through the frozen trunk, on ``ctx.device``;
    a progress bar named ``desc`` unless it is None (training has its own bar)."""
    if desc is not None:
        images = _progress(images, desc=desc, total=total, leave=False)
    for imgs, labels in images:
        yield ctx.trunk(imgs), labels.to(ctx.device, non_blocking=True).long()


def feature_store(ctx: ProbeContext, split: str, path: str, cache_dir: Path) -> FeatureStore:
    """This rank's cached features of ``split`` (extracted now if no valid cache exists).

    The key covers the trunk's weights (content hash), the architecture, the layers, the beton
    (path, size, mtime), the eval transform, the on-disk dtype and the rank's shard, so a stale
    cache is never read. Returns the store; its ``meta["reused"]`` says whether it was a hit.
    """
    cfg = ctx.cfg
    parts = {
        "format": _CACHE_FORMAT,
        "weights": ctx.weights_fingerprint,
        "model": cfg.model,
        "model_overrides": cfg.model_overrides,
        "layers": ctx.layers,
        "data": data_fingerprint(path),
        "image_size": ctx.image_size,
        "resize_size": ctx.resize_size,
        "dtype": cfg.features.cache_dtype,
        "shard": [ctx.rank, ctx.world_size],
    }
    stem = cache_dir / f"{split}-{cache_key(parts)}-rank{ctx.rank}of{ctx.world_size}"
    if FeatureStore.exists(stem):
        store = FeatureStore(stem)
        store.meta["reused"] = True
        _log(f"[probe] {split}: reusing cached features {stem.name} ({store.count} images per rank)")
        return store
    _log(f"[probe] {split}: extracting features once into {stem.parent}")
    loader = _eval_images(ctx, path)
    total = len(loader) if hasattr(loader, "__len__") else None
    store = FeatureStore.write(
        stem,
        _trunk_batches(ctx, _iterate_loader(loader), f"features {split}", total),
        cfg.features.cache_dtype,
        {"key": parts},
    )
    store.meta["reused"] = False
    return store


def run_probe(
    cfg: ProbeConfig,
    weights: str | os.PathLike,
    *,
    head_paths: Sequence[str | os.PathLike] = (),
    eval_only: bool = False,
) -> dict[str, Any]:
    """Train (unless ``eval_only`` or ``train.epochs == 0``) and evaluate probe heads on the frozen
    trunk loaded from ``weights``; write ``results.json`` and the heads into ``cfg.out_dir``.

    ``head_paths``: heads to evaluate (ours or the ml-aim layout) instead of training new ones.
    Returns the results dict (the content of ``results.json``).
    """
    scratch: list[Path] = []
    try:
        return _run_probe(cfg, weights, head_paths=head_paths, eval_only=eval_only, scratch=scratch)
    finally:
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)


def _run_probe(
    cfg: ProbeConfig,
    weights: str | os.PathLike,
    *,
    head_paths: Sequence[str | os.PathLike],
    eval_only: bool,
    scratch: list[Path],
) -> dict[str, Any]:
    from .config import to_dict

    start = time.time()
    eval_only = eval_only or cfg.train.epochs == 0
    validate_config(cfg, eval_only=eval_only)
    if eval_only and not head_paths:
        raise ValueError("evaluation only (--eval-only or train.epochs=0) needs at least one --head PATH")
    torch.manual_seed(cfg.train.seed)
    ctx = prepare(cfg, weights, train=not eval_only)
    out_dir = Path(cfg.out_dir)
    if _is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        from .config import save_config

        save_config(cfg, out_dir / "probe_config.yaml")
    trunk_cfg = ctx.trunk.config
    dim, num_heads, num_classes = trunk_cfg.width, trunk_cfg.num_heads, len(ctx.class_names)
    _log(
        f"[probe] {cfg.model} from {ctx.weights_source} weights {ctx.weights_path} "
        f"(fingerprint {ctx.weights_fingerprint[:12]}); blocks {ctx.layers}; {num_classes} classes; "
        f"world size {ctx.world_size}; device {ctx.device}"
    )

    # Without augmentation every epoch sees the same crops: extract features once. They persist
    # in the cache (features.cache) or live in a scratch folder removed at the end of the run.
    use_cache = not cfg.train.augment
    cache_reused: dict[str, bool] = {}
    if cfg.features.cache:
        cache_dir = Path(cfg.features.cache_dir or out_dir / "feature_cache")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        cache_dir = Path(tempfile.mkdtemp(prefix=".features-", dir=out_dir))
        scratch.append(cache_dir)

    if eval_only:
        slots = []
        for path in head_paths:
            kind, head, meta = load_head(path, num_heads)
            if head.linear.weight.shape != (num_classes, dim):
                raise ValueError(
                    f"head {path}: classifier shape {list(head.linear.weight.shape)} does not fit "
                    f"{num_classes} classes x width {dim}"
                )
            if "layers" in meta and list(meta["layers"]) != ctx.layers:
                _log(f"[probe] warning: head {path} was trained on blocks {meta['layers']}, evaluating on {ctx.layers}")
            name = f"{kind}_{Path(path).stem}"
            if any(slot.name == name for slot in slots):  # the same file name from two folders
                name = f"{name}_{len(slots)}"
            lr = meta.get("lr")
            slots.append(HeadSlot(name, kind, None if lr is None else float(lr), head.to(ctx.device), None))
        bank = HeadBank(slots)
        steps_per_epoch = total_steps = 0
    else:
        bank = HeadBank.create(
            cfg.heads.types,
            cfg.train.lrs,
            dim=dim,
            num_heads=num_heads,
            num_classes=num_classes,
            train=cfg.train,
            num_queries=cfg.heads.num_queries,
            device=ctx.device,
        )
        if use_cache:
            train_store = feature_store(ctx, "train", cfg.data.train_path, cache_dir)
            cache_reused["train"] = bool(train_store.meta["reused"])
            local_steps = train_store.count // ctx.per_rank_batch
        else:
            from .data import build_train_loader

            train_loader = build_train_loader(
                cfg.data.train_path,
                batch_size=ctx.per_rank_batch,
                image_size=ctx.image_size,
                scale=tuple(cfg.data.scale),
                ratio=tuple(cfg.data.ratio),
                flip=cfg.data.flip,
                seed=cfg.train.seed,
                rank=ctx.rank,
                world_size=ctx.world_size,
                num_workers=cfg.data.num_workers,
                device=_loader_device(ctx),
            )
            local_steps = len(train_loader)
        # Every rank must take the same number of steps, or the gradient all-reduce hangs.
        steps_per_epoch = _min_across_ranks(local_steps, ctx.device)
        if steps_per_epoch == 0:
            raise ValueError(
                f"train.batch_size {cfg.train.batch_size} is larger than the training set "
                f"({local_steps * ctx.per_rank_batch} images on a rank); lower train.batch_size"
            )
        total_steps = steps_per_epoch * cfg.train.epochs
        warmup_steps = min(total_steps, int(round(cfg.train.warmup_epochs * steps_per_epoch)))

    def val_batches() -> Iterator[tuple[Tensor, Tensor]]:
        if use_cache:
            store = feature_store(ctx, "val", cfg.data.val_path, cache_dir)
            cache_reused["val"] = bool(store.meta["reused"])
            return iterate_store(store, ctx.eval_batch, shuffle=False, device=ctx.device)
        loader = _eval_images(ctx, cfg.data.val_path)
        return _trunk_batches(ctx, _iterate_loader(loader), "val", len(loader) if hasattr(loader, "__len__") else None)

    history: list[dict[str, Any]] = []
    metrics_path = out_dir / "probe_metrics.jsonl"
    if _is_main() and not eval_only:
        metrics_path.write_text("")
    step = 0
    if not eval_only:
        _log(
            f"[probe] {len(bank.slots)} heads ({', '.join(cfg.heads.types)} x LRs {cfg.train.lrs}); "
            f"{cfg.train.epochs} epochs x {steps_per_epoch} steps, warmup {warmup_steps} steps, "
            f"{'augmented images' if not use_cache else 'cached features'}"
        )
        bar = _progress(total=total_steps, desc="train")
        for epoch in range(cfg.train.epochs):
            if use_cache:
                batches = iterate_store(
                    train_store,
                    ctx.per_rank_batch,
                    shuffle=True,
                    seed=cfg.train.seed * 100_003 + epoch * 101 + ctx.rank,
                    drop_last=True,
                    device=ctx.device,
                )
            else:
                batches = _trunk_batches(ctx, _iterate_loader(train_loader, epoch), None)
            bar.set_description(f"epoch {epoch + 1}/{cfg.train.epochs}")
            running: dict[str, float] = {}
            for _, (feats, labels) in zip(
                range(steps_per_epoch), batches, strict=False
            ):  # range first: no extra trunk batch
                lrs = {
                    slot.name: lr_at_step(
                        step,
                        peak_lr=slot.lr,
                        total_steps=total_steps,
                        warmup_steps=warmup_steps,
                        min_lr=min(cfg.train.min_lr, slot.lr),
                    )
                    for slot in bank.slots
                }
                losses = bank.train_step(feats, labels.long(), lrs)
                for name, value in losses.items():
                    if not math.isfinite(value):
                        raise FloatingPointError(f"head {name}: non-finite loss {value} at step {step}")
                    running[name] = 0.9 * running.get(name, value) + 0.1 * value
                step += 1
                bar.update(1)
                if step % max(1, cfg.train.log_every_steps) == 0 or step == total_steps:
                    best_name = min(running, key=running.get)
                    bar.set_postfix(best=best_name, loss=f"{running[best_name]:.3f}")
                    if _is_main():
                        with open(metrics_path, "a") as f:
                            f.write(
                                json.dumps({"kind": "train", "step": step, "epoch": epoch, "loss": losses, "lr": lrs})
                                + "\n"
                            )
            eval_now = cfg.train.eval_every_epochs > 0 and (epoch + 1) % cfg.train.eval_every_epochs == 0
            if eval_now and epoch + 1 < cfg.train.epochs:
                bank.sync_batchnorm_stats()
                scores = bank.evaluate(val_batches())
                history.append({"epoch": epoch + 1, "step": step, "scores": scores})
                _log(f"[probe] epoch {epoch + 1}: " + ", ".join(f"{n} {s['top1']:.4f}" for n, s in scores.items()))
                if _is_main():
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"kind": "val", "step": step, "epoch": epoch + 1, "scores": scores}) + "\n")
        bar.close()
        bank.sync_batchnorm_stats()

    scores = bank.evaluate(val_batches())
    results = summarise(bank, scores)
    results.update(
        {
            "model": cfg.model,
            "model_overrides": cfg.model_overrides,
            "weights": ctx.weights_path,
            "weights_source": ctx.weights_source,
            "weights_fingerprint": ctx.weights_fingerprint,
            "layers": ctx.layers,
            "num_classes": num_classes,
            "eval_only": eval_only,
            "epochs": 0 if eval_only else cfg.train.epochs,
            "steps": step,
            "world_size": ctx.world_size,
            "augment": cfg.train.augment,
            "feature_cache": {"used": use_cache, "persistent": cfg.features.cache, "reused": cache_reused},
            "trunk_images_forwarded": _sum_across_ranks(ctx.trunk.images_seen, ctx.device),
            "history": history,
            "wall_time_s": round(time.time() - start, 2),
            "config": to_dict(cfg),
        }
    )
    if _is_main():
        if not eval_only:
            results["head_files"] = save_heads(bank, out_dir / "heads", cfg, ctx)
        tmp = out_dir / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, out_dir / "results.json")
        print(format_results(results), flush=True)
    return results


def _sum_across_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device)
    return int(_all_reduce_(t).item())


def summarise(bank: HeadBank, scores: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per head type: every LR's top-1/top-5 and the best LR (by val top-1, as the paper's LR
    sweep picks it; note this selects on the reported set)."""
    per_type: dict[str, Any] = {}
    for slot in bank.slots:
        entry = per_type.setdefault(slot.kind, {"per_lr": {}, "best": None})
        row = {"lr": slot.lr, "name": slot.name, **scores[slot.name]}
        entry["per_lr"][slot.name] = row
        if entry["best"] is None or row["top1"] > entry["best"]["top1"]:
            entry["best"] = row
    return {"heads": per_type}


def save_heads(bank: HeadBank, folder: Path, cfg: ProbeConfig, ctx: ProbeContext) -> dict[str, dict[str, str]]:
    """Each head as ``<name>.safetensors`` (ours) and, for attentive heads, ``<name>_ml_aim.safetensors``.
    Returns ``{name: {"aim_ds": path, "ml_aim": path}}``; ``classes.json`` lists the class names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.json").write_text(json.dumps(ctx.class_names, indent=1) + "\n")
    files: dict[str, dict[str, str]] = {}
    for slot in bank.slots:
        meta = {
            "kind": slot.kind,
            "lr": slot.lr,
            "model": cfg.model,
            "layers": ctx.layers,
            "num_heads": ctx.trunk.config.num_heads,
            "num_classes": len(ctx.class_names),
            "weights_fingerprint": ctx.weights_fingerprint,
        }
        ours = folder / f"{slot.name}.safetensors"
        save_head(slot.head.cpu(), ours, meta)
        files[slot.name] = {"aim_ds": str(ours)}
        if slot.kind == "attentive":
            released = folder / f"{slot.name}_ml_aim.safetensors"
            save_head(slot.head, released, meta, ml_aim=True)
            files[slot.name]["ml_aim"] = str(released)
        slot.head.to(ctx.device)
    return files


def format_results(results: dict[str, Any]) -> str:
    """A console table: one line per head, the best LR of each type marked."""
    lines = [f"probe results ({results['model']}, blocks {results['layers']}, {results.get('wall_time_s', 0):.0f} s):"]
    for kind, entry in results["heads"].items():
        for name, row in entry["per_lr"].items():
            mark = "  <- best" if entry["best"] and name == entry["best"]["name"] else ""
            lr = "-" if row["lr"] is None else f"{row['lr']:g}"
            lines.append(
                f"  {kind:9s} lr {lr:<8s} top-1 {100 * row['top1']:6.2f}  top-5 {100 * row['top5']:6.2f}{mark}"
            )
    return "\n".join(lines)


__all__ = [
    "AttentiveProbe",
    "DataConfig",
    "FeatureStore",
    "FeaturesConfig",
    "HeadBank",
    "HeadSlot",
    "HeadsConfig",
    "LinearProbe",
    "ProbeConfig",
    "TrainConfig",
    "build_head",
    "head_from_state_dict",
    "head_to_ml_aim",
    "load_head",
    "resolve_layers",
    "run_probe",
    "save_head",
]
