"""The recipe as the paper and the authors' code give it (docs/recipe.md): head-block variants, LayerNorm
eps and target variance in pretraining vs released weights, the probe's bias and its LR x decay grid."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import aim_ds
from aim_ds.config import ConfigError
from aim_ds.model.aim import RELEASED_NORM_EPS, AIMConfig, normalize_patches, patchify
from aim_ds.probe import HeadBank, TrainConfig, build_head, load_probe_config
from aim_ds.weights.frozen import build_frozen_trunk
from aim_ds.weights.interop import to_ml_aim

REPO = Path(__file__).resolve().parents[1]


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _reference_head(head: torch.nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The pixel head written out by hand from docs/recipe.md, "Pretraining head"."""
    h = x @ head.embed.weight.T + head.embed.bias + head.pos_embed
    for block in head.blocks:
        mlp = lambda v: F.gelu(v @ block.mlp.fc1.weight.T) @ block.mlp.fc2.weight.T  # noqa: B023, E731
        if kind == "transformer":  # x = x + LN1(x); x = x + MLP(LN2(x))
            h = h + _layer_norm(h, block.norm_1)
            h = h + mlp(_layer_norm(h, block.norm_2))
        else:  # x = x + MLP(LN(x))
            h = h + mlp(_layer_norm(h, block.norm))
    return _layer_norm(h, head.norm) @ head.out.weight.T + head.out.bias


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_head_block_variants(kind: str) -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test", head_block=kind)
    cfg = model.config
    width, hidden, depth = cfg.head_width, int(cfg.head_width * cfg.head_mlp_ratio), cfg.head_depth
    norms = 2 if kind == "transformer" else 1
    expected = (cfg.width * width + width) + depth * (norms * 2 * width + 2 * width * hidden)
    expected += 2 * width + (width * cfg.patch_dim + cfg.patch_dim)
    assert sum(p.numel() for p in model.head.parameters()) == expected
    # Non-trivial norm affine parameters, so that a swapped or missing norm shows.
    for name, param in model.head.named_parameters():
        if "norm" in name:
            param.data.normal_()
    x = torch.randn(2, cfg.num_patches, cfg.width)
    out = model.head(x)
    assert out.shape == (2, cfg.num_patches, cfg.patch_dim)
    torch.testing.assert_close(out, _reference_head(model.head, x, kind))


def test_head_block_default_is_the_training_code_and_bad_kind_is_an_error() -> None:
    assert AIMConfig().head_block == "transformer"
    keys = set(aim_ds.create_model("aim-test").state_dict())
    assert "head.blocks.0.norm_1.weight" in keys and "head.blocks.0.norm.weight" not in keys
    with pytest.raises(ValueError, match="head_block"):
        AIMConfig(head_block="attention")


def test_pretraining_eps_and_unbiased_target_variance() -> None:
    cfg = AIMConfig()
    assert cfg.norm_eps == 1e-5 and cfg.target_unbiased and cfg.target_eps == 1e-6
    model = aim_ds.create_model("aim-test")
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    patch = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    unbiased_var = (4 + 1 + 0 + 9) / 3  # divide by P - 1
    torch.testing.assert_close(normalize_patches(patch, unbiased=True), (patch - 3.0) / (unbiased_var + 1e-6) ** 0.5)
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.targets(images), normalize_patches(patchify(images, 4), unbiased=True))


def test_released_weights_load_with_their_eps(tmp_path: Path) -> None:
    """An ml-aim file is served with eps 1e-6, so its features are exactly the released model's."""
    torch.manual_seed(0)
    released = aim_ds.create_model("aim-test", norm_eps=RELEASED_NORM_EPS).eval()
    path = tmp_path / "aim_released.pth"
    torch.save(to_ml_aim(released.state_dict()), path)
    trunk, weights = build_frozen_trunk("aim-test", path, layers=None)
    assert weights.source == "ml_aim"
    assert {m.eps for m in trunk.modules() if isinstance(m, torch.nn.LayerNorm)} == {RELEASED_NORM_EPS}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(trunk(images), released.extract_features(images), rtol=0, atol=0)


def test_probe_grid_and_bias_defaults() -> None:
    train = TrainConfig()
    assert train.weight_decays == [0.05, 0.1]
    assert max(train.lrs) == 2e-3 and min(train.lrs) == 5e-5  # docs/recipe.md: LR swept in [5e-5, 2e-3]
    bank = HeadBank.create(["attentive", "linear"], [1e-3, 2e-3], dim=16, num_heads=2, num_classes=3, train=train)
    assert [s.name for s in bank.slots] == [
        f"{kind}_lr{lr:g}_wd{wd:g}" for kind in ("attentive", "linear") for lr in (1e-3, 2e-3) for wd in (0.05, 0.1)
    ]
    for slot in bank.slots:
        decays = sorted(group["weight_decay"] for group in slot.optimizer.param_groups)
        assert decays == [0.0, slot.weight_decay]
        assert slot.head.linear.bias is None  # the authors' current probe has no classifier bias
    # Same start for every (LR, decay) of a type.
    assert torch.equal(bank.slots[0].head.k.weight, bank.slots[3].head.k.weight)
    assert build_head("linear", 8, 2, 3, bias=True).linear.bias is not None


def test_probe_configs_state_the_grid_and_reject_the_old_key(tmp_path: Path) -> None:
    for size in ("0.6B", "1B", "3B", "7B"):
        cfg = load_probe_config(REPO / "run" / "configs" / f"probe_aim-{size}.yaml")
        assert cfg.train.weight_decays == [0.05, 0.1] and max(cfg.train.lrs) == 2e-3 and not cfg.heads.bias
    with pytest.raises(ConfigError, match="weight_decays"):
        load_probe_config(None, ["train.weight_decay=0.1"])
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  weight_decay: 0.05\n")
    with pytest.raises(ConfigError, match="weight_decays"):
        load_probe_config(old)


# --- Second pass (issue 22): run length, warmup fraction ---------------------------------------------------


def test_aim_600m_saw_2b_images_and_warms_up_over_2_5_percent() -> None:
    """AIM-0.6B: 2,000,000,000 images / 4096 = 488,281 steps (not Table 10's 1.25M), warmup 2.5% of them."""
    from aim_ds.model.registry import AIM_600M_IMAGES, get_model_spec
    from aim_ds.optim import steps_from_images

    assert steps_from_images(AIM_600M_IMAGES, 4096) == 488_281
    recipe = get_model_spec("aim-0.6B").recipe
    assert recipe.total_steps(256) == 488_281
    assert recipe.total_warmup_steps(256) == round(488_281 * 0.025) == 12_207
    # Schedule points, read from the registry: the warmup's first and last steps, the cosine's middle, the end.
    assert recipe.lr_at_step(0, 256) == pytest.approx(1e-3 / 12_207)
    assert recipe.lr_at_step(12_206, 256) == pytest.approx(1e-3)
    assert recipe.lr_at_step(12_207, 256) == pytest.approx(1e-3)
    middle = 12_207 + (488_281 - 12_207) // 2
    assert recipe.lr_at_step(middle, 256) == pytest.approx(0.5e-3, rel=1e-5)
    assert recipe.lr_at_step(488_281, 256) == 0.0
    for name in ("aim-1B", "aim-3B", "aim-7B"):
        other = get_model_spec(name).recipe
        assert (other.total_steps(256), other.total_warmup_steps(256)) == (1_250_000, 31_250)
        assert other.lr_at_step(31_249, 256) == pytest.approx(1e-3) and other.lr_at_step(15_624, 256) == 0.5e-3


def test_warmup_is_a_fraction_of_any_run_length() -> None:
    """The registry's recipes carry a fraction, never a count: a 100k-step ablation warms up 2,500
    steps, a run shorter than 31,250 steps works; a fixed count overrides and is checked."""
    import dataclasses

    from aim_ds.model.registry import get_model_spec, table1_models
    from aim_ds.optim import resolve_warmup_steps

    for name in table1_models():
        recipe = get_model_spec(name).recipe
        assert recipe.warmup_steps == -1 and recipe.warmup_fraction == 0.025
        ablation = dataclasses.replace(recipe, steps=100_000)
        assert ablation.total_warmup_steps(256) == 2_500
        assert ablation.lr_at_step(2_499, 256) == pytest.approx(1e-3)
        short = dataclasses.replace(recipe, steps=1_000)
        assert short.total_warmup_steps(256) == 25 and short.lr_at_step(999, 256) > 0.0
    assert resolve_warmup_steps(1_000, 0.025, 100) == 100
    assert resolve_warmup_steps(1_000, 0.025, 0) == 0  # 0 is a count: no warmup
    with pytest.raises(ValueError, match="warmup_steps=31250 exceeds the run's 1000 steps"):
        resolve_warmup_steps(1_000, 0.025, 31_250)


# --- Second pass: q/k/v initialisation, the position table ---------------------------------------------------


def test_qkv_thirds_have_the_authors_xavier_std_at_d1536() -> None:
    """The authors' q_proj, k_proj, v_proj are separate D x D xavier-uniform matrices: std sqrt(2 / 2D) =
    0.02552 at D = 1536, not the fused [3D, D] draw's sqrt(2 / 4D) = 0.01804."""
    from aim_ds.model.attention import Attention

    torch.manual_seed(0)
    width = 1536
    attn = Attention(width, 12)
    expected, fused = math.sqrt(2.0 / (2 * width)), math.sqrt(2.0 / (4 * width))
    assert round(expected, 5) == 0.02552 and round(fused, 5) == 0.01804
    bound = math.sqrt(6.0 / (2 * width))
    for part in attn.qkv.weight.detach().chunk(3):  # q, k, v: each [D, D]
        assert part.std().item() == pytest.approx(expected, rel=0.005)
        assert part.abs().max().item() <= bound
    assert attn.proj.weight.std().item() == pytest.approx(expected, rel=0.005)
    assert tuple(attn.qkv.weight.shape) == (3 * width, width)  # the fused layout stays (ml-aim's qkv key)


def test_position_table_is_float64_exact_whatever_the_default_dtype() -> None:
    """The table comes from NumPy float64, rounded once to fp32, even where torch's constructors are
    set to build bf16 tensors (what zero.Init does to them; the DeepSpeed run is in test_recipe_deepspeed)."""
    from aim_ds.model.aim import sincos_pos_embed_2d, sincos_pos_embed_2d_float64

    exact = torch.from_numpy(sincos_pos_embed_2d_float64(1536, 16))  # [256, 1536]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        table = sincos_pos_embed_2d(1536, 16)
        model = aim_ds.create_model("aim-test")
    finally:
        torch.set_default_dtype(previous)
    assert table.dtype == torch.float32 and model.preprocessor.pos_embed.dtype == torch.float32
    torch.testing.assert_close(table.double(), exact, rtol=0, atol=6e-8)
    # What zero.Init's wrapped torch.arange gave in bf16: integers above 256 lost, the table off by > 0.01.
    assert (torch.arange(384, dtype=torch.bfloat16).double() != torch.arange(384).double()).any()
    omega = 10000.0 ** (-torch.arange(384, dtype=torch.bfloat16) / 384)  # [D/4], computed in bf16
    cols = torch.arange(16, dtype=torch.bfloat16)
    bf16_sin = (cols[:, None] * omega[None]).sin()  # [16, D/4]: the column code of raster row 0
    assert (bf16_sin.double() - exact[:16, :384]).abs().max() > 0.01


def test_position_add_rounds_once() -> None:
    """Under bf16 the sum is computed in fp32 and rounded once: never a bf16-rounded table added in bf16."""
    from aim_ds.model.aim import add_position

    x = torch.randn(2, 4, 8).to(torch.bfloat16)
    table = torch.randn(4, 8) * 1e-2 + 1.0
    out = add_position(x, table)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (x.float() + table).to(torch.bfloat16), rtol=0, atol=0)


def test_color_jitter_off_in_paper_yamls_and_checked_when_on() -> None:
    from aim_ds.config import load_config
    from aim_ds.train.config import PretrainConfig
    from aim_ds.train.preflight import check_fields

    for size in ("0.6B", "1B", "3B", "7B"):
        cfg = load_config(PretrainConfig, REPO / "run" / "configs" / f"aim-{size}.yaml")
        assert cfg.data.color_jitter is False  # Table 10 (DFN-2B+) has none
    on = load_config(PretrainConfig, REPO / "run/configs/aim-test.yaml", overrides=["data.color_jitter=true"])
    assert (tuple(on.data.color_jitter_values), on.data.color_jitter_prob) == ((0.4, 0.4, 0.2, 0.1), 0.8)
    check_fields(on)
    bad = load_config(
        PretrainConfig,
        REPO / "run/configs/aim-test.yaml",
        overrides=["data.color_jitter=true", "data.color_jitter_prob=2"],
    )
    with pytest.raises(ConfigError, match=r"data\.color_jitter_values.*probability"):
        check_fields(bad)


def test_probe_feature_precision() -> None:
    """features.dtype: float32 extracts exactly the fp32 model's features; bfloat16 computes under bf16
    autocast (on the CPU too, when asked); the paper's probe configs extract in fp32, as the authors score."""
    from aim_ds.probe.config import feature_compute_dtype
    from aim_ds.probe.context import trunk_matrix_dtype
    from aim_ds.weights.frozen import FrozenTrunk

    for size in ("0.6B", "1B", "3B", "7B"):
        assert load_probe_config(REPO / "run" / "configs" / f"probe_aim-{size}.yaml").features.dtype == "float32"
    assert load_probe_config(None).features.dtype == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert feature_compute_dtype("auto", cpu) == torch.float32 and feature_compute_dtype("auto", cuda) == torch.bfloat16
    assert feature_compute_dtype("float32", cuda) == torch.float32 == trunk_matrix_dtype(cuda, "float32")
    assert trunk_matrix_dtype(cpu, "bfloat16") == torch.bfloat16
    from aim_ds.probe.config import validate_config

    with pytest.raises(ConfigError, match="features.dtype 'fp8'"):
        validate_config(load_probe_config(None, ["features.dtype=fp8", "data.val_path=x", "data.train_path=y"]))
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.extract_features(images, [2, 3])
    fp32 = FrozenTrunk(aim_ds.create_model("aim-test"), [2, 3], compute_dtype=torch.float32)
    fp32.model.load_state_dict(model.state_dict())
    torch.testing.assert_close(fp32(images), reference, rtol=0, atol=0)
    bf16 = FrozenTrunk(aim_ds.create_model("aim-test"), [2, 3], compute_dtype=torch.bfloat16)
    bf16.model.load_state_dict(model.state_dict())
    out = bf16(images)
    assert out.dtype == torch.float32 and not torch.equal(out, reference)
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
