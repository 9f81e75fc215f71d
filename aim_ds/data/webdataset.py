"""WebDataset tar shards (img2dataset output) -> one beton per tar, on this machine.

Tar ``k`` of the sorted list belongs to process ``k % num_shards``, so any number of processes on any number
of machines (a SLURM array, or by hand) split the work without talking to each other; the Ray path
(:mod:`aim_ds.data.ray_convert`) hands the same per-tar unit, :func:`convert_tar`, to a cluster. A tar that
fails (no images, every image undecodable, a writer worker that died) is recorded and the next one goes on.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

from .beton import BetonError, ConversionError, check_regular_file, expand_shards, is_complete
from .images import IMAGE_EXTENSIONS, ImageRef
from .shard_index import refresh_shard_index
from .writers import UNLABELED, WriteOptions, WriteResult, check_writable, write_beton


def scan_tar(tar_path: str) -> tuple[list[ImageRef], list[dict[str, str]]]:
    """Image refs (byte ranges inside the tar) of a WebDataset shard, one per sample key, in tar order.

    A sample key is the member path up to the first dot of its file name (the webdataset convention); a
    sample with several image members uses the first of jpg, jpeg, png, webp.
    """
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    problems: list[dict[str, str]] = []
    try:
        check_regular_file(tar_path)  # a FIFO matched by the pattern would block tarfile forever
    except BetonError as error:
        raise ConversionError(str(error)) from None
    try:
        with tarfile.open(tar_path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, filename = member.name.rpartition("/")
                stem, dot, extension = filename.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                samples.setdefault(key, {})[extension.lower()] = member
    except (tarfile.TarError, OSError, EOFError) as error:
        # A tar cut short by a failed download: keep the complete members read so far.
        problems.append({"file": tar_path, "reason": f"tar read stopped early: {type(error).__name__}: {error}"})
    refs: list[ImageRef] = []
    for key, members in samples.items():
        extension = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if extension is None:
            problems.append({"file": f"{os.path.basename(tar_path)}:{key}", "reason": "no image member"})
            continue
        member = members[extension]
        refs.append(
            ImageRef(tar_path, member.offset_data, member.size, name=f"{os.path.basename(tar_path)}:{member.name}")
        )
    return refs, problems


def webdataset_output_path(tar_path: str, out_dir: str | os.PathLike[str]) -> Path:
    """One output beton per input tar: ``OUT_DIR/<tar name without .tar>.beton``."""
    name = os.path.basename(tar_path)
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    return Path(out_dir) / f"{stem}.beton"


def convert_tar(tar: str, out_dir: str | os.PathLike[str], options: WriteOptions, *, progress: bool) -> WriteResult:
    """One tar -> ``OUT_DIR/<name>.beton`` and its sidecar. Raises :class:`ConversionError` when nothing can
    be written (no image samples, none decodes, a writer worker died)."""
    refs, problems = scan_tar(tar)
    if not refs:
        detail = f" ({problems[0]['reason']})" if problems else ""
        raise ConversionError(f"{tar}: no image samples in this tar{detail}")
    result = write_beton(
        refs,
        [UNLABELED] * len(refs),
        webdataset_output_path(tar, out_dir),
        options,
        source=str(Path(tar).resolve()),
        kind="webdataset",
        extra_sidecar={"tar_problems": problems, "label": "unlabeled (-1)"},
        progress=progress,
    )
    result.skipped.extend(problems)
    return result


@dataclasses.dataclass
class TarFailure:
    """A tar whose conversion failed, why, and after how many attempts."""

    tar: str
    reason: str
    attempts: int = 1


@dataclasses.dataclass
class WebDatasetReport:
    """What a (partial) webdataset conversion did."""

    assigned: list[str]
    converted: list[Path]
    already_complete: list[Path]
    results: list[WriteResult]
    failed: list[TarFailure] = dataclasses.field(default_factory=list)


def plan_webdataset(
    pattern: str, out_dir: str | os.PathLike[str], *, shard_index: int, num_shards: int, overwrite: bool
) -> tuple[WebDatasetReport, list[str]]:
    """This process's share of the tars: (a report listing assigned and already complete outputs, the tars
    still to convert). Checks the output folder is writable first (one clear error, not one per tar)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index} and {num_shards}")
    tars = expand_shards(pattern)
    assigned = [tar for k, tar in enumerate(tars) if k % num_shards == shard_index]
    check_writable(out_dir)
    report = WebDatasetReport(assigned, [], [], [])
    todo = []
    for tar in assigned:
        out_path = webdataset_output_path(tar, out_dir)
        if not overwrite and is_complete(out_path):
            report.already_complete.append(out_path)
        else:
            todo.append(tar)
    return report, todo


def describe_failure(error: BaseException) -> str:
    """One line for the result table: ConversionErrors are already worded for the user."""
    text = str(error) if isinstance(error, ConversionError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())[:500]


def convert_webdataset(
    pattern: str,
    out_dir: str | os.PathLike[str],
    options: WriteOptions,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> WebDatasetReport:
    """Convert this process's share of the tars matching ``pattern``, one beton per tar, here.

    Outputs that are already complete are left alone (unless overwrite), so a re-run converts only what is
    missing, was interrupted or failed. A failing tar is recorded in ``report.failed`` and the rest go on.
    """
    report, todo = plan_webdataset(
        pattern, out_dir, shard_index=shard_index, num_shards=num_shards, overwrite=overwrite
    )
    iterator: Iterable[str] = todo
    if progress:
        from ..progress import progress as progress_bar

        iterator = progress_bar(todo, desc=f"shards (process {shard_index}/{num_shards})", unit="tar")
    for tar in iterator:
        try:
            result = convert_tar(tar, out_dir, options, progress=progress)
        except Exception as error:  # noqa: BLE001 - one bad tar must not stop the others; reported at the end
            report.failed.append(TarFailure(tar, describe_failure(error)))
            continue
        report.converted.append(result.beton_path)
        report.results.append(result)
    refresh_shard_index(out_dir)
    return report
