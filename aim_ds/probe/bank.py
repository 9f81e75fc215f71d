"""The bank of probe heads: one per (head type, peak LR, weight decay), each with its own AdamW, all
trained on the same trunk features; plus the results table and the heads' files.

Since the paper sweeps the probe's learning rate (docs/recipe.md, "Attentive probe"), one run trains
every LR at once: the trunk's output for a batch is computed once and fed to every head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_, world_size
from ..io import atomic_write_json
from .config import TrainConfig
from .heads import build_head, save_head

if TYPE_CHECKING:
    from .context import ProbeContext


@contextlib.contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """CUDA fp32 matmuls in TF32 inside the block (``enabled``), as they were on exit.

    For the probe heads only: the flag is process-wide, and the trunk's feature pass, or the
    pretraining trunk around a live probe, keeps IEEE fp32 because it is put back here. Set through
    ``torch.backends.cuda.matmul.fp32_precision``, read and written through that API alone: once the
    newer API has set the flag, reading the legacy ``allow_tf32`` raises in PyTorch 2.9+, and a value
    saved and restored here round-trips through either. The flag is CUDA's: CPU matmuls ignore it."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


@dataclass
class HeadSlot:
    """One trained head: its type, peak LR, module and optimizer."""

    name: str  # "attentive_lr0.001" (or "attentive_lr0.001_wd0.1" in a decay grid): file stem and results key
    kind: str
    lr: float | None  # None: a loaded head whose file does not say
    head: nn.Module
    optimizer: torch.optim.Optimizer | None
    weight_decay: float | None = None  # None: a loaded head


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
        bias: bool = False,
        device: torch.device | str = "cpu",
    ) -> HeadBank:
        """A head per ``(kind, lr, weight decay)`` of ``train.weight_decays``, named ``f"{kind}_lr{lr:g}"``
        (plus ``f"_wd{wd:g}"`` when the decay grid has more than one value), on ``device``, rank 0's on
        every rank. ``bias``: a classifier bias (the authors' current probe has none)."""
        slots = []
        decays = list(train.weight_decays)
        for kind in kinds:
            for lr in lrs:
                for wd in decays:
                    head = build_head(
                        kind, dim, num_heads, num_classes, num_queries=num_queries, seed=train.seed, bias=bias
                    ).to(device)
                    optimizer = torch.optim.AdamW(_param_groups(head, wd), lr=lr, betas=tuple(train.betas), eps=1e-8)
                    name = f"{kind}_lr{lr:g}" + (f"_wd{wd:g}" if len(decays) > 1 else "")
                    slots.append(HeadSlot(name, kind, float(lr), head, optimizer, float(wd)))
        bank = cls(slots, label_smoothing=train.label_smoothing, grad_clip=train.grad_clip)
        bank.broadcast_parameters()
        return bank

    @property
    def device(self) -> torch.device:
        return next(self.slots[0].head.parameters()).device

    def broadcast_parameters(self) -> None:
        """Make every rank start from rank 0's heads (they are seeded alike; this makes sure)."""
        if world_size() > 1:
            for slot in self.slots:
                for tensor in list(slot.head.parameters()) + list(slot.head.buffers()):
                    dist.broadcast(tensor.data, src=0)

    def train(self, mode: bool = True) -> None:
        for slot in self.slots:
            slot.head.train(mode)

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """How the heads compute on CUDA (fp32 weights, AdamW and loss): bf16 autocast for their
        matmuls, and TF32 for any fp32 matmul autocast leaves (:func:`tf32_matmuls`): at 7B the
        24-head grid in true fp32 cost more per step than the trunk. Neither on other devices (fp32
        on the CPU)."""
        on_cuda = self.device.type == "cuda"
        with tf32_matmuls(on_cuda), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            yield

    def train_step(self, feats: Tensor, labels: Tensor, lrs: dict[str, float]) -> Tensor:
        """Update every head on ``feats`` ``[B, N, D]`` (fp32, no grad) and ``labels`` ``[B]``
        with learning rate ``lrs[slot.name]``. Returns the heads' losses (this rank's batch) as one
        ``[len(slots)]`` fp32 tensor on the heads' device, in slot order, not read: the caller reads
        it when it logs (:meth:`loss_dict`), so a step waits for no device."""
        self.train(True)
        losses = []
        for slot in self.slots:
            with self._precision():
                logits = slot.head(feats)
            losses.append(F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing))
        # Heads share no parameters, so one backward of the sum gives each head its own gradient.
        stacked = torch.stack(losses)
        with tf32_matmuls(self.device.type == "cuda"):  # the backward's fp32 matmuls as the forward's
            stacked.sum().backward()
        self._all_reduce_grads()
        for slot in self.slots:
            assert slot.optimizer is not None
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(slot.head.parameters(), self.grad_clip)
            for group in slot.optimizer.param_groups:
                group["lr"] = lrs[slot.name]
            slot.optimizer.step()
            slot.optimizer.zero_grad(set_to_none=True)
        return stacked.detach()

    def loss_dict(self, losses: Tensor) -> dict[str, float]:
        """``{head name: loss}`` from :meth:`train_step`'s tensor: one host read for all heads."""
        return dict(zip((slot.name for slot in self.slots), losses.float().cpu().tolist(), strict=True))

    def _all_reduce_grads(self) -> None:
        size = world_size()
        if size == 1:
            return
        # One flat buffer: a single collective per step whatever the number of heads.
        grads = [p.grad for slot in self.slots for p in slot.head.parameters() if p.grad is not None]
        flat = all_reduce_(torch.cat([g.reshape(-1) for g in grads])) / size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sync_batchnorm_stats(self) -> None:
        """Average BatchNorm running statistics over ranks (each rank normalised its own shard's
        batches), so that evaluation and saved heads are the same on every rank."""
        size = world_size()
        if size == 1:
            return
        for slot in self.slots:
            for buffer in slot.head.buffers():
                if buffer.is_floating_point():
                    all_reduce_(buffer).div_(size)

    @torch.no_grad()
    def evaluate(
        self, batches: Iterator[tuple[Tensor, Tensor]], hits: dict[str, list[Tensor]] | None = None
    ) -> dict[str, dict[str, float]]:
        """Top-1 and top-5 accuracy (fractions) of every head over all ranks' ``(feats, labels)``.
        ``hits``: filled with this rank's per-image top-1 hits ``{head name: [bool [B], ...]}`` and
        ``"labels"``, in the order of ``batches`` (for intervals over val images, :mod:`aim_ds.study`)."""
        self.train(False)
        counts = torch.zeros(len(self.slots), 2, dtype=torch.float64)  # [heads, (top-1, top-5)] hits
        total = torch.zeros(1, dtype=torch.float64)
        for feats, labels in batches:
            total += labels.shape[0]
            if hits is not None:
                hits.setdefault("labels", []).append(labels.cpu())
            for i, slot in enumerate(self.slots):
                with self._precision():
                    logits = slot.head(feats)
                k = min(5, logits.shape[1])
                hit = logits.topk(k, dim=1).indices == labels[:, None]  # [B, k]
                if hits is not None:
                    hits.setdefault(slot.name, []).append(hit[:, 0].cpu())
                counts[i, 0] += hit[:, 0].sum().item()
                counts[i, 1] += hit.any(dim=1).sum().item()
        if world_size() > 1:
            # The heads' device is the collective's one (NCCL on CUDA, gloo on the CPU).
            stacked = all_reduce_(torch.cat([counts.flatten(), total]).to(self.device)).cpu()
            counts, total = stacked[:-1].view_as(counts), stacked[-1:]
        n = max(1.0, float(total.item()))
        return {
            slot.name: {"top1": counts[i, 0].item() / n, "top5": counts[i, 1].item() / n, "images": int(total.item())}
            for i, slot in enumerate(self.slots)
        }


def summarise(bank: HeadBank, scores: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per head type: every LR's top-1/top-5 and the best LR (by val top-1, as the paper's LR
    sweep picks it; note this selects on the reported set)."""
    per_type: dict[str, Any] = {}
    for slot in bank.slots:
        entry = per_type.setdefault(slot.kind, {"per_lr": {}, "best": None})
        row = {"lr": slot.lr, "weight_decay": slot.weight_decay, "name": slot.name, **scores[slot.name]}
        entry["per_lr"][slot.name] = row
        if entry["best"] is None or row["top1"] > entry["best"]["top1"]:
            entry["best"] = row
    return {"heads": per_type}


def save_heads(bank: HeadBank, folder: Path, ctx: ProbeContext) -> dict[str, dict[str, str]]:
    """Each head as ``<name>.safetensors`` (ours) and, for attentive heads, ``<name>_ml_aim.safetensors``.
    Returns ``{name: {"aim_ds": path, "ml_aim": path}}``; ``classes.json`` lists the class names."""
    atomic_write_json(folder / "classes.json", ctx.class_names, indent=1)
    files: dict[str, dict[str, str]] = {}
    for slot in bank.slots:
        meta = {
            "kind": slot.kind,
            "lr": slot.lr,
            "weight_decay": slot.weight_decay,
            "model": ctx.cfg.model.name,
            "layers": ctx.layers,
            "num_heads": ctx.trunk.config.num_heads,
            "num_classes": len(ctx.class_names),
            "weights_fingerprint": ctx.weights_fingerprint,
        }
        ours = folder / f"{slot.name}.safetensors"
        save_head(slot.head, ours, meta)
        files[slot.name] = {"aim_ds": str(ours)}
        if slot.kind == "attentive":
            released = folder / f"{slot.name}_ml_aim.safetensors"
            save_head(slot.head, released, meta, ml_aim=True)
            files[slot.name]["ml_aim"] = str(released)
    return files


def format_results(results: dict[str, Any]) -> str:
    """A console table: one line per head, the best LR of each type marked."""
    lines = [
        f"probe results ({results['model']['name']}, blocks {results['layers']}, {results.get('wall_time_s', 0):.0f} s):"
    ]
    for kind, entry in results["heads"].items():
        for name, row in entry["per_lr"].items():
            mark = "  <- best" if entry["best"] and name == entry["best"]["name"] else ""
            lr = "-" if row["lr"] is None else f"{row['lr']:g}"
            wd = "-" if row.get("weight_decay") is None else f"{row['weight_decay']:g}"
            lines.append(
                f"  {kind:9s} lr {lr:<8s} wd {wd:<5s} top-1 {100 * row['top1']:6.2f}  "
                f"top-5 {100 * row['top5']:6.2f}{mark}"
            )
    return "\n".join(lines)
