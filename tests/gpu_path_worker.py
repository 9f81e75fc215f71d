"""The GPU training path's checks on every rank of one real ``deepspeed`` launch (tests/test_gpu_path.py).

Each check builds its engine with the project's own builders (:mod:`aim_ds.train.engine`) from a
``ds_configs`` file as it ships, runs, and writes ``<check>_rank<r>.json`` into ``--out``; the test
reads those files. One launch serves all checks because a launch costs 30-90 s on a 2-core CPU.

- ``accumulation``: the dtypes ZeRO-3 really uses (read back from the engine), and the gradient
  accumulated over 16 micro-steps in bf16 compute against an fp32 plain-PyTorch reference, with
  fp32 accumulation (zero3.json) and with bf16 accumulation (the old default) beside it;
- ``checkpointing``: two optimizer steps with trunk + head activation checkpointing on and off;
- ``zero_init``: a large model built under ``deepspeed.zero.Init`` in bf16: each rank's share;
- ``runs``: the real training loop (:func:`aim_ds.train.loop.run`) on a real beton with
  zero3_fp32.json, zero3.json and zero3_offload.json as they ship, counting in the zero3.json run the
  tensor reads (``item``, ``tolist``, ``__float__``, ``__int__``, ``__bool__``) and the tensors built
  from host data onto a device (``torch.tensor(x, device=...)``, ``torch.as_tensor``) that aim_ds
  code makes in each optimizer step, and a kill + resume of the offloaded run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_ds import distributed  # noqa: E402
from aim_ds.distributed import barrier, init_distributed  # noqa: E402
from aim_ds.io import atomic_write_json  # noqa: E402
from aim_ds.model.aim import AIM  # noqa: E402
from aim_ds.train import loop  # noqa: E402
from aim_ds.train.config import (  # noqa: E402
    CheckpointSection,
    DataSection,
    ExportSection,
    LogSection,
    ModelSection,
    PretrainConfig,
    SourceSection,
    TrainSection,
    ValSection,
    resolve_plan,
)
from aim_ds.train.engine import build_ds_config, build_engine, build_model, load_ds_config, model_config  # noqa: E402

READS = ("item", "tolist", "__float__", "__int__", "__bool__")
# Tensors built from host data straight onto a device (torch.tensor(x, device=...)): on CUDA a copy
# from pageable memory that waits for the stream. Counted whatever the device, so the CPU run
# catches what a GPU run would pay for.
HOST_TO_DEVICE = ("tensor", "as_tensor")


def _engine(cfg: PretrainConfig, ds_file: str, world: int, **ds_changes: Any) -> tuple[Any, dict[str, Any]]:
    """Model and engine exactly as the driver builds them, from ``ds_configs/<ds_file>`` (top-level
    keys replaced by ``ds_changes``)."""
    model_cfg = model_config(cfg)
    plan = resolve_plan(cfg, world, model_cfg.image_size, model_cfg.num_patches)
    ds, _ = build_ds_config({**load_ds_config(ROOT / "ds_configs" / ds_file), **ds_changes}, cfg, plan, model_cfg)
    engine, _ = build_engine(build_model(model_cfg, cfg, ds), cfg, ds, plan)
    return engine, ds


def _micro_batch(rank: int, micro: int, size: int, image_size: int, num_patches: int) -> tuple[torch.Tensor, ...]:
    """Images ``[size, 3, H, W]`` and prefix lengths ``[size]`` for (rank, micro-step), on the host."""
    gen = torch.Generator().manual_seed(1000 * rank + micro)
    images = torch.randn(size, 3, image_size, image_size, generator=gen)
    return images, torch.randint(1, num_patches, (size,), generator=gen)


def _full_grads(engine: Any) -> torch.Tensor:
    """Every parameter's full averaged gradient, flattened into one fp32 vector (collective)."""
    from deepspeed.utils import safe_get_full_grad

    return torch.cat([safe_get_full_grad(p).float().flatten() for p in engine.module.parameters()])


def check_accumulation(rank: int, world: int) -> dict[str, Any]:
    micro_size, accumulation = 2, 16
    cfg = PretrainConfig(
        model=ModelSection(name="aim-test"),
        train=TrainSection(batch_size=micro_size * accumulation * world, micro_batch_size=micro_size, steps=1),
    )
    model_cfg = model_config(cfg)
    size, patches = model_cfg.image_size, model_cfg.num_patches
    # The fp32 reference: the same initial weights, every rank's micro-batches, summed in fp64.
    torch.manual_seed(cfg.train.seed)
    reference_model = AIM(model_cfg)
    reference = None
    for r in range(world):
        for m in range(accumulation):
            reference_model.zero_grad()
            reference_model(*_micro_batch(r, m, micro_size, size, patches))["loss"].backward()
            grads = torch.cat([p.grad.double().flatten() for p in reference_model.parameters()])
            reference = grads if reference is None else reference + grads
    reference /= world * accumulation
    result: dict[str, Any] = {}
    variants = {
        "fp32_accumulation": {},  # zero3.json as it ships
        "bf16_accumulation": {"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"},
    }
    for label, changes in variants.items():
        engine, _ = _engine(cfg, "zero3.json", world, **changes)
        model_dtype, accum_dtype = engine.get_data_types()
        result[label] = {
            "model_dtype": str(model_dtype),
            "grad_accum_dtype": str(accum_dtype),
            "communication_data_type": str(engine.communication_data_type),
            "zero_accumulation_dtype": str(engine.optimizer.gradient_accumulation_dtype),
            "grad_buffer_dtype": str(engine.optimizer.grad_partitions_flat_buffer.dtype),
        }
        for m in range(accumulation):
            engine.backward(engine(*_micro_batch(rank, m, micro_size, size, patches))["loss"])
            if m < accumulation - 1:
                engine.step()  # DeepSpeed counts micro-steps here; the update waits for the boundary
        grads = _full_grads(engine).double()  # after the boundary's backward, before its update
        result[label]["relative_error"] = float((grads - reference).norm() / reference.norm())
        engine.destroy()
        del engine
        gc.collect()
    return result


def check_checkpointing(rank: int, world: int) -> dict[str, Any]:
    """Losses, gradient norms and full gradients of 2 optimizer steps (accumulation 2), checkpointing
    on and off; the differences are returned."""
    runs = []
    for enabled in (True, False):
        cfg = PretrainConfig(
            model=ModelSection(name="aim-test", grad_checkpointing=enabled, head_grad_checkpointing=enabled),
            train=TrainSection(batch_size=4 * 2 * world, micro_batch_size=4, steps=2),
        )
        model_cfg = model_config(cfg)
        engine, _ = _engine(cfg, "zero3.json", world)
        assert engine.module.trunk.grad_checkpointing is enabled and engine.module.head.grad_checkpointing is enabled
        losses, norms, grads = [], [], []
        for step in range(2):
            for micro in range(2):
                batch = _micro_batch(rank, 10 * step + micro, 4, model_cfg.image_size, model_cfg.num_patches)
                loss = engine(*batch)["loss"]
                engine.backward(loss)
                losses.append(float(loss))
                if micro == 0:
                    engine.step()  # not a boundary: DeepSpeed only counts the micro-step
            grads.append(_full_grads(engine))
            engine.step()
            norms.append(float(engine.get_global_grad_norm()))
        runs.append((losses, norms, grads))
        engine.destroy()
        del engine
        gc.collect()
    (losses_on, norms_on, grads_on), (losses_off, norms_off, grads_off) = runs
    return {
        "losses_on": losses_on,
        "losses_off": losses_off,
        "grad_norms_on": norms_on,
        "grad_norms_off": norms_off,
        "max_grad_difference": max(float((a - b).abs().max()) for a, b in zip(grads_on, grads_off, strict=True)),
        "max_grad": max(float(g.abs().max()) for g in grads_on),
    }


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def check_zero_init(rank: int, world: int, name: str) -> dict[str, Any]:
    cfg = PretrainConfig(
        model=ModelSection(name=name, zero_init=True), train=TrainSection(batch_size=world, micro_batch_size=1, steps=1)
    )
    model_cfg = model_config(cfg)
    plan = resolve_plan(cfg, world, model_cfg.image_size, model_cfg.num_patches)
    ds, _ = build_ds_config(load_ds_config(ROOT / "ds_configs" / "zero3.json"), cfg, plan, model_cfg)
    gc.collect()
    rss_before, start = _rss_bytes(), time.perf_counter()
    model = build_model(model_cfg, cfg, ds)
    seconds = time.perf_counter() - start
    rss_after = _rss_bytes()
    params = list(model.parameters())
    result = {
        "model": name,
        "seconds": seconds,
        "full_numel": sum(int(p.ds_numel) for p in params),
        "local_numel": sum(int(p.ds_tensor.numel()) for p in params),
        "dtypes": sorted({str(p.ds_tensor.dtype) for p in params}),
        "visible_numel": sum(p.numel() for p in params),  # partitioned parameters are empty outside forward
        "rss_growth_bytes": rss_after - rss_before,
    }
    del model, params
    gc.collect()
    return result


def _run_config(beton: str, out_dir: Path, steps: int, log_every: int, ckpt_every: int) -> PretrainConfig:
    """aim-test on the beton: batch 16 = 2 ranks x micro 4 x accumulation 2; no validation or export."""
    return PretrainConfig(
        model=ModelSection(name="aim-test"),
        data=DataSection(sources=[SourceSection(path=beton)], num_workers=1),
        train=TrainSection(batch_size=16, micro_batch_size=4, steps=steps),
        val=ValSection(patch_grid_images=0),
        log=LogSection(every_steps=log_every),
        checkpoint=CheckpointSection(every_steps=ckpt_every, keep_last=3),
        export=ExportSection(enabled=False),
        out_dir=str(out_dir),
    )


def _train(cfg: PretrainConfig, ds_file: str) -> dict[str, Any]:
    """:func:`aim_ds.train.loop.run` with ``ds_configs/<ds_file>`` as it ships; the losses it logged."""
    from aim_ds.metrics import read_metrics

    start = time.perf_counter()
    status = loop.run(cfg, load_ds_config(ROOT / "ds_configs" / ds_file), ds_source=ds_file).status
    records = read_metrics(Path(cfg.out_dir) / "metrics.jsonl", "train")
    return {
        "status": status,
        "losses": {r["step"]: r["loss"] for r in records},
        "seconds": time.perf_counter() - start,
        "images_per_second": [r["images_per_second"] for r in records],
    }


def _count_reads(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()`` with the tensor reads made by aim_ds code counted per optimizer step: from the
    start of step k's forward passes to the start of step k+1's."""
    package = str(ROOT / "aim_ds")
    per_step: dict[int, list[str]] = {}
    current = [0]  # the optimizer step being run (1-based); 0 before the first

    def counting(name: str, original: Callable) -> Callable:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(package):
                where = f"{name} at {os.path.relpath(caller.f_code.co_filename, ROOT)}:{caller.f_lineno}"
                per_step.setdefault(current[0], []).append(where)
            return original(self, *args, **kwargs)

        return read

    def counting_builder(name: str, original: Callable) -> Callable:
        def build(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            if kwargs.get("device") is not None and caller.f_code.co_filename.startswith(package):
                where = f"torch.{name}(device=) at {os.path.relpath(caller.f_code.co_filename, ROOT)}:{caller.f_lineno}"
                per_step.setdefault(current[0], []).append(where)
            return original(*args, **kwargs)

        return build

    optimizer_step = loop._optimizer_step

    def marked_step(job: Any, step: int, *args: Any) -> Any:
        current[0] = step + 1
        return optimizer_step(job, step, *args)

    originals = {name: getattr(torch.Tensor, name) for name in READS}
    loop._optimizer_step = marked_step
    builders = {name: getattr(torch, name) for name in HOST_TO_DEVICE}
    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    for name, original in builders.items():
        setattr(torch, name, counting_builder(name, original))
    try:
        result = run()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name, original in builders.items():
            setattr(torch, name, original)
        loop._optimizer_step = optimizer_step
    return {**result, "reads_per_step": {str(k): v for k, v in sorted(per_step.items())}}


def check_runs(beton: str, out: Path, rank: int) -> dict[str, Any]:
    """The real loop on the beton, 12 steps, with each shipped config: fp32 (the reference), bf16
    (zero3.json, counting tensor reads, logging every 4 steps) and bf16 with optimizer and parameter
    offload (zero3_offload.json, checkpoints every 4 steps). Then the offloaded run is "killed"
    after its step-8 checkpoint (step 12's loses its COMPLETE marker, as a kill mid-save leaves it)
    and resumed in a fresh engine."""
    from aim_ds.weights import checkpoint as ckpt

    result = {
        "fp32": _train(_run_config(beton, out / "fp32", 12, 1, 0), "zero3_fp32.json"),
        "bf16": _count_reads(lambda: _train(_run_config(beton, out / "bf16", 12, 4, 0), "zero3.json")),
        "offload": _train(_run_config(beton, out / "offload", 12, 1, 4), "zero3_offload.json"),
    }
    if rank == 0:
        (out / "offload" / "checkpoints" / ckpt.tag_for_step(12) / ckpt.COMPLETE_MARKER).unlink()
    barrier()
    result["resumed_from"] = ckpt.latest_complete(out / "offload" / "checkpoints")[0]
    metrics = out / "offload" / "metrics.jsonl"
    before = metrics.read_text().splitlines(keepends=True)
    # The optimizer steps the resumed run really takes (1-based), and the file's lines it kept.
    ran: list[int] = []
    optimizer_step = loop._optimizer_step

    def recorded_step(job: Any, step: int, *args: Any) -> Any:
        ran.append(step + 1)
        return optimizer_step(job, step, *args)

    loop._optimizer_step = recorded_step
    try:
        result["resumed"] = _train(_run_config(beton, out / "offload", 12, 1, 4), "zero3_offload.json")
    finally:
        loop._optimizer_step = optimizer_step
    after = metrics.read_text().splitlines(keepends=True)
    result["resumed"]["steps_run"] = ran
    result["resumed"]["kept_lines"] = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), len(before))
    result["resumed"]["lines_before"] = len(before)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--beton", required=True)
    parser.add_argument("--zero-init-model", default="aim-1B")
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    args = parser.parse_args()
    out = Path(args.out)
    rank, world, _ = init_distributed()
    atomic_write_json(out / f"shm_rank{rank}.json", {"released": distributed.released_shared_buffers})
    checks = {
        "runs": lambda: check_runs(args.beton, out, rank),
        "accumulation": lambda: check_accumulation(rank, world),
        "checkpointing": lambda: check_checkpointing(rank, world),
        "zero_init": lambda: check_zero_init(rank, world, args.zero_init_model),
    }
    only = os.environ.get("GPU_PATH_ONLY")
    for name, check in checks.items():
        if only and name != only:
            continue
        start = time.perf_counter()
        result = check()
        result["check_seconds"] = time.perf_counter() - start
        atomic_write_json(out / f"{name}_rank{rank}.json", result, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
