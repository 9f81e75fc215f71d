"""The paper's two findings on your own data (``make study``): does the val loss track probe accuracy
over training, and do bigger models probe better? The logic lives in :mod:`aim_ds.study`.

    # on existing runs (same data and steps for the sizes): every checkpoint of RUN_A, the final one of each
    python run/study.py --out study_out --checkpoints-run RUN_A --size-runs RUN_A RUN_B RUN_C \\
        --probe-config probe_aim-tiny --train-beton T.beton --val-beton V.beton [key=value ...]
    # make study: sklearn digits -> betons, pretrain each --sizes for --steps (a checkpoint and a val loss every
    # --every steps, all kept), then the study on them
    python run/study.py --out study_out --pretrain

Writes ``<out>/study/checkpoints.csv``, ``loss_vs_probe.png``, ``checkpoints.json`` (with the Spearman
correlation and its p-value), ``sizes.csv``, ``sizes.json``, ``loss_vs_size.png`` (top-1 with 95% bootstrap
intervals over val images, and over probe seeds with ``--probe-seeds N``) and ``summary.md`` (each finding,
its statistic, its interval and what it does and does not show). Trailing ``key=value`` arguments
are probe-config overrides applied to every probe.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "run"))  # the demo's stages and data

import demo  # noqa: E402

from aim_ds.io import atomic_write_text  # noqa: E402
from aim_ds.study import ProbeSettings, render_summary, study_checkpoints, study_sizes  # noqa: E402
from aim_ds.weights import checkpoint as ckpt  # noqa: E402

# The study's probe: the aim-tiny probe grid's 5 LRs, one weight decay, the demo's 30 epochs, cached
# features. With --probe-labels few (the default) the heads train on 10 labelled images per class
# (run/demo.py's split, batch 25 as in the demo): with all ~144 per class an attentive head learns digits
# from a random trunk's tokens (90% in the demo), so its top-1 would measure the head, not the trunk.
STUDY_PROBE_OVERRIDES = ("train.epochs=30", "train.weight_decays=[0.05]")
PROBE_LABELS = {
    "few": (f"digits_train_{demo.FEW_PER_CLASS}_per_class.beton", ("train.batch_size=25",)),
    "all": ("digits_train.beton", ()),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="study_out", help="folder of the study (and, with --pretrain, its runs)")
    parser.add_argument("--pretrain", action="store_true", help="build the digits betons and pretrain --sizes first")
    parser.add_argument("--sizes", nargs="+", default=["aim-nano", "aim-test", "aim-tiny"], help="registry names")
    parser.add_argument("--checkpoints-model", default="aim-tiny", help="with --pretrain: the run probed at every step")
    parser.add_argument("--steps", type=int, default=600, help="with --pretrain: optimizer steps of every size")
    parser.add_argument("--every", type=int, default=60, help="with --pretrain: checkpoint and val-loss interval")
    parser.add_argument("--batch-size", type=int, default=32, help="with --pretrain: global batch of every size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--probe-seeds",
        type=int,
        default=3,
        help="probes per checkpoint (train.seed 0..N-1): the top-1 intervals then cover the heads' training noise too",
    )
    parser.add_argument(
        "--probe-labels",
        choices=sorted(PROBE_LABELS),
        default="few",
        help="with --pretrain: probe heads trained on 10 labelled digits per class (few) or on all (all)",
    )
    parser.add_argument("--checkpoints-run", default=None, help="run folder whose every checkpoint is probed")
    parser.add_argument("--size-runs", nargs="*", default=[], help="run folders of different sizes, same data/steps")
    parser.add_argument("--probe-config", default="probe_aim-tiny", help="probe YAML path or shipped name")
    parser.add_argument("--train-beton", default=None, help="labelled train .beton for the probes")
    parser.add_argument("--val-beton", default=None, help="labelled val .beton for the probes")
    parser.add_argument("overrides", nargs="*", help="probe-config overrides, e.g. train.epochs=5")
    return parser.parse_args(argv)


def pretrain_sizes(stages: demo.Stages, out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Digits betons, then one run per size with the same data, steps and seed; a run that already
    holds its final checkpoint is not launched again. Returns ``{size: run folder}``."""
    demo.make_betons(stages, out, args.sizes[0], args.seed)
    runs = {}
    for size in args.sizes:
        run_dir = out / "runs" / size
        runs[size] = run_dir
        latest = ckpt.latest_complete(run_dir / "checkpoints")
        if latest is not None and latest[0] == args.steps:
            print(f"[study] {run_dir} already holds step {args.steps}; not retrained", flush=True)
            continue
        launcher, env, ds_config = demo.launcher()
        overrides = [
            f"data.sources=[{{path: {out / 'digits_train.beton'}, prob: 1.0}}]",
            f"data.val_path={out / 'digits_val.beton'}",
            # The same batch, schedule and data order for every size: only the architecture differs.
            f"train.batch_size={args.batch_size}",
            "train.micro_batch_size=0",  # batch / world size
            "optim.peak_lr=1e-3",
            "optim.warmup_fraction=0.05",
            f"train.steps={args.steps}",
            f"train.seed={args.seed}",
            f"checkpoint.every_steps={args.every}",
            "checkpoint.keep_last=0",  # the study probes every checkpoint
            f"val.every_steps={args.every}",  # a val loss beside every checkpoint
            f"out_dir={run_dir}",
        ]
        if size != args.checkpoints_model:
            # Only the final checkpoint of the other sizes is probed: no checkpoint or val loss before it.
            overrides += [f"checkpoint.every_steps={args.steps}", f"val.every_steps={args.steps}"]
        config = ROOT / "run" / "configs" / f"{size}.yaml"
        stages.run(
            f"pretrain {size}",
            launcher + ["run/pretrain.py", "--deepspeed", ds_config, "--config", str(config), *overrides],
            env=env,
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = demo.Stages()
    start = time.perf_counter()
    train_beton, val_beton = args.train_beton, args.val_beton
    checkpoints_run, size_runs = args.checkpoints_run, list(args.size_runs)
    overrides = list(args.overrides)
    if args.pretrain:
        runs = pretrain_sizes(stages, out, args)
        beton, label_overrides = PROBE_LABELS[args.probe_labels]
        train_beton = train_beton or str(out / beton)
        val_beton = val_beton or str(out / "digits_val.beton")
        checkpoints_run = checkpoints_run or str(runs.get(args.checkpoints_model, next(iter(runs.values()))))
        size_runs = size_runs or [str(p) for p in runs.values()]
        overrides = [*STUDY_PROBE_OVERRIDES, *label_overrides, *overrides]
    if not train_beton or not val_beton:
        raise SystemExit("give --train-beton and --val-beton (labelled betons), or --pretrain")
    if args.probe_seeds < 1:
        print(f"--probe-seeds must be >= 1, got {args.probe_seeds}", file=sys.stderr)
        return 2
    seeds = tuple(range(args.probe_seeds))
    settings = ProbeSettings(args.probe_config, str(train_beton), str(val_beton), tuple(overrides), seeds)
    folder = out / "study"
    checkpoints = None
    if checkpoints_run:
        checkpoints = stages.time("probe checkpoints", study_checkpoints, checkpoints_run, settings, folder)
    sizes = stages.time("probe sizes", study_sizes, size_runs, settings, folder) if size_runs else []
    stages.seconds["total"] = time.perf_counter() - start
    summary = render_summary(checkpoints, sizes, stages.seconds)
    atomic_write_text(folder / "summary.md", summary)
    print("\n" + summary + f"\nFigures: {folder / 'loss_vs_probe.png'}, {folder / 'loss_vs_size.png'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
