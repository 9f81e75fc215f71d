"""Labels that do not come from class sub-folders: a class index file, and a flat image folder with a labels file.

ImageNet's validation set ships flat (50,000 ``ILSVRC2012_val_*.JPEG`` in one folder) with its labels in a
separate file, and its class indices must be the train set's (label ``k`` means the same class in both
betons, or a probe's accuracy is meaningless). So a flat folder is converted with two files:

* the class index: the train beton's ``train.classes.json`` (a JSON list, index = label), or a text file
  with one class per line whose first token is the class (Kaggle's ``LOC_synset_mapping.txt``:
  ``n01440764 tench, Tinca tinca``);
* the labels: Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the synset is the first token
  of PredictionString), or a plain two-column ``filename class`` file, whitespace or comma separated. A
  row's name matches an image by its file name or by its name without the extension.

Every disagreement is an error naming the file and line: a class not in the index, a duplicate row, a row
without an image, an image without a row. All are collected, so one run lists them (the first
:data:`MAX_LISTED`), instead of one per attempt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..io import read_regular_file
from .beton import ConversionError
from .images import IMAGE_EXTENSIONS, ImageRef

#: Problems listed in one error; the count of the rest follows.
MAX_LISTED = 10
#: A labels or class index file larger than this is not one (ImageNet's val solution is 3.6 MB).
MAX_LABELS_BYTES = 1 << 30
KAGGLE_HEADER = ("imageid", "predictionstring")


def _text(path: str | os.PathLike[str], what: str) -> str:
    data = read_regular_file(path, what, ConversionError, limit=MAX_LABELS_BYTES)
    try:
        return data.decode("utf-8-sig")  # a BOM from a spreadsheet export is not part of the first name
    except UnicodeDecodeError as error:
        raise ConversionError(f"{what} '{path}' is not UTF-8 text ({error})") from None


def _raise_all(problems: Sequence[str], summary: str) -> None:
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ConversionError(f"{summary} ({len(problems)} problem(s)):\n  {listed}{more}")


def read_class_index(path: str | os.PathLike[str]) -> list[str]:
    """The class names of a class index file, index = label.

    A ``.json`` file is a JSON list of strings (what ``convert_imagefolder`` writes as ``OUT.classes.json``);
    any other file has one class per non-empty line, its first whitespace-separated token the class name.
    Raises :class:`ConversionError` naming the file (and line) when it is empty, malformed or repeats a class.
    """
    text = _text(path, "class index")
    if str(path).endswith(".json"):
        try:
            names = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise ConversionError(f"class index '{path}' is not JSON ({error})") from None
        if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
            raise ConversionError(f"class index '{path}' must be a JSON list of non-empty class names")
        lines = list(enumerate(names, start=1))
        where = "entry"
    else:
        lines = [(number, line.split()[0]) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        where = "line"
    if not lines:
        raise ConversionError(f"class index '{path}' lists no classes")
    first: dict[str, int] = {}
    problems = []
    for number, name in lines:
        if name in first:
            problems.append(f"{path}:{number}: class '{name}' repeats {where} {first[name]}")
        else:
            first[name] = number
    _raise_all(problems, f"class index '{path}' repeats classes")
    return [name for _, name in lines]


def read_labels_file(path: str | os.PathLike[str]) -> dict[str, tuple[str, int]]:
    """``{image name: (class name, line number)}`` from a labels file (see the module docstring).

    The format is told by the first line: ``ImageId,PredictionString`` starts Kaggle's CSV; anything else
    is two columns, ``filename class``, split on a comma when the line has one, else on whitespace.
    Raises :class:`ConversionError` listing every malformed or duplicate row as ``FILE:LINE: ...``.
    """
    labels, problems = parse_labels_file(path)
    _raise_all(problems, f"labels file '{path}' has bad rows")
    return labels


def parse_labels_file(path: str | os.PathLike[str]) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """:func:`read_labels_file`'s rows and its problems (malformed or duplicate rows), without raising for
    them, so that a caller can list them with its own. An empty file still raises."""
    lines = _text(path, "labels file").splitlines()
    header = [cell.strip().lower() for cell in lines[0].split(",")] if lines else []
    kaggle = tuple(header[:2]) == KAGGLE_HEADER
    labels: dict[str, tuple[str, int]] = {}
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (kaggle and number == 1):
            continue
        if kaggle:
            name, _, prediction = line.partition(",")
            tokens = prediction.split()
            if not name.strip() or not tokens:
                problems.append(
                    f"{path}:{number}: expected 'ImageId,PredictionString' with a class first, got {line!r}"
                )
                continue
            name, label = name.strip(), tokens[0]
        else:
            cells = [cell.strip() for cell in line.split(",")] if "," in line else line.split()
            if len(cells) != 2 or not all(cells):
                problems.append(f"{path}:{number}: expected two columns 'filename class', got {line!r}")
                continue
            name, label = cells
        if name in labels:
            problems.append(f"{path}:{number}: duplicate row for '{name}' (first at line {labels[name][1]})")
            continue
        labels[name] = (label, number)
    if not labels and not problems:
        raise ConversionError(f"labels file '{path}' has no rows")
    return labels, problems


def scan_flat_folder(
    source: str | os.PathLike[str], labels_file: str | os.PathLike[str], classes: Sequence[str]
) -> tuple[list[ImageRef], list[int]]:
    """Image refs (sorted by name) and labels of a flat folder labelled by ``labels_file`` against ``classes``.

    Candidates are the folder's regular, non-hidden files with an image extension (jpg, jpeg, png, webp, any
    case): a README or the labels file itself lying in the folder is not an image without a label. Raises
    :class:`ConversionError` listing every class not in ``classes``, image without a row and row without an
    image, each naming its file and line.
    """
    root = Path(source)
    if not root.is_dir():
        raise ConversionError(f"source folder {'is not a folder' if root.exists() else 'does not exist'}: {root}")
    labels, problems = parse_labels_file(labels_file)
    index = {name: k for k, name in enumerate(classes)}
    images = sorted(
        entry.name
        for entry in os.scandir(root)
        if not entry.name.startswith(".")
        and entry.is_file()
        and entry.name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS
    )
    if not images:
        subfolders = any(entry.is_dir() for entry in os.scandir(root))
        hint = " (it has sub-folders: without --labels it is read as SRC/<class>/<image>)" if subfolders else ""
        raise ConversionError(f"source folder has no image files at its top level: {root}{hint}")
    unknown: dict[str, int] = {}
    used: set[str] = set()
    refs: list[ImageRef] = []
    targets: list[int] = []
    for filename in images:
        stem = filename.rpartition(".")[0]
        key = filename if filename in labels else stem if stem in labels else None
        if key is None:
            problems.append(f"{root / filename}: no label in {labels_file}")
            continue
        if key in used:  # both "x.JPEG" and "x.png" match a row "x": which one the row means is unknowable
            problems.append(f"{labels_file}:{labels[key][1]}: '{key}' matches more than one image in {root}")
            continue
        used.add(key)
        label, number = labels[key]
        if label not in index:
            unknown.setdefault(label, number)
            problems.append(
                f"{labels_file}:{number}: class '{label}' is not in the class index ({len(classes)} classes)"
            )
            continue
        refs.append(ImageRef(str(root / filename), name=filename))
        targets.append(index[label])
    problems += [
        f"{labels_file}:{number}: no image '{name}' in {root}"
        for name, (_, number) in labels.items()
        if name not in used
    ]
    summary = f"{root} and {labels_file} disagree"
    if unknown:
        summary += f"; classes not in the class index: {', '.join(sorted(unknown)[:MAX_LISTED])}"
    _raise_all(problems, summary)
    return refs, targets
