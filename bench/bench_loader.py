"""Loader throughput, side by side in one run, on the same ~1,000 real-photo JPEGs (500x375).

(a) aim_ds bicubic loader (uint8 crops, and float32 normalised); (b) FFCV's stock RandomResizedCropRGBImageDecoder
(OpenCV INTER_AREA) + flip, uint8; (c) torch DataLoader: Pillow-SIMD decode + resize(BICUBIC, box) + flip,
uint8; (d) (c) plus float conversion and normalisation in the workers. Also conversion images/s and bytes
per image at the default data_prep settings. Prints a markdown table and writes it to --out.

    python bench/bench_loader.py --out bench_out/loader.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def rrc_box(width: int, height: int, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, as (x0, y0, x1, y1)."""
    area = width * height
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x = random.randint(0, width - w)
            y = random.randint(0, height - h)
            return x, y, x + w, y + h
    return 0, 0, width, height


class PillowRRC(torch.utils.data.Dataset):
    """(c)/(d): JPEG file -> Pillow-SIMD decode -> bicubic crop-resize -> flip -> uint8 or normalised float."""

    def __init__(self, files: list[Path], size: int, normalise: bool) -> None:
        self.files, self.size, self.normalise = files, size, normalise

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.open(self.files[index]).convert("RGB")
        image = image.resize((self.size, self.size), Image.BICUBIC, box=rrc_box(*image.size))
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        if self.normalise:
            tensor = (tensor.float() / 255.0 - MEAN) / STD
        return tensor, 0


def images_per_second(batches: Callable[[], Iterable], epochs: int) -> float:
    """Best of `epochs` timed passes after one warm-up pass (numba compilation, page cache, worker start)."""
    for _ in batches():
        pass
    best = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        count = 0
        for images, _labels in batches():
            count += len(images)
        best = max(best, count / (time.perf_counter() - start))
    return best


def _pillow_loader(
    files: list[Path], size: int, normalise: bool, args: argparse.Namespace
) -> torch.utils.data.DataLoader:
    """(c)/(d): a torch DataLoader over Pillow-SIMD random-resized crops of ``size`` px."""
    return torch.utils.data.DataLoader(
        PillowRRC(files, size, normalise),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=True,
    )


def _ffcv_stock_loader(beton: Path, args: argparse.Namespace) -> Iterable:
    """(b): FFCV's stock RandomResizedCropRGBImageDecoder (OpenCV INTER_AREA) + flip, uint8."""
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    return Loader(
        str(beton),
        batch_size=args.batch_size,
        num_workers=args.workers,
        order=OrderOption.RANDOM,
        drop_last=True,
        seed=0,
        pipelines={
            "image": [
                RandomResizedCropRGBImageDecoder((224, 224), (0.4, 1.0), (3 / 4, 4 / 3)),
                RandomHorizontalFlip(),
                ToTensor(),
            ],
            "label": [IntDecoder(), ToTensor()],
        },
    )


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """Write the bench beton under ``scratch`` and time every loader: images/s, bytes and seconds by name."""
    from data_fixtures import make_imagefolder

    from aim_ds.data import WriteOptions, build_train_loader, convert_imagefolder

    src = make_imagefolder(
        scratch / "src", {"c0": args.images // 2, "c1": args.images - args.images // 2}, size=(500, 375)
    )
    files = sorted(src.glob("*/*.JPEG"))
    beton = scratch / "bench.beton"
    start = time.perf_counter()
    result = convert_imagefolder(src, beton, WriteOptions(workers=args.workers), progress=False)
    seconds = time.perf_counter() - start
    found = {
        "files": len(files),
        "convert_images_per_second": result.num_images / seconds,
        "bytes_per_image": beton.stat().st_size / result.num_images,
        "source_bytes": sum(f.stat().st_size for f in files) / len(files),
    }
    epoch = iter(range(10**6))  # a fresh epoch per pass: no pass reuses another's crops
    ours = build_train_loader(str(beton), batch_size=args.batch_size, image_size=224, num_workers=args.workers, seed=0)
    found["a_u8"] = images_per_second(lambda: ours.iter_epoch_uint8(next(epoch)), args.epochs)
    found["a_f32"] = images_per_second(lambda: ours.iter_epoch(next(epoch)), args.epochs)
    stock = _ffcv_stock_loader(beton, args)
    found["b_u8"] = images_per_second(lambda: stock, args.epochs)
    c_loader, d_loader = _pillow_loader(files, 224, False, args), _pillow_loader(files, 224, True, args)
    found["c_u8"] = images_per_second(lambda: c_loader, args.epochs)
    found["d_f32"] = images_per_second(lambda: d_loader, args.epochs)
    # Small outputs (CPU-sized models): where scaled DCT decoding applies.
    for name, kwargs in (("small_dct", {}), ("small_full", {"dct_min_shrink": 0.0})):
        loader64 = build_train_loader(
            str(beton), batch_size=args.batch_size, image_size=64, num_workers=args.workers, seed=0, **kwargs
        )
        found[name] = images_per_second(lambda loader64=loader64: loader64.iter_epoch_uint8(next(epoch)), args.epochs)
    pillow64 = _pillow_loader(files, 64, False, args)
    found["small_pillow"] = images_per_second(lambda: pillow64, args.epochs)
    return found


def report(found: dict[str, float], args: argparse.Namespace) -> str:
    """The markdown tables of :func:`measure`'s numbers."""
    from aim_ds.data.loader import DEFAULT_DCT_MIN_SHRINK

    rows = [
        ("(a) aim_ds bicubic loader, uint8 crops", found["a_u8"]),
        ("(a') aim_ds bicubic loader, float32 normalised (what iter_epoch yields on CPU)", found["a_f32"]),
        ("(b) FFCV stock RandomResizedCropRGBImageDecoder (INTER_AREA) + flip, uint8", found["b_u8"]),
        ("(c) torch DataLoader, Pillow-SIMD decode + resize(BICUBIC, box) + flip, uint8", found["c_u8"]),
        ("(d) (c) + float conversion and normalisation in the workers", found["d_f32"]),
        (
            f"64 px: aim_ds loader, default (scaled DCT decode when the crop shrinks >= {DEFAULT_DCT_MIN_SHRINK:g}x), uint8",
            found["small_dct"],
        ),
        ("64 px: aim_ds loader, dct_min_shrink=0 (always full decode), uint8", found["small_full"]),
        ("64 px: (c) at 64 px", found["small_pillow"]),
    ]
    ratios = (
        f"Ratios: (a)/(c) = {found['a_u8'] / found['c_u8']:.2f}, (a)/(b) = {found['a_u8'] / found['b_u8']:.2f}, "
        f"(a')/(d) = {found['a_f32'] / found['d_f32']:.2f}"
    )
    lines = [
        f"Loader throughput: {found['files']} real-photo JPEGs 500x375, 224 px random-resized crops (scale 0.4-1, "
        f"ratio 3/4-4/3), batch {args.batch_size}, {args.workers} workers, best of {args.epochs} epochs after a "
        f"warm-up; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| loader | images/s |",
        "|---|---|",
        *[f"| {name} | {value:,.0f} |" for name, value in rows],
        "",
        ratios,
        "",
        "| conversion (data_prep defaults: max side 512, jpg q90) | value |",
        "|---|---|",
        f"| images/s ({args.workers} workers, validation + write, incl. process start-up) "
        f"| {found['convert_images_per_second']:,.0f} |",
        f"| bytes on disk per image (beton incl. page padding) | {found['bytes_per_image'] / 1024:,.1f} KiB |",
        f"| source JPEG bytes per image, for comparison | {found['source_bytes'] / 1024:,.1f} KiB |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/loader.md")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed passes per loader (best is reported)")
    args = parser.parse_args(argv)

    from aim_ds.data.kernels import use_workqueue_threading
    from aim_ds.io import atomic_write_text

    use_workqueue_threading()  # the drivers' numba layer (NUMBA_THREADING_LAYER overrides it)

    with tempfile.TemporaryDirectory(prefix="aim_ds_bench_") as scratch:
        found = measure(args, Path(scratch))
    text = report(found, args)
    print(text)
    atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
