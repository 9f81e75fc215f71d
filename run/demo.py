"""The whole aim-ds pipeline on real images, end to end, in minutes (``make demo``).

1. data:     scikit-learn's handwritten digits written as PNG files in the ImageFolder layout
             (train and a held-out val split), converted to .beton files by ``python -m data_prep``;
2. pretrain: ``deepspeed run/pretrain.py --deepspeed ds_configs/zero3.json`` (zero3_fp32.json on CPU) trains a small AIM
             from the registry on 2 CPU ranks (or the GPUs there are), with a val loss;
3. probe:    ``run/probe.py`` fits attentive and linear probes on the exported trunk, and on the
             same trunk at random initialisation for comparison, each on all training labels and
             on 10 per class (where the pretrained features' advantage shows: see FEW_PER_CLASS);
4. a closing table (``<out>/summary.md``): probe top-1 pretrained vs random, final losses, the time
   each stage took, and where ``loss.png`` and the predicted-vs-true patch picture are.

Every stage is a real subprocess running the same CLI a user runs; each stage's command is
printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class Stages:
    """Runs commands, timing each named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        print(f"\n[demo] {stage}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})})
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"[demo] stage '{stage}' failed with exit code {proc.returncode}: {shlex.join(cmd)}")

    def time(self, stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        return result


def write_random_init_export(model_name: str, out_dir: Path, seed: int) -> Path:
    """The same architecture at random initialisation, in the export layout, as the probe baseline."""
    import torch

    import aim_ds
    from aim_ds.weights.export import save_export

    torch.manual_seed(seed)
    model = aim_ds.create_model(model_name)
    return save_export(model.state_dict(), out_dir, model_name=model_name, overrides={}, step=0)


def read_metrics(path: Path) -> tuple[float | None, float | None]:
    """Last logged train loss and last val loss from ``metrics.jsonl``."""
    from aim_ds.metrics import read_metrics as read_rows

    train = read_rows(path, "train")
    val = read_rows(path, "val")
    return (train[-1]["loss"] if train else None), (val[-1]["loss"] if val else None)


def make_betons(stages: Stages, out: Path, model: str, seed: int) -> dict[str, int]:
    """Stage 1: real labelled images -> ImageFolder -> ``digits_{train,val}.beton``. Returns the counts."""
    from aim_ds.datasets import write_digits_imagefolder
    from aim_ds.model.registry import get_model_spec

    image_size = get_model_spec(model).config.image_size
    counts = stages.time("images", write_digits_imagefolder, out / "digits", image_size=image_size, seed=seed)
    print(f"[demo] digits written: {counts}", flush=True)
    few = f"train_{FEW_PER_CLASS}_per_class"
    stages.time("images", write_few_per_class, out / "digits" / "train", out / "digits" / few, FEW_PER_CLASS, seed)
    for split in ("train", "val", few):
        # Raw pixels: at 32 px a JPEG round trip would cost more fidelity than the bytes it saves.
        beton = out / f"digits_{split}.beton"
        if not beton.exists():
            stages.run(
                "convert",
                [sys.executable, "-m", "data_prep", "imagefolder", str(out / "digits" / split), str(beton)]
                + ["--write-mode", "raw"],
            )
    return counts


# The harder probe split: with all ~144 training images per class, an attentive probe learns the digits
# from the random trunk's tokens (a random projection of each patch's pixels, carried by the residual
# stream) almost as well as from pretrained ones; with 10 labelled images per class it must rely on
# what the features already organise, which is where pretraining shows.
FEW_PER_CLASS = 10


def write_few_per_class(source: Path, dest: Path, per_class: int, seed: int) -> None:
    """Copy ``per_class`` images of each class folder of ``source`` (a seeded draw) into ``dest``."""
    import random
    import shutil

    rng = random.Random(seed)
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
        for file in rng.sample(files, min(per_class, len(files))):
            if not (dest / class_dir.name / file.name).exists():
                shutil.copy2(file, dest / class_dir.name / file.name)


def launcher() -> tuple[list[str], dict[str, str], str]:
    """The ``deepspeed`` launcher on the GPUs there are, else on 2 CPU ranks, its environment and
    the DeepSpeed config to use."""
    from aim_ds.distributed import free_port

    # A free port, not DeepSpeed's default 29500: another DeepSpeed job on this machine would make
    # the ranks' gloo connections fail with "connection reset".
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--master_port", str(free_port())]
    env = {}
    ds_config = "ds_configs/zero3.json"  # bf16 weights, fp32 gradient sums
    if _has_cuda():
        import torch

        cmd += ["--num_gpus", str(torch.cuda.device_count())]
    else:
        cmd += ["--num_gpus", "2"]
        env["DS_ACCELERATOR"] = "cpu"
        # fp32 on CPU, as the demo's published figures (BENCHMARKS.md) were made; bf16 runs on the
        # CPU too (tests/test_gpu_path.py), this is a choice, not a limit.
        ds_config = "ds_configs/zero3_fp32.json"
    return cmd, env, ds_config


def pretrain(stages: Stages, out: Path, args: argparse.Namespace) -> Path:
    """Stage 2: DeepSpeed ZeRO-3 pretraining on the GPUs there are, else 2 CPU ranks. Returns the run folder."""
    run_dir = out / "pretrain"
    launcher_cmd, env, ds_config = launcher()
    stages.run(
        "pretrain",
        launcher_cmd
        + [
            "run/pretrain.py",
            "--deepspeed",
            ds_config,
            "--config",
            f"run/configs/{args.model}.yaml",
            f"data.sources=[{{path: {out / 'digits_train.beton'}, prob: 1.0}}]",
            f"data.val_path={out / 'digits_val.beton'}",
            f"train.steps={args.steps}",
            f"train.seed={args.seed}",
            f"out_dir={run_dir}",
        ],
        env=env,
    )
    return run_dir


def probe(stages: Stages, out: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Stage 3: probes on the pretrained export and on the same architecture at random init, each
    trained on all training labels and on ``FEW_PER_CLASS`` per class (the same val images).
    Returns each probe's ``results.json`` by ``"<trunk>/<split>"``."""
    random_dir = stages.time("probe", write_random_init_export, args.model, out / "random_init", args.seed)
    results = {}
    # 10 x 10 images: a smaller batch, so that an epoch is more than one step.
    few = (f"digits_train_{FEW_PER_CLASS}_per_class.beton", ["train.batch_size=25"])
    splits: dict[str, tuple[str, list[str]]] = {"all": ("digits_train.beton", []), "few": few}
    for label, weights in (("pretrained", run_dir / "export"), ("random init", random_dir)):
        for split, (beton, extra) in splits.items():
            probe_dir = out / f"probe_{label.replace(' ', '_')}" / split
            stages.run(
                "probe",
                [
                    sys.executable,
                    "run/probe.py",
                    "--config",
                    f"run/configs/probe_{args.model}.yaml",
                    "--weights",
                    str(weights),
                    f"data.train_path={out / beton}",
                    f"data.val_path={out / 'digits_val.beton'}",
                    f"train.epochs={args.probe_epochs}",
                    # one cache per trunk: the val features are extracted once for both splits
                    f"features.cache_dir={out / ('features_' + label.replace(' ', '_'))}",
                    f"out_dir={probe_dir}",
                    *extra,
                ],
            )
            results[f"{label}/{split}"] = json.loads((probe_dir / "results.json").read_text())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="everything the demo writes goes here")
    parser.add_argument("--model", default="aim-tiny", help="registry name of the model to pretrain")
    parser.add_argument("--steps", type=int, default=600, help="pretraining optimizer steps")
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    total_start = time.perf_counter()
    counts = make_betons(stages, out, args.model, args.seed)
    run_dir = pretrain(stages, out, args)
    results = probe(stages, out, run_dir, args)

    # 4. The closing table
    train_loss, val_loss = read_metrics(run_dir / "metrics.jsonl")
    total = time.perf_counter() - total_start
    summary = render_summary(args, counts, results, train_loss, val_loss, stages.seconds, total, run_dir, out)
    from aim_ds.io import atomic_write_text

    atomic_write_text(out / "summary.md", summary)
    print("\n" + summary)
    return 0


def _top1(result: dict, head: str) -> str:
    value = result.get("heads", {}).get(head, {}).get("best", {}).get("top1")
    return "-" if value is None else f"{100 * value:.1f}%"


def render_summary(args, counts, results, train_loss, val_loss, seconds, total, run_dir: Path, out: Path) -> str:
    lines = [
        f"# aim-ds demo: {args.model}, {args.steps} pretraining steps on sklearn digits "
        f"({counts['train']} train / {counts['val']} val images, 10 classes)",
        "",
        "| probe (val top-1, best of the LR x weight-decay grid) | pretrained trunk | same trunk, random init |",
        "|---|---|---|",
    ]
    for split, words in (("all", "all training labels"), ("few", f"{FEW_PER_CLASS} labels per class")):
        for head in ("attentive", "linear"):
            pre, rnd = results[f"pretrained/{split}"], results[f"random init/{split}"]
            lines.append(f"| {head}, {words} | {_top1(pre, head)} | {_top1(rnd, head)} |")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines += [
        "",
        f"Final pretraining loss: train {fmt(train_loss)}, val {fmt(val_loss)} (chance level for the per-patch "
        "normalised target is 1.0).",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {stage} | {sec:.0f} |" for stage, sec in seconds.items()]
    lines += [
        f"| total | {total:.0f} |",
        "",
        f"Loss curves: `{run_dir / 'loss.png'}`  ",
        f"Predicted vs true patches on val images: `{run_dir / 'patches.png'}`  ",
        f"Probe results: `{out / 'probe_pretrained'}/<all|few>/results.json`, "
        f"`{out / 'probe_random_init'}/<all|few>/results.json`",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
