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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/loader.md")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed passes per loader (best is reported)")
    args = parser.parse_args(argv)

    from data_fixtures import make_imagefolder
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    from aim_ds.data import WriteOptions, build_train_loader, convert_imagefolder

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="aim_ds_bench_") as scratch:
        src = make_imagefolder(
            Path(scratch) / "src", {"c0": args.images // 2, "c1": args.images - args.images // 2}, size=(500, 375)
        )
        files = sorted(src.glob("*/*.JPEG"))
        beton = Path(scratch) / "bench.beton"
        start = time.perf_counter()
        result = convert_imagefolder(src, beton, WriteOptions(workers=args.workers), progress=False)
        convert_seconds = time.perf_counter() - start
        bytes_per_image = beton.stat().st_size / result.num_images
        source_bytes = sum(f.stat().st_size for f in files) / len(files)

        ours = build_train_loader(
            str(beton), batch_size=args.batch_size, image_size=224, num_workers=args.workers, seed=0
        )
        epoch = iter(range(10**6))
        a_u8 = images_per_second(lambda: ours.iter_epoch_uint8(next(epoch)), args.epochs)
        a_f32 = images_per_second(lambda: ours.iter_epoch(next(epoch)), args.epochs)

        stock = Loader(
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
        b_u8 = images_per_second(lambda: stock, args.epochs)

        def torch_loader(normalise: bool) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(
                PillowRRC(files, 224, normalise),
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=args.workers,
                drop_last=True,
                persistent_workers=True,
            )

        c_loader, d_loader = torch_loader(False), torch_loader(True)
        c_u8 = images_per_second(lambda: c_loader, args.epochs)
        d_f32 = images_per_second(lambda: d_loader, args.epochs)

        # Small outputs (CPU-sized models): where scaled DCT decoding applies.
        small = {}
        for name, shrink in (("dct", None), ("full", 0.0)):
            kwargs = {} if shrink is None else {"dct_min_shrink": shrink}
            loader64 = build_train_loader(
                str(beton), batch_size=args.batch_size, image_size=64, num_workers=args.workers, seed=0, **kwargs
            )
            small[name] = images_per_second(
                lambda loader64=loader64: loader64.iter_epoch_uint8(next(epoch)), args.epochs
            )
        pillow64 = torch.utils.data.DataLoader(
            PillowRRC(files, 64, False),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
            persistent_workers=True,
        )
        small["pillow"] = images_per_second(lambda: pillow64, args.epochs)

    rows = [
        ("(a) aim_ds bicubic loader, uint8 crops", f"{a_u8:,.0f}"),
        ("(a') aim_ds bicubic loader, float32 normalised (what iter_epoch yields on CPU)", f"{a_f32:,.0f}"),
        ("(b) FFCV stock RandomResizedCropRGBImageDecoder (INTER_AREA) + flip, uint8", f"{b_u8:,.0f}"),
        ("(c) torch DataLoader, Pillow-SIMD decode + resize(BICUBIC, box) + flip, uint8", f"{c_u8:,.0f}"),
        ("(d) (c) + float conversion and normalisation in the workers", f"{d_f32:,.0f}"),
        (
            "64 px: aim_ds loader, default (scaled DCT decode when the crop shrinks >= 5x), uint8",
            f"{small['dct']:,.0f}",
        ),
        ("64 px: aim_ds loader, dct_min_shrink=0 (always full decode), uint8", f"{small['full']:,.0f}"),
        ("64 px: (c) at 64 px", f"{small['pillow']:,.0f}"),
    ]
    lines = [
        f"Loader throughput: {len(files)} real-photo JPEGs 500x375, 224 px random-resized crops (scale 0.4-1, "
        f"ratio 3/4-4/3), batch {args.batch_size}, {args.workers} workers, best of {args.epochs} epochs after a "
        f"warm-up; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| loader | images/s |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        f"Ratios: (a)/(c) = {a_u8 / c_u8:.2f}, (a)/(b) = {a_u8 / b_u8:.2f}, (a')/(d) = {a_f32 / d_f32:.2f}",
        "",
        "| conversion (data_prep defaults: max side 512, jpg q90) | value |",
        "|---|---|",
        f"| images/s ({args.workers} workers, validation + write, incl. process start-up) "
        f"| {result.num_images / convert_seconds:,.0f} |",
        f"| bytes on disk per image (beton incl. page padding) | {bytes_per_image / 1024:,.1f} KiB |",
        f"| source JPEG bytes per image, for comparison | {source_bytes / 1024:,.1f} KiB |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
