"""Training-step benchmark: DeepSpeed ZeRO-3 against plain PyTorch, side by side, same model and batch.

For each model: the median step time over ``--steps`` measured steps (after ``--warmup``), images/s,
TFLOP/s per device (FLOPs from :func:`aim_ds.flops.train_flops_per_image`: 6 x matmul params x
tokens + 12 x depth x width x tokens^2, trunk + head, forward + backward), MFU against ``--peak-tflops``
(989 = H100 SXM bf16 dense), and peak device memory. Synthetic images (the loader is measured by
bench_loader.py); the prefix length is drawn per sample as in training.

    python bench/bench_gpu.py --models aim-0.6B aim-1B --micro-batch 64        # one H100
    python bench/bench_gpu.py --models aim-7B --micro-batch 16 --modes zero3 \
        --ds-config ds_configs/zero3_offload.json                              # 7B with offload
    python bench/bench_gpu.py --models aim-test --device cpu --steps 2         # the harness on CPU

Runs as one process (world size 1); it starts its own process group (aim_ds.distributed).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aim_ds  # noqa: E402
from aim_ds.distributed import init_distributed  # noqa: E402
from aim_ds.flops import H100_BF16_DENSE_FLOPS, train_flops_per_image  # noqa: E402
from aim_ds.io import atomic_write_json, atomic_write_text  # noqa: E402
from aim_ds.optim import build_optimizer, param_groups  # noqa: E402
from aim_ds.registry import PAPER_RECIPE  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _host_rss_gib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:  # pragma: no cover
        return float("nan")


def _time_steps(step_fn, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step_fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step_fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _batch(model, micro_batch: int, device: torch.device, generator: torch.Generator):
    cfg = model.config if hasattr(model, "config") else model.module.config
    images = torch.randn(micro_batch, 3, cfg.image_size, cfg.image_size, generator=generator).to(device)
    prefix = torch.randint(1, cfg.num_patches, (micro_batch,), generator=generator)
    return images, prefix


def run_plain(name: str, micro_batch: int, device: torch.device, args) -> dict:
    """fp32 master weights, bf16 autocast on CUDA, torch AdamW (fused on CUDA)."""
    torch.manual_seed(0)
    model = aim_ds.create_model(name, attn_impl=args.attn_impl).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer = build_optimizer(param_groups(model, PAPER_RECIPE.weight_decay), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> None:
        images, prefix = _batch(model, micro_batch, device, gen)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(images, prefix)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PAPER_RECIPE.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = _time_steps(step, device, args.warmup, args.steps)
    result = _summary(name, "plain", micro_batch, times, model.config, device, args)
    return result


def _ds_config(path: str, micro_batch: int, device: torch.device) -> dict:
    with open(path) as f:
        config = json.load(f)
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = micro_batch
    config.setdefault("gradient_clipping", PAPER_RECIPE.grad_clip)
    config["steps_per_print"] = 10**9
    config["wall_clock_breakdown"] = False
    if device.type != "cuda":  # CPU: fp32, no pinned offload
        config.setdefault("bf16", {})["enabled"] = False
        config.pop("fp16", None)
    return config


def run_zero3(name: str, micro_batch: int, device: torch.device, args) -> dict:
    import deepspeed

    config = _ds_config(args.ds_config, micro_batch, device)
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"
    torch.manual_seed(0)
    # Build under zero.Init so that a model larger than one device is never materialised whole.
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=config["zero_optimization"]["stage"] == 3):
        model = aim_ds.create_model(name, attn_impl=args.attn_impl)
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer = build_optimizer(param_groups(model, PAPER_RECIPE.weight_decay), lr=1e-4, offload=offload)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        images, prefix = _batch(engine.module, micro_batch, device, gen)
        loss = engine(images, prefix)["loss"]
        engine.backward(loss)
        engine.step()

    times = _time_steps(step, device, args.warmup, args.steps)
    result = _summary(
        name, f"zero3{'+offload' if offload else ''}", micro_batch, times, engine.module.config, device, args
    )
    engine.destroy()
    return result


def _summary(name, mode, micro_batch, times, cfg, device, args) -> dict:
    step_s = statistics.median(times)
    images_per_second = micro_batch / step_s
    tflops = train_flops_per_image(cfg) * images_per_second / 1e12
    result = {
        "model": name,
        "mode": mode,
        "micro_batch": micro_batch,
        "step_s": step_s,
        "images_per_second": images_per_second,
        "tflops_per_device": tflops,
        "mfu": tflops / args.peak_tflops,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "host_rss_gib": _host_rss_gib(),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(result), flush=True)
    return result


def _table(results: list[dict], args, device: torch.device) -> str:
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"Command: `python bench/bench_gpu.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {device_name}; torch {torch.__version__}; date {datetime.date.today().isoformat()}  ",
        f"MFU against {args.peak_tflops:g} TFLOP/s; attention: {args.attn_impl}; grad checkpointing: {args.grad_checkpointing}",
        "",
        "| model | mode | micro batch | step (s) | images/s | TFLOP/s per device | MFU | peak GPU mem (GiB) | host RSS (GiB) | ZeRO-3 / plain step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {(r["model"], r["micro_batch"]): r["step_s"] for r in results if r["mode"] == "plain"}
    for r in results:
        ratio = ""
        if r["mode"].startswith("zero3") and (r["model"], r["micro_batch"]) in plain:
            ratio = f"{r['step_s'] / plain[(r['model'], r['micro_batch'])]:.3f}"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['micro_batch']} | {r['step_s']:.4f} | {r['images_per_second']:.1f} | "
            f"{r['tflops_per_device']:.2f} | {100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.1f} | {r['host_rss_gib']:.1f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["aim-0.6B", "aim-1B"], help="registry names")
    parser.add_argument(
        "--micro-batch", type=int, nargs="+", default=[64], help="images per step (one per model, or one for all)"
    )
    parser.add_argument("--modes", nargs="+", default=["zero3", "plain"], choices=["zero3", "plain"])
    parser.add_argument("--ds-config", default="ds_configs/zero3.json")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation, allocator)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn-impl", default="auto", choices=["auto", "sdpa", "flex"])
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_FLOPS / 1e12)
    parser.add_argument("--out", default="bench_out/gpu.md", help="markdown table; a .json beside it")
    args = parser.parse_args(argv)
    if len(args.micro_batch) not in (1, len(args.models)):
        parser.error("--micro-batch takes one value, or one per model")
    if not Path(args.ds_config).is_file():
        parser.error(f"--ds-config {args.ds_config} does not exist")
    device = torch.device(args.device)
    if "zero3" in args.modes:
        # DeepSpeed's engine wants a process group: a world of one on a free port (or MASTER_PORT).
        init_distributed(cuda=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = []
    batches = args.micro_batch * len(args.models) if len(args.micro_batch) == 1 else args.micro_batch
    for name, micro_batch in zip(args.models, batches):
        for mode in args.modes:
            runner = run_zero3 if mode == "zero3" else run_plain
            try:
                results.append(runner(name, micro_batch, device, args))
            except torch.OutOfMemoryError as exc:
                print(f"{name} {mode} micro batch {micro_batch}: out of memory ({exc})", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = _table(results, args, device)
    out = Path(args.out)
    atomic_write_text(out, table)
    atomic_write_json(out.with_suffix(".json"), results)
    print(table)
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
