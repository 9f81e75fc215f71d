"""The LR schedule against hand-computed points, step arithmetic, and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import aim_ds
from aim_ds.optim import (
    build_optimizer,
    lr_at_step,
    param_groups,
    set_lr,
    steps_from_patches,
    warmup_steps_from_fraction,
)

SCHEDULE = dict(peak_lr=1e-3, total_steps=100, warmup_steps=10)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1e-4),  # first update: 1/10 of the peak, not 0
        (4, 5e-4),
        (9, 1e-3),  # last warmup step reaches the peak
        (10, 1e-3),  # cosine starts at the peak
        (55, 5e-4),  # half way through the 90 decay steps: cos(pi/2) = 0
        (40, 1e-3 * 0.5 * (1 + math.cos(math.pi / 3))),  # a third of the way: 7.5e-4
        (100, 0.0),  # the end
        (250, 0.0),  # past the end stays at min_lr
    ],
)
def test_schedule_points(step: int, expected: float) -> None:
    assert lr_at_step(step, **SCHEDULE) == pytest.approx(expected, abs=1e-15)


def test_schedule_min_lr_and_monotone_decay() -> None:
    lrs = [lr_at_step(s, peak_lr=1.0, total_steps=50, warmup_steps=5, min_lr=0.1) for s in range(51)]
    assert lrs[50] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:6], strict=True))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[5:-1], lrs[6:], strict=True))  # cosine falls
    assert min(lrs) >= 0.1


def test_schedule_without_warmup_starts_at_peak() -> None:
    assert lr_at_step(0, peak_lr=2.0, total_steps=10, warmup_steps=0) == pytest.approx(2.0)


def test_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at_step(0, peak_lr=1.0, total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at_step(0, peak_lr=1.0, total_steps=0, warmup_steps=0)
    with pytest.raises(ValueError, match="step"):
        lr_at_step(-1, peak_lr=1.0, total_steps=10, warmup_steps=0)


def test_steps_from_patches_table1() -> None:
    # 1.2T patches at 4096 images of 256 patches: 1,144,409.2 -> 1,144,410 steps; 0.5T -> 476,838.
    assert steps_from_patches(1.2e12, 4096, 256) == 1_144_410
    assert steps_from_patches(0.5e12, 4096, 256) == 476_838
    assert warmup_steps_from_fraction(1_144_410, 0.025) == 28_610
    with pytest.raises(ValueError):
        warmup_steps_from_fraction(100, 1.5)


class _WithPos(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, 8))  # 3-D, but a position embedding
        self.proj = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8, bias=False)
        self.frozen.weight.requires_grad_(False)


def test_param_groups_on_aim_model() -> None:
    model = aim_ds.create_model("aim-test")
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    shapes = dict(model.named_parameters())
    # Every matrix / conv kernel decays; every bias and norm parameter does not.
    assert decay["names"] and all(shapes[n].ndim >= 2 for n in decay["names"])
    assert all(shapes[n].ndim == 1 for n in no_decay["names"])
    assert "preprocessor.patchifier.proj.weight" in decay["names"]
    assert "preprocessor.patchifier.proj.bias" in no_decay["names"]
    assert "trunk.blocks.0.norm_1.weight" in no_decay["names"]
    assert "head.out.bias" in no_decay["names"]
    assert "trunk.blocks.0.attn.qkv.weight" in decay["names"]
    # Nothing lost, nothing counted twice.
    assert sorted(decay["names"] + no_decay["names"]) == sorted(shapes)


def test_param_groups_pos_embed_and_frozen() -> None:
    decay, no_decay = param_groups(_WithPos(), weight_decay=0.1)
    assert decay["names"] == ["proj.weight"]
    assert sorted(no_decay["names"]) == ["pos_embed", "proj.bias"]


def test_build_optimizer_and_set_lr() -> None:
    model = _WithPos()
    optimizer = build_optimizer(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert optimizer.param_groups[0]["eps"] == 1e-8
    set_lr(optimizer, 3e-4)
    assert all(g["lr"] == 3e-4 for g in optimizer.param_groups)


def test_optimizer_is_the_fused_kernel_on_the_cpu_too() -> None:
    """The fused AdamW runs on the CPU as on CUDA (the unfused CPU path holds two parameter-sized
    temporaries during the step; BENCHMARKS.md, "Memory planner"), and steps as the reference does."""
    torch.manual_seed(0)
    model = _WithPos()
    reference = _WithPos()
    reference.load_state_dict(model.state_dict())
    fused = build_optimizer(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    plain = torch.optim.AdamW(param_groups(reference, 0.05), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=False)
    assert fused.defaults["fused"] is True
    for _ in range(20):
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
