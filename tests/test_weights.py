"""Trunk weights from the three sources (export, DeepSpeed ZeRO-3 checkpoint, released ml-aim
layout) give identical features; mismatched checkpoints fail naming what differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import aim_ds
from aim_ds.distributed import free_port
from aim_ds.model.aim import RELEASED_NORM_EPS
from aim_ds.weights import frozen as F
from aim_ds.weights import load as W
from aim_ds.weights.interop import to_ml_aim

REPO = Path(__file__).resolve().parents[1]
LAYERS = [1, 2, 3]

# One ZeRO-3 step of aim-test on one CPU rank, then a checkpoint through aim_ds.weights.checkpoint (the
# pretraining driver's format) and the gathered full weights as a reference to compare against.
_DS_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, deepspeed
    from safetensors.torch import save_file
    import aim_ds
    from aim_ds.weights import checkpoint as ckpt

    out, steps, init = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test")
    if init:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(init))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": int(os.environ.get("AIM_TEST_ZERO_STAGE", "3"))},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = engine(images)["loss"]
        engine.backward(loss)
        engine.step()
    ckpt.save(engine, out + "/checkpoints", steps, {"note": "test"}, keep_last=2)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        state = {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}
    save_file(state, out + "/reference.safetensors")
    """
)


def make_deepspeed_run(run: Path, steps: int, init: Path | None = None, stage: int = 3) -> Path:
    """A real 1-rank ZeRO-``stage`` (CPU, gloo) run folder ``run`` with one complete checkpoint at
    ``steps`` (aim-test, from ``init``'s weights when given) and ``reference.safetensors``, the
    gathered weights."""
    run.mkdir(parents=True, exist_ok=True)
    script = run / "make_ds_ckpt.py"
    script.write_text(_DS_SCRIPT)
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=str(REPO),
        AIM_TEST_ZERO_STAGE=str(stage),
    )
    command = [sys.executable, str(script), str(run), str(steps)] + ([str(init)] if init else [])
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real 1-rank ZeRO-3 run folder, plus an export folder and an ml-aim file made from the
    same (gathered) weights."""
    root = tmp_path_factory.mktemp("weights")
    run = make_deepspeed_run(root / "run", steps=2)
    reference = load_file(str(run / "reference.safetensors"))
    export = root / "export"
    export.mkdir()
    save_file(reference, str(export / "model.safetensors"))
    (export / "model.json").write_text(json.dumps({"model": "aim-test", "overrides": {}, "step": 2}))
    ml_aim = root / "aim_test_ml_aim.safetensors"
    save_file(to_ml_aim(reference), str(ml_aim))
    ml_aim_pth = root / "aim_test_ml_aim.pth"
    torch.save({"model": to_ml_aim(reference)}, ml_aim_pth)
    return {
        "run": run,
        "export": export,
        "ml_aim": ml_aim,
        "ml_aim_pth": ml_aim_pth,
        "reference": run / "reference.safetensors",
    }


@pytest.mark.deepspeed
def test_zero2_checkpoint_consolidates_exactly(tmp_path: Path) -> None:
    """ds_configs/zero2.json ships: a real ZeRO-2 save pickles DeepSpeed's ``fragment_address``
    (two ints), which the weights-only reader must accept, and merges to the trained weights exactly."""
    from aim_ds.weights.zero_shards import consolidate_fp32

    run = make_deepspeed_run(tmp_path / "run", steps=2, stage=2)
    merged = consolidate_fp32(run / "checkpoints", "step_0000002")
    reference = load_file(str(run / "reference.safetensors"))
    assert set(merged) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value.float(), rtol=0, atol=0, msg=name)


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.deepspeed
def test_sources_are_detected(sources: dict[str, Path]) -> None:
    run = sources["run"]
    assert W.detect_source(sources["export"]) == "export"
    assert W.detect_source(sources["export"] / "model.safetensors") == "export"
    assert W.detect_source(sources["ml_aim"]) == "ml_aim"
    assert W.detect_source(sources["ml_aim_pth"]) == "ml_aim"
    for path in (run, run / "checkpoints", run / "checkpoints" / "step_0000002"):
        assert W.detect_source(path) == "deepspeed"
        assert W.resolve_deepspeed_checkpoint(path) == (run / "checkpoints", "step_0000002")


@pytest.mark.deepspeed
def test_three_sources_give_identical_features(sources: dict[str, Path]) -> None:
    reference = load_file(str(sources["reference"]))
    model = aim_ds.create_model("aim-test")
    model.load_state_dict(reference)
    model.eval()
    images = _images()
    with torch.no_grad():
        expected = model.extract_features(images, LAYERS)
    # A freshly initialised model differs: the comparison below can fail.
    with torch.no_grad():
        fresh = aim_ds.create_model("aim-test").eval().extract_features(images, LAYERS)
    assert not torch.allclose(fresh, expected)

    fingerprints = set()
    paths = [
        sources["export"],
        sources["export"] / "model.safetensors",
        sources["run"],
        sources["run"] / "checkpoints" / "step_0000002",
        sources["ml_aim"],
        sources["ml_aim_pth"],
    ]
    # A file in the released ml-aim layout is served as the released models are, with LayerNorm eps 1e-6
    # (our pretraining uses the training config's 1e-5; docs/recipe.md, "Readings").
    released = aim_ds.create_model("aim-test", norm_eps=RELEASED_NORM_EPS)
    released.load_state_dict(reference)
    with torch.no_grad():
        expected_released = released.eval().extract_features(images, LAYERS)
    for path in paths:
        trunk, loaded = F.build_frozen_trunk("aim-test", path, layers=LAYERS)
        assert set(loaded.state_dict) == {k for k in reference if k.startswith(("preprocessor.", "trunk."))}
        feats = trunk(images)
        assert feats.shape == (3, 64, 64)
        want = expected_released if loaded.source == "ml_aim" else expected
        assert torch.equal(feats, want), f"features from {path} differ"
        fingerprints.add(loaded.fingerprint())
    assert len(fingerprints) == 1  # the cache key follows content, not the file it came from


@pytest.mark.deepspeed
def test_streamed_backbone_equals_full_consolidation(sources: dict[str, Path], tmp_path: Path) -> None:
    """A probe of blocks [0, 1] merges only the preprocessor, blocks 0-1 and the final norm out of
    the ZeRO shards, each tensor equal to the full fp32 consolidation's; the pixel head is never
    merged; blocks 2-3 are shape-only placeholders; the features equal the full trunk's."""
    from aim_ds.weights.backbone import read_handover, write_handover
    from aim_ds.weights.zero_shards import consolidate_fp32

    run = sources["run"]
    full = consolidate_fp32(run / "checkpoints", "step_0000002")
    backbone = {k: v for k, v in full.items() if k.startswith(("preprocessor.", "trunk."))}
    streamed = W.load_trunk_weights(run, keep_blocks=2)
    state = streamed.state_dict
    assert not any(k.startswith("head.") for k in state) and set(state) == set(backbone)
    for key, value in state.items():
        assert value.shape == backbone[key].shape, key
        if key.startswith(("trunk.blocks.2.", "trunk.blocks.3.")):
            assert value.is_meta, f"{key} was merged though no probed block needs it"
        else:
            assert value.dtype == torch.float32 and torch.equal(value, backbone[key]), key
    # bf16 matrices (a CUDA probe), fp32 vectors, each cast from the same fp32 master weights.
    half = W.load_trunk_weights(run, keep_blocks=2, matrix_dtype=torch.bfloat16).state_dict
    for key, value in half.items():
        if not value.is_meta:
            want = backbone[key].to(torch.bfloat16 if value.ndim >= 2 else torch.float32)
            assert value.dtype == want.dtype and torch.equal(value, want), key
    # The trunk built from the streamed blocks gives the full trunk's features for blocks [0, 1].
    images = _images()
    streamed_trunk = F.frozen_trunk("aim-test", streamed, layers=[0, 1])
    full_trunk = F.frozen_trunk("aim-test", W.load_trunk_weights(run), layers=[0, 1])
    assert len(streamed_trunk.model.trunk.blocks) == 2
    assert torch.equal(streamed_trunk(images), full_trunk(images))
    # The hand-over file to the other ranks carries the same tensors and placeholders (same fingerprint).
    write_handover(tmp_path / "handover.safetensors", state)
    handed = read_handover(tmp_path / "handover.safetensors")
    assert W.fingerprint_state_dict(handed) == streamed.fingerprint()
    assert all(handed[k].is_meta == v.is_meta for k, v in state.items())
    # Rank 0 of a probe on several ranks merges the shards straight into that file: the same content.
    meta = W.write_deepspeed_handover(run, tmp_path / "merged.safetensors", keep_blocks=2)
    merged = read_handover(tmp_path / "merged.safetensors")
    assert W.fingerprint_state_dict(merged) == streamed.fingerprint() and meta == streamed.meta
    assert all(merged[k].is_meta == v.is_meta for k, v in state.items())
    # A checkpoint whose skipped blocks do not fit the model still fails, naming them.
    with pytest.raises(W.WeightsMismatchError, match="trunk.blocks.3"):
        F.frozen_trunk("aim-test", streamed, layers=[0, 1], depth=3)


@pytest.mark.deepspeed
def test_frozen_trunk_is_frozen_and_bidirectional(sources: dict[str, Path]) -> None:
    trunk, _ = F.build_frozen_trunk("aim-test", sources["export"], layers=[3])
    trunk.train()  # asking for train mode must not unfreeze it
    assert not trunk.model.training
    assert all(not p.requires_grad for p in trunk.parameters())
    assert trunk.model.head is None  # pixel head dropped: not needed to probe
    images = _images()
    feats = trunk(images)
    assert not feats.requires_grad and not feats.is_inference()
    # Full attention: the first token's features depend on the last patch of the image.
    changed = images.clone()
    changed[:, :, -4:, -4:] += 1.0
    assert not torch.allclose(trunk(changed)[:, 0], feats[:, 0])
    assert trunk.images_seen == 6 and trunk.batches_seen == 2


@pytest.mark.deepspeed
def test_export_name_from_model_json(sources: dict[str, Path]) -> None:
    trunk, loaded = F.build_frozen_trunk(None, sources["export"])
    assert trunk.config.width == 64 and loaded.meta["model"] == "aim-test"
    with pytest.raises(W.WeightsError, match="no model.json"):
        F.build_frozen_trunk(None, sources["ml_aim"])


@pytest.mark.deepspeed
def test_zero3_export_is_a_standalone_pretrained_model(sources: dict[str, Path], tmp_path: Path) -> None:
    """The export of a real ZeRO-3 checkpoint, moved out of its run, loads by both conventions
    holding exactly the trained weights, pixel head included."""
    import shutil

    from aim_ds.weights.export import export_checkpoint

    ckpt_dir, tag = W.resolve_deepspeed_checkpoint(sources["run"])
    export = export_checkpoint(ckpt_dir, tag, tmp_path / "run" / "export", model_name="aim-test", overrides={}, step=2)
    moved = Path(shutil.move(str(export), tmp_path / "shared"))
    reference = load_file(str(sources["reference"]))
    for model in (aim_ds.AIM.from_pretrained(moved), aim_ds.create_model("aim-test", pretrained=moved)):
        state = model.state_dict()
        assert set(state) == set(reference)
        assert all(torch.equal(state[k], v.float()) for k, v in reference.items())


@pytest.mark.deepspeed
def test_mismatched_checkpoint_names_keys_and_shapes(sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(W.WeightsMismatchError) as info:
        F.build_frozen_trunk("aim-tiny", sources["export"])
    err = info.value
    assert "trunk.blocks.5.mlp.fc1.weight" in err.missing  # aim-tiny has 6 blocks, aim-test 4
    assert ("trunk.blocks.0.attn.qkv.weight", (192, 64), (576, 192)) in err.mismatched
    text = str(err)
    assert "trunk.blocks.0.attn.qkv.weight: checkpoint [192, 64] vs model [576, 192]" in text
    assert "(model aim-test)" in text  # the hint names the model the checkpoint fits

    state = load_file(str(sources["ml_aim"]))
    state["trunk.blocks.7.norm_1.weight"] = torch.ones(64)
    del state["trunk.post_trunk_norm.bias"]
    odd = tmp_path / "odd.safetensors"
    save_file(state, str(odd))
    with pytest.raises(W.WeightsMismatchError) as info:
        F.build_frozen_trunk("aim-test", odd)
    assert info.value.unexpected == ["trunk.blocks.7.norm_1.weight"]
    assert info.value.missing == ["trunk.post_trunk_norm.bias"]
    assert not info.value.mismatched


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(W.WeightsError, match="does not exist"):
        W.load_trunk_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(W.WeightsError, match="neither"):
        W.load_trunk_state_dict(tmp_path / "empty")
    save_file({"foo.weight": torch.ones(2)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(KeyError, match="not an ml-aim AIM backbone"):
        W.load_trunk_state_dict(tmp_path / "foo.safetensors")


def test_fingerprint_changes_with_any_weight() -> None:
    state = {k: v for k, v in aim_ds.create_model("aim-test").state_dict().items() if k.startswith("trunk.")}
    before = W.fingerprint_state_dict(state)
    state["trunk.blocks.2.mlp.fc2.weight"] = state["trunk.blocks.2.mlp.fc2.weight"].clone()
    assert W.fingerprint_state_dict(state) == before
    state["trunk.blocks.2.mlp.fc2.weight"][0, 0] += 1e-6
    assert W.fingerprint_state_dict(state) != before


def test_features_stop_after_the_last_block_asked_for() -> None:
    """Features of blocks [1, 2] of aim-test's 4 are the mean of those blocks' outputs of a full
    hand-run forward, and neither block 3 nor the final norm runs (counted with forward hooks);
    the frozen trunk drops the unused block altogether and gives the same features."""
    import copy

    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test").eval()
    images = _images()
    with torch.no_grad():
        x = model.preprocessor(images)
        outputs = []
        for block in model.trunk.blocks:  # every block, as the full forward runs them
            x = block(x)
            outputs.append(x)
        assert not torch.equal(outputs[3], outputs[2])  # the last block changes what it gets
        expected = torch.stack([outputs[1], outputs[2]]).mean(dim=0)

    calls = {name: 0 for name in ("0", "1", "2", "3", "norm")}

    def count(name: str):
        def hook(*_: object) -> None:
            calls[name] += 1

        return hook

    for i, block in enumerate(model.trunk.blocks):
        block.register_forward_hook(count(str(i)))
    model.trunk.post_trunk_norm.register_forward_hook(count("norm"))
    with torch.no_grad():
        got = model.extract_features(images, [1, 2])
    assert torch.equal(got, expected)
    assert calls == {"0": 1, "1": 1, "2": 1, "3": 0, "norm": 0}

    trunk = F.FrozenTrunk(copy.deepcopy(model), [2, 1])  # the copy keeps the counting hooks
    assert len(trunk.model.trunk.blocks) == 3
    assert torch.equal(trunk(images), expected)
    assert calls == {"0": 2, "1": 2, "2": 2, "3": 0, "norm": 0}
    with torch.no_grad():
        model.extract_features(images)  # the full path still runs every block and the norm
    assert calls == {"0": 3, "1": 3, "2": 3, "3": 1, "norm": 1}


def test_torch_weights_file_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A released-layout .pth (with a DDP prefix and a probe head) is read by one torch.load, with
    weights_only=True, and maps to the backbone keys."""
    model = aim_ds.create_model("aim-test")
    backbone = to_ml_aim(model.state_dict())
    path = tmp_path / "released.pth"
    torch.save({"model": {f"module.{k}": v for k, v in {**backbone, "head.cls_token": torch.zeros(1)}.items()}}, path)
    real_load, seen = torch.load, []

    def counting_load(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    loaded = W.load_trunk_weights(path)
    assert seen == [True]
    assert loaded.source == "ml_aim" and set(loaded.state_dict) == set(backbone)
    trunk = F.frozen_trunk("aim-test", loaded, layers=[0])
    assert len(trunk.model.trunk.blocks) == 1
