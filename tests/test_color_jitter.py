"""Colour jitter (aim_ds.data.color_jitter) against a naive per-pixel reference written from the ops'
definitions (torchvision's, with Python's colorsys for the HSV round trip), and its determinism."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from aim_ds.data.color_jitter import ColorJitter, JitterPlan, apply_color_jitter, sample_color_jitter

GRAY = (0.2989, 0.587, 0.114)


def _clamp(v: float) -> float:
    return min(255.0, max(0.0, v))


def _reference_one(image: np.ndarray, factors: np.ndarray, order: np.ndarray) -> np.ndarray:
    """One image [H, W, 3] uint8, pixel by pixel in float64, rounded once at the end."""
    h, w, _ = image.shape
    px = [[[float(c) for c in image[i, j]] for j in range(w)] for i in range(h)]
    for op in order:
        f = float(factors[op])
        if op == 0:  # brightness: blend with black
            px = [[[_clamp(f * c) for c in p] for p in row] for row in px]
        elif op == 1:  # contrast: blend with the mean gray level of the image
            mean = sum(sum(GRAY[k] * p[k] for k in range(3)) for row in px for p in row) / (h * w)
            px = [[[_clamp(f * c + (1 - f) * mean) for c in p] for p in row] for row in px]
        elif op == 2:  # saturation: blend with the pixel's own gray level
            px = [
                [[_clamp(f * c + (1 - f) * sum(GRAY[k] * p[k] for k in range(3))) for c in p] for p in row]
                for row in px
            ]
        else:  # hue: rotate in HSV
            new = []
            for row in px:
                new_row = []
                for p in row:
                    hh, ss, vv = colorsys.rgb_to_hsv(*(c / 255.0 for c in p))
                    new_row.append([c * 255.0 for c in colorsys.hsv_to_rgb((hh + f) % 1.0, ss, vv)])
                new.append(new_row)
            px = new
    return np.clip(np.rint(np.array(px)), 0, 255).astype(np.uint8)


def test_jitter_matches_the_naive_reference() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 5, 6, 3), dtype=np.uint8)
    images[0] = 128  # a gray image: hue undefined, saturation 0
    images[1, ..., 2] = 0  # no blue
    plan = sample_color_jitter(12, ColorJitter(), np.random.default_rng(1))
    plan.apply[:3] = True  # the special images are jittered
    plan.apply[3] = False
    assert {tuple(o) for o in plan.order} != {tuple(plan.order[0])}  # several orders in one batch
    out = apply_color_jitter(images, plan)
    assert out.dtype == np.uint8 and out.shape == images.shape
    for b in range(12):
        expected = _reference_one(images[b], plan.factors[b], plan.order[b]) if plan.apply[b] else images[b]
        # float32 vs float64: a value sitting on .5 may round the other way.
        assert np.abs(out[b].astype(int) - expected.astype(int)).max() <= 1, b
        assert (out[b] == expected).mean() > 0.9, b
    assert np.array_equal(out[3], images[3])
    assert not np.array_equal(out[plan.apply], images[plan.apply])


@pytest.mark.parametrize("op", range(4))
def test_each_op_alone(op: int) -> None:
    """Each op in isolation, with a fixed factor, so that a swapped or mis-defined op shows."""
    rng = np.random.default_rng(op)
    images = rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    factors = np.tile(np.array([1.3, 0.7, 1.2, 0.1], dtype=np.float32), (3, 1))
    identity = np.array([1.0, 1.0, 1.0, 0.0], dtype=np.float32)
    factors = np.where(np.arange(4) == op, factors, identity).astype(np.float32)
    plan = JitterPlan(apply=np.ones(3, bool), factors=factors, order=np.tile(np.arange(4), (3, 1)))
    out = apply_color_jitter(images, plan)
    for b in range(3):
        expected = _reference_one(images[b], factors[b], np.array([op]))
        assert np.abs(out[b].astype(int) - expected.astype(int)).max() <= 1


def test_draws_are_deterministic_and_follow_the_ranges() -> None:
    jitter = ColorJitter()
    a = sample_color_jitter(4096, jitter, np.random.default_rng([0, 1, 2, 3]))
    b = sample_color_jitter(4096, jitter, np.random.default_rng([0, 1, 2, 3]))
    assert (
        np.array_equal(a.apply, b.apply) and np.array_equal(a.factors, b.factors) and np.array_equal(a.order, b.order)
    )
    assert 0.77 < a.apply.mean() < 0.83  # p = 0.8
    assert a.factors[:, :3].min() >= 0.6 and a.factors[:, 0].max() <= 1.4 and a.factors[:, 2].max() <= 1.2
    assert np.abs(a.factors[:, 3]).max() <= 0.1
    assert all(sorted(o) == [0, 1, 2, 3] for o in a.order)


def test_bad_values_are_errors() -> None:
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.6)
    with pytest.raises(ValueError, match="probability"):
        ColorJitter(prob=1.5)
    with pytest.raises(ValueError, match="brightness, contrast, saturation, hue"):
        ColorJitter.from_values([0.4, 0.4], 0.8)


def test_train_loader_jitters_deterministically_without_moving_crops(tmp_path) -> None:
    """On a real beton: the jittered batch is the plain batch (same crops and flips) with the plan drawn
    from (seed, epoch, step, rank); two passes give the same bytes; another rank gets other draws."""
    from data_fixtures import make_imagefolder

    from aim_ds.data import build_train_loader
    from aim_ds.data.writers import WriteOptions, convert_imagefolder

    folder = make_imagefolder(tmp_path / "images", {"a": 8, "b": 8}, size=(48, 40))
    beton = tmp_path / "train.beton"
    convert_imagefolder(folder, beton, WriteOptions(workers=1), progress=False)
    common = dict(batch_size=4, image_size=32, seed=3, world_size=2, num_workers=1)

    def batches(rank: int, jitter: ColorJitter | None) -> list[np.ndarray]:
        loader = build_train_loader(str(beton), rank=rank, color_jitter=jitter, **common)
        return [images for images, _ in loader.iter_epoch_uint8(epoch=1)]

    jitter = ColorJitter()
    plain, jittered, again = batches(1, None), batches(1, jitter), batches(1, jitter)
    assert len(plain) == 2
    for step, (p, j, a) in enumerate(zip(plain, jittered, again, strict=True)):
        assert np.array_equal(j, a)
        rng = np.random.default_rng([3, 1, step, 1, 0xC0103])
        assert np.array_equal(j, apply_color_jitter(p, sample_color_jitter(4, jitter, rng)))
        assert not np.array_equal(j, p)
    assert not np.array_equal(batches(0, jitter)[0], jittered[0])
