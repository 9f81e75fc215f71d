"""Pretrain AIM with DeepSpeed.

    deepspeed run/pretrain.py --deepspeed ds_configs/zero3.json --config run/configs/aim-0.6B.yaml \
        [key=value ...]                       # e.g. train.steps=1000 out_dir=runs/aim-0.6B
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 run/pretrain.py --deepspeed ds_configs/zero3.json \
        --config run/configs/aim-tiny.yaml    # CPU, two ranks, fp32, gloo
    python run/pretrain.py --export-only runs/aim-tiny   # safetensors from the newest checkpoint

A run started again with the same out_dir resumes from its newest complete checkpoint.
Exit codes: 0 finished or stopped cleanly (signal / train.stop_after_steps, checkpoint saved),
2 bad configuration, 3 non-finite loss.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from aim_ds.config import ConfigError, load_config  # noqa: E402
from aim_ds.train.config import NonFiniteLossError, PretrainConfig  # noqa: E402
from aim_ds.train.engine import load_ds_config  # noqa: E402
from aim_ds.train.loop import run  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (run/configs/*.yaml)")
    parser.add_argument(
        "--deepspeed", "--deepspeed_config", dest="deepspeed", help="DeepSpeed engine config JSON (ds_configs/*.json)"
    )
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument(
        "--export-only", metavar="OUT_DIR", help="export the newest complete checkpoint of OUT_DIR and exit"
    )
    parser.add_argument(
        "--skip-memory-check", action="store_true", help="start even when the memory plan (aim_ds.plan) does not fit"
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=40")
    args = parser.parse_args(argv)
    if not args.export_only and (not args.config or not args.deepspeed):
        parser.error("--config and --deepspeed are required (or --export-only OUT_DIR)")
    return args


def export_only(run_dir: str) -> int:
    """Consolidate the newest complete checkpoint of ``run_dir`` into ``run_dir/export``."""
    from aim_ds.export import export_latest

    cfg = load_config(PretrainConfig, Path(run_dir) / "config.yaml")
    path = export_latest(run_dir, model_name=cfg.model.name, overrides=cfg.model.overrides, ml_aim=cfg.export.ml_aim)
    logging.getLogger("aim_ds").info("exported to %s", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # DeepSpeed calls torch.distributed's *_tensor collectives, which torch now flags on every call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # Rank 0 speaks; the other ranks only warn (the launcher sets RANK before we start).
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("aim_ds")
    try:
        if args.export_only:
            return export_only(args.export_only)
        cfg = load_config(PretrainConfig, args.config, overrides=args.overrides)
        ds_base = load_ds_config(args.deepspeed)
        result = run(cfg, ds_base, ds_source=args.deepspeed, check_memory=not args.skip_memory_check)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        return 3
    log.info("%s at step %d: %s", result.status, result.step, result.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
