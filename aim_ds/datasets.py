"""Small real labelled image sets that ship inside PyPI packages, written as image files.

The demo and the tests need real images without a network: scikit-learn ships the UCI
handwritten digits (1,797 grayscale 8x8 scans, 10 classes). They are written in the ImageFolder
layout (``root/{train,val}/<class>/*.png``) that ``python -m data_prep imagefolder`` reads, so
they travel through exactly the path a user's ImageNet folders take.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_imagefolder(
    root: str | os.PathLike,
    *,
    image_size: int = 32,
    val_fraction: float = 0.2,
    val_per_class: int | None = None,
    seed: int = 0,
    tint: bool = True,
) -> dict[str, int]:
    """Write scikit-learn's digits as RGB PNG files under ``root/train`` and ``root/val``.

    Each 8x8 scan (values 0-16) is scaled to 0-255 and upsampled to ``image_size`` with bicubic
    interpolation. With ``tint``, each image gets a random foreground and background colour
    (seeded), so colour carries no label information and the three channels differ. The split is
    stratified: ``val_fraction`` of every class (or exactly ``val_per_class`` images) goes to ``val``. Idempotent: a finished folder
    (marked by ``root/digits.json``) with the same settings is left as it is. Returns counts.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    settings = {
        "image_size": image_size,
        "val_fraction": val_fraction,
        "val_per_class": val_per_class,
        "seed": seed,
        "tint": tint,
    }
    marker = root / "digits.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("settings") == settings:
            return info["counts"]
    if root.exists():
        shutil.rmtree(root)
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        n_val = val_per_class if val_per_class is not None else max(1, int(round(len(indices) * val_fraction)))
        for rank, index in enumerate(indices):
            split = "val" if rank < n_val else "train"
            gray = (digits.images[index] / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(gray, mode="L").resize((image_size, image_size), Image.BICUBIC)
            if tint:
                fg = rng.integers(128, 256, size=3)
                bg = rng.integers(0, 96, size=3)
                alpha = np.asarray(image, dtype=np.float32)[..., None] / 255.0
                rgb = (alpha * fg + (1 - alpha) * bg).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(rgb, mode="RGB")
            else:
                image = image.convert("RGB")
            folder = tmp / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:04d}.png")
            counts[split] += 1
    (tmp / "digits.json").write_text(json.dumps({"settings": settings, "counts": counts}, indent=2))
    tmp.rename(root)
    return counts
