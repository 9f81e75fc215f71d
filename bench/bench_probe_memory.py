"""Peak host memory of loading a backbone for probing: the whole fp32 export (``aim_ds.weights``)
against the streamed bf16 read (``aim_ds.stream.read_backbone``), each in a fresh process.

    python bench/bench_probe_memory.py --model aim-0.6B --work /tmp/probe_mem [--out bench_out/probe_mem.md]

Writes a random-initialised export of ``--model`` (trunk and head, fp32, the layout
``run/pretrain.py`` exports) once, then measures each way's peak RSS (``ru_maxrss``) in its own
process, from Python start to a frozen trunk ready to run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3


def write_export(model: str, folder: Path) -> Path:
    """A random ``model.safetensors`` + ``model.json`` for ``model`` (built once, fp32)."""
    import torch
    from safetensors.torch import save_file

    from aim_ds.registry import create_model

    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "model.safetensors"
    if not file.is_file():
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in create_model(model).state_dict().items()}
        save_file(state, str(file))
        (folder / "model.json").write_text(json.dumps({"model": model, "overrides": {}, "step": 0}))
    return file


def load(way: str, model: str, folder: Path) -> None:
    """One way of loading, in this process; prints its peak RSS in bytes."""
    import torch

    from aim_ds import weights

    if way == "before":
        trunk, _ = weights.build_frozen_trunk(model, folder)
    else:
        from aim_ds.stream import read_backbone

        state = read_backbone(folder / "model.safetensors", torch.bfloat16)
        trunk = weights.FrozenTrunk(weights.build_trunk(model, state), None)
    params = sum(p.numel() * p.element_size() for p in trunk.parameters())
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "weights": params}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="aim-0.6B")
    parser.add_argument("--work", default="/tmp/probe_mem", help="where the test export is written")
    parser.add_argument("--way", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    folder = Path(args.work) / args.model
    if args.way:
        load(args.way, args.model, folder)
        return 0
    file = write_export(args.model, folder)
    rows = [
        f"{args.model}: export {file.stat().st_size / GIB:.2f} GiB (fp32, trunk + head)",
        "",
        "| load | peak RSS | trunk weights held |",
        "|---|---|---|",
    ]
    for way, label in (("before", "whole fp32 export (aim_ds.weights)"), ("after", "streamed, bf16 (aim_ds.stream)")):
        done = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--work", args.work, "--way", way],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(f"| {label} | {result['peak'] / GIB:.2f} GiB | {result['weights'] / GIB:.2f} GiB |")
        print(rows[-1], flush=True)
    text = "\n".join(rows)
    print(text)
    if args.out:
        from aim_ds.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
