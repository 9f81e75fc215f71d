"""data_prep / aim_ds.data.writers and aim_ds.data.beton on real JPEG/PNG bytes made from sample photographs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import jpeg_bytes, make_imagefolder, make_tar, photo_variant, read_beton_images
from PIL import Image

from aim_ds.data import read_class_names, read_sidecar
from aim_ds.data.beton import beton_num_samples, is_complete, resolve_betons, sidecar_path
from aim_ds.data.webdataset import scan_tar
from aim_ds.io import partial_path
from data_prep.__main__ import main as cli

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, env=env, cwd=ROOT)


_read_all = read_beton_images  # decoded with FFCV's reader metadata + Pillow, independent of our loader


@pytest.fixture(scope="module")
def folder_beton(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An image folder with odd modes and bad files, converted once through the CLI's main()."""
    root = tmp_path_factory.mktemp("folder")
    src = make_imagefolder(root / "src", {"n02_zebra": 6, "n01_apple": 5})
    odd = src / "n01_apple"
    base = photo_variant(40, (96, 64))
    base.convert("L").save(odd / "gray.JPEG", quality=90)
    base.convert("CMYK").save(odd / "cmyk.JPEG", quality=90)
    base.convert("P", palette=Image.ADAPTIVE).save(odd / "palette.png")
    rgba = base.convert("RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[:, :10, 3] = 0  # transparent left strip -> white
    Image.fromarray(alpha, "RGBA").save(odd / "rgba.png")
    # EXIF orientation 6: stored 96x64 landscape, displayed rotated 90 degrees clockwise (64x96 portrait).
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(odd / "rotated.JPEG", quality=95, exif=exif.tobytes())
    good = jpeg_bytes(photo_variant(41, (96, 64)))
    (odd / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[200:4000] = os.urandom(3800)
    (odd / "corrupt.JPEG").write_bytes(bytes(corrupt))
    (odd / "notes.JPEG").write_text("this is not an image")
    out = root / "out" / "train.beton"
    assert cli(["imagefolder", str(src), str(out), "--workers", "2", "--quiet"]) == 0
    return {"src": src, "out": out, "base": np.asarray(base)}


def test_imagefolder_counts_labels_classes_sidecar(folder_beton: dict) -> None:
    out = folder_beton["out"]
    assert read_class_names(out) == ["n01_apple", "n02_zebra"]
    sidecar = read_sidecar(out)
    assert sidecar is not None and is_complete(out)
    images, labels = _read_all(out)
    skipped = {Path(s["file"]).name for s in sidecar["skipped"]}
    # The corrupt file may still decode (libjpeg tolerates some damage); truncated and non-image never do.
    assert {"truncated.JPEG", "notes.JPEG"} <= skipped <= {"truncated.JPEG", "notes.JPEG", "corrupt.JPEG"}
    assert all(s["reason"] for s in sidecar["skipped"])
    n_apple = 5 + 5 + 3 - len(skipped)  # 5 photos + 5 odd-mode images + 3 bad files, minus skips
    assert sidecar["num_images"] == beton_num_samples(out) == len(images) == n_apple + 6
    assert np.bincount(labels).tolist() == [n_apple, 6]
    assert sidecar["options"]["max_resolution"] == 512 and sidecar["options"]["jpeg_quality"] == 90
    assert sidecar["options"]["write_mode"] == "jpg" and sidecar["aim_ds_version"] == "0.1.0"
    assert sidecar["source"] == str(folder_beton["src"].resolve())
    assert all(im.ndim == 3 and im.shape[2] == 3 for im in images)


def test_imagefolder_modes_and_exif(folder_beton: dict) -> None:
    images, labels = _read_all(folder_beton["out"])
    base = folder_beton["base"].astype(float)  # [64, 96, 3]
    # Files are sorted by name inside the class: cmyk, corrupt?, gray, n01_apple_*, notes(skipped), palette, rgba, rotated
    shapes = [im.shape for im in images]
    assert (96, 64, 3) in shapes, "EXIF-rotated image should be stored upright (portrait)"
    rotated = next(im for im in images if im.shape == (96, 64, 3)).astype(float)
    upright = np.rot90(base, k=-1)  # orientation 6 = rotate 90 degrees clockwise for display
    assert np.abs(rotated - upright).mean() < 6.0
    assert np.abs(rotated - np.rot90(base, k=1)).mean() > 20.0
    # Greyscale stays grey in RGB; the RGBA image's transparent strip became white.
    gray = [im for im in images if im.shape == (64, 96, 3) and np.abs(im[..., 0].astype(int) - im[..., 2]).max() <= 3]
    assert gray, "greyscale input should come out as RGB with equal channels"
    assert any(im.shape == (64, 96, 3) and im[:, :8].mean() > 245 and im[:, 20:].mean() < 200 for im in images)


def test_missing_and_empty_source_errors(tmp_path: Path) -> None:
    result = _run_cli("imagefolder", str(tmp_path / "nope"), str(tmp_path / "x.beton"))
    assert result.returncode != 0 and str(tmp_path / "nope") in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "empty").mkdir()
    result = _run_cli("imagefolder", str(tmp_path / "empty"), str(tmp_path / "x.beton"))
    assert result.returncode != 0 and str(tmp_path / "empty") in result.stderr and "Traceback" not in result.stderr
    result = _run_cli("webdataset", str(tmp_path / "shard-{0000..0003}.tar"), str(tmp_path / "o"))
    assert result.returncode != 0 and "shard-0000.tar" in result.stderr
    assert not list(tmp_path.glob("**/*.beton"))


@pytest.fixture(scope="module")
def tars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wds")
    for i in range(5):
        make_tar(root / f"dfn-{i:05d}.tar", 12, start=12 * i, png_every=4)
    return root


def test_webdataset_split_rerun_and_inspect(tars: Path, tmp_path: Path) -> None:
    out = tmp_path / "betons"
    pattern = str(tars / "dfn-{00000..00004}.tar")
    for index in range(2):
        assert (
            cli(
                [
                    "webdataset",
                    pattern,
                    str(out),
                    "--shard-index",
                    str(index),
                    "--num-shards",
                    "2",
                    "--workers",
                    "1",
                    "--quiet",
                ]
            )
            == 0
        )
    names = sorted(p.name for p in out.glob("*.beton"))
    assert names == [f"dfn-{i:05d}.beton" for i in range(5)]
    for beton in out.glob("*.beton"):
        assert is_complete(beton) and beton_num_samples(beton) == 12
        assert read_sidecar(beton)["label"] == "unlabeled (-1)"
    assert len(scan_tar(str(tars / "dfn-00000.tar"))[0]) == 12

    # Re-run with a glob over what killed runs leave behind (the sidecar is published last):
    # 00001 deleted, its sidecar alone; 00003 killed mid-write (old sidecar already removed, beton half-written
    # as a temp); 00004 killed between the two renames (a whole beton, its sidecar still a temp).
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.beton")}
    (out / "dfn-00001.beton").unlink()
    (out / "dfn-00003.beton").rename(partial_path(out / "dfn-00003.beton"))
    sidecar_path(out / "dfn-00003.beton").unlink()
    side4 = sidecar_path(out / "dfn-00004.beton")
    side4.rename(partial_path(side4))
    assert not any(is_complete(out / f"dfn-0000{i}.beton") for i in (1, 3, 4))
    assert resolve_betons(str(out / "dfn-*")) == [out / f"dfn-0000{i}.beton" for i in (0, 2, 4)]
    time.sleep(0.01)  # so that a rewritten file's mtime differs (coarse file-system clocks), not a wait
    assert cli(["webdataset", str(tars / "dfn-*.tar"), str(out), "--workers", "1", "--quiet"]) == 0
    rewritten = {p.name for p in out.glob("*.beton") if p.stat().st_mtime_ns != mtimes.get(p.name)}
    assert rewritten == {"dfn-00001.beton", "dfn-00003.beton", "dfn-00004.beton"}
    assert all(is_complete(beton) for beton in out.glob("*.beton"))
    assert not list(out.glob("*.partial"))

    result = _run_cli("inspect", str(out))
    assert result.returncode == 0, result.stderr
    assert "images:       60" in result.stdout and "files:        5" in result.stdout
    assert "jpeg_quality=90" in result.stdout and "write_mode=jpg" in result.stdout
    assert "width:" in result.stdout and "160" in result.stdout
    info = json.loads(_run_cli("inspect", str(out / "dfn-00000.beton"), "--json").stdout)
    assert info["num_images"] == 12 and info["fields"] == {"image": "RGBImageField", "label": "IntField"}


def test_killed_conversion_leaves_nothing_finished(tmp_path: Path) -> None:
    """Kill a real conversion mid-write: no beton under its final name, and a re-run completes it."""
    src = make_imagefolder(tmp_path / "src", {"a": 60, "b": 60}, size=(400, 300))
    out = tmp_path / "o" / "x.beton"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "data_prep",
            "imagefolder",
            str(src),
            str(out),
            "--workers",
            "1",
            "--chunk-size",
            "2",
            "--quiet",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # The FFCV write has begun once the temp beton holds its header: validation is over, nothing is
        # published yet. Kill right then (bounded wait; the bound only turns a hang into a clear failure).
        partial = partial_path(out)
        deadline = time.monotonic() + 120
        while not (partial.exists() and partial.stat().st_size > 0):
            assert process.poll() is None, f"conversion exited ({process.returncode}) before {partial} appeared"
            assert time.monotonic() < deadline, f"{partial} did not appear within 120 s"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: the assertion above says why
            os.killpg(process.pid, 9)
        process.wait()
    assert process.returncode == -9, "conversion finished before it could be killed"
    assert partial.exists(), "the kill should leave the half-written temp beton as debris"
    assert not out.exists() and not sidecar_path(out).exists() and not is_complete(out)
    assert cli(["imagefolder", str(src), str(out), "--workers", "2", "--quiet"]) == 0
    assert is_complete(out) and beton_num_samples(out) == 120
    assert not list(out.parent.glob("*.partial")), "the re-run should remove the killed run's debris"
