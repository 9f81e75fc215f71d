"""What the beton checks cost: loader throughput with and without them, back to back, and the open-time row
checks on a million rows.

    python bench/bench_beton_safety.py --baseline /path/to/checkout/without/the/checks

Builds one beton of 256 real-photo JPEGs (500x375, the writer's defaults), then alternates child processes
running the train loader (224 px crops, batch 64, 2 threads) from this checkout and from --baseline, alternating
rounds (4 x 6 epochs each), and reports images/s and the ratio. Then times :func:`aim_ds.data.beton.check_rows` on 1M
synthetic rows (what opening a shard of that size adds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import numpy as np
from aim_ds.data import build_train_loader
loader = build_train_loader(sys.argv[1], batch_size=64, image_size=224, num_workers=2, seed=0)
for _ in loader.iter_epoch_uint8(0):  # warm-up: numba cache load, page cache
    pass
start, images = time.perf_counter(), 0
for epoch in range(1, 7):
    for batch, _ in loader.iter_epoch_uint8(epoch):
        images += len(batch)
print(json.dumps({"images_per_s": images / (time.perf_counter() - start)}))
"""


def _write_beton(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from data_fixtures import make_imagefolder

    from aim_ds.data.writers import WriteOptions, convert_imagefolder

    src = make_imagefolder(folder / "src", {"a": 128, "b": 128}, size=(500, 375))
    out = folder / "bench.beton"
    convert_imagefolder(src, out, WriteOptions(workers=2), progress=False)
    return out


def _throughput(root: Path, beton: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(beton)], env=env, capture_output=True, text=True,
                          check=True, cwd=root)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_s"]


def _row_checks(rows: int = 1_000_000) -> float:
    from aim_ds.data.beton import ALLOC_TABLE_TYPE, FIELD_TYPES, HEADER_TYPE, BetonContents, check_rows

    start_data = 1 << 24
    sizes = np.full(rows, 30_000, np.uint64)
    ptrs = start_data + np.arange(rows, dtype=np.uint64) * 30_000
    table = np.zeros(rows, ALLOC_TABLE_TYPE)
    table["sample_id"], table["ptr"], table["size"] = np.arange(rows), ptrs, sizes
    image = np.zeros(rows, FIELD_TYPES[2][1])
    image["width"], image["height"], image["data_ptr"] = 500, 375, ptrs
    header = np.zeros(1, HEADER_TYPE)[0]
    header["num_samples"], header["page_size"] = rows, 1 << 21
    header["alloc_table_ptr"] = int(ptrs[-1]) + 30_000
    contents = BetonContents(header, {"image": "RGBImageField"}, {"image": image}, table)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        check_rows("synthetic.beton", contents, start_data, int(header["alloc_table_ptr"]) + table.nbytes, 512)
        best = min(best, time.perf_counter() - start)
    return best


def _header_share(beton: Path) -> tuple[float, float]:
    """(us per image for the JPEG header check alone, us per image to decode + crop), same images, one thread:
    the part of the kernel's time the check adds, without the noise of two processes on a shared machine."""
    import numba

    from aim_ds.data.kernels import decode_crop_batch, jpeg_header_sizes
    from aim_ds.data.sampling import center_crop_boxes
    from aim_ds.data.sources import gather, open_source

    numba.set_num_threads(1)
    source = open_source(beton)
    indices = np.arange(source.num_images)
    batch = gather([source], np.zeros_like(indices), indices)
    boxes = center_crop_boxes(batch.heights, batch.widths, 224, 256).astype(np.float64)
    out = np.empty((len(indices), 224, 224, 3), np.uint8)
    flips = np.zeros(len(indices), bool)
    args = (batch.payload, batch.offsets, batch.sizes, batch.heights, batch.widths, batch.modes, boxes, flips, out, 2.5)
    decode_crop_batch(*args)
    jpeg_header_sizes(batch.payload, batch.offsets, batch.sizes)
    best_header = best_decode = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        jpeg_header_sizes(batch.payload, batch.offsets, batch.sizes)
        best_header = min(best_header, time.perf_counter() - start)
        start = time.perf_counter()
        decode_crop_batch(*args)
        best_decode = min(best_decode, time.perf_counter() - start)
    return best_header / len(indices) * 1e6, best_decode / len(indices) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout without the checks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        beton = _write_beton(Path(tmp))
        ours, theirs = [], []
        for _ in range(4):
            theirs.append(_throughput(args.baseline, beton))
            ours.append(_throughput(ROOT, beton))
        header_us, decode_us = _header_share(beton)
    print(f"loader images/s, baseline: {' '.join(f'{v:.0f}' for v in theirs)} (median {np.median(theirs):.0f})")
    print(f"loader images/s, checked:  {' '.join(f'{v:.0f}' for v in ours)} (median {np.median(ours):.0f})")
    print(f"ratio checked / baseline (medians): {np.median(ours) / np.median(theirs):.3f}")
    print(f"one thread: JPEG header check {header_us:.1f} us/image, decode + 224 px crop {decode_us:.0f} us/image "
          f"({100 * header_us / decode_us:.2f} % of it)")  # fmt: skip
    print(f"check_rows on 1,000,000 rows: {_row_checks() * 1000:.0f} ms (best of 3)")


if __name__ == "__main__":
    main()
