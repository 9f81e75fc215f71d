"""What betons cost on disk at data_prep's defaults (longer side 512, JPEG q90), per image and for 2B images.

Two sets of real photographs (the only natural photos on a bare machine are the sample images that ship
with scikit-learn and matplotlib, tests/data_fixtures.py):

* ``native``: crops of the photos at their own resolution (no upsampling), longer side 520-640 px, so the
  beton's downscale to 512 px keeps a real photo's detail per pixel, as DFN images downloaded by img2dataset
  at 512 px do;
* ``variants``: the loader benchmark's 500x375 images (random crops resized, often up: smoother, so smaller).

Prints a markdown table: stored JPEG bytes per image (the rows' data), whole-file bytes per image (page padding
and metadata included) and the extrapolation to 2 billion images. Bytes, not times: the figures do not move
with machine load.

    PYTHONPATH=. python bench/bench_beton_size.py --images 600
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from data_fixtures import jpeg_bytes, photo_variant, sample_photos  # noqa: E402
from PIL import Image  # noqa: E402

from aim_ds.data.beton import read_beton  # noqa: E402
from aim_ds.data.writers import WriteOptions, convert_imagefolder  # noqa: E402

DFN_IMAGES = 2_000_000_000


def native_crop(index: int) -> Image.Image:
    """A crop of a sample photo at its own resolution, longer side 520-640 px (downscaled to 512 in the beton)."""
    rng = np.random.default_rng([13, index])
    photo = sample_photos()[index % len(sample_photos())]
    height, width = photo.shape[:2]
    long_side = int(rng.integers(520, max(width, height) + 1))
    aspect = float(rng.uniform(0.66, 0.8))
    if width >= height:
        crop_w, crop_h = min(long_side, width), min(int(long_side * aspect), height)
    else:
        crop_w, crop_h = min(int(long_side * aspect), width), min(long_side, height)
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def measure(name: str, images: int, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="beton_size_") as scratch:
        folder = Path(scratch) / "src" / "photos"
        folder.mkdir(parents=True)
        source_bytes = 0
        for i in range(images):
            image = native_crop(i) if name == "native" else photo_variant(i, (500, 375))
            data = jpeg_bytes(image, quality=95)  # a web JPEG; the beton re-encodes at q90 either way
            (folder / f"{i:06d}.jpg").write_bytes(data)
            source_bytes += len(data)
        out = Path(scratch) / "out.beton"
        result = convert_imagefolder(folder.parent, out, WriteOptions(workers=workers), progress=False)
        contents = read_beton(out)
        stored = int(contents.blob_sizes["image"].sum())
        sides = np.maximum(contents.metadata["image"]["width"], contents.metadata["image"]["height"])
        return {
            "images": result.num_images,
            "longer_side": float(np.median(sides)),
            "source_kib": source_bytes / images / 1024,
            "stored_kib": stored / result.num_images / 1024,
            "file_kib": out.stat().st_size / result.num_images / 1024,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="images per set (default 600)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    print("| set (data_prep defaults: max side 512, jpg q90) | images | median longer side | source JPEG q95 "
          "KiB/img | stored JPEG KiB/img | beton file KiB/img | 2B images |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ("native", "variants"):
        row = measure(name, args.images, args.workers)
        tib = row["file_kib"] * 1024 * DFN_IMAGES / 2**40
        print(f"| {name} | {row['images']} | {row['longer_side']:.0f} px | {row['source_kib']:.1f} | "
              f"{row['stored_kib']:.1f} | {row['file_kib']:.1f} | {tib:.0f} TiB |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
