"""Pretrain AIM with DeepSpeed.

    deepspeed run/pretrain.py --deepspeed ds_configs/zero3.json --config run/configs/aim-0.6B.yaml \
        [key=value ...]                       # e.g. train.steps=1000 out_dir=runs/aim-0.6B
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 run/pretrain.py --deepspeed ds_configs/zero3.json \
        --config run/configs/aim-tiny.yaml    # CPU, two ranks, fp32, gloo
    python run/pretrain.py --export-only runs/aim-tiny   # safetensors from the newest checkpoint

A run started again with the same out_dir resumes from its newest complete checkpoint that loads.
Before anything is built, every field and path of the config is checked (exit 2 naming the key)
and rank 0 takes the run folder's lock (exit 2 naming the holder when another job has it).
Exit codes: 0 finished or stopped cleanly (signal / train.stop_after_steps / launcher gone,
checkpoint saved), 2 bad configuration, locked or unresumable run folder, damaged weights,
3 non-finite loss.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from aim_ds import checkpoint as ckpt  # noqa: E402
from aim_ds.config import ConfigError, load_config  # noqa: E402
from aim_ds.train.config import NonFiniteLossError, PretrainConfig  # noqa: E402
from aim_ds.train.engine import load_ds_config  # noqa: E402
from aim_ds.train.lock import RunLock, RunLockedError  # noqa: E402
from aim_ds.train.loop import run  # noqa: E402
from aim_ds.train.preflight import check_config  # noqa: E402
from aim_ds.zero_shards import ShardError  # noqa: E402


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
    """Consolidate the newest complete checkpoint of ``run_dir`` into ``run_dir/export`` (under the
    run folder's lock; the shards are read without unpickling code, see aim_ds.zero_shards)."""
    from aim_ds.export import export_latest

    ckpt.check_manifest(run_dir)
    cfg = load_config(PretrainConfig, Path(run_dir) / "config.yaml")
    with RunLock(run_dir):
        path = export_latest(
            run_dir, model_name=cfg.model.name, overrides=cfg.model.overrides, ml_aim=cfg.export.ml_aim
        )
    logging.getLogger("aim_ds").info("exported to %s", path)
    return 0


def train(args: argparse.Namespace) -> int:
    """Check everything that can be checked without a process group, lock the run folder (rank 0)
    and run. Every rank checks on its own, so a bad config exits before DeepSpeed starts."""
    cfg = load_config(PretrainConfig, args.config, overrides=args.overrides)
    ds_base = load_ds_config(args.deepspeed)
    check_config(cfg)
    lock = RunLock(cfg.out_dir)
    if os.environ.get("RANK", "0") == "0":
        lock.acquire()  # before anything is written into the run folder
    try:
        ckpt.check_manifest(cfg.out_dir)
        if lock.held:
            ckpt.write_manifest(cfg.out_dir)
        result = run(cfg, ds_base, ds_source=args.deepspeed, check_memory=not args.skip_memory_check)
    finally:
        lock.release()
    logging.getLogger("aim_ds").info("%s at step %d: %s", result.status, result.step, result.out_dir)
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
        return export_only(args.export_only) if args.export_only else train(args)
    except RunLockedError as exc:
        log.error("run folder locked: %s", exc)
        return 2
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except (ckpt.CheckpointError, ShardError) as exc:
        log.error("cannot resume or export: %s", exc)
        return 2
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        return 3


if __name__ == "__main__":
    sys.exit(main())
