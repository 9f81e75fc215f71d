"""Page faults and CPU time per training step under each host-allocator setting (issue 23).

Each setting runs in its own process (glibc's malloc settings cannot be undone in a process):
``glibc`` (its defaults: a moving mmap threshold), ``return-freed`` (``aim_ds.distributed.
return_freed_memory``: every block above 1 MiB gets its own mapping) and ``fitted`` (that, then
``fit_host_allocator`` as the pretraining and probe drivers call it for the model). One process, one
thread, plain PyTorch (no DeepSpeed, no loader): forward, backward and fused AdamW of the model on
random images, ``--warmup`` steps then ``--steps`` counted with ``getrusage``. Page faults are a
count, not a timing, so they hold on a loaded machine; the CPU seconds move with the load.

    python bench/bench_host_alloc.py --model aim-tiny --micro-batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("glibc", "return-freed", "fitted")


def _measure(setting: str, model_name: str, micro_batch: int, warmup: int, steps: int) -> dict[str, float]:
    import torch

    from aim_ds.distributed import fit_host_allocator, return_freed_memory
    from aim_ds.model.flops import matmul_params
    from aim_ds.model.registry import create_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(model_name)
    if setting != "glibc":
        return_freed_memory()
    if setting == "fitted":
        fit_host_allocator(sum(matmul_params(model.config)), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    size = model.config.image_size
    images = torch.randn(micro_batch, 3, size, size)
    prefix_len = torch.full((micro_batch,), max(1, model.num_patches // 4))

    def step() -> None:
        model(images, prefix_len=prefix_len)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "user_s_per_step": (after.ru_utime - before.ru_utime) / steps,
        "system_s_per_step": (after.ru_stime - before.ru_stime) / steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="aim-tiny")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(_measure(args.one, args.model, args.micro_batch, args.warmup, args.steps)))
        return 0
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    print(f"{args.model}, micro-batch {args.micro_batch}, {args.steps} steps after {args.warmup}, 1 thread")
    print("| setting | page faults / step | system s / step | user s / step |")
    print("|---|---|---|---|")
    for setting in args.settings:
        command = [sys.executable, __file__, "--one", setting, "--model", args.model]
        command += ["--micro-batch", str(args.micro_batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        row = json.loads(proc.stdout.splitlines()[-1])
        print(
            f"| {setting} | {row['page_faults_per_step']:,.0f} | {row['system_s_per_step']:.3f} "
            f"| {row['user_s_per_step']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
