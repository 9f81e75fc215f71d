"""Training-step benchmark: plain PyTorch, DeepSpeed ZeRO-2 and ZeRO-3 side by side, for each attention kernel.

For each model x attention (``sdpa``, ``flex``) x mode (``plain``, ``zero2``, ``zero3``): the median
time of one optimizer step of ``--accumulation`` micro-steps (forward + backward each, then the
update) over ``--steps`` measured steps after ``--warmup``; images/s; TFLOP/s per device (FLOPs from
:func:`aim_ds.model.flops.train_flops_per_image`: 6 x matmul params x tokens + 12 x depth x width x
tokens^2, trunk + head, forward + backward); MFU against ``--peak-tflops`` (default: the GPU's bf16
dense peak from aim_ds.devices, the H100 SXM's 989 on the CPU); and peak memory (CUDA: the peak
allocated per configuration; CPU: the process's peak RSS so far, which only grows). The micro-batches are generated on the device once, before timing, so the
figures are the model's and the engine's (the loader is measured by bench_loader.py).

Precision is what each path asks for on every device: the DeepSpeed JSONs as they ship (bf16
weights, fp32 gradient sums; ``"auto"`` knobs filled from the width as the driver does), plain
PyTorch under ``--precision`` (default bf16 autocast over fp32 weights, fused AdamW on CUDA).
FlexAttention's backward does not run on CPU: there its rows are reported as skipped, with the reason.

    python bench/bench_gpu.py --models aim-0.6B aim-1B --micro-batch 64 --accumulation 4   # one H100
    python bench/bench_gpu.py --models aim-7B --micro-batch 16 --modes zero3 \
        --zero3-config ds_configs/zero3_offload.json --grad-checkpointing                # 7B with offload
    python bench/bench_gpu.py --models aim-test --device cpu --steps 2                    # the harness on CPU

Runs as one process (world size 1); it starts its own process group (aim_ds.distributed).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aim_ds  # noqa: E402
from aim_ds.distributed import init_distributed  # noqa: E402
from aim_ds.io import atomic_write_json, atomic_write_text  # noqa: E402
from aim_ds.metrics import device_peak_flops  # noqa: E402
from aim_ds.model.flops import train_flops_per_image  # noqa: E402
from aim_ds.model.registry import PAPER_RECIPE  # noqa: E402
from aim_ds.optim import build_optimizer, param_groups  # noqa: E402
from aim_ds.train.engine import optimizer_offloaded, resolve_auto_knobs  # noqa: E402

MODES = ("plain", "zero2", "zero3")
ATTENTION = ("sdpa", "flex")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _time_steps(step_fn: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per call of ``step_fn`` (one optimizer step), after ``warmup`` untimed calls."""
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


def _batches(cfg: aim_ds.AIMConfig, micro_batch: int, count: int, device: torch.device) -> list[tuple]:
    """``count`` micro-batches ``(images [B, 3, H, W], prefix_len [B])`` made on ``device`` once.
    The prefix lengths are drawn on the host, where the model checks them, as in training."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        images = torch.randn(micro_batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
        out.append((images, torch.randint(1, cfg.num_patches, (micro_batch,), generator=gen)))
    return out


def run_plain(name: str, attn: str, micro_batch: int, device: torch.device, args: argparse.Namespace) -> dict:
    """fp32 master weights, ``--precision`` autocast, torch AdamW (fused on CUDA), real accumulation."""
    torch.manual_seed(0)
    model = aim_ds.create_model(name, attn_impl=attn).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing, head=args.grad_checkpointing)
    optimizer = build_optimizer(param_groups(model, PAPER_RECIPE.weight_decay), lr=1e-4)
    batches = _batches(model.config, micro_batch, args.accumulation, device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step() -> None:
        for images, prefix in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
                loss = model(images, prefix)["loss"]
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PAPER_RECIPE.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = _time_steps(step, device, args.warmup, args.steps)
    return _summary(name, attn, "plain", micro_batch, times, model.config, device, args)


def _ds_config(path: str, micro_batch: int, accumulation: int, model_cfg: aim_ds.AIMConfig) -> dict[str, Any]:
    """The JSON as it ships, with the batch keys and the ``"auto"`` knobs filled as the driver does."""
    with open(path) as f:
        config = json.load(f)
    config.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro_batch * accumulation,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    config.setdefault("gradient_clipping", PAPER_RECIPE.grad_clip)
    resolve_auto_knobs(config, model_cfg)
    return config


def run_deepspeed(
    name: str, attn: str, mode: str, micro_batch: int, device: torch.device, args: argparse.Namespace
) -> dict:
    import deepspeed

    model_cfg = aim_ds.get_model_spec(name).config.replace(attn_impl=attn)
    config = _ds_config(
        args.zero3_config if mode == "zero3" else args.zero2_config, micro_batch, args.accumulation, model_cfg
    )
    torch.manual_seed(0)
    # ZeRO-3: built under zero.Init so that a model larger than one device is never materialised whole.
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=config["zero_optimization"]["stage"] == 3):
        model = aim_ds.create_model(name, attn_impl=attn)
    model.set_grad_checkpointing(args.grad_checkpointing, head=args.grad_checkpointing)
    optimizer = build_optimizer(
        param_groups(model, PAPER_RECIPE.weight_decay), lr=1e-4, offload=optimizer_offloaded(config)
    )
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batches = _batches(model_cfg, micro_batch, args.accumulation, device)

    def step() -> None:
        for images, prefix in batches:
            engine.backward(engine(images, prefix)["loss"])
            engine.step()  # the update happens at the accumulation boundary

    try:
        times = _time_steps(step, device, args.warmup, args.steps)
    finally:
        engine.destroy()  # also when FlexAttention refuses to train here
    label = mode + ("+offload" if optimizer_offloaded(config) else "")
    return _summary(name, attn, label, micro_batch, times, model_cfg, device, args)


def _summary(name, attn, mode, micro_batch, times, cfg, device, args) -> dict:
    step_s = statistics.median(times)
    images_per_second = micro_batch * args.accumulation / step_s
    tflops = train_flops_per_image(cfg) * images_per_second / 1e12
    result = {
        "model": name,
        "attention": attn,
        "mode": mode,
        "micro_batch": micro_batch,
        "accumulation": args.accumulation,
        "step_s": step_s,
        "images_per_second": images_per_second,
        "tflops_per_device": tflops,
        "mfu": tflops / args.peak_tflops,
        "peak_mem_gib": _peak_memory_gib(device),
        "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "host_peak_rss",
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(result), flush=True)
    return result


def _table(results: list[dict], skipped: list[str], args: argparse.Namespace, device: torch.device) -> str:
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    memory = "peak GPU mem allocated (GiB)" if device.type == "cuda" else "peak host RSS so far (GiB)"
    lines = [
        f"Command: `python bench/bench_gpu.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {device_name}; torch {torch.__version__}; date {datetime.date.today().isoformat()}  ",
        f"MFU against {args.peak_tflops:g} TFLOP/s; plain precision {args.precision}; DeepSpeed: "
        f"{args.zero2_config}, {args.zero3_config}; grad checkpointing: {args.grad_checkpointing}",
        "",
        f"| model | attention | mode | micro batch x accumulation | step (s) | images/s | TFLOP/s per device | MFU | {memory} | step / plain step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    plain = {(r["model"], r["attention"], r["micro_batch"]): r["step_s"] for r in results if r["mode"] == "plain"}
    for r in results:
        key = (r["model"], r["attention"], r["micro_batch"])
        ratio = f"{r['step_s'] / plain[key]:.3f}" if key in plain else ""
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['mode']} | {r['micro_batch']} x {r['accumulation']} | "
            f"{r['step_s']:.4f} | {r['images_per_second']:.1f} | {r['tflops_per_device']:.3f} | {100 * r['mfu']:.2f}% | "
            f"{r['peak_mem_gib']:.2f} | {ratio} |"
        )
    lines += [f"- skipped: {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def _run_one(name: str, attn: str, mode: str, micro_batch: int, device: torch.device, args) -> dict | str:
    """One configuration's result, or the reason it could not run here."""
    try:
        if mode == "plain":
            return run_plain(name, attn, micro_batch, device, args)
        return run_deepspeed(name, attn, mode, micro_batch, device, args)
    except torch.OutOfMemoryError as exc:
        return f"{name} {attn} {mode} micro batch {micro_batch}: out of memory ({str(exc).splitlines()[0]})"
    except NotImplementedError as exc:  # FlexAttention's backward on CPU
        if attn != "flex":
            raise
        return f"{name} {attn} {mode}: {str(exc).split('.')[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["aim-0.6B", "aim-1B"], help="registry names")
    parser.add_argument(
        "--micro-batch", type=int, nargs="+", default=[64], help="images per micro-step (one per model, or one for all)"
    )
    parser.add_argument("--accumulation", type=int, default=4, help="micro-steps per optimizer step")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--attention", nargs="+", default=list(ATTENTION), choices=ATTENTION)
    parser.add_argument("--zero2-config", default="ds_configs/zero2.json")
    parser.add_argument("--zero3-config", default="ds_configs/zero3.json")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="plain PyTorch's autocast")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing (compilation, allocator)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grad-checkpointing", action="store_true", help="trunk and head")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="MFU denominator (default: the GPU's bf16 dense peak, aim_ds.devices)",
    )
    parser.add_argument("--out", default="bench_out/gpu.md", help="markdown table; a .json beside it")
    args = parser.parse_args(argv)
    if len(args.micro_batch) not in (1, len(args.models)):
        parser.error("--micro-batch takes one value, or one per model")
    for path in (args.zero2_config, args.zero3_config):
        if not Path(path).is_file():
            parser.error(f"DeepSpeed config {path} does not exist")
    device = torch.device(args.device)
    if args.peak_tflops is None:  # the detected GPU's peak; the H100's on the CPU and unknown GPUs
        args.peak_tflops = device_peak_flops(0.0, device) / 1e12
    if any(m != "plain" for m in args.modes):
        # DeepSpeed's engine wants a process group: a world of one on a free port (or MASTER_PORT).
        init_distributed(cuda=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results: list[dict] = []
    skipped: list[str] = []
    batches = args.micro_batch * len(args.models) if len(args.micro_batch) == 1 else args.micro_batch
    for name, micro_batch in zip(args.models, batches):
        for attn in args.attention:
            for mode in args.modes:
                outcome = _run_one(name, attn, mode, micro_batch, device, args)
                (results.append if isinstance(outcome, dict) else skipped.append)(outcome)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    # Also after a row that ran out of memory (no _summary reset it): else the next
                    # row would report the failed row's peak.
                    torch.cuda.reset_peak_memory_stats()
    table = _table(results, skipped, args, device)
    out = Path(args.out)
    atomic_write_text(out, table)
    atomic_write_json(out.with_suffix(".json"), {"results": results, "skipped": skipped})
    print(table)
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
