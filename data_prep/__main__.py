"""Command line for the aim_ds.data writers.

    python -m data_prep imagefolder SRC OUT.beton [options]
    python -m data_prep imagefolder VAL_DIR val.beton --labels LOC_val_solution.csv --classes train.classes.json
    python -m data_prep hf DATASET_DIR_OR_PARQUET OUT.beton [--image-column image --label-column label]
    python -m data_prep webdataset 'dfn-{00000..00099}.tar' OUT_DIR [--shard-index i --num-shards n] [options]
    python -m data_prep webdataset 'dfn-{00000..00099}.tar' OUT_DIR --ray [ADDRESS] [options]
    python -m data_prep webdataset 'in1k-{0000..1023}.tar' OUT_DIR --label-key cls --classes train.classes.json
    python -m data_prep inspect PATH [--json]

Errors the user can fix (missing or empty source, existing output, read-only or full output folder, bad
option) print one line and exit with status 2. A webdataset conversion goes on past tars that fail, prints a
table of them at the end and exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aim_ds.data.writers import WriteOptions


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _resolution(text: str) -> int:
    value = int(text)
    if value != 0 and not 16 <= value <= 16384:
        raise argparse.ArgumentTypeError(f"must be 0 (keep original size) or in [16, 16384], got {value}")
    return value


def _quality(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in [1, 100], got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _write_defaults() -> dict[str, Any]:
    """Each :class:`WriteOptions` field's default, by field name: the one place those defaults live."""
    from aim_ds.data.writers import WriteOptions

    return {f.name: f.default for f in dataclasses.fields(WriteOptions)}


def _add_write_options(parser: argparse.ArgumentParser, *, ray: bool = False) -> None:
    """The storage options the converters share; ``ray``: the subcommand has ``--ray`` (webdataset only)."""
    from aim_ds.data.writers import WRITE_MODES

    default = _write_defaults()
    group = parser.add_argument_group("how images are stored")
    group.add_argument(
        "--max-resolution",
        type=_resolution,
        default=default["max_resolution"],
        help=f"longer side in px after a Pillow bicubic downscale; 0 keeps the original (default "
        f"{default['max_resolution']}: every 224 px random-resized crop at scale >= 0.4 stays a downscale)",
    )
    group.add_argument(
        "--write-mode",
        choices=WRITE_MODES,
        default=default["write_mode"],
        help=f"FFCV RGBImageField mode (default {default['write_mode']}; raw costs ~590 KB per 512x384 image)",
    )
    group.add_argument(
        "--jpeg-quality",
        type=_quality,
        default=default["jpeg_quality"],
        help=f"JPEG quality 1-100 (default {default['jpeg_quality']})",
    )
    group.add_argument(
        "--smart-threshold",
        type=int,
        default=default["smart_threshold"],
        help=f"smart mode: JPEG-encode images whose raw pixels exceed this many bytes "
        f"(default {default['smart_threshold']})",
    )
    group.add_argument(
        "--compress-probability",
        type=_probability,
        default=default["compress_probability"],
        help=f"proportion mode: probability that an image is JPEG-encoded (default {default['compress_probability']})",
    )
    # The one default of its own: a conversion run from the shell owns the machine, so it takes every core,
    # where the library's WriteOptions stays modest for callers that share it.
    group.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="processes (default: all cores; with --ray: 1 per task, Ray runs one task per free core)"
        if ray
        else "processes (default: all cores)",
    )
    group.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=default["chunk_size"],
        help=f"images per work item of a writer process (default {default['chunk_size']})",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep", description="Convert images to FFCV .beton files for aim_ds."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    folder = commands.add_parser(
        "imagefolder",
        help="SRC/<class>/<image> (ImageNet train layout), or a flat folder with --labels (ImageNet val) -> one beton",
        description="SRC/<class>/<image> -> one beton, labels from the sorted class folder names (or their index "
        "in --classes); or a flat folder of images labelled by --labels, against the class index --classes (the "
        "train beton's OUT.classes.json), as ImageNet's val set ships.",
    )
    folder.add_argument("source", help="class-folder tree (e.g. ILSVRC/train), or a flat folder with --labels")
    folder.add_argument("output", help="output .beton; OUT.beton.json (sidecar) and OUT.classes.json go beside it")
    folder.add_argument(
        "--labels",
        metavar="FILE",
        help="SOURCE is flat; FILE gives each image's class: Kaggle's LOC_val_solution.csv (ImageId,"
        "PredictionString; the first token is the class) or two columns 'filename class' (whitespace or comma)",
    )
    folder.add_argument(
        "--classes",
        metavar="FILE",
        help="class index, index = label: a JSON list (the train beton's train.classes.json) or one class per "
        "line, first token (LOC_synset_mapping.txt). Required with --labels; without, the class folders must be in it",
    )
    folder.add_argument("--overwrite", action="store_true", help="replace an existing output (default: refuse)")
    _add_write_options(folder)

    hf = commands.add_parser(
        "hf",
        help="a Hugging Face dataset (save_to_disk folder or parquet files) with image and label columns -> one beton",
        description="A Hugging Face datasets dataset -> one beton, read with pyarrow (no datasets package needed): "
        "a save_to_disk folder (a Dataset, or a DatasetDict with --split), a parquet file, a folder of parquet "
        "files or a glob. A ClassLabel column's names become OUT.classes.json.",
    )
    hf.add_argument("source", help="save_to_disk folder, .parquet file, folder of parquet files, or a quoted glob")
    hf.add_argument("output", help="output .beton; OUT.beton.json (sidecar) and OUT.classes.json go beside it")
    hf.add_argument("--image-column", default="image", help="the Image (or binary) column (default image)")
    hf.add_argument(
        "--label-column",
        default="label",
        help="the ClassLabel, integer or class-name column (default label); '' for none: every label -1",
    )
    hf.add_argument("--split", help="the split of a DatasetDict folder, or of parquet files named SPLIT-*.parquet")
    hf.add_argument(
        "--classes",
        metavar="FILE",
        help="class index the labels must follow (e.g. the train beton's OUT.classes.json); default: the "
        "ClassLabel's names, or the sorted class names of a string column",
    )
    hf.add_argument("--overwrite", action="store_true", help="replace an existing output (default: refuse)")
    _add_write_options(hf)

    shards = commands.add_parser(
        "webdataset",
        help="WebDataset tars -> one beton per tar in OUT_DIR (label -1 unless --label-key)",
    )
    shards.add_argument("shards", help="glob and/or brace pattern, e.g. 'dfn/{00000..00099}.tar' (quote it)")
    shards.add_argument("out_dir", help="output folder; tar NAME.tar becomes NAME.beton + NAME.beton.json")
    shards.add_argument(
        "--label-key",
        metavar="KEY",
        help="labelled shards: EXT (the member KEY.EXT holds the label, e.g. cls) or EXT:FIELD (a field of the "
        "JSON member, e.g. json:label); an integer, or a class name looked up in --classes. Default: label -1",
    )
    shards.add_argument(
        "--classes",
        metavar="FILE",
        help="with --label-key: the class index (JSON list or one class per line); labels are checked against "
        "it and it is written to OUT_DIR/classes.json, which the probe reads",
    )
    index, count = _slurm_array()
    shards.add_argument(
        "--shard-index",
        type=int,
        default=index,
        help="this process's index in [0, num_shards) (default: from SLURM_ARRAY_TASK_ID when set, else 0)",
    )
    shards.add_argument(
        "--num-shards",
        type=_positive_int,
        default=count,
        help="processes splitting the tars: tar k goes to k %% n (default: SLURM_ARRAY_TASK_COUNT, else 1)",
    )
    shards.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="one Ray task per tar on the Ray cluster at ADDRESS (auto, HOST:PORT, ray://HOST:PORT); "
        "--ray alone starts a local Ray on this machine. OUT_DIR must be visible from every node",
    )
    shards.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="with --ray: attempts after the first for a tar whose task died or raised (default 2)",
    )
    shards.add_argument(
        "--overwrite", action="store_true", help="rewrite complete outputs too (default: only missing/incomplete)"
    )
    _add_write_options(shards, ray=True)

    inspect = commands.add_parser("inspect", help="counts, fields, stored resolutions and sidecar of betons")
    inspect.add_argument("path", help="a .beton, a folder of betons, or a glob")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _slurm_array() -> tuple[int, int]:
    """(index, count) of this task in a SLURM job array (``sbatch --array``), or (0, 1) outside one. The
    index counts from the array's first task id, so ``--array=1-8`` works as well as ``0-7``."""
    task_id, task_count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if task_id is None or task_count is None:
        return 0, 1
    return int(task_id) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0")), int(task_count)


def _options(args: argparse.Namespace) -> WriteOptions:
    """The write options the parsed arguments ask for (every WriteOptions field has a flag)."""
    from aim_ds.data.writers import WriteOptions

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(WriteOptions)}
    if values["workers"] is None:
        values["workers"] = 1 if getattr(args, "ray", None) else os.cpu_count() or 1
    return WriteOptions(**values)


def _print_failures(failed: Sequence[Any]) -> None:
    """The result table of tars that failed: one line each, tar and reason."""
    print(f"{len(failed)} tar(s) failed:", file=sys.stderr)
    width = max(len(f.tar) for f in failed)
    for failure in failed:
        tries = f" (after {failure.attempts} attempts)" if failure.attempts > 1 else ""
        print(f"  {failure.tar:<{width}}  {failure.reason}{tries}", file=sys.stderr)


def _webdataset(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from aim_ds.data.labels import read_class_index
    from aim_ds.data.webdataset import LabelSpec, convert_webdataset

    if not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index must be in [0, {args.num_shards}), got {args.shard_index}")
    if args.classes and not args.label_key:
        parser.error("--classes needs --label-key (unlabelled shards have no classes)")
    try:
        classes = tuple(read_class_index(args.classes)) if args.classes else None
        labels = LabelSpec(args.label_key, classes) if args.label_key else None
    except ValueError as error:
        parser.error(f"--label-key: {error}")
    common = {
        "shard_index": args.shard_index,
        "num_shards": args.num_shards,
        "overwrite": args.overwrite,
        "labels": labels,
    }
    if args.ray:
        from aim_ds.data.ray_convert import convert_webdataset_ray

        report = convert_webdataset_ray(
            args.shards, args.out_dir, _options(args), address=args.ray, progress=not args.quiet,
            max_retries=args.max_retries, **common,
        )  # fmt: skip
    else:
        report = convert_webdataset(args.shards, args.out_dir, _options(args), progress=not args.quiet, **common)
    images = sum(r.num_images for r in report.results)
    skipped = sum(len(r.skipped) for r in report.results)
    print(
        f"process {args.shard_index}/{args.num_shards}: {len(report.assigned)} tars assigned, "
        f"{len(report.converted)} converted ({images} images, {skipped} skipped), "
        f"{len(report.already_complete)} already complete, {len(report.failed)} failed"
    )
    if report.failed:
        _print_failures(report.failed)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from aim_ds.data.beton import ConversionError, format_inspection, inspect_betons
    from aim_ds.data.writers import convert_imagefolder

    try:
        if args.command in ("imagefolder", "hf"):
            if args.command == "imagefolder":
                result = convert_imagefolder(
                    args.source, args.output, _options(args), labels=args.labels, classes=args.classes,
                    overwrite=args.overwrite, progress=not args.quiet,
                )  # fmt: skip
            else:
                from aim_ds.data.hf import convert_hf

                result = convert_hf(
                    args.source, args.output, _options(args), image_column=args.image_column,
                    label_column=args.label_column or None, split=args.split, classes=args.classes,
                    overwrite=args.overwrite, progress=not args.quiet,
                )  # fmt: skip
            print(
                f"wrote {result.beton_path}: {result.num_images} images, {len(result.skipped)} skipped, "
                f"{result.seconds:.1f} s"
            )
            for entry in result.skipped[:20]:
                print(f"  skipped {entry['file']}: {entry['reason']}")
        elif args.command == "webdataset":
            return _webdataset(args, parser)
        else:
            info = inspect_betons(args.path)
            print(json.dumps(info, indent=1) if args.json else format_inspection(info))
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a read-only or full output folder, a missing file: say which, no traceback
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
