"""WebDataset tar shards (img2dataset output) -> one beton per tar, on this machine.

Tar ``k`` of the sorted list belongs to process ``k % num_shards``, so any number of processes on any number
of machines (a SLURM array, or by hand) split the work without talking to each other; the Ray path
(:mod:`aim_ds.data.ray_convert`) hands the same per-tar unit, :func:`convert_tar`, to a cluster. A tar that
fails (no images, every image undecodable, a writer worker that died) is recorded and the next one goes on.

Shards are unlabelled (label -1) unless a :class:`LabelSpec` says where a sample's label is: a member of its
own (``cls``: ``KEY.cls`` holds ``417``) or a key inside a JSON member (``json:label``), as the public ImageNet
WebDataset copies store them. A labelled sample whose label is missing or unreadable is skipped and listed
in the sidecar like an undecodable image, so a wrong key shows at once (a tar with no label at all fails).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..io import atomic_write_json
from .beton import BetonError, ConversionError, check_regular_file, expand_shards, folder_classes_path, is_complete
from .images import IMAGE_EXTENSIONS, ImageRef
from .shard_index import refresh_shard_index
from .writers import UNLABELED, WriteOptions, WriteResult, check_writable, write_beton

#: A label member or JSON member larger than this is not a label (a sample's JSON is a few hundred bytes).
MAX_LABEL_MEMBER_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """Where a labelled shard keeps each sample's class, and the class index.

    key: ``EXT`` (the member ``KEY.EXT`` holds the label as text, e.g. ``cls``) or ``EXT:FIELD`` (the JSON
        member ``KEY.EXT`` holds it under FIELD, dotted for nested objects, e.g. ``json:label``). None: the
        shards are unlabelled and every label is -1.
    classes: the class names, index = label (None: labels must be integers and are not range-checked). A
        label that is not an integer is looked up by name in it (``n01440764``).
    """

    key: str | None = None
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.key is not None:
            extension, _, field = self.key.partition(":")
            if not extension or "." in extension or "/" in extension or (":" in self.key and not field):
                raise ValueError(f"label key must be EXT or EXT:FIELD (e.g. cls, json:label), got {self.key!r}")

    @property
    def extension(self) -> str | None:
        return None if self.key is None else self.key.partition(":")[0].lower()

    def label_of(self, member: bytes) -> int:
        """The label a label member's bytes give; raises ValueError saying what is wrong."""
        _, _, field = (self.key or "").partition(":")
        value: object = member.decode("utf-8").strip()
        if field:
            value = json.loads(member)
            for part in field.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ValueError(f"no key {field!r} in the .{self.extension} member")
                value = value[part]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"label {value!r} is neither an integer nor a class name")
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            if self.classes is None or value not in self.classes:
                raise ValueError(f"label {value!r} is not an integer{'' if self.classes is None else ' nor a class'}")
            return self.classes.index(value)
        label = int(value)
        if label < 0 or (self.classes is not None and label >= len(self.classes)):
            bound = "" if self.classes is None else f" of {len(self.classes)} classes"
            raise ValueError(f"label {label} is out of range{bound}")
        return label


def scan_tar(tar_path: str, labels: LabelSpec | None = None) -> tuple[list[ImageRef], list[int], list[dict[str, str]]]:
    """Image refs (byte ranges inside the tar) of a WebDataset shard, one per sample key, in tar order, their
    labels (-1 when ``labels`` has no key) and the problems met (listed in the sidecar as skipped).

    A sample key is the member path up to the first dot of its file name (the webdataset convention); a
    sample with several image members uses the first of jpg, jpeg, png, webp.
    """
    spec = labels or LabelSpec()
    label_extension = spec.extension
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    label_bytes: dict[str, bytes] = {}
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
                extension = extension.lower()
                samples.setdefault(key, {})[extension] = member
                if extension == label_extension and member.size <= MAX_LABEL_MEMBER_BYTES:
                    file = archive.extractfile(member)
                    label_bytes[key] = file.read() if file is not None else b""
    except (tarfile.TarError, OSError, EOFError) as error:
        # A tar cut short by a failed download: keep the complete members read so far.
        problems.append({"file": tar_path, "reason": f"tar read stopped early: {type(error).__name__}: {error}"})
    refs: list[ImageRef] = []
    targets: list[int] = []
    name = os.path.basename(tar_path)
    for key, members in samples.items():
        extension = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if extension is None:
            problems.append({"file": f"{name}:{key}", "reason": "no image member"})
            continue
        label = UNLABELED
        if label_extension is not None:
            if key not in label_bytes:
                why = "too large" if label_extension in members else "missing"
                problems.append({"file": f"{name}:{key}", "reason": f"label member .{label_extension} {why}"})
                continue
            try:
                label = spec.label_of(label_bytes[key])
            except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError included
                problems.append({"file": f"{name}:{key}.{label_extension}", "reason": f"bad label: {error}"[:300]})
                continue
        member = members[extension]
        refs.append(ImageRef(tar_path, member.offset_data, member.size, name=f"{name}:{member.name}"))
        targets.append(label)
    return refs, targets, problems


def write_class_index(out_dir: str | os.PathLike[str], classes: Sequence[str]) -> Path:
    """Publish ``OUT_DIR/classes.json`` (the class names of every beton in the folder, index = label), what
    :func:`aim_ds.data.read_class_names` reads for the folder or any beton in it. A different class list
    already there is an error: a folder's betons must share one index."""
    from .beton import read_class_names

    path = folder_classes_path(out_dir)
    if path.exists() and read_class_names(out_dir) != list(classes):
        raise ConversionError(f"{path} holds a different class list; convert into another folder or remove it")
    atomic_write_json(path, list(classes), indent=0)
    return path


def webdataset_output_path(tar_path: str, out_dir: str | os.PathLike[str]) -> Path:
    """One output beton per input tar: ``OUT_DIR/<tar name without .tar>.beton``."""
    name = os.path.basename(tar_path)
    stem = name[: -len(".tar")] if name.endswith(".tar") else name
    return Path(out_dir) / f"{stem}.beton"


def convert_tar(
    tar: str,
    out_dir: str | os.PathLike[str],
    options: WriteOptions,
    *,
    progress: bool,
    labels: LabelSpec | None = None,
) -> WriteResult:
    """One tar -> ``OUT_DIR/<name>.beton`` and its sidecar. Raises :class:`ConversionError` when nothing can
    be written (no image samples, none labelled or none decodes, a writer worker died)."""
    refs, targets, problems = scan_tar(tar, labels)
    if not refs:
        detail = f" (first: {problems[0]['file']}: {problems[0]['reason']})" if problems else ""
        what = "labelled image samples" if labels is not None and labels.key else "image samples"
        raise ConversionError(f"{tar}: no {what} in this tar{detail}")
    label_note = "unlabeled (-1)"
    if labels is not None and labels.key:
        label_note = f"from {labels.key}" + (f", {len(labels.classes)} classes" if labels.classes else "")
    result = write_beton(
        refs,
        targets,
        webdataset_output_path(tar, out_dir),
        options,
        source=str(Path(tar).resolve()),
        kind="webdataset",
        extra_sidecar={"tar_problems": problems, "label": label_note},
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
    pattern: str,
    out_dir: str | os.PathLike[str],
    *,
    shard_index: int,
    num_shards: int,
    overwrite: bool,
    labels: LabelSpec | None = None,
) -> tuple[WebDatasetReport, list[str]]:
    """This process's share of the tars: (a report listing assigned and already complete outputs, the tars
    still to convert). Checks the output folder is writable first (one clear error, not one per tar) and
    publishes the class index there when ``labels`` has one (every process writes the same file)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index} and {num_shards}")
    tars = expand_shards(pattern)
    assigned = [tar for k, tar in enumerate(tars) if k % num_shards == shard_index]
    check_writable(out_dir)
    if labels is not None and labels.classes is not None:
        write_class_index(out_dir, labels.classes)
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
    labels: LabelSpec | None = None,
) -> WebDatasetReport:
    """Convert this process's share of the tars matching ``pattern``, one beton per tar, here.

    Outputs that are already complete are left alone (unless overwrite), so a re-run converts only what is
    missing, was interrupted or failed. A failing tar is recorded in ``report.failed`` and the rest go on.
    ``labels``: where the labels are (:class:`LabelSpec`); with classes, ``OUT_DIR/classes.json`` is written.
    """
    report, todo = plan_webdataset(
        pattern, out_dir, shard_index=shard_index, num_shards=num_shards, overwrite=overwrite, labels=labels
    )
    iterator: Iterable[str] = todo
    if progress:
        from ..progress import progress as progress_bar

        iterator = progress_bar(todo, desc=f"shards (process {shard_index}/{num_shards})", unit="tar")
    for tar in iterator:
        try:
            result = convert_tar(tar, out_dir, options, progress=progress, labels=labels)
        except Exception as error:  # noqa: BLE001 - one bad tar must not stop the others; reported at the end
            report.failed.append(TarFailure(tar, describe_failure(error)))
            continue
        report.converted.append(result.beton_path)
        report.results.append(result)
    refresh_shard_index(out_dir)
    return report
