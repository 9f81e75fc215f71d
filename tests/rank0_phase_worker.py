"""Two ranks under the deepspeed launcher with a process-group timeout of a few seconds, and a
rank-0-only phase that lasts longer (tests/test_cluster.py). ``--mode phase`` waits through
:func:`aim_ds.distributed.rank0_phase`; then a phase whose work raises; ``--mode barrier`` waits the old way, in a barrier; ``--mode die``:
rank 0 exits inside the phase (started without a launcher, which would kill the other rank itself)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from aim_ds.distributed import DistSection, all_reduce_, barrier, init_distributed, rank0_phase


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("phase", "barrier", "die"), required=True)
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--work-s", type=float, default=8.0)
    args = parser.parse_args()
    out = Path(args.out)
    rank, world, _ = init_distributed(dist_cfg=DistSection(timeout_minutes=args.timeout_s / 60))
    before = int(all_reduce_(torch.ones(1)).item())  # the group works

    def slow_work() -> dict[str, float]:
        time.sleep(args.work_s)
        return {"answer": 42.0}

    def failing_work() -> None:
        time.sleep(args.work_s)
        raise OSError("disk full (on purpose)")

    result = None
    error = ""
    if args.mode == "die":  # rank 0 dies inside the phase: the other rank must not poll on
        start = time.monotonic()

        def die() -> None:
            time.sleep(args.work_s)
            os._exit(17)

        try:
            rank0_phase("die", out, die, poll_s=0.2, max_wait_s=600)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            error = f"{type(exc).__name__}: {exc}"
        report = {"error": error, "waited_s": time.monotonic() - start}
        (out / f"rank{rank}.json").write_text(json.dumps(report))
        return
    try:
        if args.mode == "barrier":
            if rank == 0:
                result = slow_work()
            barrier()
        else:
            result = rank0_phase("slow", out, slow_work, poll_s=0.2)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        error = f"{type(exc).__name__}: {exc}"
    after = 0 if error else int(all_reduce_(torch.ones(1)).item())  # the group still works afterwards
    fail_error = ""
    if args.mode == "phase":  # then a rank-0 phase that fails: every rank stops with its message
        try:
            rank0_phase("failing", out, failing_work, poll_s=0.2)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            fail_error = f"{type(exc).__name__}: {exc}"
    report = {"before": before, "after": after, "result": result, "error": error, "fail_error": fail_error}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
