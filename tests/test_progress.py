"""Progress output that suits where it goes: tqdm bars on a terminal, whole periodic lines in a file.

The converter runs as the real CLI with its output sent to a file (as under SLURM) and, once, to a
real pseudo-terminal; the line report is checked directly too.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from aim_ds.progress import LineProgress, format_duration, progress, progress_mode
from tests.data_fixtures import make_imagefolder

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(validate|write) [^:]*: (done )?(\d+)/(\d+) img \((\d+)%\)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("progress") / "src", {"a": 20, "b": 20}, size=(48, 40))


def _convert(folder: Path, out: Path, stdout: int, stderr: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", "imagefolder", str(folder), str(out), "--workers", "1"],
        cwd=ROOT,
        stdout=stdout,
        stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=300,
    )


def test_converter_logs_plain_lines_to_a_file(folder: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "convert.log"
    with open(log_path, "wb") as log_file:
        # stdout and stderr to one file, as `sbatch` or `make demo > log 2>&1` does.
        result = _convert(
            folder, tmp_path / "out.beton", log_file.fileno(), subprocess.STDOUT, AIM_PROGRESS_INTERVAL_S="0"
        )
    text = log_path.read_bytes().decode()
    assert result.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text  # no redraws, no cursor movement
    lines = [m for m in map(LINE.match, text.splitlines()) if m]
    # The validation pass reports each tenth of the 40 images (at interval 0); FFCV's writer workers
    # report in jumps (all 40 at once here): at least their closing line.
    for stage, least in (("validate", 10), ("write", 1)):
        counts = [int(m.group(3)) for m in lines if m.group(1) == stage]
        assert len(counts) >= least, text
        assert counts == sorted(counts) and counts[-1] == 40, (stage, counts)
        done = [m for m in lines if m.group(1) == stage and m.group(2)]
        assert len(done) == 1 and int(done[0].group(5)) == 100, text


def test_a_terminal_gets_a_bar() -> None:
    leader, follower = pty.openpty()  # a real terminal: a bar must stay a bar there
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # tqdm draws nothing at 0 rows
    code = "from aim_ds.progress import progress\nfor _ in progress(range(40), desc='scan', mininterval=0): pass"
    try:
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=follower,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=120,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    text = b"".join(chunks).decode(errors="replace")
    assert result.returncode == 0, text
    assert "\r" in text and "40/40" in text  # tqdm's redraws
    assert "done" not in text  # not the line report


def test_line_report_tenths_and_close() -> None:
    out = io.StringIO()
    report = LineProgress(range(100), desc="scan", unit="img", file=out, interval_s=0.0)
    assert list(report) == list(range(100))  # iteration passes the items through and closes the report
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"scan: {10 * k}/100 img ({10 * k}%)" for k in range(1, 11)] + [
        "scan: done 100/100 img (100%)"
    ]
    report.close()  # a second close prints nothing more
    assert len(out.getvalue().splitlines()) == 11


def test_line_report_spacing_and_postfix() -> None:
    out = io.StringIO()
    report = LineProgress(total=1000, desc="train", file=out, interval_s=3600.0)
    report.update(500)  # half-way, but within interval / 10 of the start: no line yet
    assert out.getvalue() == ""
    report.interval_s = 0.05
    time.sleep(0.06)
    report.set_postfix(best="attentive", loss="1.234")
    report.update(1)  # the interval has passed: a line, with the postfix and an ETA
    line = out.getvalue().strip()
    assert (
        line.startswith("train: 501/1000 it (50%)") and "ETA" in line and line.endswith("[best=attentive, loss=1.234]")
    )
    report.set_description("epoch 2/2")
    report.close()
    assert out.getvalue().splitlines()[-1].startswith("epoch 2/2: done 501/1000 it (50%)")


def test_disabled_and_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    report = progress(range(3), desc="x", disable=True, file=out)
    assert list(report) == [0, 1, 2] and out.getvalue() == ""
    assert progress_mode(out) == "lines"  # a StringIO is no terminal
    monkeypatch.setenv("AIM_PROGRESS", "bar")
    assert progress_mode(out) == "bar"
    monkeypatch.setenv("AIM_PROGRESS", "off")
    assert progress(range(2), file=out).disable
    monkeypatch.setenv("AIM_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="AIM_PROGRESS='fancy' is not one of auto, bar, lines, off"):
        progress_mode(out)
    monkeypatch.setenv("AIM_PROGRESS", "lines")
    monkeypatch.setenv("AIM_PROGRESS_INTERVAL_S", "-1")
    with pytest.raises(ValueError, match="AIM_PROGRESS_INTERVAL_S='-1'"):
        progress(range(2), file=out)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (7.4, "7s"), (185, "3m05s"), (3725, "1h02m"), (90000, "1d01h"), (float("nan"), "?"), (-1, "?")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
