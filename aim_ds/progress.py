"""Progress bars that suit where the output goes: tqdm on a terminal, plain periodic lines in a file.

A tqdm bar redraws itself with carriage returns; written to a file (a SLURM log, ``make demo > log``)
every redraw stays, and one bar becomes one line of megabytes. :func:`progress` therefore returns a
tqdm bar only when its stream is a terminal (or a notebook runs), and otherwise a :class:`LineProgress`
with the few parts of tqdm's interface the project uses (iteration, ``update``, ``n``,
``set_postfix``, ``set_description``, ``close``) that prints whole lines: one at each tenth of the
total (at most one per ``interval / 10`` seconds), at least one per ``interval`` seconds while it
runs, and a last one when it ends.

Two environment variables steer it:

- ``AIM_PROGRESS``: ``auto`` (the default: bars on a terminal, lines elsewhere), ``bar``, ``lines``
  or ``off``.
- ``AIM_PROGRESS_INTERVAL_S``: the most seconds between two lines of a running task (default 60;
  0: a line at every tenth, however close together, and none in between).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

MODE_VARIABLE = "AIM_PROGRESS"
INTERVAL_VARIABLE = "AIM_PROGRESS_INTERVAL_S"
MODES = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL_S = 60.0
STEPS = 10  # a line at each tenth of the total


def progress_mode(stream: IO[str] | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for output to ``stream`` (default: stderr, where tqdm writes),
    from ``AIM_PROGRESS``; ``auto`` picks bars for a terminal or a notebook, lines otherwise."""
    mode = os.environ.get(MODE_VARIABLE, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={os.environ[MODE_VARIABLE]!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if "ipykernel" in sys.modules:  # a notebook's stderr is no terminal, but tqdm.auto draws a widget there
        return "bar"
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream is not None and stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return "lines"


def interval_seconds() -> float:
    """``AIM_PROGRESS_INTERVAL_S`` (default 60): the most seconds between two progress lines."""
    text = os.environ.get(INTERVAL_VARIABLE, "")
    if not text.strip():
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{INTERVAL_VARIABLE}={text!r} is not a number of seconds >= 0")
    return value


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    file: IO[str] | None = None,
    **tqdm_options: Any,
) -> Any:
    """A progress bar over ``iterable`` (or driven by ``update``): tqdm's on a terminal, a
    :class:`LineProgress` otherwise (see the module's docstring). ``tqdm_options`` (``leave``,
    ``dynamic_ncols``, ...) go to tqdm and are ignored by the line form."""
    mode = "off" if disable else progress_mode(file)
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=file, **tqdm_options)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=mode == "off", file=file)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``, ``185`` -> ``"3m05s"``, ``7.4`` -> ``"7s"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds >= 86400:
        days, rest = divmod(seconds, 86400)
        return f"{days}d{rest // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class LineProgress:
    """A progress report in whole lines (no carriage returns), for output that is not a terminal.

    ``desc: 300/1000 img (30%), 150 img/s, 2s elapsed, ETA 5s [postfix]``. Lines come at each tenth
    of ``total`` (no closer together than ``interval / 10`` seconds), after ``interval`` seconds
    without one, and once at :meth:`close` (``done``). Without a total only the time rule applies.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        file: IO[str] | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc, self.unit, self.disable = desc, unit, disable
        self.file = file
        self.interval_s = interval_seconds() if interval_s is None else interval_s
        self.n: float = 0
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.last_tenth = 0
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress report was made without an iterable; call update() instead")
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()  # as tqdm: a finished iteration closes the report

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """``n`` more units done; prints a line when one is due."""
        self.n += n
        if self.disable or self.closed:
            return
        now = time.monotonic()
        since = now - self.last_line
        tenth = self._tenth()
        # Interval 0 means lines at the tenths only (a time rule at 0 would print at every update).
        timed = self.interval_s > 0 and since >= self.interval_s
        if (tenth > self.last_tenth and since >= self.interval_s / STEPS) or timed:
            self.last_tenth = tenth
            self._print(now)

    def set_postfix(self, *args: Any, refresh: bool = True, **values: Any) -> None:
        """Text appended to the next lines, as tqdm's ``set_postfix(key=value, ...)``."""
        parts = [str(a) for a in args if a] + [f"{key}={value}" for key, value in values.items()]
        self.postfix = ", ".join(parts)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """tqdm's forced redraw: nothing to redraw in a line report."""

    def write(self, text: str) -> None:
        """A message between progress lines (tqdm.write's role)."""
        print(text, file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        """The last line (``done``, with the count, time and rate), once."""
        if self.closed:
            return
        self.closed = True
        if not self.disable:
            self._print(time.monotonic(), done=True)

    def _tenth(self) -> int:
        if not self.total:
            return 0
        return min(STEPS, int(STEPS * self.n / self.total))

    def line(self, now: float | None = None, *, done: bool = False) -> str:
        """The text of one progress line."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        count = _number(self.n)
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            count += f"/{_number(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            count += f" {self.unit}"
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        parts = [f"{head}{'done ' if done else ''}{count}"]
        if math.isfinite(rate):
            parts.append(f"{rate:.0f} {self.unit}/s" if rate >= 100 else f"{rate:.3g} {self.unit}/s")  # no 3.4e+03
        parts.append(f"{format_duration(elapsed)} elapsed")
        if not done and self.total and self.n and math.isfinite(rate) and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        text = ", ".join(parts)
        return f"{text} [{self.postfix}]" if self.postfix else text

    def _print(self, now: float, *, done: bool = False) -> None:
        self.last_line = now
        print(self.line(now, done=done), file=self.file or sys.stderr, flush=True)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
