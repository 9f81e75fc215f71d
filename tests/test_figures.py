"""One source of figures: every figure quoted outside BENCHMARKS.md carries a marker naming its source,
and this test fails when the quote and the source disagree.

Markers (invisible HTML comments in markdown; ``[...]`` in YAML and code comments), written right
after the figure they vouch for:

- ``VALUE<!-- def:KEY -->`` (BENCHMARKS.md only): defines KEY once, beside the measurement, its
  command, machine and date;
- ``VALUE<!-- fig:KEY -->`` / ``VALUE [fig:KEY]``: a quote of KEY; VALUE must equal the definition
  rounded to the decimals the quote shows (``10.4`` may quote ``10.43``, not ``10.5``);
- ``VALUE<!-- plan:FIELD ARGS -->`` / ``VALUE [plan:FIELD ARGS]``: a planner prediction; ARGS are
  ``python -m aim_ds.plan`` arguments (in a run config, ``--config`` defaults to that file) and FIELD
  one of :data:`PLAN_FIELDS`, read from what the planner prints;
- ```TEXT`<!-- make:VAR -->``: TEXT is the Makefile's default of ``VAR``.

A marker inside an inline code span (backticks) is an example, not a quote. Run
``python tests/test_figures.py`` to list every disagreement at once.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "BENCHMARKS.md"

# Where quotes may live: the documents, the run configs, and every comment or help text in code.
SCANNED = ("*.md", "docs/**/*.md", "aim_ds/configs/**/*.yaml", "run/**/*.py", "aim_ds/cli/*.py", "Makefile", "scripts/**/*.sh",
           "scripts/**/*.sbatch", "aim_ds/**/*.py", "aim_ds/**/*.yaml", "data_prep/**/*.py", "bench/**/*.py")  # fmt: skip
# The shipped run configs, wherever they live (a checkout's run/configs, or package data under aim_ds/).
RUN_CONFIGS = ("run/configs/*.yaml", "aim_ds/**/configs/*.yaml")
THIS = Path(__file__).resolve()

MARKER = re.compile(r"(?:<!--\s*|\[)(?P<kind>def|fig|plan|make):(?P<body>[^\]]*?)(?:\s*-->|\])")
# The figure a marker vouches for: the last number before it on its line, with an optional unit.
# A sign counts only after a space or bracket: "0.07-0.16" quotes 0.16, "(-0.89" quotes -0.89.
VALUE = re.compile(r"(?P<num>(?:(?<![\w.])[-+])?\d[\d,]*(?:\.\d+)?)\s?(?P<unit>%|[A-Za-z][A-Za-z/]{0,7})?[*~)]*\s*$")

# What `python -m aim_ds.plan` prints, field by field (aim_ds/plan/report.py, format_plan).
PLAN_FIELDS = {
    "act_per_token": r"activations per token: ([\d.]+) KiB without",
    "act_per_token_ckpt": r"activations per token: .*?, ([\d.]+) KiB with",
    "peak": r"^\s+peak\s+([\d.]+) GiB",
    "states": r"^\s+model states ([\d.]+) GiB",
    "activations": r"^\s+activations\s+([\d.]+) GiB",
    "optim": r"^\s+optim\. step\s+([\d.]+) GiB",
    "buffers": r"^\s+buffers\s+([\d.]+) GiB",
    "host": r"host memory per node: ([\d.]+) GiB",
    "step": r"predicted step time at .*?: ([\d.]+) s \(",
    "compute": r"predicted step time at .*?\(compute ([\d.]+) s",
    "collectives": r"predicted step time at .*?collectives ([\d.]+) s",
    "pcie": r"predicted step time at .*?offload PCIe ([\d.]+) s",
    "fastest": r"fastest that fits: .*?\): ([\d.]+) s",
    "fastest_peak": r"fastest that fits: .*?\(peak ([\d.]+) GiB\)",
    "fastest_compute": r"fastest that fits: .*?\(compute ([\d.]+) s",
    "fastest_pcie": r"fastest that fits: .*?offload PCIe ([\d.]+) s",
}


@dataclass(frozen=True)
class Marker:
    path: Path
    line: int
    kind: str
    body: str
    before: str  # the line's text before the marker

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def number(self) -> str:
        match = VALUE.search(self.before)
        if match is None:
            raise AssertionError(f"{self.where}: no figure right before [{self.kind}:{self.body}]")
        return match["num"].replace(",", "")


def scanned_files() -> list[Path]:
    files: set[Path] = set()
    for pattern in SCANNED:
        files.update(p for p in ROOT.glob(pattern) if p.is_file() and ".venv" not in p.parts)
    files.discard(THIS)
    return sorted(files)


def run_configs() -> list[Path]:
    return sorted({p for pattern in RUN_CONFIGS for p in ROOT.glob(pattern)})


def markers(path: Path) -> list[Marker]:
    found = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        # A marker inside an inline code span is an example of one (as in BENCHMARKS.md's header).
        spans = [m.span() for m in re.finditer(r"(`+)(?:.+?)\1", text)]
        for match in MARKER.finditer(text):
            if any(start < match.start() < end for start, end in spans):
                continue
            found.append(Marker(path, number, match["kind"], match["body"].strip(), text[: match.start()]))
    return found


@functools.cache
def all_markers() -> tuple[Marker, ...]:
    return tuple(m for path in scanned_files() for m in markers(path))


@functools.cache
def definitions() -> dict[str, Marker]:
    defined: dict[str, Marker] = {}
    for marker in all_markers():
        if marker.kind != "def":
            continue
        if marker.path != SOURCE:
            raise AssertionError(f"{marker.where}: def:{marker.body} outside BENCHMARKS.md (quote it with fig:)")
        if marker.body in defined:
            raise AssertionError(f"{marker.where}: def:{marker.body} already defined at {defined[marker.body].where}")
        marker.number()  # a definition without a figure is an error of its own
        defined[marker.body] = marker
    return defined


def decimals(number: str) -> int:
    return len(number.split(".", 1)[1]) if "." in number else 0


def agrees(quoted: str, source: str) -> bool:
    """The quote is the source rounded to the quote's decimals, and not more precise than it. The source is
    itself a printed, rounded figure (2476.5 may stand for 2476.46), so a quote within half a unit of its own
    last digit plus half a unit of the source's agrees: 2,477 quotes 2476.5, 10.4 quotes 10.43, 10.5 does not."""
    places, source_places = decimals(quoted), decimals(source)
    if places > source_places:
        return False
    slack = Decimal("0.5").scaleb(-places) + (Decimal("0.5").scaleb(-source_places) if places < source_places else 0)
    return abs(Decimal(quoted) - Decimal(source)) < slack


def fig_errors() -> list[str]:
    defined = definitions()
    errors = []
    for marker in all_markers():
        if marker.kind != "fig":
            continue
        source = defined.get(marker.body)
        if source is None:
            errors.append(f"{marker.where}: fig:{marker.body} is not defined in BENCHMARKS.md (def:{marker.body})")
            continue
        quoted, value = marker.number(), source.number()
        if not agrees(quoted, value):
            errors.append(
                f"{marker.where}: quotes {quoted} for {marker.body}; BENCHMARKS.md ({source.where}) says {value}"
            )
    return errors


@functools.cache
def plan_output(argv: tuple[str, ...]) -> str:
    """What ``python -m aim_ds.plan ARGV`` prints, run in this process (no DeepSpeed launch)."""
    from aim_ds.cli.plan import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        main(list(argv))  # exit 1 (does not fit) still prints the plan
    return out.getvalue()


def plan_argv(marker: Marker) -> tuple[str, tuple[str, ...]]:
    field, *args = shlex.split(marker.body)
    if field not in PLAN_FIELDS:
        raise AssertionError(f"{marker.where}: plan:{field}: unknown field (one of {', '.join(PLAN_FIELDS)})")
    if "--config" not in args:
        if marker.path.suffix != ".yaml":
            raise AssertionError(f"{marker.where}: plan:{marker.body} names no --config")
        args = ["--config", str(marker.path.relative_to(ROOT)), *args]
    if "--host-memory-gb" not in args:  # figures must not depend on this machine's memory
        args += ["--host-memory-gb", "1000"]
    return field, tuple(args)


def plan_errors() -> list[str]:
    errors = []
    for marker in all_markers():
        if marker.kind != "plan":
            continue
        field, argv = plan_argv(marker)
        with contextlib.chdir(ROOT):
            printed = plan_output(argv)
        match = re.search(PLAN_FIELDS[field], printed, flags=re.M)
        if match is None:
            errors.append(f"{marker.where}: the planner printed no {field} for {' '.join(argv)}:\n{printed}")
        elif not agrees(marker.number(), match[1]):
            errors.append(
                f"{marker.where}: quotes {marker.number()} for the planner's {field}; "
                f"python -m aim_ds.plan {' '.join(argv)} prints {match[1]}"
            )
    return errors


def makefile_default(name: str) -> str:
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(rf"{re.escape(name)}\s*\?=\s*(.*)$", line)
        if match:
            return match[1].strip()
    raise AssertionError(f"Makefile has no default for {name}")


def make_errors() -> list[str]:
    errors = []
    for marker in all_markers():
        if marker.kind != "make":
            continue
        quoted = re.search(r"`([^`]*)`\s*$", marker.before)
        default = makefile_default(marker.body)
        if quoted is None or quoted[1] != default:
            got = quoted[1] if quoted else "no `...` before the marker"
            errors.append(f"{marker.where}: quotes {got!r} for make's {marker.body}; the Makefile says {default!r}")
    return errors


def test_markers_are_well_formed() -> None:
    """Every key is defined once, in BENCHMARKS.md, next to a figure; the scan sees the documents."""
    names = {p.name for p in scanned_files()}
    assert {"README.md", "ARCHITECTURE.md", "aim-0.6B.yaml", "Makefile"} <= names
    defined = definitions()
    assert len(defined) >= 20, "BENCHMARKS.md defines the figures the README quotes"
    assert sum(m.kind == "fig" for m in all_markers()) >= 20


def test_quotes_match_benchmarks() -> None:
    errors = fig_errors()
    assert not errors, "figures quoted away from their source:\n" + "\n".join(errors)


def test_quotes_match_makefile() -> None:
    errors = make_errors()
    assert not errors, "\n".join(errors)


def test_planner_quotes_match_the_planner() -> None:
    """Peaks, host memory and step times quoted from the planner (run configs, README, BENCHMARKS.md prose)
    equal what ``python -m aim_ds.plan`` prints for the same arguments now."""
    pytest.importorskip("deepspeed")
    assert any(m.kind == "plan" and m.path.suffix == ".yaml" for m in all_markers())
    errors = plan_errors()
    assert not errors, "planner figures that drifted:\n" + "\n".join(errors)


def test_generated_planner_tables_are_current() -> None:
    """BENCHMARKS.md's planner tables are generated (`bench/bench_plan.py --table --update BENCHMARKS.md`); a
    planner or config change that moves a figure must regenerate them."""
    pytest.importorskip("deepspeed")
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "bench" / "bench_plan.py")
    assert spec is not None and spec.loader is not None
    bench_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_plan)
    doc = SOURCE.read_text()
    block = doc.split(bench_plan.TABLE_BEGIN, 1)[1].split(bench_plan.TABLE_END, 1)[0].strip()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(io.StringIO()):
        fresh = bench_plan.table(argparse.Namespace()).strip()
    stale = [f"  BENCHMARKS.md: {old}\n  planner now:   {new}" for old, new in
             zip(block.splitlines(), fresh.splitlines(), strict=False) if old != new]  # fmt: skip
    assert block == fresh, (
        "the planner tables in BENCHMARKS.md are stale; run python bench/bench_plan.py --table --update "
        "BENCHMARKS.md\n" + "\n".join(stale[:10])
    )


def test_run_config_comments_cite_the_planner() -> None:
    """A GiB figure in a run config's comments is a planner figure: it must carry a plan: marker."""
    unmarked = []
    assert any(p.name == "aim-0.6B.yaml" for p in run_configs()), "the shipped run configs moved: update RUN_CONFIGS"
    for path in run_configs():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.split("#", 1)[1] if "#" in line else ""
            for match in re.finditer(r"(?<![\d.,])\d[\d,]*(?:\.\d+)?\s?GiB", comment):
                if not re.match(r"[^\[]{0,12}\[plan:", comment[match.end() :]):
                    unmarked.append(f"{path.relative_to(ROOT)}:{number}: {match.group()} without [plan:...]")
    assert not unmarked, "\n".join(unmarked)


def test_agrees_rounds_to_the_quote_and_reads_the_figure() -> None:
    assert agrees("10.4", "10.43") and agrees("172", "172.44") and agrees("69.7", "69.69") and agrees("+7.8", "7.8")
    assert agrees("2477", "2476.5") and agrees("80.2", "80.2") and agrees("0.9", "0.90")
    assert not agrees("10.5", "10.43") and not agrees("185", "172.44") and not agrees("65.7", "69.69")
    assert not agrees("80.3", "80.2") and not agrees("2478", "2476.5")
    assert not agrees("93.60", "93.6")  # more precise than the source
    assert agrees("-0.89", "-0.886") and not agrees("0.89", "-0.886")
    for text, number in (("0.07-0.16", "0.16"), ("is -0.89", "-0.89"), ("(+16.2", "+16.2"), ("**2.92**", "2.92"),
                         ("1,438 GiB/GPU", "1438"), ("93.6%", "93.6")):  # fmt: skip
        assert Marker(THIS, 1, "fig", "k", text).number() == number, text


# Texts that said something false before and are cheap to keep honest.
def logical_lines(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) with backslash continuations joined: a command's comment may sit on its
    next line."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        start, text = pending if pending else (number, "")
        text += line
        pending = (start, text[:-1] + " ") if line.endswith("\\") else None
        if pending is None:
            joined.append((start, text))
    return joined


def test_help_texts_do_not_call_bf16_configs_fp32() -> None:
    """``zero3.json`` trains in bf16 (``"bf16": {"enabled": true}``); a text that names it for an fp32 run
    misleads (``zero3_fp32.json`` is the fp32 one)."""
    import json

    assert json.loads((ROOT / "ds_configs" / "zero3.json").read_text())["bf16"]["enabled"] is True
    wrong = []
    for path in [*sorted((ROOT / "run").glob("*.py")), *run_configs()]:
        for number, line in logical_lines(path):
            if re.search(r"ds_configs/zero3\.json", line) and re.search(r"\bfp32\b(?! (?:gradient|sums?\b))", line):
                wrong.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not wrong, "zero3.json described as fp32:\n" + "\n".join(wrong)


def test_imagefolder_help_offers_no_ray() -> None:
    """``--ray`` exists only for ``webdataset``; ``imagefolder --help`` must not offer it."""
    sys.path.insert(0, str(ROOT))
    from data_prep.__main__ import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # noqa: SLF001
    assert "--ray" not in commands["imagefolder"].format_help()
    assert "--ray" in commands["webdataset"].format_help()


if __name__ == "__main__":  # every disagreement at once, for whoever updates a figure
    problems = fig_errors() + make_errors() + plan_errors()
    print("\n".join(problems) or f"{len(all_markers())} markers, all agree")
    sys.exit(1 if problems else 0)
