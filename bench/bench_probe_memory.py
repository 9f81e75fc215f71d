"""Peak host memory per rank of loading a probe's frozen trunk, before and after streamed loading.

For one model size (``aim-0.6B`` by default), each measurement is a fresh pair of processes (rank 0
and rank 1 of a 2-rank gloo group, as ``run/probe.py`` under ``torchrun``) that load the frozen trunk
exactly as the probe does, from (a) an export folder and (b) a DeepSpeed ZeRO-3 checkpoint, and
report their peak resident set (``VmHWM`` of ``/proc/self/status``: a fresh process each time, since
``ru_maxrss`` is inherited across fork), and their anonymous (private) and file-backed resident
memory at the end. ``--tree`` runs another checkout's code (``PYTHONPATH=<tree>``), e.g. the code
before rank 0 merged the shards straight into the hand-over file (a92d94a)::

    git -C /work/main worktree add /tmp/before a92d94a
    # once: a real ZeRO-3 checkpoint (0 optimizer steps, Adam states) on 2 CPU ranks, then its export
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port <free port> bench/bench_probe_memory.py \\
        --make-checkpoint /tmp/probe_mem/run
    python bench/bench_probe_memory.py --make-export /tmp/probe_mem/run
    # measurements
    python bench/bench_probe_memory.py --run /tmp/probe_mem/run --tree /tmp/before --label before
    python bench/bench_probe_memory.py --run /tmp/probe_mem/run --tree . --label after

A tree from before ``aim_ds.probe.context`` existed (71e0d0a and older) needs ``--legacy``, which
replays that commit's probe start-up.

The export is written to ``<run>/export_folder`` rather than ``<run>/export``, so that the DeepSpeed
measurement reads the checkpoint and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPORT_FOLDER = "export_folder"


def status_kib(key: str) -> int:
    """One ``/proc/self/status`` figure in KiB (``VmHWM``, ``RssAnon``, ``RssFile``), -1 if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


# ---------------------------------------------------------------------------------------------
# Making the checkpoint and the export (once)


def make_checkpoint(run: Path, model_name: str) -> None:
    """Runs on every rank under the ``deepspeed`` launcher: ``model_name`` built under
    ``deepspeed.zero.Init`` (never whole on one rank), bf16 ZeRO-3 with AdamW, 0 optimizer steps,
    saved through :mod:`aim_ds.weights.checkpoint` (the pretraining driver's format) as step 0."""
    import deepspeed
    import torch

    from aim_ds.model.registry import create_model
    from aim_ds.weights import checkpoint as ckpt

    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        # Sub-groups of 50M elements: the optimizer-state initialisation allocates one fp32 gradient
        # per sub-group, so two ranks of a 1.09B-parameter model fit in this machine's 24 GiB.
        "zero_optimization": {"stage": 3, "sub_group_size": 50_000_000},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    }
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = create_model(model_name)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    # The Adam moments a checkpoint of a real run holds (torch creates them at the first step), one
    # pair per fp32 sub-group partition, so that the shards have their real size (12 bytes per
    # parameter). Their values do not matter here: a probe must not read them. empty_like, not
    # zeros_like: untouched pages cost no memory on this machine until torch.save reads them.
    zero = engine.optimizer
    for flat in zero.fp32_partitioned_groups_flat:
        moments = {"exp_avg": torch.empty_like(flat), "exp_avg_sq": torch.empty_like(flat)}
        zero.optimizer.state[flat] = {"step": torch.tensor(1.0), **moments}
    if engine.global_rank == 0:
        ckpt.write_manifest(run)
    ckpt.save(engine, run / "checkpoints", 0, {"model": model_name}, keep_last=1)
    if engine.global_rank == 0:
        print(f"rank 0 peak RSS while making the checkpoint: {status_kib('VmHWM') / 2**20:.2f} GiB", flush=True)


def make_export(run: Path, model_name: str) -> None:
    """The checkpoint's export (consolidated fp32 safetensors + model.json) in ``run/export_folder``."""
    sys.path.insert(0, str(ROOT))
    from aim_ds.weights import checkpoint as ckpt
    from aim_ds.weights.export import export_checkpoint

    step, path = ckpt.latest_complete(run / "checkpoints")
    export_checkpoint(path.parent, path.name, run / EXPORT_FOLDER, model_name=model_name, overrides={}, step=step)


# ---------------------------------------------------------------------------------------------
# One measurement: a fresh process per rank


def _load_after(model_name: str, layers: str, weights: Path, out_dir: Path, rank: int, world: int) -> dict[str, Any]:
    """This branch's probe start-up for the trunk (``aim_ds.probe.context.load_frozen_trunk``)."""
    from aim_ds.model.registry import get_model_spec
    from aim_ds.probe.config import ProbeConfig, resolve_layers
    from aim_ds.probe.context import load_frozen_trunk

    cfg = ProbeConfig()
    cfg.model.name, cfg.out_dir, cfg.device = model_name, str(out_dir), "cpu"
    blocks = resolve_layers(layers, model_name, get_model_spec(model_name).config.depth)
    trunk, loaded = load_frozen_trunk(cfg, weights, blocks, rank, world)
    return {"fingerprint": loaded.fingerprint(), "blocks": len(trunk.model.trunk.blocks)}


def _load_legacy(model_name: str, layers: str, weights: Path, out_dir: Path, rank: int, world: int) -> dict[str, Any]:
    """The probe start-up of commit 71e0d0a (``aim_ds/probe.py`` ``prepare``, its trunk lines), as that
    commit wrote it: its tree has neither ``aim_ds.io`` nor ``aim_ds.distributed``, hence the bare
    ``os.replace`` and ``dist.barrier``."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from aim_ds.model.registry import get_model_spec
    from aim_ds.probe import resolve_layers
    from aim_ds.weights.frozen import build_frozen_trunk
    from aim_ds.weights.load import detect_source, load_trunk_state_dict

    blocks = resolve_layers(layers, model_name, get_model_spec(model_name).config.depth)
    load_from = weights
    if world > 1 and detect_source(weights) == "deepspeed":
        load_from = out_dir / ".trunk_from_deepspeed.safetensors"
        if rank == 0:
            tmp = load_from.with_name(load_from.name + ".tmp")
            save_file(load_trunk_state_dict(weights), str(tmp))
            os.replace(tmp, load_from)
        dist.barrier()
    trunk, loaded = build_frozen_trunk(model_name, load_from, layers=blocks, device="cpu")
    dist.barrier()
    if rank == 0 and load_from != weights:
        load_from.unlink(missing_ok=True)
    return {"fingerprint": loaded.fingerprint(), "blocks": len(trunk.model.trunk.blocks)}


def child(args: argparse.Namespace) -> None:
    """One rank of one measurement; prints one JSON line."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A bare gloo group, not aim_ds.distributed.init_distributed: that imports DeepSpeed on every rank
    # (about 0.2 GiB more resident) and does not exist in a legacy tree, so the figures would move.
    dist.init_process_group("gloo", rank=rank, world_size=world)
    start = time.perf_counter()
    load = _load_legacy if args.legacy else _load_after
    info = load(args.model, args.layers, Path(args.weights), Path(args.out_dir), rank, world)
    seconds = time.perf_counter() - start
    dist.barrier()
    row = {"rank": rank, "seconds": round(seconds, 1), **info}
    row.update({key: status_kib(key) for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")})
    print("RESULT " + json.dumps(row), flush=True)
    dist.destroy_process_group()


def measure(
    run: Path, tree: Path, label: str, model_name: str, layers: str, world: int, legacy: bool = False
) -> list[dict[str, Any]]:
    """Both sources, ``world`` fresh processes each, with ``tree``'s code (``legacy``: 71e0d0a's)."""
    sys.path.insert(0, str(ROOT))
    from aim_ds.distributed import free_port

    rows = []
    sources = {"export": run / EXPORT_FOLDER, "deepspeed": run}
    for source, weights in sources.items():
        port = free_port()
        out_dir = run / f"probe_out_{label}"
        out_dir.mkdir(exist_ok=True)
        procs = []
        for rank in range(world):
            env = dict(
                os.environ,
                PYTHONPATH=str(tree.resolve()),
                RANK=str(rank),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            )
            command = [sys.executable, __file__, "--child", "--label", label, "--model", model_name, "--layers", layers]
            command += ["--weights", str(weights), "--out-dir", str(out_dir)] + (["--legacy"] if legacy else [])
            procs.append(
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            )
        for proc in procs:
            log = proc.communicate()[0]
            results = [line for line in log.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not results:
                raise RuntimeError(f"{label} {source}: child failed\n{log[-4000:]}")
            row = {"label": label, "layers": layers, "source": source, **json.loads(results[-1][len("RESULT ") :])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="aim-0.6B")
    parser.add_argument("--make-checkpoint", type=Path, help="(under the deepspeed launcher) write the checkpoint")
    parser.add_argument("--make-export", type=Path, help="export the run's checkpoint to <run>/export_folder")
    parser.add_argument("--run", type=Path, help="run folder to measure")
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose aim_ds is measured")
    parser.add_argument("--label", default="after", help="name of the measurement in the rows")
    parser.add_argument("--legacy", action="store_true", help="replay commit 71e0d0a's probe start-up (older trees)")
    parser.add_argument("--layers", default="last", help="probed blocks: last | best (the probe config's names)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", type=Path, help="append the rows (JSON lines) to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.make_checkpoint:
        return make_checkpoint(args.make_checkpoint, args.model)
    if args.make_export:
        return make_export(args.make_export, args.model)
    if args.run is None:
        parser.error("give --run (or --make-checkpoint / --make-export)")
    rows = measure(args.run, args.tree, args.label, args.model, args.layers, args.world, args.legacy)
    if args.out:
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps({**row, "machine": platform.node(), "cpus": os.cpu_count()}) + "\n")


if __name__ == "__main__":
    main()
