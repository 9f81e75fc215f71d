"""One rank of tests/test_recipe_deepspeed.py: aim-test (wider) built under ``deepspeed.zero.Init`` with
ds_configs/zero3.json as it ships (bf16), through the project's own builders, as the driver builds it.

Writes ``rank<r>.json`` into ``--out``: the position tables' dtypes and their largest error against the
float64 table, q/k/v standard deviations of the gathered fused ``qkv`` weights, and (rank 0) the
trained engine's trunk features next to those of the fp32 export of the same checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aim_ds.distributed import barrier, init_distributed  # noqa: E402
from aim_ds.io import atomic_write_json  # noqa: E402
from aim_ds.model.aim import sincos_pos_embed_2d_float64  # noqa: E402
from aim_ds.train.config import ModelSection, PretrainConfig, TrainSection, resolve_plan  # noqa: E402
from aim_ds.train.engine import build_ds_config, build_engine, build_model, load_ds_config, model_config  # noqa: E402
from aim_ds.weights.export import export_checkpoint, load_exported  # noqa: E402

# Wide enough that the q/k/v standard deviations are estimated to ~0.3% (256 x 256 draws each).
OVERRIDES = {"width": 256, "num_heads": 2}


def _table_error(table: torch.Tensor, dim: int, grid: int) -> float:
    exact = torch.from_numpy(sincos_pos_embed_2d_float64(dim, grid))
    return float((table.double().cpu() - exact).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args, _ = parser.parse_known_args()  # the launcher adds --local_rank
    rank, world, _ = init_distributed()
    cfg = PretrainConfig(
        model=ModelSection(name="aim-test", overrides=OVERRIDES, zero_init=True),
        train=TrainSection(batch_size=2 * world, micro_batch_size=2, steps=2),
    )
    model_cfg = model_config(cfg)
    plan = resolve_plan(cfg, world, model_cfg.image_size, model_cfg.num_patches)
    ds, _ = build_ds_config(load_ds_config(ROOT / "ds_configs" / "zero3.json"), cfg, plan, model_cfg)
    model = build_model(model_cfg, cfg, ds)
    import deepspeed

    pre, head = model.preprocessor.pos_embed, model.head.pos_embed
    result: dict[str, Any] = {
        "weight_dtype": str(model.trunk.blocks[0].attn.qkv.weight.dtype),
        "partitioned": hasattr(model.trunk.blocks[0].attn.qkv.weight, "ds_id"),
        "table_dtypes": [str(pre.dtype), str(head.dtype)],
        "table_errors": [
            _table_error(pre, model_cfg.width, model_cfg.grid_size),
            _table_error(head, model_cfg.head_width, model_cfg.grid_size),
        ],
    }
    qkv_stds = []
    for block in model.trunk.blocks:
        with deepspeed.zero.GatheredParameters([block.attn.qkv.weight]):
            qkv_stds.append([float(part.float().std()) for part in block.attn.qkv.weight.chunk(3)])
    result["qkv_stds"] = qkv_stds

    engine, _ = build_engine(model, cfg, ds, plan)
    result["table_dtypes_in_engine"] = [str(pre.dtype), str(head.dtype)]
    gen = torch.Generator().manual_seed(rank)
    size = model_cfg.image_size
    for _ in range(2):  # move the weights off their initial values
        images = torch.randn(2, 3, size, size, generator=gen)
        engine.backward(engine(images, torch.randint(1, model_cfg.num_patches, (2,), generator=gen))["loss"])
        engine.step()
    probe_images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    engine.eval()
    with torch.no_grad():
        trained = engine.module.extract_features(probe_images)  # bf16 engine, ZeRO-3 gathered
    engine.save_checkpoint(str(Path(args.out) / "checkpoints"), tag="step_0000002")
    barrier()
    if rank == 0:
        export_dir = export_checkpoint(
            Path(args.out) / "checkpoints",
            "step_0000002",
            Path(args.out) / "export",
            model_name="aim-test",
            overrides=OVERRIDES,
            step=2,
        )
        exported = load_exported(export_dir).eval()
        # The export in the run's own arithmetic: bf16 weights, fp32 position tables (buffers stay fp32
        # in the engine too), so the two forwards differ only if the tables differ.
        for param in exported.parameters():
            param.data = param.data.to(torch.bfloat16)
        with torch.no_grad():
            replica = exported.extract_features(probe_images)
        torch.save({"trained": trained.float(), "replica": replica.float()}, Path(args.out) / "features.pt")
        result["features_dtype"] = str(trained.dtype)
    atomic_write_json(Path(args.out) / f"rank{rank}.json", result)
    barrier()
    engine.destroy()


if __name__ == "__main__":
    main()
