"""The recipe as the paper and the authors' code give it (docs/recipe.md): head-block variants, LayerNorm
eps and target variance in pretraining vs released weights, the probe's bias and its LR x decay grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import aim_ds
from aim_ds.config import ConfigError
from aim_ds.frozen import build_frozen_trunk
from aim_ds.interop import to_ml_aim
from aim_ds.model import RELEASED_NORM_EPS, AIMConfig, normalize_patches, patchify
from aim_ds.probe import HeadBank, TrainConfig, build_head, load_probe_config

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
