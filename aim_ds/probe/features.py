"""The on-disk feature cache: with ``train.augment=false`` the trunk sees every image once, its
features are written here, and every epoch and every LR reads them back.

A store is keyed by the trunk's weights (content hash), the architecture, the layers, the beton,
the eval transform, the on-disk dtype and the rank's shard, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError
from ..io import atomic_path, atomic_write_json
from ..model.registry import get_model_spec
from .config import CACHE_DTYPES
from .context import ProbeContext, build_eval_images, eval_batches, log, max_images_of

_CACHE_FORMAT = 1  # bump when the cache file layout or the feature definition changes


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

    Files: ``<stem>.features`` (raw rows, ``dtype``), ``<stem>.labels.npy``, ``<stem>.json``. Each is
    published atomically (:mod:`aim_ds.io`) and the JSON last, so a store counts only when
    complete; a run killed mid-extraction leaves ``*.partial`` files that the next writer removes.
    """

    def __init__(self, stem: Path) -> None:
        self.stem = stem
        self.meta: dict[str, Any] = json.loads(stem.with_suffix(".json").read_text())
        self.count = int(self.meta["count"])
        self.shape = tuple(self.meta["shape"])  # (N, D)
        self.dtype = CACHE_DTYPES[self.meta["dtype"]]
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
        torch_dtype = CACHE_DTYPES[dtype]
        labels: list[Tensor] = []
        shape: tuple[int, ...] | None = None
        count = 0
        with atomic_path(stem.with_suffix(".features")) as tmp, open(tmp, "wb") as f:
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
        # A file object: np.save would append ".npy" to a path that does not end in it.
        with atomic_path(stem.with_suffix(".labels.npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, torch.cat(labels).numpy())
        atomic_write_json(stem.with_suffix(".json"), {"count": count, "shape": list(shape), "dtype": dtype, **info})
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
        idx_sorted, _ = order[start : start + batch_size].sort()  # read in file order; batch order is moot
        yield (
            store.rows(idx_sorted).to(device, non_blocking=True),
            store.labels[idx_sorted].to(device, non_blocking=True),
        )


def _gib(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``0.92 TiB``, ``786.4 KiB``)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'TiB' else 1}f} {unit}"
    return f"{n:.0f} B"


def cache_bytes(ctx: ProbeContext, images: int) -> int:
    """Bytes the cache of ``images`` images takes: every token of every image, ``[N, D]`` rows in
    ``features.cache_dtype`` (the attentive head reads all tokens), plus 8 bytes a label."""
    model_cfg = get_model_spec(ctx.cfg.model.name).config.replace(**ctx.cfg.model.overrides)
    itemsize = CACHE_DTYPES[ctx.cfg.features.cache_dtype].itemsize
    return images * (model_cfg.num_patches * model_cfg.width * itemsize + 8)


def check_cache_fits(ctx: ProbeContext, split: str, images: int, cache_dir: Path) -> int:
    """Refuse (:class:`ConfigError` naming both sizes) a cache of ``images`` images per rank that
    would not fit the free space of ``cache_dir``'s disk, where this node's ranks all write theirs,
    before a byte is written. Returns the bytes this rank needs."""
    needed = cache_bytes(ctx, images)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    probe = cache_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * local_ranks > free:
        total = images * ctx.world_size
        raise ConfigError(
            f"the {split} feature cache needs {_gib(needed * local_ranks)} on {probe} ({total} images x "
            f"{_gib(needed / max(images, 1))} each, {ctx.cfg.model.name}, {ctx.cfg.features.cache_dtype}; "
            f"{local_ranks} rank(s) on this node) but only {_gib(free)} is free there; set "
            f"data.max_{split}_images (a subset) or features.cache_dir (a larger disk)"
            + (" or features.cache_dtype=bfloat16" if ctx.cfg.features.cache_dtype == "float32" else "")
        )
    return needed


def feature_store(ctx: ProbeContext, split: str, path: str, cache_dir: Path) -> FeatureStore:
    """This rank's cached features of ``split`` (extracted now if no valid cache exists).

    Returns the store; its ``meta["reused"]`` says whether it was a hit.
    """
    cfg = ctx.cfg
    parts = {
        "format": _CACHE_FORMAT,
        "weights": ctx.weights_fingerprint,
        "model": cfg.model.name,
        "model_overrides": cfg.model.overrides,
        "layers": ctx.layers,
        "data": data_fingerprint(path),
        "image_size": ctx.image_size,
        "resize_size": ctx.resize_size,
        "dtype": cfg.features.cache_dtype,
        "shard": [ctx.rank, ctx.world_size],
    }
    if cfg.features.dtype != "auto":  # keys of caches written before features.dtype existed stay valid
        parts["compute_dtype"] = cfg.features.dtype
    if max_images_of(cfg, path):  # a subset is another set of rows (absent otherwise: older caches stay valid)
        parts["max_images"] = max_images_of(cfg, path)
    stem = cache_dir / f"{split}-{cache_key(parts)}-rank{ctx.rank}of{ctx.world_size}"
    if FeatureStore.exists(stem):
        store = FeatureStore(stem)
        store.meta["reused"] = True
        log(f"[probe] {split}: reusing cached features {stem.name} ({store.count} images per rank)")
        return store
    images = build_eval_images(ctx, path).num_images  # this rank's share of the (bounded) split
    needed = check_cache_fits(ctx, split, images, cache_dir)
    log(f"[probe] {split}: extracting features of {images} images per rank once into {stem.parent} ({_gib(needed)})")
    store = FeatureStore.write(
        stem, eval_batches(ctx, path, f"features {split}"), cfg.features.cache_dtype, {"key": parts}
    )
    store.meta["reused"] = False
    return store
