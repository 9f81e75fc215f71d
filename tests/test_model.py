"""The AIM model, the registry, the prefix-causal mask, the loss, interop and FLOPs."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import aim_ds
from aim_ds.model.aim import normalize_patches, patchify, sincos_pos_embed_2d, trunk_parameter_count, unpatchify
from aim_ds.model.attention import prefix_causal_mask
from aim_ds.model.flops import train_flops_per_image
from aim_ds.model.registry import get_model_spec, table1_models
from aim_ds.weights.interop import from_ml_aim, to_ml_aim

SMALL = [n for n in aim_ds.list_models() if get_model_spec(n).paper_params is None]


def test_list_models_has_table1_sizes() -> None:
    assert set(table1_models()) == {"aim-0.6B", "aim-1B", "aim-3B", "aim-7B"}
    assert set(table1_models()) <= set(aim_ds.list_models())
    assert "aim-test" in aim_ds.list_models()


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(KeyError) as info:
        aim_ds.create_model("aim-9B")
    message = str(info.value)
    assert "aim-9B" in message and "aim-0.6B" in message and "aim-test" in message


def test_register_refuses_silent_overwrite() -> None:
    from aim_ds.model.registry import register_model

    with pytest.raises(ValueError, match="already registered"):
        register_model(get_model_spec("aim-test"))


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(TypeError, match="widht"):
        aim_ds.create_model("aim-test", widht=32)


@pytest.mark.parametrize("name", table1_models())
def test_table1_parameter_counts(name: str) -> None:
    spec = get_model_spec(name)
    model = aim_ds.create_model(name, device="meta")
    counted = trunk_parameter_count(model)
    assert abs(counted - spec.paper_params) / spec.paper_params < 0.005, (name, counted)
    # The pixel head is "about 0.4B" at width 2048, depth 12, for every size.
    head = sum(p.numel() for p in model.head.parameters())
    assert 0.39e9 < head < 0.42e9
    assert spec.config.num_heads * 128 == spec.config.width  # head dim 128
    assert len(spec.best_probe_layers) == 6


def test_table1_recipes() -> None:
    for name in table1_models():
        recipe = get_model_spec(name).recipe
        assert recipe.peak_lr == 1e-3 and recipe.batch_size == 4096 and recipe.betas == (0.9, 0.95)
        # docs/recipe.md, "Readings": 2B images for 0.6B, Table 10's 1.25M steps for the others; warmup 2.5%.
        expected = (488_281, 12_207) if name == "aim-0.6B" else (1_250_000, 31_250)
        assert (recipe.total_steps(256), recipe.total_warmup_steps(256)) == expected
    # Table 1's patch counts stay as figures: 0.5T at 4096 x 256 per step would be 476,838 steps.
    recipe = dataclasses.replace(get_model_spec("aim-0.6B").recipe, steps=0)
    assert recipe.total_steps(256) == math.ceil(0.5e12 / (4096 * 256)) == 476_838
    assert get_model_spec("aim-1B").recipe.patches_seen == 1.2e12


@pytest.mark.parametrize("name", SMALL)
def test_small_models_forward_backward_all_params_get_grads(name: str) -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model(name)
    cfg = model.config
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    out = model(images)
    assert out["pred"].shape == (2, cfg.num_patches, cfg.patch_size**2 * 3)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_no_biases_in_attention_and_mlp_linears() -> None:
    model = aim_ds.create_model("aim-test")
    for name, module in model.trunk.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None, name
    assert model.preprocessor.patchifier.proj.bias is not None
    assert model.head.embed.bias is not None and model.head.out.bias is not None


def test_state_dict_has_no_position_keys() -> None:
    keys = aim_ds.create_model("aim-test").state_dict().keys()
    assert not [k for k in keys if "pos_embed" in k]


def naive_mask(prefix_len: list[int], n: int) -> torch.Tensor:
    mask = torch.zeros(len(prefix_len), 1, n, n, dtype=torch.bool)
    for b, s in enumerate(prefix_len):
        for i in range(n):
            for j in range(n):
                mask[b, 0, i, j] = j <= i or j < s
    return mask


def test_prefix_causal_mask_matches_double_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    n = 16
    prefix = torch.randint(1, n, (6,), generator=gen)
    assert torch.equal(prefix_causal_mask(prefix, n), naive_mask(prefix.tolist(), n))


def test_flex_block_mask_agrees_with_sdpa_mask() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    from aim_ds.model.attention import flex_block_mask

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 64, 16, generator=gen) for _ in range(3))
    prefix = torch.tensor([1, 17, 63])
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=prefix_causal_mask(prefix, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is the slow path
        out = flex_attention(q, k, v, block_mask=flex_block_mask(prefix, 64))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _trunk_rows(model, images: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_trunk(images, prefix)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_changing_a_patch_affects_only_allowed_rows(seed: int) -> None:
    torch.manual_seed(seed)
    model = aim_ds.create_model("aim-test").eval()
    cfg = model.config
    n, p, g = cfg.num_patches, cfg.patch_size, cfg.grid_size
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    s = int(torch.randint(2, n - 2, ()).item())
    prefix = torch.tensor([s])
    base = _trunk_rows(model, images, prefix)

    def perturb(j: int) -> torch.Tensor:
        changed = images.clone()
        r, c = divmod(j, g)
        changed[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 1.0
        return _trunk_rows(model, changed, prefix)

    # j >= S: rows i < j are unchanged, row j changes.
    j = int(torch.randint(s, n, ()).item())
    out = perturb(j)
    torch.testing.assert_close(out[0, :j], base[0, :j], atol=1e-6, rtol=0)
    assert (out[0, j] - base[0, j]).abs().max() > 1e-3
    # j < S (inside the bidirectional prefix): earlier rows i < S do change.
    j = s - 1
    out = perturb(j)
    if j > 0:
        assert (out[0, :j] - base[0, :j]).abs().amax(dim=-1).min() > 1e-4


def test_extract_features_is_bidirectional() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test").eval()
    cfg = model.config
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    changed = images.clone()
    changed[:, :, -cfg.patch_size :, -cfg.patch_size :] += 1.0  # the last patch
    with torch.no_grad():
        for layers in (None, [1, 2]):
            a = model.extract_features(images, layers)
            b = model.extract_features(changed, layers)
            assert a.shape == (1, cfg.num_patches, cfg.width)
            assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4  # the first row sees the last patch


def test_extract_features_layers_is_mean_of_block_outputs() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test").eval()
    images = torch.randn(2, 3, 32, 32)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in model.trunk.blocks]
    with torch.no_grad():
        feats = model.extract_features(images, [1, 3])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(feats, (outputs[1] + outputs[3]) / 2)
    with pytest.raises(ValueError, match="layers"):
        model.extract_features(images, [7])


def test_target_normalisation_hand_computed() -> None:
    patch = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    mean, var = 3.0, ((4 + 1 + 0 + 9) / 4)
    expected = (patch - mean) / math.sqrt(var + 1e-6)
    torch.testing.assert_close(normalize_patches(patch), expected)


def test_patchify_order_and_round_trip() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)  # [2, 4, 48]
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right one (raster order); its first value is (row 0, col 4, channel 0),
    # its second is channel 1 of the same pixel: (row-in-patch, col-in-patch, channel) order.
    assert patches[0, 1, 0] == images[0, 0, 0, 4] and patches[0, 1, 1] == images[0, 1, 0, 4]
    assert patches[0, 1, 3] == images[0, 0, 0, 5]
    assert torch.equal(unpatchify(patches, 4, 2), images)


def test_loss_hand_computed_and_ignores_prefix_targets() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test")
    cfg = model.config
    n = cfg.num_patches
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    prefix = torch.tensor([3, n - 1])
    pred = torch.randn(2, n, cfg.patch_dim)
    target = normalize_patches(patchify(images, cfg.patch_size), unbiased=cfg.target_unbiased)
    errors = []
    for b, s in enumerate(prefix.tolist()):
        for k in range(n - 1):
            if k + 1 >= s:  # row k predicts patch k+1; the last prefix token's prediction counts
                errors.append(((pred[b, k] - target[b, k + 1]) ** 2).mean())
    expected = torch.stack(errors).mean()  # token-level mean across the batch
    torch.testing.assert_close(model.forward_loss(pred, images, prefix), expected)
    # Changing prefix targets (patches 1..S-1 of sample 0) leaves the loss unchanged.
    changed = images.clone()
    changed[0, :, 0 : cfg.patch_size, cfg.patch_size : 3 * cfg.patch_size] += 5.0  # patches 1 and 2
    torch.testing.assert_close(model.forward_loss(pred, changed, prefix), expected)
    # Changing patch S of sample 0 (the first counted target) changes it.
    changed = images.clone()
    changed[0, :, 0 : cfg.patch_size, 3 * cfg.patch_size : 4 * cfg.patch_size] *= -1.0
    assert not torch.allclose(model.forward_loss(pred, changed, prefix), expected)


def test_prefix_len_validation() -> None:
    model = aim_ds.create_model("aim-test")
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="prefix_len"):
        model(images, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="prefix_len"):
        model(images, torch.tensor([5]))


def test_prefix_draw_follows_torch_generator() -> None:
    model = aim_ds.create_model("aim-test")
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(7)
    a = model(images)["loss"]
    torch.manual_seed(7)
    b = model(images)["loss"]
    assert torch.equal(a, b)
    draws = model.sample_prefix_len(10_000, torch.Generator().manual_seed(0))
    assert draws.min() == 1 and draws.max() == model.num_patches - 1


def test_sincos_position_embedding_layout() -> None:
    dim, grid = 16, 4
    emb = sincos_pos_embed_2d(dim, grid)  # [16, 16]
    quarter = dim // 4
    w = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    k = 2 * grid + 3  # row 2, column 3
    expected_col = torch.cat([torch.sin(3 * w), torch.cos(3 * w)])
    expected_row = torch.cat([torch.sin(2 * w), torch.cos(2 * w)])
    torch.testing.assert_close(emb[k], torch.cat([expected_col, expected_row]).float())


def test_layernorm_and_loss_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test")
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, torch.tensor([4, 9]))
        normed = model.trunk.post_trunk_norm(torch.randn(2, 4, 64, dtype=torch.bfloat16) * 100)
    assert out["loss"].dtype == torch.float32
    assert out["pred"].dtype == torch.bfloat16  # the matmuls ran in bf16
    # The norm computed in fp32: per-row mean ~0 and std ~1 despite bf16 input of scale 100.
    assert normed.float().mean(-1).abs().max() < 0.05


def test_grad_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test")
    images = torch.randn(2, 3, 32, 32)
    prefix = torch.tensor([3, 30])
    model(images, prefix)["loss"].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images, prefix)["loss"].backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_head_grad_checkpointing_recomputes_and_gives_same_gradients() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test")
    images = torch.randn(2, 3, 32, 32)
    prefix = torch.tensor([3, 30])
    calls = []
    model.head.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early: no post hook
    out = model(images, prefix)
    out["loss"].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(calls) == 1
    model.zero_grad()
    model.set_grad_checkpointing(False, head=True)
    assert model.head.grad_checkpointing and not model.trunk.grad_checkpointing
    calls.clear()
    again = model(images, prefix)
    again["loss"].backward()
    assert len(calls) == 2  # the head block ran again in the backward pass
    assert torch.equal(again["loss"], out["loss"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_prefix_len_on_the_host_is_checked_without_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    model = aim_ds.create_model("aim-test")
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 63]))
    monkeypatch.undo()
    assert reads == []
    with pytest.raises(ValueError, match=r"prefix_len values must lie in \[1, 63\], got \[0, 5\]"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([0, 5]))


def test_ml_aim_round_trip_identical_outputs() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test").eval()
    images = torch.randn(2, 3, 32, 32)
    released = to_ml_aim(model.state_dict())
    assert not [k for k in released if k.startswith("head.")]
    fresh = aim_ds.create_model("aim-test").eval()
    missing, unexpected = fresh.load_state_dict(from_ml_aim(released), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    with torch.no_grad():
        assert torch.equal(fresh.extract_features(images), model.extract_features(images))
        assert torch.equal(fresh.extract_features(images, [0, 1]), model.extract_features(images, [0, 1]))


def ml_aim_layout_state_dict(width: int, depth: int, patch: int, classes: int) -> dict[str, torch.Tensor]:
    """A state dict written from docs/recipe.md's list of the released key names and shapes."""
    sd = {
        "preprocessor.patchifier.proj.weight": torch.randn(width, 3, patch, patch),
        "preprocessor.patchifier.proj.bias": torch.randn(width),
        "preprocessor.patchifier.norm.weight": torch.randn(width),
        "preprocessor.patchifier.norm.bias": torch.randn(width),
        "trunk.post_trunk_norm.weight": torch.randn(width),
        "trunk.post_trunk_norm.bias": torch.randn(width),
        "head.cls_token": torch.randn(1, 1, width),
        "head.k.weight": torch.randn(width, width),
        "head.v.weight": torch.randn(width, width),
        "head.linear.weight": torch.randn(classes, width),
        "head.bn.running_mean": torch.randn(width),
        "head.bn.running_var": torch.rand(width),
        "head.bn.num_batches_tracked": torch.tensor(0),
    }
    for i in range(depth):
        b = f"trunk.blocks.{i}."
        sd |= {
            b + "norm_1.weight": torch.randn(width),
            b + "norm_1.bias": torch.randn(width),
            b + "attn.qkv.weight": torch.randn(3 * width, width),
            b + "attn.proj.weight": torch.randn(width, width),
            b + "norm_2.weight": torch.randn(width),
            b + "norm_2.bias": torch.randn(width),
            b + "mlp.fc1.weight": torch.randn(4 * width, width),
            b + "mlp.fc2.weight": torch.randn(width, 4 * width),
        }
    return sd


def test_ml_aim_layout_loads_without_missing_or_unexpected_keys() -> None:
    cfg = get_model_spec("aim-test").config
    released = ml_aim_layout_state_dict(cfg.width, cfg.depth, cfg.patch_size, classes=10)
    model = aim_ds.create_model("aim-test")
    ours = from_ml_aim({f"module.{k}": v for k, v in released.items()})  # a DDP-style prefix is stripped
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected
    assert not [k for k in missing if not k.startswith("head.")]
    assert torch.equal(model.trunk.blocks[2].attn.qkv.weight, released["trunk.blocks.2.attn.qkv.weight"])
    with pytest.raises(KeyError, match="unexpected"):
        from_ml_aim({**released, "decoder.weight": torch.zeros(1)})


def test_flop_counter() -> None:
    cfg = get_model_spec("aim-0.6B").config
    d, n = cfg.width, cfg.num_patches
    trunk = 12 * d * d * cfg.depth + 588 * d
    head = d * 2048 + 12 * 2 * 2048 * 8192 + 2048 * 588
    expected = 6 * (trunk + head) * n + 12 * cfg.depth * d * n * n
    assert train_flops_per_image(cfg) == pytest.approx(expected)
    # Roughly 6 x (0.68B + 0.41B) x 256 ~ 1.7 TFLOP per image.
    assert 1.6e12 < train_flops_per_image(cfg) < 1.8e12
    assert train_flops_per_image(get_model_spec("aim-7B").config) > 3 * train_flops_per_image(cfg)


def test_initialisation_follows_the_authors() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-tiny")
    qkv = model.trunk.blocks[0].attn.qkv.weight  # [3D, D]: q, k, v each xavier as D x D, bound sqrt(6 / 2D)
    bound = math.sqrt(6 / (2 * qkv.shape[1]))
    for part in qkv.chunk(3):
        assert part.abs().max() <= bound and part.abs().max() > 0.9 * bound
    conv = model.preprocessor.patchifier.proj.weight  # flattened [D, 3*p*p]
    bound = math.sqrt(6 / (conv.shape[0] + conv[0].numel()))
    assert conv.abs().max() <= bound and conv.abs().max() > 0.9 * bound
    assert model.head.out.bias.abs().sum() == 0 and model.preprocessor.patchifier.proj.bias.abs().sum() == 0
    assert torch.equal(model.trunk.post_trunk_norm.weight, torch.ones_like(model.trunk.post_trunk_norm.weight))


def test_bf16_weights_take_fp32_images_and_keep_fp32_targets() -> None:
    torch.manual_seed(0)
    model = aim_ds.create_model("aim-test").to(torch.bfloat16)  # as under DeepSpeed's bf16 mode
    images = torch.randn(2, 3, 32, 32)  # fp32 pixels
    out = model(images, torch.tensor([3, 9]))
    assert out["pred"].dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    assert model.targets(images).dtype == torch.float32
