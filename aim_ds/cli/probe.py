"""Probe a frozen AIM trunk: attentive and linear heads, an LR sweep in one run.

    aim-probe --config probe_aim-test --weights RUN/export [key=value ...]      # or python run/probe.py
    deepspeed --num_gpus 8 $(which aim-probe) --config probe_aim-0.6B --weights RUN
    aim-probe --config ... --weights aim_600m.pth --head aim_600m.pth --eval-only

``--config``: a probe YAML path, or a shipped name (``probe_aim-test`` ... ``probe_aim-7B``).

``--weights``: an export folder or its model.safetensors, a DeepSpeed checkpoint (run folder,
checkpoints/ or a tag folder), or a released ml-aim backbone (.safetensors / .pth). The logic
lives in :mod:`aim_ds.probe` and :mod:`aim_ds.weights.load`. The config's ``model`` section is
``{name: ..., overrides: {...}}``, as in the pretraining config.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from ..config import ConfigError
from ..data.kernels import use_workqueue_threading
from ..probe import load_probe_config, run_probe
from ..shipped import resolve_config
from ..weights.load import WeightsError, WeightsMismatchError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="probe YAML path, or a shipped name (probe_aim-0.6B, ...)")
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
    """The driver (``aim-probe``, ``run/probe.py``): 0 done, 2 bad input (one line on stderr)."""
    args = parse_args(argv)
    use_workqueue_threading()  # before the loaders' first kernel: see its docstring
    try:
        cfg = load_probe_config(resolve_config(args.config, "probe", "--config"), overrides=args.overrides)
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
