"""Hostile betons and shard folders: every damaged file is one clear error naming it (and the row), in
``data_prep inspect``, in the training loader and at the driver's preflight, never a crash, a hang or rows
of garbage; FIFOs and sockets are refused by name wherever a path is opened.

The betons are real: written by the project's writer from real photo JPEGs, then patched through FFCV's
record layouts (tests/beton_craft.py). Before these checks, ``zero_width`` killed the loader with
``free(): invalid size`` (SIGABRT) or SIGSEGV, ``mismatch_8x8`` and ``count_up_by_one`` trained on
uninitialised or zero rows, and a FIFO hung ``inspect`` and every rank.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from beton_craft import patched, setter
from data_fixtures import jpeg_bytes, make_imagefolder, make_tar, photo_variant

from aim_ds.data.beton import BetonError, check_jpeg_sizes, read_beton
from aim_ds.data.shard_index import index_path, refresh_shard_index
from aim_ds.data.writers import WriteOptions, convert_imagefolder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "run" / "configs"
DS_ZERO3 = ROOT / "ds_configs" / "zero3.json"
ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real beton of 6 photo JPEGs (48x40), written by the project's writer, with its sidecar."""
    root = tmp_path_factory.mktemp("good")
    folder = make_imagefolder(root / "images", {"a": 3, "b": 3}, size=(48, 40))
    out = root / "train.beton"
    convert_imagefolder(folder, out, WriteOptions(workers=1), progress=False)
    return out


def _both(value: int, row: int):
    def edit(records: np.ndarray) -> None:
        records["image"]["width"][row] = value
        records["image"]["height"][row] = value

    return edit


def _header(key: str, value):
    def edit(header: np.void) -> None:
        header[key] = value(header) if callable(value) else value

    return edit


def _table(row: int, key: str, value: int):
    return setter(key, row, None, value)


# name -> (patch keywords, text the one error must contain besides the file's path)
CASES: dict[str, tuple[dict, str]] = {
    "zero_width": ({"rows": setter("image", 2, "width", 0)}, "row 2 ('image'): image size 0x40"),
    "zero_height_no_sidecar": (
        {"rows": setter("image", 2, "height", 0), "sidecar": False},
        "row 2 ('image'): image size 48x0",
    ),
    "huge": ({"rows": _both(65535, 1)}, "row 1 ('image'): image size 65535x65535 exceeds the stored maximum 512"),
    "huge_no_sidecar": ({"rows": _both(65535, 1), "sidecar": False}, "row 1 ('image'): image size 65535x65535"),
    "mismatch_8x8": ({"rows": _both(8, 3)}, "row 3"),
    "mode_unknown": ({"rows": setter("image", 0, "mode", 7)}, "row 0 ('image'): mode 7"),
    "raw_too_short": ({"rows": setter("image", 5, "mode", 1)}, "row 5 ('image'): raw image 48x40"),
    "count_up_by_one": ({"header": _header("num_samples", 7), "sidecar": False}, "row 6 ('image')"),
    "count_up_sidecar": ({"header": _header("num_samples", 7)}, "holds 7 images but its sidecar says 6"),
    "count_up_a_lot": ({"header": _header("num_samples", 10**9)}, "1000000000 samples cannot fit before"),
    "count_up_to_table": ({"header": _header("num_samples", 175000), "sidecar": False}, "header says 175000 samples"),
    "count_down": ({"header": _header("num_samples", 5), "sidecar": False}, "allocation 5 belongs to sample 5"),
    "pointer_past_eof": ({"rows": setter("image", 4, "data_ptr", 1 << 40)}, "row 4 ('image'): its data pointer"),
    "pointer_of_other_row": ({"rows": setter("image", 4, "data_ptr", 2097152)}, "row 4 ('image'): its data pointer"),
    "allocation_past_eof": ({"table": _table(4, "ptr", 1 << 62)}, "allocation 4 (sample 4"),
    "allocation_size_huge": ({"table": _table(1, "size", 1 << 40)}, "allocation 1 (sample 1"),
    "metadata_over_pages": (
        {"header": _header("num_samples", 2097152 // 24 + 5), "sidecar": False},
        "allocation 0 (sample 0",
    ),
}
DECODE_ONLY = {"mismatch_8x8"}  # rows that look right; the JPEG's own header disagrees


@pytest.fixture(scope="module")
def crafted(good: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crafted")
    return {name: patched(good, root / f"{name}.beton", **kwargs) for name, (kwargs, _) in CASES.items()}


def _driver():
    spec = importlib.util.spec_from_file_location("pretrain_driver", ROOT / "run" / "pretrain.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    return driver


def _args(source: Path, out_dir: Path, val: Path) -> list[str]:
    return [
        "--deepspeed", str(DS_ZERO3), "--config", str(CONFIGS / "aim-test.yaml"),
        f"data.sources=[{{path: '{source}', prob: 1.0}}]", f"data.val_path={val}", f"out_dir={out_dir}",
    ]  # fmt: skip


def test_good_beton_reads_whole(good: Path) -> None:
    contents = read_beton(good)
    table = contents.alloc_table
    assert np.array_equal(contents.blob_sizes["image"], table["size"][np.argsort(table["sample_id"])])
    assert check_jpeg_sizes(good, contents) > 0


@pytest.mark.parametrize("name", list(CASES))
def test_open_names_file_and_row(crafted: dict[str, Path], name: str) -> None:
    """read_beton refuses every damaged layout; the decode-only case passes it and fails the JPEG check."""
    path, expected = crafted[name], CASES[name][1]
    if name in DECODE_ONLY:
        contents = read_beton(path)
        with pytest.raises(BetonError) as error:
            check_jpeg_sizes(path, contents)
        assert "its JPEG header says 48x40" in str(error.value)
    else:
        with pytest.raises(BetonError) as error:
            read_beton(path)
    assert str(path) in str(error.value) and expected in str(error.value), str(error.value)


@pytest.mark.parametrize("name", list(CASES))
def test_inspect_one_line_exit_2(crafted: dict[str, Path], name: str, capsys: pytest.CaptureFixture) -> None:
    from data_prep.__main__ import main

    assert main(["inspect", str(crafted[name])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(crafted[name]) in err[0] and CASES[name][1] in err[0], err


LOADER_SCRIPT = """
import sys
from aim_ds.data import build_train_loader, build_eval_loader
for path in sys.argv[1:]:
    print("start", path, flush=True)
    try:
        loader = build_train_loader(path, batch_size=2, image_size=32, num_workers=1)
        for _ in loader.iter_epoch(0):
            pass
        for _ in build_eval_loader(path, batch_size=3, image_size=32, resize_size=32, num_workers=1):
            pass
        print("result ok", flush=True)
    except Exception as error:
        print("result", type(error).__name__, str(error).replace(chr(10), " "), flush=True)
"""


def test_loader_names_file_and_row_never_crashes(crafted: dict[str, Path], good: Path) -> None:
    """Every crafted beton through both loaders in one child process: a crash shows as a signal exit code
    (SIGABRT from ``free(): invalid size``, SIGSEGV), a bad row as one BetonError naming file and row."""
    paths = [str(good)] + [str(crafted[name]) for name in CASES]
    proc = subprocess.run(
        [sys.executable, "-c", LOADER_SCRIPT, *paths], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-3000:]}"
    results = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("result ")]
    assert results[0] == "ok" and len(results) == len(paths), proc.stdout
    for name, result in zip(CASES, results[1:], strict=True):
        path, expected = str(crafted[name]), CASES[name][1]
        assert result.startswith("BetonError ") and path in result and expected in result, (name, result)
        if name in DECODE_ONLY:
            assert "cannot decode: the JPEG's own header gives other sides" in result, result


@pytest.mark.parametrize("name", list(CASES))
def test_preflight_names_file_and_row(
    crafted: dict[str, Path], good: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """As a training source the damaged beton stops the real driver at preflight: exit 2, one error line,
    no process group (no engine) and nothing written in the run folder."""
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        code = _driver().main(_args(crafted[name], out, good))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1, caplog.text
    assert "data.sources[0].path=" in errors[0] and str(crafted[name]) in errors[0], errors
    assert CASES[name][1] in errors[0], errors
    assert not torch.distributed.is_initialized() and not out.exists()


def _driver_subprocess(source: Path, val: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "run" / "pretrain.py"), *_args(source, out, val)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "deepspeed.initialize" not in proc.stderr
    return lines[0]


def test_hostile_sources_stop_the_real_driver(
    good: Path, crafted: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A zero-width row (it crashed the loader) and a FIFO named .beton (it hung every rank) through
    ``python run/pretrain.py`` (a world of one fails at preflight, so no launcher is needed); a JPEG renamed
    .beton, a truncated beton and a FIFO as ``data.val_path`` through the same driver's main() in-process."""
    fifo = tmp_path / "fifo.beton"
    os.mkfifo(fifo)
    for k, (source, expected) in enumerate(
        {crafted["zero_width"]: "row 2 ('image'): image size 0x40", fifo: "a FIFO, not a regular file"}.items()
    ):
        line = _one_error(_driver_subprocess(source, good, tmp_path / f"run{k}"))
        assert f"data.sources[0].path='{source}'" in line and expected in line, line
    renamed = tmp_path / "photo.beton"
    renamed.write_bytes(jpeg_bytes(photo_variant(0, (64, 48))))
    truncated = tmp_path / "cut.beton"
    truncated.write_bytes(good.read_bytes()[: 2097152 + 3000])
    cases = [
        (renamed, good, "data.sources[0].path", "not an FFCV beton (header version 55551, expected 2; the file looks like a JPEG image)"),
        (truncated, good, "data.sources[0].path", "truncated or corrupt beton"),
        (good, fifo, "data.val_path", "a FIFO, not a regular file"),
    ]  # fmt: skip
    for k, (source, val, key, expected) in enumerate(cases):
        caplog.clear()
        with _deadline(120), caplog.at_level(logging.INFO):
            code = _driver().main(_args(source, tmp_path / f"in{k}", val))
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert code == 2 and len(errors) == 1, caplog.text
        assert f"{key}='{val if key == 'data.val_path' else source}'" in errors[0] and expected in errors[0], errors


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging: SIGALRM interrupts a blocking open or read of a FIFO."""

    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s: something waits on a FIFO")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m data_prep ARGS`` in this process (its main(), output captured), within a deadline."""
    from data_prep.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with _deadline(300), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return subprocess.CompletedProcess(["data_prep", *args], code, out.getvalue(), err.getvalue())


def test_fifo_beton_inspect_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "x.beton"
    os.mkfifo(fifo)
    proc = _run(["inspect", str(fifo)])
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == f"error: {fifo}: a FIFO, not a regular file: only regular files are read"
    )
    folder = tmp_path / "shards"
    folder.mkdir()
    os.mkfifo(folder / "shards.index.json")
    shutil.copyfile(Path(__file__), folder / "not_a.beton")  # any regular file first in the folder
    proc = _run(["inspect", str(folder)])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_fifo_and_socket_in_image_folder_are_skipped_by_name(tmp_path: Path) -> None:
    folder = make_imagefolder(tmp_path / "images", {"a": 2, "b": 2}, size=(48, 40))
    os.mkfifo(folder / "a" / "pipe.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "b" / "sock.jpg"))
    try:
        proc = _run(["imagefolder", str(folder), str(tmp_path / "out.beton"), "--workers", "1", "--quiet"])
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and ": 4 images, 2 skipped" in proc.stdout, proc.stdout
    assert "a/pipe.jpg: " in proc.stdout and "a FIFO, not a regular file" in proc.stdout, proc.stdout
    assert "b/sock.jpg: " in proc.stdout and "a socket, not a regular file" in proc.stdout, proc.stdout


def test_fifo_tar_in_webdataset_input_fails_by_name(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    make_tar(tmp_path / "in" / "000.tar", 4)
    os.mkfifo(tmp_path / "in" / "001.tar")
    proc = _run(["webdataset", str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"), "--workers", "1", "--quiet"])
    assert proc.returncode == 1, proc.stderr  # the good tar is converted, the FIFO listed as failed
    assert "1 converted" in proc.stdout and "1 failed" in proc.stdout, proc.stdout
    assert f"{tmp_path / 'in' / '001.tar'}: a FIFO, not a regular file" in proc.stderr, proc.stderr


def test_index_that_lies_fails_at_preflight_and_in_the_loader(
    good: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``shards.index.json`` claiming 5 images for a 6-image shard (its size and mtime still matching):
    preflight names the index and the shard; the loader's first read of that shard names them too,
    instead of an uncaught ValueError hours in."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(2):
        shutil.copyfile(good, folder / f"s{k}.beton")
    refresh_shard_index(folder)
    index = json.loads(index_path(folder).read_text())
    assert index["shards"]["s1.beton"]["num_images"] == 6
    index["shards"]["s1.beton"]["num_images"] = 5
    index_path(folder).write_text(json.dumps(index))
    with caplog.at_level(logging.INFO):
        code = _driver().main(_args(folder, tmp_path / "run", good))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1, caplog.text
    assert f"{index_path(folder)} says s1.beton holds 5 images, its header says 6" in errors[0], errors
    from aim_ds.data.sources import open_source

    source = open_source(folder)
    with pytest.raises(BetonError, match=r"s1.beton: holds 6 images, 5 expected \(from .*shards.index.json"):
        source.shards[1].ensure_open()
