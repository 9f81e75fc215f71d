"""Pretrain AIM with DeepSpeed.

    deepspeed run/pretrain.py --deepspeed ds_configs/zero3.json --config run/configs/aim-0.6B.yaml \
        [key=value ...]                       # e.g. train.steps=1000 out_dir=runs/aim-0.6B
    deepspeed $(which aim-pretrain) --deepspeed zero3 --config aim-0.6B [key=value ...]   # installed
    aim-pretrain --deepspeed zero3_fp32 --config aim-test ...   # one process, no launcher
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 run/pretrain.py --deepspeed ds_configs/zero3_fp32.json \
        --config run/configs/aim-tiny.yaml    # CPU, two ranks, fp32, gloo (zero3.json: bf16, on CPU too)
    python run/pretrain.py --export-only runs/aim-tiny   # safetensors from the newest checkpoint

    sbatch [--nodes N] scripts/slurm/pretrain.sbatch --config C --deepspeed D [key=value ...]

A run started again with the same out_dir resumes from its newest complete checkpoint that loads.
Before anything is built, every field and path of the config is checked (exit 2 naming the key)
and rank 0 takes the run folder's lock (every rank exits 2 naming the holder when another live
job has it; a holder that stopped beating for lock.stale_after_s is taken over, wherever it ran).
A stop request (SIGTERM, SIGINT, SIGUSR1, the file <out_dir>/stop.request, the launcher gone)
checkpoints at the next step boundary; a second SIGTERM/SIGINT stop.repeat_after_s later, or
stop.timeout_s without the stop ending, ends the process at once (exit 128 + signal).
A job whose lock another job took over (its heartbeat stalled for lock.stale_after_s) stops every
rank at the next step without a checkpoint and leaves the other job's lock alone (exit 4).

Exit codes (for requeue loops; scripts/slurm/pretrain.sbatch reads them):
   0  finished (or already finished), or stopped at train.stop_after_steps as configured
  75  stopped on request with a checkpoint: start the same command again to resume
   2  bad input: configuration, locked or unresumable run folder, damaged weights
   3  non-finite loss or gradient norm (nothing saved)
   4  the run lock was taken over by another job, which owns the run folder now (nothing saved;
      do not requeue)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from ..config import ConfigError, load_config
from ..data.kernels import use_workqueue_threading
from ..ds_config import load_ds_config
from ..shipped import resolve_config
from ..train.config import NonFiniteLossError, PretrainConfig
from ..train.lock import RunLock, RunLockedError, RunLockLostError
from ..train.loop import run
from ..train.preflight import check_config
from ..train.stopping import (
    EXIT_BAD_INPUT,
    EXIT_FINISHED,
    EXIT_LOCK_LOST,
    EXIT_NON_FINITE,
    EXIT_STOPPED,
    STOP_FILE,
    StopRequest,
)
from ..weights import checkpoint as ckpt
from ..weights.zero_shards import ShardError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", help="run config: a YAML path, or a shipped name (aim-test, aim-tiny, ..., aim-0.6B, ..., aim-7B)"
    )
    parser.add_argument(
        "--deepspeed",
        "--deepspeed_config",
        dest="deepspeed",
        help="DeepSpeed engine config: a JSON path, or a shipped name (zero3, zero3_fp32, zero3_offload, zero2)",
    )
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument(
        "--export-only", metavar="OUT_DIR", help="export the newest complete checkpoint of OUT_DIR and exit"
    )
    parser.add_argument(
        "--skip-memory-check", action="store_true", help="start even when the memory plan (aim_ds.plan) does not fit"
    )
    parser.add_argument(
        "--print-out-dir", action="store_true", help="print the run folder the config and overrides give, and exit"
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=40")
    args = parser.parse_args(argv)
    if args.print_out_dir and not args.config:
        parser.error("--print-out-dir needs --config")
    if not args.export_only and not args.print_out_dir and (not args.config or not args.deepspeed):
        parser.error("--config and --deepspeed are required (or --export-only OUT_DIR)")
    return args


def export_only(run_dir: str) -> int:
    """Consolidate the newest complete checkpoint of ``run_dir`` into ``run_dir/export`` (under the
    run folder's lock; the shards are read without unpickling code, see aim_ds.weights.zero_shards)."""
    from ..weights.export import export_latest

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
    # Installed before the slow start-up, so that a stop asked for meanwhile is a checkpoint at step 1.
    stop = StopRequest(
        Path(cfg.out_dir) / STOP_FILE, repeat_after_s=cfg.stop.repeat_after_s, timeout_s=cfg.stop.timeout_s
    )
    stop.install()
    lock = RunLock(cfg.out_dir, stale_after_s=cfg.lock.stale_after_s)
    refused: RunLockedError | None = None

    def agree_on_lock() -> None:
        """Every rank stops at once when rank 0 was refused the lock (not only rank 0, leaving the
        others in a collective until the process group's timeout)."""
        from ..distributed import max_across_ranks

        if max_across_ranks(int(refused is not None)):
            raise refused or RunLockedError(f"rank 0 could not take {lock.path} (its log names the holder)")

    try:
        if os.environ.get("RANK", "0") == "0":
            try:
                lock.acquire()  # before anything is written into the run folder
            except RunLockedError as exc:
                if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                    raise
                refused = exc  # told to every rank once the process group exists (agree_on_lock)
        if refused is None:
            ckpt.check_manifest(cfg.out_dir)
            if lock.held:
                ckpt.write_manifest(cfg.out_dir)
                stop.lock = lock  # the loop stops every rank when another job takes it over
        result = run(
            cfg, ds_base, ds_source=args.deepspeed, check_memory=not args.skip_memory_check, joined=agree_on_lock
        )
        if result.status == "stopped" and lock.held:
            stop.consume_stop_file()
    finally:
        lock.release()
        stop.restore()
    logging.getLogger("aim_ds").info("%s at step %d: %s", result.status, result.step, result.out_dir)
    as_configured = 0 < cfg.train.stop_after_steps <= result.step
    return EXIT_STOPPED if result.status == "stopped" and not as_configured else EXIT_FINISHED


def main(argv: list[str] | None = None) -> int:
    """The driver (``aim-pretrain``, ``run/pretrain.py``): returns the exit code documented above."""
    args = parse_args(argv)
    use_workqueue_threading()  # before the loaders' first kernel: see its docstring
    # DeepSpeed calls torch.distributed's *_tensor collectives, which torch now flags on every call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # Rank 0 speaks; the other ranks only warn (the launcher sets RANK before we start).
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("aim_ds")
    try:
        # A shipped name (aim-0.6B, zero3) becomes the packaged file's path; an existing path wins.
        if args.config:
            args.config = resolve_config(args.config, "run", "--config")
        if args.deepspeed:
            args.deepspeed = resolve_config(args.deepspeed, "deepspeed", "--deepspeed")
        if args.print_out_dir:
            print(load_config(PretrainConfig, args.config, overrides=args.overrides).out_dir)
            return EXIT_FINISHED
        return export_only(args.export_only) if args.export_only else train(args)
    except RunLockedError as exc:
        log.error("run folder locked: %s", exc)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_BAD_INPUT
    except (ckpt.CheckpointError, ShardError) as exc:
        log.error("cannot resume or export: %s", exc)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        return EXIT_NON_FINITE
    except RunLockLostError as exc:
        # Rank 0 names the holder; the other ranks' line would only repeat that it happened.
        log.log(logging.ERROR if os.environ.get("RANK", "0") == "0" else logging.INFO, "%s", exc)
        return EXIT_LOCK_LOST


if __name__ == "__main__":
    sys.exit(main())
