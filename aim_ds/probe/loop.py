"""A probe run: train heads of every (type, LR, decay) on the frozen trunk's features, evaluate, report.

With ``train.augment=false`` the trunk sees every image once (features cached on disk, see
:mod:`aim_ds.probe.features`); with augmentation it runs once per training batch, whatever the
number of heads. Every rank takes the same number of steps; rank 0 writes the run folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, save_config, to_dict
from ..distributed import is_main, min_across_ranks, sum_across_ranks
from ..io import atomic_path, atomic_write_json
from ..metrics import TENSORBOARD_DIR, scalar_items, tensorboard_writer
from ..optim import lr_at_step
from ..weights.load import WeightsError
from .bank import HeadBank, HeadSlot, format_results, save_heads, summarise
from .config import ProbeConfig, validate_config
from .context import (
    ProbeContext,
    build_train_images,
    check_batch_fits,
    eval_batches,
    iterate_loader,
    log,
    prepare,
    progress,
    trunk_batches,
)
from .features import FeatureStore, feature_store, iterate_store
from .heads import check_head_file, load_head


class _Features:
    """Where a run's features come from: the on-disk cache (no augmentation: every epoch sees the
    same crops) or the trunk on every training batch (augmentation: random crops differ)."""

    def __init__(self, ctx: ProbeContext, cache_dir: Path) -> None:
        self.ctx = ctx
        self.cache_dir = cache_dir
        self.use_cache = not ctx.cfg.train.augment
        self.reused: dict[str, bool] = {}
        self._train_store: FeatureStore | None = None
        self._train_loader: Any = None

    def open_train(self) -> int:
        """Extract (or find) the training features, or build the training loader; returns this
        rank's number of full batches per epoch."""
        ctx = self.ctx
        if self.use_cache:
            self._train_store = feature_store(ctx, "train", ctx.cfg.data.train_path, self.cache_dir)
            self.reused["train"] = bool(self._train_store.meta["reused"])
            return self._train_store.count // ctx.per_rank_batch
        self._train_loader = build_train_images(ctx)
        return len(self._train_loader)

    def train(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's training ``(feats [b, N, D], labels [b])`` of ``epoch``, freshly shuffled."""
        ctx = self.ctx
        if self._train_store is not None:
            seed = ctx.cfg.train.seed * 100_003 + epoch * 101 + ctx.rank
            return iterate_store(
                self._train_store, ctx.per_rank_batch, shuffle=True, seed=seed, drop_last=True, device=ctx.device
            )
        return trunk_batches(ctx, iterate_loader(self._train_loader, epoch), None)

    def val(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's validation ``(feats, labels)``."""
        ctx = self.ctx
        if self.use_cache:
            store = feature_store(ctx, "val", ctx.cfg.data.val_path, self.cache_dir)
            self.reused["val"] = bool(store.meta["reused"])
            return iterate_store(store, ctx.eval_batch, shuffle=False, device=ctx.device)
        return eval_batches(ctx, ctx.cfg.data.val_path, "val")


@dataclass(frozen=True)
class _Schedule:
    """Steps of the run: every rank takes ``steps_per_epoch`` steps an epoch."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def lrs(self, step: int, bank: HeadBank, min_lr: float) -> dict[str, float]:
        """Each head's LR at ``step``: warmup, then cosine from its peak to ``min_lr``."""
        return {
            slot.name: lr_at_step(
                step,
                peak_lr=slot.lr,
                total_steps=self.total_steps,
                warmup_steps=self.warmup_steps,
                min_lr=min(min_lr, slot.lr),
            )
            for slot in bank.slots
        }


class _MetricsLog:
    """``probe_metrics.jsonl`` in the run folder, one JSON record a line, written by rank 0.

    The file keeps its history across probe runs: each run appends, starting with a ``"run_start"``
    record (wall time, a fresh ``run`` number) so that a reader can tell the runs apart. With
    ``tensorboard``, the numbers also go to TensorBoard event files in ``out_dir/tensorboard/run_N``
    (``train/loss/<head>``, ``train/lr/<head>``, ``val/scores/<head>/top1``), one folder a run."""

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        self.enabled = is_main()
        self.tensorboard: Any = None
        if self.enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = path.read_text() if path.is_file() else ""
            if text and not text.endswith("\n"):  # a killed run's torn last line stays on its own line
                with open(path, "a") as f:
                    f.write("\n")
            runs = text.count('"kind": "run_start"')
            self.write({"kind": "run_start", "run": runs, "time": time.time()})
            if tensorboard:
                self.tensorboard = tensorboard_writer(path.parent / TENSORBOARD_DIR / f"run_{runs}")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None and "step" in record:
            values = {k: v for k, v in record.items() if k not in ("kind", "step", "epoch")}
            for name, value in scalar_items(values):
                self.tensorboard.add_scalar(f"{record['kind']}/{name}", value, int(record["step"]))
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


@contextlib.contextmanager
def _feature_dir(cfg: ProbeConfig, out_dir: Path) -> Iterator[Path]:
    """The persistent cache folder (``features.cache``), or a scratch folder (in ``features.cache_dir``
    when set, else ``out_dir``) removed at the end."""
    if cfg.features.cache:
        yield Path(cfg.features.cache_dir or out_dir / "feature_cache")
        return
    where = Path(cfg.features.cache_dir or out_dir)  # a scratch cache may go to a node-local disk too
    where.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".features-", dir=where))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_bank(ctx: ProbeContext, head_paths: Sequence[str | os.PathLike]) -> HeadBank:
    """Trained heads from files (ours or the ml-aim layout), checked against the trunk and classes."""
    dim, num_classes = ctx.trunk.config.width, len(ctx.class_names)
    slots: list[HeadSlot] = []
    for path in head_paths:
        kind, head, meta = load_head(path, ctx.trunk.config.num_heads)
        if head.linear.weight.shape != (num_classes, dim):
            raise WeightsError(
                f"head {path}: classifier shape {list(head.linear.weight.shape)} does not fit "
                f"{num_classes} classes x width {dim}"
            )
        if "layers" in meta and list(meta["layers"]) != ctx.layers:
            log(f"[probe] warning: head {path} was trained on blocks {meta['layers']}, evaluating on {ctx.layers}")
        name = f"{kind}_{Path(path).stem}"
        if any(slot.name == name for slot in slots):  # the same file name from two folders
            name = f"{name}_{len(slots)}"
        lr = meta.get("lr")
        slots.append(HeadSlot(name, kind, None if lr is None else float(lr), head.to(ctx.device), None))
    return HeadBank(slots)


def _plan(ctx: ProbeContext, features: _Features) -> _Schedule:
    cfg = ctx.cfg
    local_steps = features.open_train()
    # Every rank must take the same number of steps, or the gradient all-reduce hangs.
    steps_per_epoch = min_across_ranks(local_steps)
    if steps_per_epoch == 0:
        # prepare() checked the count: a rank's loader gave fewer full batches than the images promised.
        check_batch_fits(cfg, ctx.world_size, ctx.train_images, per_rank_steps=0)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = min(total_steps, int(round(cfg.train.warmup_epochs * steps_per_epoch)))
    return _Schedule(steps_per_epoch, total_steps, warmup_steps)


def _train_epoch(
    ctx: ProbeContext,
    bank: HeadBank,
    features: _Features,
    schedule: _Schedule,
    epoch: int,
    step: int,
    bar: Any,
    metrics: _MetricsLog,
) -> int:
    """One epoch of every head from global step ``step``; returns the step count after it."""
    cfg = ctx.cfg
    running: Tensor | None = None  # per-head moving average, on the heads' device
    last_read = step
    # range first in the zip: no extra trunk batch is computed past the last step.
    for _, (feats, labels) in zip(range(schedule.steps_per_epoch), features.train(epoch), strict=False):
        lrs = schedule.lrs(step, bank, cfg.train.min_lr)
        losses = bank.train_step(feats, labels.long(), lrs)
        # Kept on the device and read once per log line: a NaN or inf stays in the average, so the
        # check at the log line still sees every step since the last one.
        running = losses.clone() if running is None else 0.9 * running + 0.1 * losses
        step += 1
        bar.update(1)
        if step % max(1, cfg.train.log_every_steps) == 0 or step == schedule.total_steps:
            values, averages = bank.loss_dict(losses), bank.loss_dict(running)
            for name, value in averages.items():
                if not math.isfinite(value) or not math.isfinite(values[name]):
                    raise FloatingPointError(
                        f"head {name}: non-finite loss at or before step {step} (steps {last_read + 1}-{step})"
                    )
            last_read = step
            best_name = min(averages, key=averages.get)
            bar.set_postfix(best=best_name, loss=f"{averages[best_name]:.3f}")
            metrics.write({"kind": "train", "step": step, "epoch": epoch, "loss": values, "lr": lrs})
    return step


def _train(
    ctx: ProbeContext, bank: HeadBank, features: _Features, metrics: _MetricsLog
) -> tuple[int, list[dict[str, Any]]]:
    """Train every head for ``train.epochs``; returns ``(steps, mid-run evaluations)``."""
    cfg = ctx.cfg
    schedule = _plan(ctx, features)
    log(
        f"[probe] {len(bank.slots)} heads ({', '.join(cfg.heads.types)} x LRs {cfg.train.lrs} "
        f"x weight decays {cfg.train.weight_decays}); "
        f"{cfg.train.epochs} epochs x {schedule.steps_per_epoch} steps, warmup {schedule.warmup_steps} steps, "
        f"{'cached features' if features.use_cache else 'augmented images'}"
    )
    history: list[dict[str, Any]] = []
    step = 0
    bar = progress(total=schedule.total_steps, desc="train")
    for epoch in range(cfg.train.epochs):
        bar.set_description(f"epoch {epoch + 1}/{cfg.train.epochs}")
        step = _train_epoch(ctx, bank, features, schedule, epoch, step, bar, metrics)
        every = cfg.train.eval_every_epochs
        if every > 0 and (epoch + 1) % every == 0 and epoch + 1 < cfg.train.epochs:
            bank.sync_batchnorm_stats()
            scores = bank.evaluate(features.val())
            history.append({"epoch": epoch + 1, "step": step, "scores": scores})
            log(f"[probe] epoch {epoch + 1}: " + ", ".join(f"{n} {s['top1']:.4f}" for n, s in scores.items()))
            metrics.write({"kind": "val", "step": step, "epoch": epoch + 1, "scores": scores})
    bar.close()
    bank.sync_batchnorm_stats()
    return step, history


def _start(cfg: ProbeConfig, ctx: ProbeContext, out_dir: Path) -> None:
    if is_main():
        save_config(cfg, out_dir / "probe_config.yaml")
    log(
        f"[probe] {cfg.model.name} from {ctx.weights_source} weights {ctx.weights_path} "
        f"(fingerprint {ctx.weights_fingerprint[:12]}); blocks {ctx.layers}; {len(ctx.class_names)} classes; "
        f"world size {ctx.world_size}; device {ctx.device}"
    )


VAL_HITS_FILE = "val_hits_rank{rank}of{world}.npz"


def _write_val_hits(out_dir: Path, hits: dict[str, list[Tensor]], rank: int, world: int) -> None:
    """This rank's per-image top-1 hits of every head on the val set, and the labels, in the val
    loader's order (uint8 arrays in an ``.npz``): what the study resamples for its intervals."""
    import numpy as np

    arrays = {name: torch.cat(parts).numpy().astype(np.uint8) for name, parts in hits.items() if parts}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / VAL_HITS_FILE.format(rank=rank, world=world)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


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
    start = time.time()
    eval_only = eval_only or cfg.train.epochs == 0
    validate_config(cfg, eval_only=eval_only)
    if eval_only and not head_paths:
        raise ConfigError("evaluation only (--eval-only or train.epochs=0) needs at least one --head PATH")
    for path in head_paths:  # before the trunk is built: a bad --head fails in seconds, not after the load
        check_head_file(path)
    torch.manual_seed(cfg.train.seed)
    ctx = prepare(cfg, weights, train=not eval_only)
    out_dir = Path(cfg.out_dir)
    _start(cfg, ctx, out_dir)
    step, history = 0, []
    with _feature_dir(cfg, out_dir) as cache_dir:
        features = _Features(ctx, cache_dir)
        if eval_only:
            bank = load_bank(ctx, head_paths)
        else:
            bank = HeadBank.create(
                cfg.heads.types,
                cfg.train.lrs,
                dim=ctx.trunk.config.width,
                num_heads=ctx.trunk.config.num_heads,
                num_classes=len(ctx.class_names),
                train=cfg.train,
                num_queries=cfg.heads.num_queries,
                bias=cfg.heads.bias,
                device=ctx.device,
            )
            metrics = _MetricsLog(out_dir / "probe_metrics.jsonl", tensorboard=cfg.train.tensorboard)
            try:
                step, history = _train(ctx, bank, features, metrics)
            finally:
                metrics.close()
        hits: dict[str, list[Tensor]] = {}
        scores = bank.evaluate(features.val(), hits=hits)
    _write_val_hits(out_dir, hits, ctx.rank, ctx.world_size)
    results = summarise(bank, scores)
    results.update(
        {
            "model": {"name": cfg.model.name, "overrides": cfg.model.overrides},
            "weights": ctx.weights_path,
            "weights_source": ctx.weights_source,
            "weights_fingerprint": ctx.weights_fingerprint,
            "layers": ctx.layers,
            "num_classes": len(ctx.class_names),
            "eval_only": eval_only,
            "epochs": 0 if eval_only else cfg.train.epochs,
            "steps": step,
            "world_size": ctx.world_size,
            "device": str(ctx.device),
            "augment": cfg.train.augment,
            "feature_cache": {"used": features.use_cache, "persistent": cfg.features.cache, "reused": features.reused},
            "trunk_images_forwarded": sum_across_ranks(ctx.trunk.images_seen),
            "trunk_batches_forwarded": sum_across_ranks(ctx.trunk.batches_seen),
            "history": history,
            "wall_time_s": round(time.time() - start, 2),
            "config": to_dict(cfg),
        }
    )
    if is_main():
        if not eval_only:
            results["head_files"] = save_heads(bank, out_dir / "heads", ctx)
        atomic_write_json(out_dir / "results.json", results)
        print(format_results(results), flush=True)
    return results
