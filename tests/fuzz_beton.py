"""Property-based fuzzing of every reader a beton folder reaches: the beton header, field descriptors,
metadata rows and allocation table, the sidecar JSON and ``shards.index.json``.

The property: any mutation of a valid file gives the right result (every image decodes to the same pixels
as the original, the counts are right) or one :class:`~aim_ds.data.beton.BetonError` naming the file;
never another exception, a crash (faulthandler prints it and the exit status is a signal), a hang (each
example has a 60 s watchdog) or an allocation beyond a bound set by the file's size (tracemalloc peak).
Mutations of the JPEG bytes themselves are not fuzzed: a beton has no checksum, so a flipped bit in
entropy-coded data decodes to other pixels by design.

    AIM_FUZZ_EXAMPLES=2000 python tests/fuzz_beton.py GOOD.beton     # standalone (tests/test_fuzz_beton.py)

Prints one JSON line: examples tried per target, outcomes, and the failures found (none expected).
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import sys
import tempfile
import traceback
import tracemalloc
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from beton_craft import layout  # noqa: E402

from aim_ds.data.beton import (  # noqa: E402
    BetonError,
    format_inspection,
    inspect_betons,
)
from aim_ds.data.loader import build_eval_loader  # noqa: E402
from aim_ds.data.shard_index import index_path, refresh_shard_index  # noqa: E402
from aim_ds.data.sources import check_betons  # noqa: E402

EXAMPLES = int(os.environ.get("AIM_FUZZ_EXAMPLES", "40"))
WATCHDOG_SECONDS = 60
#: Bytes a read may allocate beyond the file's own size (numpy and loader scratch of a tiny beton).
ALLOWANCE = 64 << 20
INTERESTING = [0, 1, 2, 7, 255, 256, 4095, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]

stats: dict[str, dict[str, int]] = {}
failures: list[str] = []


def _record(target: str, outcome: str) -> None:
    stats.setdefault(target, {}).setdefault(outcome, 0)
    stats[target][outcome] += 1


def _decode_all(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a beton through the eval loader (the same kernel as training), uint8 crops and labels."""
    loader = build_eval_loader(path, batch_size=64, image_size=16, resize_size=16, num_workers=1)
    images, labels = zip(*loader.iter_uint8(), strict=True)
    return np.concatenate(images), np.concatenate(labels)


def _read_all(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Everything a user's tools do with a beton: inspect (rows and JPEG headers), preflight, the loader."""
    format_inspection(inspect_betons(path))
    check_betons([path])
    return _decode_all(path)


def check(target: str, path: Path, expected: tuple[np.ndarray, np.ndarray], read=None, names: tuple = ()) -> None:
    """The property for one mutated file; ``names``: paths an error may name instead of ``path``."""
    size = path.stat().st_size
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    tracemalloc.start()
    try:
        result = (read or _read_all)(path)
    except BetonError as error:
        message = str(error)
        if not any(str(p) in message for p in (path, *names)) or "\n" in message:
            raise AssertionError(f"{target}: error does not name the file in one line: {message!r}") from None
        _record(target, "error")
        return
    except Exception as error:
        where = traceback.format_exc().strip().splitlines()[-6:]
        raise AssertionError(f"{target}: {type(error).__name__} instead of a BetonError: {error} {where}") from error
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        faulthandler.cancel_dump_traceback_later()
    if peak > size + ALLOWANCE:
        raise AssertionError(f"{target}: allocated {peak} bytes reading a {size}-byte file")
    if expected is not None:
        images, _ = result
        if images.shape != expected[0].shape or not np.array_equal(images, expected[0]):
            raise AssertionError(f"{target}: read without error but the pixels differ from the original")
    _record(target, "same")


def _regions(good: Path) -> dict[str, tuple[int, int]]:
    offset, count, table_ptr = layout(good)
    rows_end = offset + count * 24
    return {
        "header": (0, 24),
        "descriptors": (24, offset),
        "rows": (offset, rows_end),
        "table": (table_ptr, good.stat().st_size),
        "structure": (0, rows_end),
    }


edit = st.tuples(
    st.floats(0, 1, exclude_max=True),
    st.one_of(
        st.tuples(st.just(1), st.integers(0, 255)),
        st.tuples(st.sampled_from([2, 4, 8]), st.sampled_from(INTERESTING)),
        st.tuples(st.sampled_from([2, 4, 8]), st.integers(0, 2**64 - 1)),
    ),
)


def _fresh(work: Path, kind: str, counter) -> Path:
    """A new folder per example (the loader keeps a shard index per folder), with the beton's path in it."""
    folder = work / f"{kind}{next(counter)}"
    folder.mkdir()
    return folder / "x.beton"


def run(good: Path, work: Path) -> None:
    expected = _decode_all(good)
    regions = _regions(good)
    original = good.read_bytes()
    sidecar_text = Path(str(good) + ".json").read_text()
    counter = iter(range(10**9))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate, Phase.shrink])  # fmt: skip
    @given(
        region=st.sampled_from(sorted(regions)),
        edits=st.lists(edit, min_size=1, max_size=6),
        cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
        with_sidecar=st.booleans(),
    )
    def beton(region: str, edits: list, cut: float | None, with_sidecar: bool) -> None:
        low, high = regions[region]
        data = bytearray(original)
        for where, (width, value) in edits:
            at = low + int(where * (high - low))
            data[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")[: len(data) - at]
        if cut is not None:
            data = data[: int(cut * len(data))]
        path = _fresh(work, "b", counter)
        path.write_bytes(bytes(data))
        if with_sidecar:
            Path(str(path) + ".json").write_text(sidecar_text)
        try:
            check("beton", path, expected)
        finally:
            shutil.rmtree(path.parent)

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    )

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate, Phase.shrink])  # fmt: skip
    @given(
        mode=st.sampled_from(["value", "bytes"]),
        key=st.sampled_from(["num_images", "beton_bytes", "options", "format", "skipped", "num_skipped", "source"]),
        value=json_values,
        edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    )
    def sidecar(mode: str, key: str, value, edits: list) -> None:
        path = _fresh(work, "s", counter)
        shutil.copyfile(good, path)
        if mode == "value":
            content = json.loads(sidecar_text)
            if key == "options" and isinstance(value, dict) is False:
                content["options"] = {"max_resolution": value}
            else:
                content[key] = value
            text = json.dumps(content).encode()
        else:
            text = bytearray(sidecar_text.encode())
            for where, byte in edits:
                text[int(where * len(text))] = byte
        Path(str(path) + ".json").write_bytes(bytes(text))
        try:
            check("sidecar", path, expected)
        finally:
            shutil.rmtree(path.parent)

    folder = work / "shards"
    folder.mkdir()
    for k in range(2):
        shutil.copyfile(good, folder / f"s{k}.beton")
    refresh_shard_index(folder)
    index_text = index_path(folder).read_text()
    truth = 2 * len(expected[0])

    def read_index(_: Path) -> None:
        if check_betons(sorted(folder.glob("*.beton"))) != truth:
            raise AssertionError("index: check_betons returned a wrong count without an error")

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate, Phase.shrink])  # fmt: skip
    @given(
        mode=st.sampled_from(["count", "entry", "bytes"]),
        value=json_values,
        edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    )
    def index(mode: str, value, edits: list) -> None:
        content = json.loads(index_text)
        if mode == "count":
            content["shards"]["s1.beton"]["num_images"] = value
            text = json.dumps(content).encode()
        elif mode == "entry":
            content["shards"]["s0.beton"] = value
            text = json.dumps(content).encode()
        else:
            text = bytearray(index_text.encode())
            for where, byte in edits:
                text[int(where * len(text))] = byte
        index_path(folder).write_bytes(bytes(text))
        check("index", folder / "s1.beton", None, read=read_index, names=(index_path(folder), folder))

    for test in (beton, sidecar, index):
        try:
            test()
        except Exception as error:  # noqa: BLE001 - reported in the summary line, exit status 1
            found = getattr(error, "exceptions", None) or [error]  # hypothesis groups distinct failures
            failures.extend(f"{test.__name__}: {e}" for e in found)


def main() -> int:
    good = Path(sys.argv[1])
    faulthandler.enable()
    with tempfile.TemporaryDirectory(prefix="aim-fuzz-") as work:
        run(good, Path(work))
    print(json.dumps({"examples_per_target": EXAMPLES, "outcomes": stats, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
