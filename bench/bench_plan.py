"""The planner (aim_ds.plan) against reality: a few ZeRO-3 optimizer steps on CPU ranks, peak memory
per rank measured, side by side with the planner's prediction for the same settings.

    python bench/bench_plan.py --model aim-0.6B --micro-batch 1 4 --checkpointing off on \
        [--override depth=16] [--zero sub_group_size=1e8 ...] [--steps 2] [--trace] [--out bench_out/plan.md]
    python bench/bench_plan.py --table --out bench_out/plan_table.md   # the planner's tables, no run
    python bench/bench_plan.py --table --update BENCHMARKS.md          # regenerate BENCHMARKS.md's tables

Each configuration is one launch of the real ``deepspeed`` launcher with two CPU ranks (gloo; the
DeepSpeed config as given, ``ds_configs/zero3.json`` by default: bf16 weights, fp32 gradient sums, as
run/pretrain.py runs it on every device) running this file with ``--worker``: the model is built under
``deepspeed.zero.Init`` and wrapped by aim_ds.train.engine exactly as the driver does; images are
synthetic (memory does not depend on pixel values). A rank's peak is its peak resident set size
(``ru_maxrss``), which on the CPU accelerator holds everything the planner counts; ``--trace`` also
prints each rank's resident/peak memory after each phase (build, engine, forward, backward, step).
Before each launch the worker runs the driver's own start-up check, so a configuration the planner
says does not fit is refused, not run (``--no-check`` runs it anyway).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _run_config(model: str, overrides: dict[str, Any], micro: int, world: int, checkpointing: bool) -> Any:
    from aim_ds.train.config import PretrainConfig

    cfg = PretrainConfig()
    cfg.model.name, cfg.model.overrides = model, overrides
    cfg.model.grad_checkpointing, cfg.model.zero_init = checkpointing, True
    cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.steps = micro * world, micro, 100
    return cfg


def _phase(name: str) -> tuple[str, int, int]:
    """``(name, resident bytes now, peak resident bytes so far)`` of this process."""
    from aim_ds.plan.memory import resident_bytes

    return name, resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    """One rank: build, train ``--steps`` steps, report peak RSS and the plan (rank 0 writes JSON)."""
    import torch

    from aim_ds.distributed import init_distributed, is_main, max_across_ranks
    from aim_ds.plan import check_run, local_hardware
    from aim_ds.train.config import resolve_plan
    from aim_ds.train.engine import build_ds_config, build_engine, build_model, load_ds_config, model_config

    rank, world, device = init_distributed()
    overrides = json.loads(args.overrides_json)
    cfg = _run_config(args.model, overrides, args.micro_batch[0], world, args.checkpointing[0] == "on")
    model_cfg = model_config(cfg)
    run_plan = resolve_plan(cfg, world, model_cfg.image_size, model_cfg.num_patches)
    ds, _ = build_ds_config(load_ds_config(args.deepspeed), cfg, run_plan, model_cfg, source=args.deepspeed)
    hardware = local_hardware(world, device)  # its runtime term: this rank's RSS with everything imported
    sizing = (
        check_run(
            model_cfg,
            args.model,
            ds,
            hardware,
            batch_size=cfg.train.batch_size,
            micro_batch=run_plan.micro_batch_size,
            checkpointing=cfg.model.grad_checkpointing,
        )
        if not args.no_check
        else None
    )
    phases = [_phase("imported")]
    model = build_model(model_cfg, cfg, ds)
    phases.append(_phase("model built"))
    engine, _ = build_engine(model, cfg, ds, run_plan)
    phases.append(_phase("engine built"))
    generator = torch.Generator().manual_seed(rank)
    size = model_cfg.image_size
    for step in range(1, args.steps + 1):
        images = torch.randn(run_plan.micro_batch_size, 3, size, size, generator=generator)
        prefix = torch.randint(1, model_cfg.num_patches, (run_plan.micro_batch_size,), generator=generator)
        loss = engine(images, prefix_len=prefix)["loss"]
        phases.append(_phase(f"step {step} forward"))
        engine.backward(loss)
        phases.append(_phase(f"step {step} backward"))
        engine.step()
        phases.append(_phase(f"step {step} optimizer"))
    if args.trace:
        print(f"rank {rank}: " + "; ".join(f"{name} {now / GIB:.2f}/{peak / GIB:.2f}" for name, now, peak in phases),
              flush=True)  # fmt: skip
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_max = max_across_ranks(peak_kib) * 1024
    if is_main():
        from aim_ds.plan import make_plan

        if sizing is None:
            sizing = make_plan(
                model_cfg, args.model, ds, hardware, batch_size=cfg.train.batch_size,
                micro_batch=run_plan.micro_batch_size, checkpointing=cfg.model.grad_checkpointing,
            )  # fmt: skip
        chosen = sizing.chosen
        result = {
            "model": args.model,
            "overrides": overrides,
            "micro_batch": run_plan.micro_batch_size,
            "checkpointing": cfg.model.grad_checkpointing,
            "world": world,
            "measured_peak_bytes": peak_max,
            "predicted_peak_bytes": chosen.peak,
            "predicted": {
                "model_states": chosen.model_states,
                "activations": chosen.activations,
                "optimizer_step": chosen.optimizer_step,
                "buffers": chosen.buffers,
                "runtime": chosen.runtime,
            },
            "plan": sizing.text,
        }
        Path(args.result).write_text(json.dumps(result))


def _deepspeed_config(args: argparse.Namespace, tmp: Path) -> str:
    """``--deepspeed`` as given, or a copy in ``tmp`` with the ``--zero`` knobs of its
    ``zero_optimization`` section replaced (e.g. ``sub_group_size=100000000``)."""
    if not args.zero:
        return args.deepspeed
    ds = json.loads(Path(args.deepspeed).read_text())
    for item in args.zero:
        key, value = item.split("=", 1)
        try:
            ds["zero_optimization"][key] = int(float(value))  # 1e8, 100000000
        except ValueError:
            ds["zero_optimization"][key] = value
    path = tmp / f"{Path(args.deepspeed).stem}_{'_'.join(args.zero)}.json"
    path.write_text(json.dumps(ds, indent=1))
    return str(path)


def launch(args: argparse.Namespace, micro: int, checkpointing: str) -> dict[str, Any]:
    """One configuration under the real launcher, two CPU ranks; returns rank 0's JSON."""
    from aim_ds.distributed import free_port

    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        overrides = dict(kv.split("=", 1) for kv in args.override)
        overrides = {k: int(v) if v.isdigit() else v for k, v in overrides.items()}
        command = [
            deepspeed, "--num_gpus", str(args.ranks), "--master_port", str(free_port()), str(Path(__file__).resolve()),
            "--worker", "--model", args.model, "--micro-batch", str(micro), "--checkpointing", checkpointing,
            "--steps", str(args.steps), "--deepspeed", _deepspeed_config(args, Path(tmp)), "--result", str(result),
            "--overrides-json", json.dumps(overrides), *(["--no-check"] if args.no_check else []),
            *(["--trace"] if args.trace else []),
        ]  # fmt: skip
        env = dict(os.environ, DS_ACCELERATOR="cpu")
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if args.trace:
            print("\n".join(line for line in done.stdout.splitlines() if line.startswith("rank ")), flush=True)
        refused = [line for line in done.stderr.splitlines() if "PlanError: " in line]
        if done.returncode != 0 and refused:  # the driver's start-up check said no: a result too
            return {"refused": refused[0].split("PlanError: ", 1)[1].split(" (the plan:")[0]}
        if done.returncode != 0 or not result.exists():
            raise SystemExit(f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(result.read_text())


TABLE_BEGIN = "<!-- bench_plan --table: begin (generated; edits here are overwritten) -->"
TABLE_END = "<!-- bench_plan --table: end -->"


def _sizing(cfg: Any, ds_name: str, hw: Any, micro: int, checkpointing: bool, steps: int) -> Any:
    from aim_ds.plan import make_plan
    from aim_ds.train.engine import load_ds_config, model_config

    return make_plan(
        model_config(cfg), cfg.model.name, load_ds_config(ROOT / "ds_configs" / ds_name), hw,
        batch_size=cfg.train.batch_size, micro_batch=micro, checkpointing=checkpointing, steps=steps,
    )  # fmt: skip


def _hardware(gpu: Any, gpus: int) -> Any:
    from aim_ds.plan import Hardware, default_headroom

    return Hardware(
        gpus, 1, "cuda", gpu.memory, 1000 * GIB, 2 * GIB, headroom=default_headroom("cuda", gpu.memory), gpu=gpu
    )


def _configs() -> list[tuple[str, Any]]:
    from aim_ds.config import load_config
    from aim_ds.train.config import PretrainConfig

    paths = sorted((ROOT / "run/configs").glob("aim-*.yaml"), key=lambda p: (_size(p.stem), p.stem))
    return [(p.name, load_config(PretrainConfig, p)) for p in paths]


def _size(stem: str) -> float:
    """Sort key: aim-0.6B < aim-1B < ... ; the small test models first."""
    tail = stem.removeprefix("aim-")
    return float(tail[:-1]) if tail.endswith("B") and tail[:-1].replace(".", "").isdigit() else -1.0


def _steps(cfg: Any, world: int) -> int:
    """The run's optimizer steps as the YAML gives them (train.steps, or from train.patches_seen)."""
    import dataclasses

    from aim_ds.train.config import resolve_plan
    from aim_ds.train.engine import model_config

    model_cfg = model_config(cfg)
    free = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=0))
    return resolve_plan(free, world, model_cfg.image_size, model_cfg.num_patches).total_steps


def table(args: argparse.Namespace) -> str:
    """Two tables, both predictions of the planner (no run): the memory breakdown of the paper's
    sizes on 8 H100s (and 7B offloaded to one), then every shipped YAML on 1 and 8 GPUs of each GPU
    in aim_ds.devices with its fastest fitting choice, step time and the run's hours."""
    from aim_ds.devices import GPUS

    h100 = GPUS["H100-SXM"]
    rows = ["| run | GPUs | micro-batch x accum | ckpt | states | activations | optim. step | buffers | peak / GPU | "
            "host / node | fits at | step s: compute / collectives / PCIe -> total |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    cases = [(size, "zero3.json", 8) for size in ("0.6B", "1B", "3B", "7B")] + [("7B", "zero3_offload.json", 1)]
    configs = dict(_configs())
    for size, ds_name, gpus in cases:
        cfg = configs[f"aim-{size}.yaml"]
        sizing = _sizing(cfg, ds_name, _hardware(h100, gpus), cfg.train.micro_batch_size, cfg.model.grad_checkpointing,
                         0)  # fmt: skip
        plan, t = sizing.chosen, sizing.step
        best = "; ".join(f"{p.micro_batch}{' +ckpt' if p.checkpointing else ''}" for p in sizing.best) or "none"
        rows.append(
            f"| aim-{size} {ds_name} | {gpus} | {plan.micro_batch} x {plan.accumulation} | "
            f"{'on' if plan.checkpointing else 'off'} | {plan.model_states / GIB:.1f} | "
            f"{plan.activations / GIB:.1f} | {plan.optimizer_step / GIB:.1f} | {plan.buffers / GIB:.1f} | "
            f"{plan.peak / GIB:.1f}{'' if sizing.fits else ' (does not fit)'} | "
            f"{plan.host_per_node / GIB:.0f} | {best} | {t.compute:.1f} / {t.network:.2f} / {t.pcie:.1f} -> "
            f"{t.total:.1f} |"
        )
    rows += [
        "",
        "Every shipped YAML on one node of 1 and 8 GPUs of each kind: `ds_configs/zero3.json`, or "
        "`zero3_offload.json` where nothing fits without offload; the YAML's own micro-batch and checkpointing, "
        "and the fitting choice with the shortest predicted step, whose step time and hours are shown "
        "(40% MFU of the GPU's bf16 dense peak; steps from the YAML).",
        "",
        "| config | GPU | GPUs | DeepSpeed | YAML's choice | fastest that fits | peak / usable GiB | "
        "step s (compute / coll. / PCIe) | bound | steps | hours | GPU-hours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in configs.items():
        for gpu in GPUS.values():
            for gpus in (1, 8):
                rows.append(_hours_row(name, cfg, gpu, gpus))
                print(rows[-1], flush=True)
    return "\n".join(rows)


def _hours_row(name: str, cfg: Any, gpu: Any, gpus: int) -> str:
    hw = _hardware(gpu, gpus)
    steps = _steps(cfg, gpus)
    micro = cfg.train.micro_batch_size
    divides = micro > 0 and cfg.train.batch_size % (micro * gpus) == 0
    for ds_name in ("zero3.json", "zero3_offload.json"):
        sizing = _sizing(cfg, ds_name, hw, micro if divides else 1, cfg.model.grad_checkpointing, steps)
        if sizing.fastest is not None:
            break
    yaml_choice = f"{micro}{' +ckpt' if cfg.model.grad_checkpointing else ''}: "
    yaml_choice += ("fits" if sizing.fits else "does not fit") if divides else "does not divide"
    if sizing.fastest is None:
        return f"| {name} | {gpu.name} | {gpus} | {ds_name} | {yaml_choice} | nothing fits | | | | {steps:,} | | |"
    plan, t = sizing.fastest
    hours = steps * t.total / 3600
    return (
        f"| {name} | {gpu.name} | {gpus} | {ds_name} | {yaml_choice} | {plan.micro_batch} x {plan.accumulation}"
        f"{' +ckpt' if plan.checkpointing else ''} | {plan.peak / GIB:.1f} / {hw.usable / GIB:.1f} | "
        f"{t.total:.3g} ({t.compute:.3g} / {t.network:.2g} / {t.pcie:.3g}) | {t.bound} | {steps:,} | "
        f"{_figure(hours)} | {_figure(hours * gpus)} |"
    )


def _figure(value: float) -> str:
    """Thousands separated from 100 up, three significant digits below (the small models' seconds)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def update_markdown(path: Path, text: str) -> None:
    """Replace the generated block of ``path`` (between :data:`TABLE_BEGIN` and :data:`TABLE_END`)."""
    from aim_ds.io import atomic_write_text

    doc = path.read_text()
    if TABLE_BEGIN not in doc or TABLE_END not in doc:
        raise SystemExit(f"{path} has no generated block ({TABLE_BEGIN} ... {TABLE_END})")
    head, rest = doc.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
    atomic_write_text(path, f"{head}{TABLE_BEGIN}\n{text}\n{TABLE_END}{tail}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="aim-0.6B")
    parser.add_argument("--override", nargs="*", default=[], help="AIMConfig overrides, e.g. depth=4")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the ZeRO-3 trace completes at 1)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--zero", nargs="*", default=[], help="zero_optimization knobs to replace, e.g. sub_group_size=1e8"
    )
    parser.add_argument("--deepspeed", default=str(ROOT / "ds_configs/zero3.json"))
    parser.add_argument("--no-check", action="store_true", help="run even when the planner says it does not fit")
    parser.add_argument("--trace", action="store_true", help="print each rank's memory (now/peak GiB) per phase")
    parser.add_argument("--table", action="store_true", help="print the planner's tables only (no run)")
    parser.add_argument(
        "--update", default=None, help="with --table: rewrite the generated block of this markdown file (BENCHMARKS.md)"
    )
    parser.add_argument("--out", default=None, help="markdown file for the results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--overrides-json", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.table:
        text = table(args)
        if args.update:
            update_markdown(Path(args.update), text)
    else:
        rows = [
            f"{args.model} {' '.join(args.override)} on {args.ranks} CPU ranks ({Path(args.deepspeed).name}"
            f"{' with ' + ', '.join(args.zero) if args.zero else ''}, gloo), "
            f"{args.steps} steps, {datetime.date.today()}",
            "",
            "| micro-batch | ckpt | measured peak / rank | predicted | ratio | states | activations | optim. step "
            "| buffers | runtime |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for micro in args.micro_batch:
            for checkpointing in args.checkpointing:
                r = launch(args, micro, checkpointing)
                if "refused" in r:
                    rows.append(f"| {micro} | {checkpointing} | not run: the planner refused it: {r['refused']} |")
                    print(rows[-1], flush=True)
                    continue
                p = r["predicted"]
                rows.append(
                    f"| {micro} | {checkpointing} | {r['measured_peak_bytes'] / GIB:.2f} GiB | "
                    f"{r['predicted_peak_bytes'] / GIB:.2f} GiB | "
                    f"{r['predicted_peak_bytes'] / r['measured_peak_bytes']:.2f} | "
                    + " | ".join(
                        f"{p[k] / GIB:.2f}"
                        for k in ("model_states", "activations", "optimizer_step", "buffers", "runtime")
                    )
                    + " |"
                )
                print(rows[-1], flush=True)
        text = "\n".join(rows)
    print(text)
    if args.out:
        from aim_ds.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
