"""Loader start-up, open files and resident memory against the number of beton shards (up to 2,000).

Writes one small real-photo beton (16 images, 96x72) with data_prep's writer and copies it to N shards with
their sidecars (identical shards: what grows with N is the per-shard cost, not the data). For each N, a fresh
process builds the training loader over the folder, then draws ``--batches`` batches of 64 (random over all
shards, so most shards are touched) and reports: start-up seconds (building the loader, i.e. finding the
shards and their counts), the same again with the shard index present, seconds to the first batch (numba
compilation or cache load included), open file descriptors and resident memory (VmRSS) of the process
after the batches. Each rank is one such process (the loader's decode workers are threads).

    python bench/bench_shards.py --counts 100 500 2000 --out bench_out/shards.md

``--conversion`` instead measures webdataset conversion images/s on the same cores: the local path
(one process, ``--workers`` = all cores) against ``--ray`` on a local Ray (one task per tar, 1 CPU each),
over ``--tars`` tars of ``--images`` real 500x375 photos, at data_prep's defaults (512 px, jpg q90).

    python bench/bench_shards.py --conversion --tars 8 --images 150 --out bench_out/conversion.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_shards(folder: Path, count: int, template: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shutil.copyfile(template, folder / f"s-{i:05d}.beton")
        shutil.copyfile(str(template) + ".json", folder / f"s-{i:05d}.beton.json")


def make_template(root: Path) -> Path:
    from data_fixtures import make_tar

    from aim_ds.data.webdataset import convert_webdataset
    from aim_ds.data.writers import WriteOptions

    make_tar(root / "t.tar", 16, size=(96, 72))
    convert_webdataset(str(root / "t.tar"), root / "template", WriteOptions(workers=1), progress=False)
    return root / "template" / "t.beton"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def child(folder: str, batches: int) -> dict[str, float]:
    """Runs in a fresh process: the measurements for one shard folder."""
    start = time.perf_counter()
    from aim_ds.data import build_train_loader

    imported = time.perf_counter()
    loader = build_train_loader(folder, batch_size=64, image_size=32, seed=0, num_workers=2)
    built = time.perf_counter()
    batches = min(batches, len(loader))
    iterator = loader.iter_epoch_uint8(0)
    next(iterator)
    first = time.perf_counter()
    for _ in range(batches - 1):
        next(iterator)
    done = time.perf_counter()
    opened = sum(1 for s in loader.sources[0].shards if s._opened)
    return {
        "import_s": imported - start,
        "startup_s": built - imported,
        "first_batch_s": first - built,
        "batches_per_s": (batches - 1) / max(done - first, 1e-9),
        "shards_touched": opened,
        "open_fds": len(os.listdir("/proc/self/fd")),
        "rss_mib": _status("VmRSS") / 1024,
    }


def run_child(folder: Path, batches: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), "--batches", str(batches)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_conversion(num_tars: int, images: int) -> str:
    """Markdown lines: images/s of the local webdataset path and of the Ray path over the same tars."""
    from data_fixtures import make_tar

    from aim_ds.data.ray_convert import convert_webdataset_ray, init_ray
    from aim_ds.data.webdataset import convert_webdataset
    from aim_ds.data.writers import WriteOptions

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="aim_ds_conv_") as tmp:
        root = Path(tmp)
        for i in range(num_tars):
            make_tar(root / f"s-{i:04d}.tar", images, start=images * i, size=(500, 375))
        total = num_tars * images
        start = time.perf_counter()
        convert_webdataset(str(root / "s-*.tar"), root / "local", WriteOptions(workers=cores), progress=False)
        local = time.perf_counter() - start
        start = time.perf_counter()
        init_ray(None)
        started = time.perf_counter()
        report = convert_webdataset_ray(str(root / "s-*.tar"), root / "ray", WriteOptions(workers=1), progress=False)
        finished = time.perf_counter()
        assert len(report.converted) == num_tars and not report.failed
    return "\n".join(
        [
            f"Conversion: {platform.node()}, {cores} cores, {time.strftime('%Y-%m-%d')}; {num_tars} tars x {images} "
            "photos 500x375 -> 512 px jpg q90",
            "",
            "| path | seconds | images/s |",
            "|---|---:|---:|",
            f"| local (`--workers {cores}`) | {local:.1f} | {total / local:.0f} |",
            f"| Ray, local cluster ({cores} CPUs, 1 per task), excluding Ray start ({started - start:.1f} s) | "
            f"{finished - started:.1f} | {total / (finished - started):.0f} |",
            f"| Ray, including its start | {finished - start:.1f} | {total / (finished - start):.0f} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--conversion", action="store_true", help="Ray against local conversion instead")
    parser.add_argument("--tars", type=int, default=8)
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batches)))
        return 0
    if args.conversion:
        text = bench_conversion(args.tars, args.images)
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="aim_ds_shards_") as tmp:
        template = make_template(Path(tmp))
        for count in args.counts:
            folder = Path(tmp) / f"n{count}"
            make_shards(folder, count, template)
            cold = run_child(folder, args.batches)  # no index yet: headers read (and the index written)
            warm = run_child(folder, args.batches)  # index present (the code before the index ignores it)
            rows.append((count, cold, warm))
    lines = [
        f"Shard scaling: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}; 16 images per shard, batch 64 at 32 px, {args.batches} batches",
        "",
        "| shards | import (s) | start-up, no index (s) | start-up, index (s) | first batch (s) | batches/s "
        "| shards touched | open fds | RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count, cold, warm in rows:
        if "error" in cold or "error" in warm:
            lines.append(f"| {count} | {cold.get('error', '')} {warm.get('error', '')} |||||||")
            continue
        lines.append(
            f"| {count} | {warm['import_s']:.1f} | {cold['startup_s']:.3f} | {warm['startup_s']:.3f} | "
            f"{warm['first_batch_s']:.2f} | "
            f"{warm['batches_per_s']:.1f} | {warm['shards_touched']} | {warm['open_fds']} | {warm['rss_mib']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
