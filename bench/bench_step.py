"""Training-step benchmark on 2 CPU ranks: DeepSpeed ZeRO-3 against plain PyTorch DDP on the same model and data.

For each model and mode, 2 ranks (gloo) time ``--steps`` optimizer steps after ``--warmup``; the
median step gives images/s for the whole world, and each row's ratio to DDP on the same model.
Modes:

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` over fp32 weights, the same AdamW and
  gradient clipping as the training path;
* ``zero3``: the DeepSpeed JSON (``--ds-config``, fp32 by default) with its ``"auto"`` knobs filled by
  :func:`aim_ds.train.engine.resolve_auto_knobs`, as the driver fills them, under ``zero.Init``;
* ``zero3-compile``: the same with ``model.compile`` (per-block ``torch.compile``, inductor on CPU);
  its first steps compile, so ``--warmup`` must cover them (3 is enough here).

``--zero KEY=VALUE`` overrides a ``zero_optimization`` knob of every ZeRO-3 row (to compare fixed
buckets with the ``"auto"`` ones); ``--label`` names such a run in the table. The micro-batches are
random images made once on each rank before timing, the same for every mode, so the figures are the
model's and the engine's (the loader is measured by bench_loader.py).

    python bench/bench_step.py                                   # aim-tiny and the 0.6B-width model
    python bench/bench_step.py --models aim-tiny --modes zero3 --zero reduce_bucket_size=65536

``aim-0.6B-w``: aim-0.6B's widths (trunk 1536, head 2048, 224 px, patch 14: 256 tokens) at depth 2
and head depth 1, so that DDP's full fp32 copies fit two ranks on a shared 24 GiB machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aim_ds  # noqa: E402
from aim_ds.distributed import free_port, init_distributed  # noqa: E402
from aim_ds.io import atomic_write_json, atomic_write_text  # noqa: E402
from aim_ds.model.aim import AIM, AIMConfig  # noqa: E402
from aim_ds.model.registry import PAPER_RECIPE  # noqa: E402
from aim_ds.optim import build_optimizer, param_groups  # noqa: E402
from aim_ds.train.engine import compile_blocks, resolve_auto_knobs  # noqa: E402

MODES = ("ddp", "zero3", "zero3-compile")
WORLD = 2


def model_config(name: str) -> AIMConfig:
    """A registry model, or ``aim-0.6B-w`` (aim-0.6B's widths at depth 2, head depth 1)."""
    if name == "aim-0.6B-w":
        return aim_ds.get_model_spec("aim-0.6B").config.replace(depth=2, head_depth=1)
    return aim_ds.get_model_spec(name).config


def _batches(cfg: AIMConfig, micro_batch: int, count: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 + rank)
    return [
        (
            torch.randn(micro_batch, 3, cfg.image_size, cfg.image_size, generator=gen),
            torch.randint(1, cfg.num_patches, (micro_batch,), generator=gen),
        )
        for _ in range(count)
    ]


def _time(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _ds_config(path: str, micro_batch: int, accumulation: int, cfg: AIMConfig, zero: dict[str, Any]) -> dict:
    config = json.loads(Path(path).read_text())
    config.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro_batch * accumulation * WORLD,
        gradient_clipping=PAPER_RECIPE.grad_clip,
    )
    resolve_auto_knobs(config, cfg)
    config["zero_optimization"].update(zero)
    return config


def run_ddp(cfg: AIMConfig, batches: list, args: argparse.Namespace) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(AIM(cfg))
    optimizer = build_optimizer(param_groups(model.module, PAPER_RECIPE.weight_decay), lr=1e-4)

    def step() -> None:
        for i, (images, prefix) in enumerate(batches):
            sync = model.no_sync() if i < len(batches) - 1 else torch.enable_grad()
            with sync:
                (model(images, prefix)["loss"] / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PAPER_RECIPE.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _time(step, args.warmup, args.steps), {}


def run_zero3(cfg: AIMConfig, batches: list, args: argparse.Namespace, compiled: bool) -> tuple[list[float], dict]:
    import deepspeed

    config = _ds_config(args.ds_config, args.micro_batch, args.accumulation, cfg, args.zero)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = AIM(cfg)
    if compiled:
        compile_blocks(model)
    optimizer = build_optimizer(param_groups(model, PAPER_RECIPE.weight_decay), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def step() -> None:
        for images, prefix in batches:
            engine.backward(engine(images, prefix)["loss"])
            engine.step()

    try:
        times = _time(step, args.warmup, args.steps)
    finally:
        engine.destroy()
    zero = config["zero_optimization"]
    keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    return times, {k: zero[k] for k in keys}


def _worker(rank: int, port: int, args: argparse.Namespace, result_path: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    init_distributed(cuda=False)
    rows = []
    for name in args.models:
        cfg = model_config(name)
        batches = _batches(cfg, args.micro_batch, args.accumulation, rank)
        for mode in args.modes:
            if mode == "ddp":
                times, knobs = run_ddp(cfg, batches, args)
            else:
                times, knobs = run_zero3(cfg, batches, args, compiled=mode == "zero3-compile")
            step_s = statistics.median(times)
            row = {
                "model": name, "mode": mode, "label": args.label, "step_s": step_s,
                "images_per_second": args.micro_batch * args.accumulation * WORLD / step_s,
                "step_times": times, **knobs,
            }  # fmt: skip
            rows.append(row)
            if rank == 0:
                print(json.dumps({k: v for k, v in row.items() if k != "step_times"}), flush=True)
    if rank == 0:
        atomic_write_json(Path(result_path), {"rows": rows})
    dist.barrier()
    dist.destroy_process_group()


def table(rows: list[dict], args: argparse.Namespace) -> str:
    load = os.getloadavg()
    lines = [
        f"Command: `python bench/bench_step.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or 'cpu'}), 2 CPU ranks (gloo); torch "
        f"{torch.__version__}; {datetime.datetime.now().isoformat(timespec='minutes')}; load average at the end "
        f"{load[0]:.1f}  ",
        f"micro-batch {args.micro_batch} x accumulation {args.accumulation} per rank; median of {args.steps} steps "
        f"after {args.warmup}; ZeRO-3: {os.path.relpath(args.ds_config, ROOT)}",
        "",
        "| model | mode | step (s) | images/s | ratio to ddp | reduce / prefetch bucket, persistence (elements) |",
        "|---|---|---|---|---|---|",
    ]
    ddp = {r["model"]: r["images_per_second"] for r in rows if r["mode"] == "ddp"}
    for r in rows:
        ratio = f"{r['images_per_second'] / ddp[r['model']]:.2f}" if r["model"] in ddp else ""
        knobs = (
            f"{r['reduce_bucket_size']:,} / {r['stage3_prefetch_bucket_size']:,}, "
            f"{r['stage3_param_persistence_threshold']:,}"
            if "reduce_bucket_size" in r
            else ""
        )
        mode = r["mode"] + (f" ({r['label']})" if r["label"] else "")
        lines.append(
            f"| {r['model']} | {mode} | {r['step_s']:.3f} | {r['images_per_second']:.1f} | {ratio} | {knobs} |"
        )
    return "\n".join(lines) + "\n"


def _zero_override(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--zero takes KEY=VALUE, got {text!r}")
    try:
        return key, int(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--zero {key}: {value!r} is not a number") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["aim-tiny", "aim-0.6B-w"])
    parser.add_argument("--modes", nargs="+", default=["ddp", "zero3"], choices=MODES)
    parser.add_argument("--micro-batch", type=int, default=16, help="images per rank per micro-step")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero3_fp32.json"))
    parser.add_argument("--zero", type=_zero_override, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--label", default="", help="names this run's ZeRO-3 rows in the table")
    parser.add_argument("--out", default="bench_out/step.md", help="markdown table; a .json beside it")
    args = parser.parse_args(argv)
    args.zero = dict(args.zero)
    for name in args.models:
        try:
            model_config(name)
        except KeyError as exc:
            parser.error(str(exc))
    if not Path(args.ds_config).is_file():
        parser.error(f"--ds-config {args.ds_config} does not exist")
    os.environ["DS_ACCELERATOR"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        mp.spawn(_worker, args=(free_port(), args, str(result)), nprocs=WORLD, join=True)
        rows = json.loads(result.read_text())["rows"]
    text = table(rows, args)
    out = Path(args.out)
    atomic_write_text(out, text)
    atomic_write_json(out.with_suffix(".json"), {"rows": rows, "argv": sys.argv[1:]})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
