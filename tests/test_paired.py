"""Paired differences between runs (trainer/paired.py) against a hand computation, and the SE's
meaning checked by simulation: about 95% of ±2 SE intervals cover the true difference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.commands.paired import paired_difference


def test_paired_difference_by_hand():
    a = {
        1: {"x": np.array([1.0, 2.0, 3.0]), "y": np.array([4.0, 4.0])},
        2: {"x": np.array([1.5, 2.0, 2.5]), "y": np.array([5.0, 3.0])},
    }
    b = {
        1: {"x": np.array([1.0, 1.0, 1.0]), "y": np.array([3.0, 3.0])},
        2: {"x": np.array([1.0, 1.0, 1.0]), "y": np.array([3.0, 3.0])},
        3: {"x": np.array([9.0, 9.0, 9.0]), "y": np.array([9.0, 9.0])},
    }  # seed 3: b only, not paired
    d = paired_difference(a, b, ["x", "y"])
    # seed 1: δx = (0, 1, 2) mean 1, δy = (1, 1) mean 1 -> D1 = 1; seed 2: δx = (.5, 1, 1.5) mean 1,
    # δy = (2, 0) mean 1 -> D2 = 1; seed-averaged δ̄x = (.25, 1, 1.75), δ̄y = (1.5, .5)
    assert d.seeds == (1, 2) and d.mean == pytest.approx(1.0) and d.se_seed == pytest.approx(0.0)
    se_seq2 = (np.var([0.25, 1.0, 1.75], ddof=1) / 3 + np.var([1.5, 0.5], ddof=1) / 2) / 4
    assert d.se_seq == pytest.approx(math.sqrt(se_seq2)) and d.se == pytest.approx(math.sqrt(se_seq2))
    assert d.resolved() == (1.0 >= 2 * math.sqrt(se_seq2))
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({1: a[1]}, {2: b[2]}, ["x"])
    with pytest.raises(ValueError, match="same evaluation sequences"):
        paired_difference({1: {"x": np.ones(3)}}, {1: {"x": np.ones(4)}}, ["x"])


def test_the_standard_error_matches_the_spread_of_the_difference():
    """Simulated condition pairs with a known macro difference (0.05): sequence difficulty shared by
    both (cancelled by pairing), per-sequence noise and a per-seed training offset. Over many such
    studies the estimated SE² averages to the actual variance of Δ, and Δ is centred on the truth.
    (With 3 seeds the seed part of SE² rests on 2 degrees of freedom, so ±2 SE is nearer a 90%
    interval than a 95% one when seed noise dominates: the README says so.)"""
    rng = np.random.default_rng(0)
    true, means, variances = 0.05, [], []
    for _ in range(400):
        difficulty = {g: rng.normal(5, 1, 160) for g in ("x", "y", "z")}
        a, b = {}, {}
        for seed in (1, 2, 3):
            offset = rng.normal(0, 0.01)  # training noise of condition a at this seed
            a[seed] = {g: v + true + offset + rng.normal(0, 0.05, v.size) for g, v in difficulty.items()}
            b[seed] = {g: v + rng.normal(0, 0.05, v.size) for g, v in difficulty.items()}
        d = paired_difference(a, b, ["x", "y", "z"])
        means.append(d.mean)
        variances.append(d.se**2)
    assert abs(np.mean(means) - true) < 3 * np.std(means) / np.sqrt(len(means))
    assert 0.8 <= np.mean(variances) / np.var(means) <= 1.25, np.mean(variances) / np.var(means)
