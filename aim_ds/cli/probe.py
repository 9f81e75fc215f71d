"""Probe a frozen AIM trunk: attentive and linear heads, an LR sweep in one run.

    python run/probe.py --config run/configs/probe_aim-test.yaml --weights RUN/export [key=value ...]
    deepspeed --num_gpus 8 run/probe.py --config run/configs/probe_aim-0.6B.yaml --weights RUN
    python run/probe.py --config ... --weights aim_600m.pth --head aim_600m.pth --eval-only

``--weights``: an export folder or its model.safetensors, a DeepSpeed checkpoint (run folder,
checkpoints/ or a tag folder), or a released ml-aim backbone (.safetensors / .pth). The logic
lives in :mod:`aim_ds.probe` and :mod:`aim_ds.weights.load`. The config's ``model`` section is
``{name: ..., overrides: {...}}``, as in the pretraining config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch.distributed as dist  # noqa: E402

from aim_ds.config import ConfigError  # noqa: E402
from aim_ds.probe import load_probe_config, run_probe  # noqa: E402
from aim_ds.weights.load import WeightsError, WeightsMismatchError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run/configs/probe_<name>.yaml")
    parser.add_argument("--weights", required=True, help="trunk weights: export, DeepSpeed checkpoint or ml-aim file")
    parser.add_argument(
        "--head", action="append", default=[], help="a trained head to evaluate (repeatable; ours or ml-aim layout)"
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate the --head files, train nothing")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, e.g. train.epochs=3 train.lrs=[1e-3,2e-3] model.overrides={image_size: 64}",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_probe_config(args.config, overrides=args.overrides)
        run_probe(cfg, args.weights, head_paths=args.head, eval_only=args.eval_only)
    except (ConfigError, WeightsError, WeightsMismatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
