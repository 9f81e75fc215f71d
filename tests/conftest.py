"""Shared pytest set-up: GPU tests skip cleanly without CUDA; the betons of the DeepSpeed tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def betons(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train / val betons of 64 px tiles cut from scikit-learn's two sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("data")
    photos = load_sample_images()
    for split in ("train", "val"):
        for name in photos.filenames:
            (root / split / Path(name).stem).mkdir(parents=True)
    count = {"train": 0, "val": 0}
    for name, photo in zip(photos.filenames, photos.images, strict=True):  # [427, 640, 3] uint8
        for row in range(photo.shape[0] // 64):
            for col in range(photo.shape[1] // 64):
                split = "val" if (row + col) % 6 == 0 else "train"
                tile = photo[row * 64 : (row + 1) * 64, col * 64 : (col + 1) * 64]
                Image.fromarray(tile).save(root / split / Path(name).stem / f"{row:02d}_{col:02d}.png")
                count[split] += 1
    out = {}
    for split in ("train", "val"):
        out[split] = root / f"{split}.beton"
        subprocess.run(
            [sys.executable, "-m", "data_prep", "imagefolder", str(root / split), str(out[split]), "--workers", "1"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=300,
        )
    assert count["train"] >= 90 and count["val"] >= 15
    return out
