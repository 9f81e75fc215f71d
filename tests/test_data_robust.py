"""Nothing hangs, one bad input stops nothing else: real worker deaths, full and read-only disks, bad tars,
decompression bombs, bad betons. Real files, real FFCV writer processes, real tmpfs mounts (root only)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import make_bad_tar, make_imagefolder, make_tar, photo_variant
from PIL import Image

from aim_ds.data import read_sidecar
from aim_ds.data.beton import BetonError, beton_num_samples, inspect_betons, is_complete
from aim_ds.data.loader import UpsamplingWarning, build_eval_loader, build_train_loader
from aim_ds.data.shard_index import index_path
from aim_ds.data.sources import open_source
from aim_ds.io import partial_path
from data_prep.__main__ import main as cli

ROOT = Path(__file__).resolve().parents[1]


def _popen(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "data_prep", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    process = _popen(*args)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _wait_for_write(process: subprocess.Popen, partial: Path, seconds: float = 120) -> None:
    """Until the FFCV write has begun (the temp beton holds its header); bounded, so a hang fails clearly."""
    deadline = time.monotonic() + seconds
    while not (partial.exists() and partial.stat().st_size > 0):
        assert process.poll() is None, f"conversion exited ({process.returncode}): {process.communicate()[1]}"
        assert time.monotonic() < deadline, f"{partial} did not appear within {seconds} s"
        time.sleep(0.01)


def _forked_children(pid: int) -> list[int]:
    """Children of pid running the same command line: multiprocessing forks (FFCV's writer workers), not
    the resource tracker (which multiprocessing spawns with its own command line)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == cmdline]


def _finish(process: subprocess.Popen, seconds: float) -> tuple[int, str, float]:
    """(exit status, stderr, seconds taken) of a process that must end within ``seconds``."""
    start = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"conversion still running {seconds} s after its writer died: it hangs")
    return process.returncode, stderr, time.monotonic() - start


def test_killed_writer_worker_ends_the_output_with_an_error(tmp_path: Path) -> None:
    src = make_imagefolder(tmp_path / "src", {"a": 150, "b": 150}, size=(400, 300))
    out = tmp_path / "o" / "x.beton"
    process = _popen("imagefolder", str(src), str(out), "--workers", "2", "--chunk-size", "2", "--quiet")
    _wait_for_write(process, partial_path(out))
    deadline = time.monotonic() + 30  # the header is written just before the workers start
    while not (workers := _forked_children(process.pid)):
        assert process.poll() is None and time.monotonic() < deadline, "no FFCV writer worker found"
        time.sleep(0.005)
    os.kill(workers[0], signal.SIGKILL)
    status, stderr, seconds = _finish(process, 30)
    assert status == 2 and seconds < 10, stderr
    assert f"writer process {workers[0]} was killed by SIGKILL" in stderr and "Traceback" not in stderr
    assert not out.exists() and not partial_path(out).exists()


@contextlib.contextmanager
def _tmpfs(size: str, *options: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted on a fresh folder (root only; skips otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    folder = Path(tempfile.mkdtemp(prefix="aim_ds_tmpfs_"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(folder)])
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def test_full_disk_is_a_clear_error_before_and_during_the_write(tmp_path: Path) -> None:
    src = make_imagefolder(tmp_path / "src", {"a": 60, "b": 60}, size=(200, 150))
    with _tmpfs("1m") as small:
        result = _run("imagefolder", str(src), str(small / "x.beton"), "--write-mode", "raw", "--quiet")
        assert result.returncode == 2 and f"not enough free space in {small}" in result.stderr, result.stderr
        assert "bytes" in result.stderr and not list(small.iterdir())
    # Enough space at the check (120 raw images of 90 KB + pages), then the disk fills up mid-write: the
    # writer worker's ENOSPC must end the conversion, not hang it.
    with _tmpfs("16m") as disk:
        out = disk / "x.beton"
        process = _popen("imagefolder", str(src), str(out), "--write-mode", "raw", "--workers", "1",
                         "--chunk-size", "2", "--quiet")  # fmt: skip
        _wait_for_write(process, partial_path(out))
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * (1 << 20))
        status, stderr, seconds = _finish(process, 30)
        assert status == 2 and seconds < 10, stderr
        assert "No space left on device" in stderr and "Traceback" not in stderr
        assert not out.exists() and not partial_path(out).exists()


def test_read_only_output_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    src = make_imagefolder(tmp_path / "src", {"a": 3})
    make_tar(tmp_path / "s-0.tar", 3)
    with _tmpfs("4m", "ro") as readonly:
        for args in (
            ("imagefolder", str(src), str(readonly / "x.beton")),
            ("webdataset", str(tmp_path / "s-0.tar"), str(readonly / "wds")),
        ):
            result = _run(*args, "--quiet")
            assert result.returncode == 2, result.stderr
            assert result.stderr.count("\n") == 1 and str(readonly) in result.stderr, result.stderr
            assert "Read-only file system" in result.stderr


def test_imagefolder_needs_overwrite_and_quiet_is_silent(tmp_path: Path) -> None:
    src = make_imagefolder(tmp_path / "src", {"a": 4, "b": 3})
    out = tmp_path / "x.beton"
    first = _run("imagefolder", str(src), str(out), "--quiet")
    assert first.returncode == 0 and first.stderr == "", first.stderr  # no FFCV progress bar either
    mtime = out.stat().st_mtime_ns
    again = _run("imagefolder", str(src), str(out), "--quiet")
    assert again.returncode == 2 and "--overwrite" in again.stderr and out.stat().st_mtime_ns == mtime
    assert _run("imagefolder", str(src), str(out), "--quiet", "--overwrite").returncode == 0
    assert out.stat().st_mtime_ns != mtime and is_complete(out)


def test_bad_tars_are_recorded_and_the_rest_converted(tmp_path: Path) -> None:
    tars = tmp_path / "tars"
    tars.mkdir()
    make_tar(tars / "s-0.tar", 5)
    make_bad_tar(tars / "s-1.tar", "no-images")
    make_bad_tar(tars / "s-2.tar", "corrupt")
    make_tar(tars / "s-3.tar", 5, start=5)
    out = tmp_path / "out"
    for _ in range(2):  # a re-run retries the failed tars only, and fails the same way
        result = _run("webdataset", str(tars / "s-*.tar"), str(out), "--workers", "1", "--quiet")
        assert result.returncode == 1, result.stderr
        assert "2 tar(s) failed" in result.stderr and "Traceback" not in result.stderr
        assert "s-1.tar" in result.stderr and "no image samples" in result.stderr
        assert "s-2.tar" in result.stderr and "none of the 4 files decoded" in result.stderr
        assert sorted(p.name for p in out.glob("*.beton")) == ["s-0.beton", "s-3.beton"]
        assert all(is_complete(b) and beton_num_samples(b) == 5 for b in out.glob("*.beton"))
    assert "2 already complete" in result.stdout


def test_decompression_bomb_is_skipped_and_large_images_reduced(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    # 10000 x 10000 = 100 M pixels, over Pillow's 89.5 M cap: a few KB of PNG that would decode to 300 MB RGB.
    Image.new("1", (10_000, 10_000)).save(src / "bomb.png")
    assert (src / "bomb.png").stat().st_size < 200_000
    # 6000 x 4000 greyscale, under the cap: reduced before the RGB conversion, stored at 512 px.
    big = np.asarray(photo_variant(0, (600, 400)).convert("L").resize((6000, 4000), Image.BICUBIC))
    Image.fromarray(big).save(src / "big.png")
    photo_variant(1).save(src / "photo.jpg", quality=90)
    (src / "text.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "x.beton"
    assert cli(["imagefolder", str(src.parent), str(out), "--workers", "1", "--quiet"]) == 0
    sidecar = read_sidecar(out)
    reasons = {Path(s["file"]).name: s["reason"] for s in sidecar["skipped"]}
    assert set(reasons) == {"bomb.png", "text.jpg"} and sidecar["num_images"] == 2
    assert reasons["bomb.png"].startswith("DecompressionBombWarning") and "100000000 pixels" in reasons["bomb.png"]
    assert "BytesIO" not in reasons["text.jpg"] and "a/text.jpg" in reasons["text.jpg"]
    info = inspect_betons(out)
    assert info["longer_side"]["max"] == 512


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    src = make_imagefolder(root / "src", {"a": 10, "b": 10}, size=(80, 60))
    out = root / "small.beton"
    assert cli(["imagefolder", str(src), str(out), "--workers", "1", "--max-resolution", "64", "--quiet"]) == 0
    return out


def test_wrong_files_as_betons_name_the_file_and_the_problem(small_beton: Path, tmp_path: Path) -> None:
    jpeg = tmp_path / "photo.beton"
    photo_variant(0).save(jpeg, format="JPEG")
    truncated = tmp_path / "cut.beton"
    data = small_beton.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path, words in ((jpeg, "not an FFCV beton"), (truncated, "truncated")):
        with pytest.raises(BetonError, match=words) as error:
            build_train_loader(str(path), batch_size=2, image_size=32)
        assert str(path) in str(error.value)
        result = _run("inspect", str(path))
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    assert "JPEG" in str(pytest.raises(BetonError, beton_num_samples, jpeg).value)
    # Cut inside the allocation table only: the size check against the sidecar catches it.
    shutil.copy(small_beton, tmp_path / "tail.beton")
    shutil.copy(str(small_beton) + ".json", tmp_path / "tail.beton.json")
    with open(tmp_path / "tail.beton", "r+b") as f:
        f.truncate(len(data) - 24)
    with pytest.raises(BetonError, match="tail.beton"):
        beton_num_samples(tmp_path / "tail.beton")


def test_small_betons_trained_large_warn(small_beton: Path) -> None:
    with pytest.warns(UpsamplingWarning, match=r"stored at 64 px .* crops 224 px"):
        build_train_loader(str(small_beton), batch_size=2, image_size=224)
    with pytest.warns(UpsamplingWarning, match="64 px"):
        build_eval_loader(str(small_beton), batch_size=2, image_size=224, resize_size=256)


def test_shard_index_counts_and_staleness(tmp_path: Path) -> None:
    tars = tmp_path / "tars"
    tars.mkdir()
    for i in range(3):
        make_tar(tars / f"s-{i}.tar", 4 + i, start=10 * i)
    out = tmp_path / "out"
    assert cli(["webdataset", str(tars / "s-*.tar"), str(out), "--workers", "1", "--quiet"]) == 0
    assert index_path(out).is_file()
    assert [s.num_images for s in open_source(out).shards] == [4, 5, 6]
    # Rewrite one shard with a different count and put the old index back (as a concurrent writer might):
    # the stale entry is noticed by stat and that one header re-read.
    stale = index_path(out).read_text()
    make_tar(tars / "s-1.tar", 9, start=10)
    time.sleep(0.01)
    assert cli(["webdataset", str(tars / "s-1.tar"), str(out), "--workers", "1", "--quiet", "--overwrite"]) == 0
    index_path(out).write_text(stale)
    assert [s.num_images for s in open_source(out).shards] == [4, 9, 6]
    assert '"s-1.beton": {"num_images": 9' in index_path(out).read_text()


def test_numpy_beton_format_matches_ffcv(small_beton: Path) -> None:
    """aim_ds reads betons without importing FFCV (~9 s); its dtypes must stay FFCV's."""
    from ffcv.fields import FloatField, IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    from aim_ds.data import beton

    assert (beton.HEADER_TYPE, beton.FIELD_DESC_TYPE, beton.ALLOC_TABLE_TYPE, beton.CURRENT_VERSION) == (
        HeaderType, FieldDescType, ALLOC_TABLE_TYPE, CURRENT_VERSION,
    )  # fmt: skip
    for type_id, field in ((0, FloatField()), (1, IntField()), (2, RGBImageField())):
        assert beton.FIELD_TYPES[type_id] == (type(field).__name__, field.metadata_type)
    ours, theirs = beton.read_beton(small_beton), Reader(str(small_beton))
    assert list(ours.fields) == theirs.field_names and np.array_equal(ours.alloc_table, theirs.alloc_table)
    for i, name in enumerate(theirs.field_names):
        assert np.array_equal(ours.metadata[name], theirs.metadata[f"f{i}"])
