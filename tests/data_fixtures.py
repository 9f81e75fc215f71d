"""Real photographs for the data tests: crops and resizes of the sample photos that ship with
scikit-learn (china.jpg, flower.jpg, 427x640) and matplotlib (grace_hopper.jpg), saved as real JPEG/PNG bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


@lru_cache(maxsize=1)
def sample_photos() -> tuple[np.ndarray, ...]:
    """Natural photographs, uint8 [H, W, 3] each."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(image, dtype=np.uint8) for image in load_sample_images().images]
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append(np.asarray(Image.open(f).convert("RGB")))
    except Exception:  # noqa: BLE001 - optional third photo
        pass
    return tuple(photos)


def photo_variant(index: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Image.Image:
    """A distinct natural image: a random crop of a sample photo resized to size (W, H), maybe mirrored."""
    rng = np.random.default_rng([seed, index])
    photo = sample_photos()[index % len(sample_photos())]
    height, width = photo.shape[:2]
    crop_w = int(rng.integers(width // 2, width + 1))
    crop_h = int(rng.integers(height // 2, height + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def jpeg_bytes(image: Image.Image, quality: int = 90, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **kwargs)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_imagefolder(root: Path, classes: dict[str, int], size: tuple[int, int] = (160, 120), seed: int = 0) -> Path:
    """root/<class>/<i>.JPEG with `count` real-photo JPEGs per class; returns root."""
    k = 0
    for name, count in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (folder / f"{name}_{i:04d}.JPEG").write_bytes(jpeg_bytes(photo_variant(k, size, seed)))
            k += 1
    return root


def make_tar(path: Path, count: int, start: int = 0, size: tuple[int, int] = (160, 120), png_every: int = 0) -> Path:
    """An img2dataset-style WebDataset shard: KEY.jpg (or KEY.png) + KEY.txt + KEY.json per sample."""
    with tarfile.open(path, "w") as archive:
        for i in range(count):
            key = f"{start + i:09d}"
            image = photo_variant(start + i, size, seed=7)
            if png_every and i % png_every == png_every - 1:
                members = {f"{key}.png": png_bytes(image)}
            else:
                members = {f"{key}.jpg": jpeg_bytes(image)}
            members[f"{key}.txt"] = f"caption {key}".encode()
            members[f"{key}.json"] = f'{{"key": "{key}", "status": "success"}}'.encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def read_beton_images(beton: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every stored image, decoded with FFCV's reader metadata + Pillow (independent of our loader), and the
    labels: (list of uint8 [H, W, 3], int64 [N])."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    image_col = f"f{reader.field_names.index('image')}"
    label_col = f"f{reader.field_names.index('label')}"
    data = np.memmap(beton, dtype=np.uint8, mode="r")
    table = reader.alloc_table
    sizes = dict(zip(table["ptr"].tolist(), table["size"].tolist(), strict=True))
    images = []
    for meta in reader.metadata[image_col]:
        pointer = int(meta["data_ptr"])
        raw = bytes(data[pointer : pointer + sizes[pointer]])
        if meta["mode"] == 0:
            images.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
        else:
            images.append(np.frombuffer(raw, np.uint8).reshape(meta["height"], meta["width"], 3))
    return images, reader.metadata[label_col].astype(np.int64)


def make_bad_tar(path: Path, kind: str) -> Path:
    """A shard that can never convert: ``kind`` "no-images" (captions only) or "corrupt" (JPEG names over
    bytes that are not images)."""
    with tarfile.open(path, "w") as archive:
        for i in range(4):
            key = f"{i:09d}"
            name, data = (f"{key}.txt", b"caption only") if kind == "no-images" else (f"{key}.jpg", b"\xff\xd8garbage")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def make_labelled_tar(path: Path, labels: list[int], classes: list[str], start: int = 0, size=(96, 72)) -> Path:
    """An ImageNet-WebDataset-style shard: KEY.jpg + KEY.cls (the class index as text) + KEY.json (with the
    index under "label" and the class name under "meta.synset"), per sample."""
    with tarfile.open(path, "w") as archive:
        for i, label in enumerate(labels):
            key = f"{start + i:09d}"
            members = {
                f"{key}.jpg": jpeg_bytes(photo_variant(start + i, size, seed=11)),
                f"{key}.cls": f"{label}\n".encode(),
                f"{key}.json": json.dumps({"label": label, "meta": {"synset": classes[label]}}).encode(),
            }
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path
