"""DoGE, DGA, DoReMi and ODM against updates computed by hand from controllers.md's equations (PiKE
and R&B: test_pike_rnb.py); the invariants at the end run over every online controller.

Every expected value below is written out with numpy from the equations, never by calling the
controllers' own helpers, on K = 3 domains with fixed statistics.
"""

import copy
import math
import subprocess
import sys

import numpy as np
import pytest

from mixtures import MixtureConfigError, Request, build_controller
from mixtures.base import DomainStats

DOMAINS = ["code", "math", "books"]
U = np.full(3, 1 / 3)
NAN = float("nan")


def stats(step=0, lr=1e-3, loss=(2.0, 3.0, 4.0), tokens=(100, 100, 100), **kw) -> DomainStats:
    arrays = {k: None if v is None else np.asarray(v, dtype=np.float64) for k, v in kw.items()}
    return DomainStats(
        step=step, lr=lr, loss=np.asarray(loss, dtype=np.float64), tokens=np.asarray(tokens, dtype=np.float64), **arrays
    )


def grad_stats(align, norms, ref_norm, **kw) -> DomainStats:
    """Stats of a one-reference Request: align is [K] here, a [K, 1] column in DomainStats."""
    return stats(align=np.asarray(align, dtype=np.float64)[:, None], norms=norms, ref_norms=[ref_norm], **kw)


def softmax(z):
    e = np.exp(z - np.max(z))
    return e / e.sum()


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


# ---------------------------------------------------------------- DoGE


def test_doge_request_and_defaults_by_target():
    universal = build_controller("doge", DOMAINS, {})
    assert universal.request(0) == Request(align=("heldout",), norms=True, ref_sequences=None)
    assert universal.cfg.step_mu == 0.01 and universal.cfg.clip == 5.0
    ood = build_controller("doge", DOMAINS, {"target": "target:humaneval"})
    assert ood.request(7).align == ("target:humaneval",) and ood.request(7).norms
    assert ood.cfg.step_mu == 0.05 and ood.cfg.clip == 1.0
    explicit = build_controller("doge", DOMAINS, {"target": "target:humaneval", "mu": 0.2, "max_grad_norm": 3.0})
    assert explicit.cfg.step_mu == 0.2 and explicit.cfg.clip == 3.0


def test_doge_update_by_hand_clips_scores_and_gradients():
    lr, mu = 1e-3, 0.01  # the clip C = 5
    c = build_controller("doge", DOMAINS, {})
    # math's norm 10 > C: clip factor 0.5; the target's norm 8 > C: clip factor 5/8.
    c.observe(grad_stats(align=[3.0, 200.0, -1.0], norms=[2.0, 10.0, 4.0], ref_norm=8.0, lr=lr))
    s_iT = np.array([1.0 * 0.625 * 3.0, 0.5 * 0.625 * 200.0, 1.0 * 0.625 * -1.0])  # 1.875, 62.5, -0.625
    normaliser = (2.0 + 5.0 + 4.0) / 3 + 1e-6  # mean of min(||g_i||, C)
    s = lr * s_iT / normaliser  # 5.11e-4, 1.70e-2, -1.70e-4
    assert s[1] > 5 * lr and s[2] < 0
    s = np.array([s[0], 5 * lr, 0.0])  # clipped to [0, 5 lr]: upper bound for math, lower for books
    alpha = softmax(np.log(U) + s / mu)
    assert np.allclose(c.average_weights, alpha, rtol=1e-12, atol=0)
    # Proxy mode: the sampler stays uniform, the loss carries K α.
    assert np.array_equal(c.weights, U) and np.allclose(c.loss_weights, 3 * alpha, rtol=1e-12, atol=0)
    # A second step moves from α, not from uniform.
    c.observe(grad_stats(align=[1.0, 0.0, 2.0], norms=[1.0, 1.0, 1.0], ref_norm=1.0, lr=lr))
    s2 = lr * np.array([1.0, 0.0, 2.0]) / (1.0 + 1e-6)
    alpha2 = softmax(np.log(alpha) + s2 / mu)
    assert np.allclose(c.loss_weights, 3 * alpha2, rtol=1e-12, atol=0)


def test_doge_scores_sum_over_several_targets():
    """target=heldout:* (one target per evaluated domain): s_i sums the clipped alignments over the
    targets, as the official code sums its scores over its target domains."""
    lr, mu, C = 1e-3, 0.01, 5.0
    c = build_controller("doge", DOMAINS, {"target": "heldout:*"})
    assert c.request(0).align == ("heldout:*",) and c.cfg.step_mu == mu and c.cfg.clip == C  # universal defaults
    align = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    c.observe(stats(align=align, norms=[1.0, 2.0, 10.0], ref_norms=[1.0, 10.0], lr=lr))
    s_iT = np.array([1.0, 1.0, 0.5])[:, None] * np.array([1.0, 0.5])[None, :] * align  # clip factors c_i c_T
    s = np.clip(lr * s_iT.sum(axis=1) / ((1.0 + 2.0 + 5.0) / 3 + 1e-6), 0, 5 * lr)
    assert np.allclose(c.loss_weights / 3, softmax(np.log(U) + s / mu), rtol=1e-12, atol=0)


def test_doge_negative_dw_min_and_eps_mixing():
    lr, mu, eps = 2e-3, 0.05, 0.1
    c = build_controller("doge", DOMAINS, {"target": "target:t", "dw_min": -1.0, "dw_max": 2.0, "reweight_eps": eps})
    c.observe(grad_stats(align=[-9.0, 0.3, 9.0], norms=[0.5, 0.5, 0.5], ref_norm=0.5, lr=lr))
    s = lr * np.array([-9.0, 0.3, 9.0]) / (0.5 + 1e-6)  # OOD: C = 1, no clipping of the gradients
    s = np.clip(s, -1.0 * lr, 2.0 * lr)
    assert s[0] == -lr and s[2] == 2 * lr
    alpha = (1 - eps) * softmax(np.log(U) + s / mu) + eps / 3
    assert np.allclose(c.loss_weights / 3, alpha, rtol=1e-12, atol=0)


def test_doge_resample_mode_and_floor():
    lr, mu = 1e-3, 0.01
    c = build_controller("doge", DOMAINS, {"mode": "resample", "floor": 0.3})
    c.observe(grad_stats(align=[1.0, 2.0, 3.0], norms=[1.0, 2.0, 3.0], ref_norm=1.0, lr=lr))
    alpha = softmax(np.log(U) + lr * np.array([1.0, 2.0, 3.0]) / (2.0 + 1e-6) / mu)
    assert np.allclose(c.weights, 0.7 * alpha + 0.1, rtol=1e-12, atol=0)
    assert np.array_equal(c.loss_weights, np.ones(3))
    # The floor is not part of the state: the log-weights are log α itself.
    assert np.allclose(np.exp(c.state_dict()["logw"]), alpha, rtol=1e-12, atol=0)


def test_doge_absent_domain_keeps_its_weight():
    lr, mu = 1e-3, 0.01
    c = build_controller("doge", DOMAINS, {"mode": "resample"})
    c.observe(
        grad_stats(
            align=[4.0, 1.0, NAN], norms=[2.0, 6.0, NAN], ref_norm=1.0, tokens=[50, 50, 0], loss=[1.0, 1.0, NAN], lr=lr
        )
    )
    normaliser = (2.0 + 5.0) / 2 + 1e-6  # present domains only
    s = lr * np.array([4.0, 5 / 6 * 1.0]) / normaliser
    present = (1 / 3) * np.exp(s / mu)
    present *= (2 / 3) / present.sum()  # the step is renormalised among the present domains
    assert np.allclose(c.weights, [present[0], present[1], 1 / 3], rtol=1e-12, atol=0)
    assert c.weights[2] == pytest.approx(1 / 3, abs=1e-15)


def test_doge_average_and_burn_in():
    def run(burn_in):
        c = build_controller("doge", DOMAINS, {"burn_in": burn_in})
        assert np.array_equal(c.average_weights, U)  # nothing recorded yet: the current α
        trajectory = []
        for align in ([1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0]):
            c.observe(grad_stats(align=align, norms=[1.0, 1.0, 1.0], ref_norm=1.0, lr=1e-2))
            trajectory.append(c.loss_weights / 3)
        return c, trajectory

    c, alphas = run(0)
    assert np.allclose(c.average_weights, np.mean(alphas, axis=0), rtol=1e-12, atol=0)
    assert not np.allclose(c.average_weights, c.weights)  # proxy: the export is ᾱ, not the uniform sampler
    c, alphas = run(2)
    assert np.allclose(c.average_weights, alphas[2], rtol=1e-12, atol=0)


# ---------------------------------------------------------------- DGA


def test_dga_requests_only_on_update_steps():
    c = build_controller("dga", DOMAINS, {"target": "target:code_tasks"})
    for step in (0, 1, 8, 10, 18):
        r = c.request(step)
        assert r.align == () and not r.norms and not r.any_gradient
    assert c.request(9) == Request(
        align=("target:code_tasks",), norms=True, source="auto", probe_sequences=16, ref_sequences=16
    )
    assert c.request(19).align == ("target:code_tasks",)
    custom = build_controller(
        "dga",
        DOMAINS,
        {"target": "target:x", "update_every": 3, "source": "in_batch", "probe_sequences": 4, "target_sequences": 8},
    )
    assert [s for s in range(9) if custom.request(s).align] == [2, 5, 8]
    assert custom.request(2) == Request(
        align=("target:x",), norms=True, source="in_batch", probe_sequences=4, ref_sequences=8
    )


def test_dga_between_updates_nothing_changes():
    c = build_controller("dga", DOMAINS, {"target": "target:t"})
    before = c.state_dict()
    c.observe(stats(step=3))  # no gradient statistics on a non-update step
    c.observe(grad_stats(align=[5.0, 0.0, 0.0], norms=[1.0, 1.0, 1.0], ref_norm=1.0, step=4))
    assert same_state(c.state_dict(), before) and np.array_equal(c.weights, U)


def test_dga_update_by_hand_clip_ema_and_lr_coupling():
    lr, mu, beta = 1e-3, 0.001, 0.9
    c = build_controller("dga", DOMAINS, {"target": "target:t"})
    # C = 1: math's norm 4 is clipped by 1/4, the target's norm 2 by 1/2.
    c.observe(grad_stats(align=[0.4, 2.0, -0.6], norms=[0.5, 4.0, 1.0], ref_norm=2.0, step=9, lr=lr))
    a = np.array([1.0 * 0.5 * 0.4, 0.25 * 0.5 * 2.0, 1.0 * 0.5 * -0.6])  # 0.2, 0.25, -0.3
    eta = lr / mu  # = 1
    alpha_hat = U * np.exp(eta * a) / (U * np.exp(eta * a)).sum()
    alpha = beta * U + (1 - beta) * alpha_hat
    assert np.allclose(c.weights, alpha, rtol=1e-12, atol=0) and np.array_equal(c.loss_weights, np.ones(3))
    c.observe(grad_stats(align=[0.0, 0.0, 1.0], norms=[1.0, 1.0, 1.0], ref_norm=1.0, step=19, lr=lr / 2))
    a2 = np.array([0.0, 0.0, 1.0])
    hat2 = alpha * np.exp(0.5 * a2) / (alpha * np.exp(0.5 * a2)).sum()
    assert np.allclose(c.weights, beta * alpha + (1 - beta) * hat2, rtol=1e-12, atol=0)

    uncoupled = build_controller("dga", DOMAINS, {"target": "target:t", "lr_coupling": False, "mu": 2.0, "ema": 0.5})
    uncoupled.observe(grad_stats(align=[1.0, 0.0, 0.0], norms=[1.0, 1.0, 1.0], ref_norm=1.0, step=9, lr=123.0))
    hat = U * np.exp(np.array([0.5, 0.0, 0.0]))  # η_α = 1/μ regardless of the LR
    assert np.allclose(uncoupled.weights, 0.5 * U + 0.5 * hat / hat.sum(), rtol=1e-12, atol=0)


def test_dga_floor_is_not_in_the_state():
    c = build_controller(
        "dga", DOMAINS, {"target": "target:t", "floor": 0.3, "ema": 0.0, "lr_coupling": False, "mu": 1.0}
    )
    c.observe(grad_stats(align=[1.0, 0.0, -1.0], norms=[1.0, 1.0, 1.0], ref_norm=1.0, step=9))
    alpha = softmax(np.array([1.0, 0.0, -1.0]))
    assert np.allclose(c.state_dict()["w"], alpha, rtol=1e-12, atol=0)
    assert np.allclose(c.weights, 0.7 * alpha + 0.1, rtol=1e-12, atol=0)
    assert c.weights.min() >= 0.1


def test_dga_absent_domains():
    # Probe batches: a domain missing from the training batch is still probed and updated.
    c = build_controller("dga", DOMAINS, {"target": "target:t", "lr_coupling": False, "mu": 1.0})
    c.observe(
        grad_stats(
            align=[1.0, 0.0, 2.0], norms=[1.0, 1.0, 1.0], ref_norm=1.0, step=9, tokens=[10, 10, 0], loss=[1.0, 1.0, NAN]
        )
    )
    hat = U * np.exp([1.0, 0.0, 2.0])
    assert np.allclose(c.weights, 0.9 * U + 0.1 * hat / hat.sum(), rtol=1e-12, atol=0)
    # All-NaN probe rows mark a domain the trainer could not probe: it keeps its weight.
    c = build_controller("dga", DOMAINS, {"target": "target:t", "lr_coupling": False, "mu": 1.0})
    c.observe(grad_stats(align=[1.0, 0.0, NAN], norms=[1.0, 1.0, NAN], ref_norm=1.0, step=9))
    hat = (1 / 3) * np.exp([1.0, 0.0])
    hat *= (2 / 3) / hat.sum()
    assert np.allclose(c.weights, 0.9 * U + 0.1 * np.append(hat, 1 / 3), rtol=1e-12, atol=0)
    assert c.weights[2] == pytest.approx(1 / 3, abs=1e-15)
    # In-batch gradients: presence is the token count.
    c = build_controller("dga", DOMAINS, {"target": "target:t", "source": "in_batch", "lr_coupling": False, "mu": 1.0})
    c.observe(
        grad_stats(
            align=[1.0, 0.0, NAN], norms=[1.0, 1.0, NAN], ref_norm=1.0, step=9, tokens=[5, 5, 0], loss=[1.0, 1.0, NAN]
        )
    )
    assert c.weights[2] == pytest.approx(1 / 3, abs=1e-15) and c.weights[0] > c.weights[1]


def test_dga_basis_by_hand():
    basis = {"web": {"code": 1, "math": 1, "books": 0}, "target_like": {"code": 0, "math": 1, "books": 3}}
    cfg = {"target": "target:t", "basis": basis, "lr_coupling": False, "mu": 1.0, "ema": 0.5}
    c = build_controller("dga", DOMAINS, cfg)
    P = np.array([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]])
    assert np.allclose(c.weights, np.array([0.5, 0.5]) @ P)  # α = Pᵀ w with w uniform over the 2 bases
    c.observe(grad_stats(align=[2.0, 0.4, -0.8], norms=[2.0, 1.0, 1.0], ref_norm=1.0, step=9))
    a = np.array([0.5 * 2.0, 0.4, -0.8])  # code's gradient clipped by C / ||g|| = 1/2
    a_basis = np.array([0.5 * a[0] + 0.5 * a[1], 0.25 * a[1] + 0.75 * a[2]])  # 0.7, -0.5
    w_hat = 0.5 * np.exp(a_basis) / (0.5 * np.exp(a_basis)).sum()
    w = 0.5 * np.array([0.5, 0.5]) + 0.5 * w_hat
    assert np.allclose(c.state_dict()["w"], w, rtol=1e-12, atol=0)
    assert np.allclose(c.weights, w @ P, rtol=1e-12, atol=0)
    # The same basis as a list of rows in domain order gives the same update.
    listed = build_controller("dga", DOMAINS, {**cfg, "basis": [[1, 1, 0], [0, 1, 3]]})
    listed.observe(grad_stats(align=[2.0, 0.4, -0.8], norms=[2.0, 1.0, 1.0], ref_norm=1.0, step=9))
    assert np.array_equal(listed.weights, c.weights)


def test_dga_basis_restricted_to_present_domains():
    cfg = {
        "target": "target:t",
        "basis": [[1, 1, 0], [0, 1, 3], [0, 0, 1]],
        "lr_coupling": False,
        "mu": 1.0,
        "ema": 0.0,
        "source": "in_batch",
    }
    c = build_controller("dga", DOMAINS, cfg)
    c.observe(
        grad_stats(
            align=[1.0, -1.0, NAN], norms=[1.0, 1.0, NAN], ref_norm=1.0, step=9, tokens=[8, 8, 0], loss=[1.0, 1.0, NAN]
        )
    )
    # Basis 1 keeps only math (0.25 of its mass, renormalised to 1); basis 2 has no present domain.
    a_basis = np.array([0.5 * 1.0 + 0.5 * -1.0, -1.0])
    w_present = (1 / 3) * np.exp(a_basis)
    w_present *= (2 / 3) / w_present.sum()
    w = np.append(w_present, 1 / 3)
    assert np.allclose(c.state_dict()["w"], w, rtol=1e-12, atol=0)


def test_dga_basis_errors_name_the_knob():
    with pytest.raises(MixtureConfigError, match=r"mixture\.basis\.web names unknown domains \['law'\]"):
        build_controller(
            "dga", DOMAINS, {"target": "target:t", "basis": {"web": {"code": 1, "math": 1, "books": 1, "law": 1}}}
        )
    with pytest.raises(MixtureConfigError, match=r"mixture\.basis\[1\] has 2 entries"):
        build_controller("dga", DOMAINS, {"target": "target:t", "basis": [[1, 1, 1], [1, 1]]})
    with pytest.raises(MixtureConfigError, match=r"mixture\.basis gives no weight to domains \['books'\]"):
        build_controller("dga", DOMAINS, {"target": "target:t", "basis": [[1, 1, 0]]})


# ---------------------------------------------------------------- DoReMi


def test_doremi_update_by_hand():
    eta, c_eps = 1.0, 1e-3
    c = build_controller("doremi", DOMAINS, {"reference": "runs/ref"})
    assert c.request(0) == Request(ref_model_loss=True) and c.request(5).align == ()
    c.observe(stats(excess_loss=[0.5, 0.0, 1.2]))
    a1 = U * np.exp(eta * np.array([0.5, 0.0, 1.2]))
    a1 = (1 - c_eps) * a1 / a1.sum() + c_eps / 3
    assert np.array_equal(c.weights, U) and np.allclose(c.loss_weights, 3 * a1, rtol=1e-12, atol=0)
    c.observe(stats(excess_loss=[0.1, 2.0, 0.0]))
    a2 = a1 * np.exp(eta * np.array([0.1, 2.0, 0.0]))
    a2 = (1 - c_eps) * a2 / a2.sum() + c_eps / 3
    assert np.allclose(c.loss_weights, 3 * a2, rtol=1e-12, atol=0)
    # The official code's running average starts at α₀ with a count of 1; the paper's formula leaves it out.
    assert np.allclose(c.average_weights, (U + a1 + a2) / 3, rtol=1e-12, atol=0)
    paper = build_controller("doremi", DOMAINS, {"reference": "runs/ref", "average_initial": False})
    for excess in ([0.5, 0.0, 1.2], [0.1, 2.0, 0.0]):
        paper.observe(stats(excess_loss=excess))
    assert np.allclose(paper.average_weights, (a1 + a2) / 2, rtol=1e-12, atol=0)


def test_doremi_resample_and_eta():
    c = build_controller(
        "doremi", DOMAINS, {"reference": "runs/ref", "mode": "resample", "reweight_eta": 0.1, "reweight_eps": 0.0}
    )
    c.observe(stats(excess_loss=[3.0, 0.0, 0.0]))
    expected = softmax(0.1 * np.array([3.0, 0.0, 0.0]))
    assert np.allclose(c.weights, expected, rtol=1e-12, atol=0) and np.array_equal(c.loss_weights, np.ones(3))


def test_doremi_absent_domain():
    c_eps = 1e-3
    c = build_controller("doremi", DOMAINS, {"reference": "runs/ref"})
    c.observe(stats(excess_loss=[1.0, NAN, 0.0], tokens=[10, 0, 10], loss=[1.0, NAN, 1.0]))
    present = (1 / 3) * np.exp([1.0, 0.0])
    present *= (2 / 3) / present.sum()  # the step renormalises among present domains: math keeps 1/3
    expected = (1 - c_eps) * np.array([present[0], 1 / 3, present[1]]) + c_eps / 3
    assert np.allclose(c.loss_weights / 3, expected, rtol=1e-12, atol=0)
    assert c.loss_weights[1] / 3 == pytest.approx(1 / 3, abs=1e-15)  # (1 - c)/3 + c/3


# ---------------------------------------------------------------- ODM


def test_odm_exploration_schedule_and_policy_by_hand():
    K, gamma = 3, 0.9
    eps = {
        0: 1 / 3,
        1: 1 / 3,
        2: 1 / 3,
        3: 1 / 3,
        4: math.sqrt(math.log(3) / 12),
        5: math.sqrt(math.log(3) / 15),
        6: math.sqrt(math.log(3) / 18),
    }
    # t = 1..3: sqrt(ln 3 / 3t) = 0.605, 0.428, 0.349 are all above 1/K; t = 4: 0.3026 < 1/3.
    assert eps[4] == pytest.approx(0.302574, abs=1e-6) and eps[5] == pytest.approx(0.270630, abs=1e-6)
    c = build_controller("odm", DOMAINS, {})
    assert c.request(0) == Request() and np.allclose(c.weights, U)
    tokens, loss = np.array([200.0, 100.0, 100.0]), np.array([2.0, 3.0, 4.0])
    R, pi = np.zeros(3), U.copy()
    for t in range(1, 6):
        c.observe(stats(step=t - 1, tokens=tokens, loss=loss))
        r_hat = K * (tokens / tokens.sum()) / pi * loss
        R = gamma * R + (1 - gamma) * r_hat
        # Round t + 1: π = (1 - K ε_{t+1}) softmax(ε_t R) + ε_{t+1}
        pi = (1 - K * eps[t + 1]) * np.exp(eps[t] * R) / np.exp(eps[t] * R).sum() + eps[t + 1]
        assert np.allclose(c.weights, pi, rtol=1e-12, atol=0), t
        if t + 1 <= 3:
            assert np.allclose(c.weights, U)  # K ε = 1: the softmax term has weight 0
    assert not np.allclose(c.weights, U)
    assert np.allclose(c.state_dict()["reward"], R, rtol=1e-12, atol=0) and c.state_dict()["round"] == 6


def test_odm_absent_domain_keeps_its_reward_and_warmup():
    c = build_controller("odm", DOMAINS, {"warmup_steps": 2})
    before = c.state_dict()
    c.observe(stats(step=0))
    c.observe(stats(step=1))
    assert same_state(c.state_dict(), before)
    c.observe(stats(step=2, tokens=[30, 0, 10], loss=[1.0, NAN, 5.0]))
    r_hat = 3 * np.array([0.75, 0.25]) / (1 / 3) * np.array([1.0, 5.0])
    assert np.allclose(c.state_dict()["reward"], [0.1 * r_hat[0], 0.0, 0.1 * r_hat[1]], rtol=1e-12, atol=0)


def test_odm_importance_weights_use_the_distribution_the_batch_came_from():
    c = build_controller("odm", DOMAINS, {"gamma": 0.5})
    drawn = np.array([0.5, 0.3, 0.2])  # an earlier shard's policy, not the controller's current one
    tokens, loss = np.array([50.0, 30.0, 20.0]), np.array([2.0, 3.0, 4.0])
    c.observe(stats(step=0, tokens=tokens, loss=loss, sample_weights=drawn))
    expected = 0.5 * 3 * (tokens / 100) / drawn * loss  # K * share / pi_drawn * L, then (1 - gamma)
    assert np.allclose(c.state_dict()["reward"], expected, rtol=1e-12, atol=0)


def test_odm_softmax_is_stable():
    c = build_controller("odm", DOMAINS, {"gamma": 0.0})
    for step in range(50):
        c.observe(stats(step=step, loss=[1e6, 1.0, 1.0]))
    assert np.all(np.isfinite(c.weights)) and c.weights.sum() == pytest.approx(1.0)
    assert c.weights[0] > c.weights[1]


# ---------------------------------------------------------------- every controller

CONTROLLERS = {
    "doge": {},
    "doge_resample": {"mode": "resample", "reweight_eps": 0.05, "floor": 0.1, "burn_in": 2},
    "doge_ood": {"target": "target:t"},
    "dga": {"target": "target:t", "update_every": 2},
    "dga_basis": {
        "target": "target:t",
        "update_every": 1,
        "basis": [[1, 1, 0], [0, 1, 1], [1, 0, 0]],
        "source": "in_batch",
    },
    "doremi": {"reference": "runs/ref"},
    "doremi_resample": {"reference": "runs/ref", "mode": "resample"},
    "odm": {},
    "pike": {"update_every": 2},
    "pike_balanced": {"update_every": 1, "tau": 2.0, "floor": 0.1, "source": "in_batch"},
    "pike_raw": {"update_every": 3, "normalise": "none", "zeta2": 0.5, "source": "probe_batch"},
    "rnb": {"round_steps": 2},
    "rnb_all": {"round_steps": 3, "params": "all", "lam": 2.0, "floor": 0.1},
}
NEEDS = {
    "doge": ("loss", "align", "norms", "ref_norms", "lr"),
    "dga": ("loss", "align", "norms", "ref_norms", "lr"),
    "doremi": ("loss", "excess_loss", "lr"),
    "odm": ("loss", "lr"),
    "pike": ("loss", "norms", "grad_var", "lr"),
    "rnb": ("loss", "gram", "lr"),
}


def make(key):
    return build_controller(key.split("_")[0], DOMAINS, CONTROLLERS[key])


def random_stats(step: int, rng: np.random.Generator, *, everyone: bool = False) -> DomainStats:
    """Finite statistics for every field; some domains absent (NaN rows) unless ``everyone``."""
    tokens = np.full(3, 64.0) if everyone else rng.integers(0, 4, size=3) * 64.0
    tokens[rng.integers(3)] += 64  # at least one domain present
    present = tokens > 0

    def rows(x):
        return np.where(present.reshape(-1, *[1] * (x.ndim - 1)), x, NAN)

    out = DomainStats(
        step=step,
        lr=float(rng.uniform(1e-4, 1e-2)),
        loss=rows(rng.uniform(1, 5, 3)),
        tokens=tokens,
        align=rows(rng.normal(0, 3, (3, 1))),
        ref_norms=np.array([rng.uniform(0.1, 8)]),
        norms=rows(rng.uniform(0.1, 10, 3)),
        excess_loss=rows(rng.uniform(0, 2, 3)),
    )
    # PiKE's variances and batch size, R&B's Gram (NaN rows and columns for absent domains)
    out.grad_var = rows(rng.uniform(0.1, 50, 3))
    vectors = rng.normal(0, 1, (3, 4))
    out.gram = np.where(np.outer(present, present), vectors @ vectors.T, NAN)
    out.extra = {"batch_sequences": 8, "sequences": rng.integers(1, 9, 3).astype(float)}
    return out


def drive(c, steps, rng, start=0):
    """What the trainer does each step: request, observe."""
    for step in range(start, start + steps):
        c.request(step)
        c.observe(random_stats(step, rng))


def learned(c) -> np.ndarray:
    """The controller's distribution: α for the LearnedMixture controllers, the policy for ODM."""
    return getattr(c, "mixture", c.weights)


@pytest.mark.parametrize("key", CONTROLLERS)
def test_weights_stay_on_the_simplex(key):
    c, rng = make(key), np.random.default_rng(1)
    for step in range(60):
        c.observe(random_stats(step, rng))
        for w in (c.weights, c.average_weights, learned(c)):
            assert np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(c.loss_weights >= 0) and c.loss_weights.sum() == pytest.approx(3.0, abs=1e-12)
    assert not np.allclose(learned(c), U)


@pytest.mark.parametrize("key", CONTROLLERS)
def test_non_finite_step_changes_nothing(key):
    rng = np.random.default_rng(2)
    for field in NEEDS[key.split("_")[0]]:
        c = make(key)
        drive(c, 5, rng)
        good = random_stats(5, rng, everyone=True)  # step 5 updates every controller here
        good.align = np.abs(good.align) + 0.5  # positive scores: DoGE's [0, 5 η] clip cannot zero them all
        bad = copy.deepcopy(good)
        if field == "lr":
            bad.lr = NAN
        else:
            # an infinite σ² (a NaN one means too few pieces: PiKE leaves that domain out instead)
            getattr(bad, field)[0] = np.inf if field in ("loss", "grad_var") else NAN
        before, weights, loss_weights = c.state_dict(), c.weights.copy(), c.loss_weights.copy()
        c.observe(bad)
        assert same_state(c.state_dict(), before), field
        assert np.array_equal(c.weights, weights) and np.array_equal(c.loss_weights, loss_weights), field
        c.observe(good)  # the same step with finite statistics does update
        assert not same_state(c.state_dict(), before), field


@pytest.mark.parametrize("key", CONTROLLERS)
def test_state_dict_round_trip_is_bit_exact(key):
    rng = np.random.default_rng(3)
    a = make(key)
    drive(a, 7, rng)
    state = a.state_dict()
    for v in state.values():
        assert isinstance(v, (np.ndarray, int, float, list))
    b = make(key)
    b.load_state_dict(state)
    assert same_state(b.state_dict(), state)
    later = rng.bit_generator.state
    drive(a, 9, rng, start=7)
    rng.bit_generator.state = later
    drive(b, 9, rng, start=7)
    assert same_state(a.state_dict(), b.state_dict())
    for attr in ("weights", "loss_weights", "average_weights"):
        assert np.array_equal(getattr(a, attr), getattr(b, attr)), attr


@pytest.mark.parametrize(
    "name, values, knob",
    [
        ("doge", {"mu": 0}, "mixture.mu"),
        ("doge", {"max_grad_norm": -1.0}, "mixture.max_grad_norm"),
        ("doge", {"dw_min": 2.0, "dw_max": 1.0}, "mixture.dw_max"),
        ("doge", {"reweight_eps": 1.0}, "mixture.reweight_eps"),
        ("doge", {"mode": "mixed"}, "mixture.mode"),
        ("doge", {"target": "humaneval"}, "mixture.target"),
        ("doge", {"burn_in": -3}, "mixture.burn_in"),
        ("doge", {"floor": -0.1}, "mixture.floor"),
        ("doge", {"ref_sequences": 0}, "mixture.ref_sequences"),
        ("dga", {}, "mixture.target"),
        ("dga", {"target": "heldout"}, "mixture.target"),
        ("dga", {"target": "target:t", "update_every": 0}, "mixture.update_every"),
        ("dga", {"target": "target:t", "mu": -1}, "mixture.mu"),
        ("dga", {"target": "target:t", "ema": 1.0}, "mixture.ema"),
        ("dga", {"target": "target:t", "max_grad_norm": 0}, "mixture.max_grad_norm"),
        ("dga", {"target": "target:t", "lr_coupling": "yes"}, "mixture.lr_coupling"),
        ("dga", {"target": "target:t", "source": "probe"}, "mixture.source"),
        ("dga", {"target": "target:t", "probe_sequences": 0}, "mixture.probe_sequences"),
        ("dga", {"target": "target:t", "target_sequences": 2.5}, "mixture.target_sequences"),
        ("dga", {"target": "target:t", "floor": 2}, "mixture.floor"),
        ("dga", {"target": "target:t", "basis": []}, "mixture.basis"),
        ("doremi", {}, "mixture.reference"),
        ("doremi", {"reference": "  "}, "mixture.reference"),
        ("doremi", {"reference": "r", "reweight_eta": 0}, "mixture.reweight_eta"),
        ("doremi", {"reference": "r", "reweight_eps": -1e-3}, "mixture.reweight_eps"),
        ("doremi", {"reference": "r", "mode": "x"}, "mixture.mode"),
        ("odm", {"gamma": 1.0}, "mixture.gamma"),
        ("odm", {"warmup_steps": -1}, "mixture.warmup_steps"),
        ("odm", {"epsilon": 0.1}, "mixture.epsilon"),
        ("pike", {"update_every": 0}, "mixture.update_every"),
        ("pike", {"update_every": 2.5}, "mixture.update_every"),
        ("pike", {"zeta1": -1.0}, "mixture.zeta1"),
        ("pike", {"zeta2": "big"}, "mixture.zeta2"),
        ("pike", {"normalise": "max"}, "mixture.normalise"),
        ("pike", {"tau": -0.5}, "mixture.tau"),
        ("pike", {"tau": float("inf")}, "mixture.tau"),
        ("pike", {"floor": 1.5}, "mixture.floor"),
        ("pike", {"source": "probe"}, "mixture.source"),
        ("pike", {"probe_sequences": 0}, "mixture.probe_sequences"),
        ("rnb", {"round_steps": 0}, "mixture.round_steps"),
        ("rnb", {"round_steps": True}, "mixture.round_steps"),
        ("rnb", {"lam": 0}, "mixture.lam"),
        ("rnb", {"params": "last"}, "mixture.params"),
        ("rnb", {"floor": -0.1}, "mixture.floor"),
    ],
)
def test_config_errors_name_the_knob(name, values, knob):
    with pytest.raises(MixtureConfigError, match=knob.replace(".", r"\.")):
        build_controller(name, DOMAINS, values)


def test_missing_requested_statistic_is_an_error():
    c = build_controller("doge", DOMAINS, {})
    with pytest.raises(ValueError, match=r"DomainStats\.align"):
        c.observe(stats())


def test_mixtures_stay_pure():
    code = (
        "import sys, mixtures; bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
