"""``aim-plan`` (``python -m aim_ds.plan``): the plan of one run config on the given hardware (see :mod:`aim_ds.plan`).

A driver, not part of the planner: it reads the pretraining run config (:mod:`aim_ds.train.config`), which
the planner below the training package must not import.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..config import ConfigError, load_config
from ..devices import DEFAULT_GPU, GPUS, gpu_spec
from ..ds_config import load_ds_config
from ..plan import __doc__ as PLAN_DOC
from ..plan.memory import (
    GIB,
    HEADROOM_FRACTION,
    Hardware,
    available_host_bytes,
    default_headroom,
    host_memory_bytes,
    runtime_bytes,
)
from ..plan.report import make_plan
from ..shipped import resolve_config
from ..train.config import PretrainConfig, resolve_plan
from ..train.engine import model_config

ZEROPP = {"zero_quantized_weights": True, "zero_quantized_gradients": True}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aim-plan", description=(PLAN_DOC or "").split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config: a YAML path or a shipped name (aim-7B, ...)")
    parser.add_argument("--deepspeed", required=True, help="DeepSpeed config: a JSON path or a shipped name (zero3)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (ranks) per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: DeepSpeed's CPU accelerator")
    parser.add_argument(
        "--gpu",
        default=DEFAULT_GPU,
        help=f"GPU model: its memory, bf16 peak and PCIe/NVLink/network bandwidths together ({', '.join(GPUS)})",
    )
    parser.add_argument("--gpu-memory-gb", type=float, default=None, help="per GPU, GiB (default: the --gpu's)")
    parser.add_argument(
        "--headroom",
        type=float,
        default=HEADROOM_FRACTION,
        help="fraction of GPU memory kept free for the caching allocator's fragmentation",
    )
    parser.add_argument("--pcie-gbs", type=float, default=None, help="host<->GPU GB/s per GPU (default: the --gpu's)")
    parser.add_argument("--nvlink-gbs", type=float, default=None, help="GPU<->peers GB/s (default: the --gpu's)")
    parser.add_argument(
        "--network-gbs", type=float, default=None, help="inter-node GB/s per node (default: the --gpu's)"
    )
    parser.add_argument(
        "--zeropp",
        action="store_true",
        help="plan with ZeRO++ (hpZ over each node's GPUs, int8 weight and int4 gradient communication)",
    )
    parser.add_argument(
        "--host-memory-gb",
        type=float,
        default=None,
        help="per node, GiB (default: this machine's; on --device cpu the ranks share what is available now)",
    )
    parser.add_argument("--runtime-gb", type=float, default=None, help="per-rank footprint outside the model, GiB")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device (default: the --gpu's bf16 dense)")
    parser.add_argument("overrides", nargs="*", help="run-config overrides, e.g. train.micro_batch_size=32")
    args = parser.parse_args(argv)
    if not 0 <= args.headroom < 1:
        parser.error(f"--headroom {args.headroom}: a fraction of the GPU's memory, in [0, 1)")
    for name in ("pcie_gbs", "nvlink_gbs", "network_gbs", "peak_tflops", "gpu_memory_gb"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} {value}: must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """The planner's command line: 0 fits, 1 does not fit (the knob to change on stderr), 2 bad input."""
    args = parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, resolve_config(args.config, "run", "--config"), overrides=args.overrides)
        ds = load_ds_config(resolve_config(args.deepspeed, "deepspeed", "--deepspeed"))
        if args.zeropp:
            ds.setdefault("zero_optimization", {}).update(ZEROPP, zero_hpz_partition_size=args.gpus)
        gpu = gpu_spec(args.gpu)
        gpu = dataclasses.replace(
            gpu,
            pcie=args.pcie_gbs * 1e9 if args.pcie_gbs else gpu.pcie,
            nvlink=args.nvlink_gbs * 1e9 if args.nvlink_gbs else gpu.nvlink,
            network=args.network_gbs * 1e9 if args.network_gbs else gpu.network,
        )
        model_cfg = model_config(cfg)
        host = int(args.host_memory_gb * GIB) if args.host_memory_gb else host_memory_bytes()
        # On the CPU the ranks get what is free now (MemAvailable), unless told the node's memory.
        per_rank_host = (int(args.host_memory_gb * GIB) if args.host_memory_gb else available_host_bytes()) // args.gpus
        memory = per_rank_host
        if args.device == "cuda":
            memory = int(args.gpu_memory_gb * GIB) if args.gpu_memory_gb else gpu.memory
        hw = Hardware(
            gpus_per_node=args.gpus,
            nodes=args.nodes,
            device=args.device,
            device_memory=memory,
            host_memory=host,
            runtime=runtime_bytes(args.device, args.runtime_gb),
            headroom=default_headroom(args.device, memory, args.headroom),
            gpu=gpu,
        )
        run = resolve_plan(cfg, hw.world_size, model_cfg.image_size, model_cfg.num_patches)
        sizing = make_plan(
            model_cfg,
            cfg.model.name,
            ds,
            hw,
            batch_size=cfg.train.batch_size,
            micro_batch=run.micro_batch_size,
            checkpointing=cfg.model.grad_checkpointing,
            mfu=args.mfu,
            peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
            steps=run.total_steps,
        )
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    print(sizing.text)
    if not sizing.fits:
        print(f"does not fit: {sizing.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
