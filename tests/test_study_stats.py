"""The study's statistics (aim_ds.study) on data whose answers can be checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aim_ds.study import bootstrap_difference, bootstrap_top1, render_summary, spearman


def test_spearman_rho_and_p_by_hand() -> None:
    # Ranks differ by d = (-1, 1, -1, 1, 0): rho = 1 - 6 * 4 / (5 * 24) = 0.8; t = 0.8 * sqrt(3 / 0.36) = 2.309,
    # two-sided p with 3 degrees of freedom = 0.1040.
    c = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert c.rho == pytest.approx(0.8) and c.n == 5
    assert c.p_value == pytest.approx(0.1040, abs=5e-4)
    # The case: n = 6, sum d^2 = 62 -> rho = 1 - 372 / 210 = -0.771, p = 0.072: not significant.
    c = spearman([1, 2, 3, 4, 5, 6], [6, 4, 5, 1, 3, 2])  # d = (-5, -2, -2, 3, 2, 4): sum d^2 = 62
    assert c.rho == pytest.approx(1 - 6 * 62 / 210) == pytest.approx(-0.7714, abs=1e-4)
    assert c.p_value == pytest.approx(0.0724, abs=5e-4) and c.p_value > 0.05  # t = 2.424, 4 degrees of freedom
    perfect = spearman(list(range(8)), list(range(8, 0, -1)))
    assert perfect.rho == pytest.approx(-1.0) and perfect.p_value < 1e-6
    with_nan = spearman([1.0, 2.0, float("nan"), 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert with_nan.rho == pytest.approx(1.0) and with_nan.n == 4
    assert math.isnan(spearman([1.0, 2.0], [1.0, 2.0]).rho)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).p_value)


def test_bootstrap_top1_over_images_and_seeds() -> None:
    assert bootstrap_top1(np.ones(50, bool)).as_dict() == {"value": 1.0, "low": 1.0, "high": 1.0, "level": 0.95}
    # 500 right of 1000: binomial standard error 0.0158, so the 95% interval is about 0.5 +- 0.031.
    hits = np.zeros(1000, bool)
    hits[::2] = True
    interval = bootstrap_top1(hits)
    assert interval.value == 0.5
    assert interval.low == pytest.approx(0.469, abs=0.008) and interval.high == pytest.approx(0.531, abs=0.008)
    assert bootstrap_top1(hits, seed=0) == interval  # deterministic
    # Two probe seeds at 30% and 70%: the interval spans the seeds' spread, not only the images'.
    seeds = np.zeros((2, 1000), bool)
    seeds[0, :300] = True
    seeds[1, :700] = True
    spread = bootstrap_top1(seeds)
    assert spread.value == pytest.approx(0.5)
    assert spread.low < 0.33 and spread.high > 0.67
    with pytest.raises(ValueError, match="no val images"):
        bootstrap_top1(np.zeros(0, bool))


def test_paired_difference_sees_only_the_discordant_images() -> None:
    """b is a plus 20 more right answers out of 1000: a paired difference is 0.02 +- ~0.009 (only the 20
    discordant images vary); unpaired, the interval would be +- 0.044 and include 0."""
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.5
    b = a.copy()
    b[np.flatnonzero(~a)[:20]] = True
    diff = bootstrap_difference(a, b)
    assert diff.value == pytest.approx(0.02)
    assert 0.0 < diff.low < 0.02 < diff.high < 0.04 and diff.excludes_zero()
    same = bootstrap_difference(a, a)
    assert (same.low, same.high) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same val images"):
        bootstrap_difference(a, b[:10])


def _row(**values: float) -> dict:
    row = {}
    for kind, (v, lo, hi) in values.items():
        row.update({f"top1_{kind}": v, f"top1_{kind}_low": lo, f"top1_{kind}_high": hi})
    return row


def test_summary_states_findings_and_what_the_intervals_do_not_separate() -> None:
    checkpoints = {
        "run": "runs/aim-tiny",
        "probe_seeds": [0],
        "rows": [
            {"step": s, "val_loss": 1 / s, "val_images": 359, **_row(linear=(0.2, 0.15, 0.25))} for s in (10, 20, 30)
        ],
        "spearman_val_loss_vs_top1": {"linear": {"rho": -0.77, "p_value": 0.072, "n": 6}},
    }
    sizes = [
        {"model": "s", "params": 1e5, "step": 9, "val_loss": 0.3, **_row(linear=(0.20, 0.16, 0.24))},
        {
            "model": "m",
            "params": 1e6,
            "step": 9,
            "val_loss": 0.2,
            **_row(linear=(0.30, 0.26, 0.34)),
            "vs_smaller_linear": 0.10,
            "vs_smaller_linear_low": 0.05,
            "vs_smaller_linear_high": 0.15,
        },
        {
            "model": "l",
            "params": 1e7,
            "step": 9,
            "val_loss": 0.19,
            **_row(linear=(0.32, 0.28, 0.36)),
            "vs_smaller_linear": 0.02,
            "vs_smaller_linear_low": -0.01,
            "vs_smaller_linear_high": 0.05,
        },
    ]
    text = render_summary(checkpoints, sizes, {"total": 1.0})
    assert (
        "rho(val loss, top-1) = -0.77 over n = 6 checkpoints, two-sided p = 0.072: **not shown** at the 5% level"
        in text
    )
    assert "20.0% [15.0%, 25.0%]" in text and "359 val images" in text
    assert "What it does not show" in text and "does not show" in text
    assert "Val loss: **strictly falls**" in text
    assert "**not every step is separated**" in text
    assert "l **cannot be separated** from m (difference +2.0 points, 95% CI [-1.0, +5.0])" in text
    assert "m better than s" in text
    checkpoints["spearman_val_loss_vs_top1"]["linear"] = {"rho": -0.9, "p_value": 0.001, "n": 10}
    assert "**shown**." in render_summary(checkpoints, [], {})
