"""PiKE and R&B against updates computed by hand from controllers.md §8.5 and §8.6.

Every expected value is written out with numpy from the equations, never by calling the
controllers' own helpers, on K = 3 (or 4) domains with fixed statistics. Simplex, non-finite steps,
the state_dict round trip and config errors are also covered by the invariants of
test_controllers.py, which run over both.
"""

import copy
from pathlib import Path

import numpy as np
import pytest

from mixtures import Request, build_controller
from mixtures.base import DomainStats

DOMAINS = ["code", "math", "books"]
U = np.full(3, 1 / 3)
NAN = float("nan")
CONF = Path(__file__).resolve().parents[1] / "trainer" / "conf"


def stats(step=9, lr=1e-3, loss=(2.0, 3.0, 4.0), tokens=(100, 100, 100), batch=4, sequences=None, **kw) -> DomainStats:
    arrays = {k: None if v is None else np.asarray(v, dtype=np.float64) for k, v in kw.items()}
    return DomainStats(
        step=step,
        lr=lr,
        loss=np.asarray(loss, dtype=np.float64),
        tokens=np.asarray(tokens, dtype=np.float64),
        extra=({} if batch is None else {"batch_sequences": batch})
        | ({} if sequences is None else {"sequences": np.asarray(sequences, dtype=np.float64)}),
        **arrays,
    )


PAPER = {"zeta1": 1.0, "zeta2": 1.0, "debias": False}
"""The bare equation of the paper (unit constants, the measured squared norm), which the hand
computations below write out; the project defaults are tested apart."""


def pike(values: dict):
    return build_controller("pike", DOMAINS, {**PAPER, **values})


def softmax(z):
    e = np.exp(z - np.max(z))
    return e / e.sum()


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


# ---------------------------------------------------------------- PiKE


def test_pike_requests_only_on_update_steps():
    c = pike({})
    assert c.adaptive and not c.accumulates
    for step in (0, 1, 8, 10, 18):
        assert c.request(step) == Request()
    for step in (9, 19):
        assert c.request(step) == Request(norms=True, grad_var=True, source="auto", probe_sequences=16)
    custom = pike({"update_every": 3, "source": "in_batch", "probe_sequences": 4})
    assert [s for s in range(9) if custom.request(s).grad_var] == [2, 5, 8]
    assert custom.request(5) == Request(norms=True, grad_var=True, source="in_batch", probe_sequences=4)


def test_pike_between_updates_nothing_changes():
    c = pike({})
    before = c.state_dict()
    c.observe(stats(step=3))  # no gradient statistics on a non-update step: no error either
    c.observe(stats(step=4, norms=[9.0, 1.0, 1.0], grad_var=[1.0, 1.0, 1.0]))
    assert same_state(c.state_dict(), before) and np.array_equal(c.weights, U)


def test_pike_update_by_hand_mean_normalised():
    c = pike({"zeta1": 2.0, "zeta2": 0.5})
    c.observe(stats(norms=[1.0, 2.0, 3.0], grad_var=[8.0, 4.0, 20.0], batch=4))
    a = np.array([1.0, 4.0, 9.0])  # ‖∇L_k‖²
    noise = np.array([8.0, 4.0, 20.0]) / (2 * 4)  # σ_k²/(2b) = 1, 0.5, 2.5
    step = 2.0 * a / (14 / 3) - 0.5 * noise / (4 / 3)  # each term over its mean across the domains
    w = U * np.exp(step) / (U * np.exp(step)).sum()
    assert np.allclose(c.weights, w, rtol=1e-12, atol=0) and np.allclose(c.mixture, w, rtol=1e-12, atol=0)
    assert np.array_equal(c.loss_weights, np.ones(3))  # tau = 0: plain PiKE, no loss weights
    assert np.allclose(c.average_weights, w, rtol=1e-12, atol=0)
    # The batch size cancels under normalise="mean"; a second update moves from w, not from uniform.
    c.observe(stats(step=19, norms=[2.0, 2.0, 1.0], grad_var=[1.0, 3.0, 2.0], batch=64))
    step2 = 2.0 * np.array([4.0, 4.0, 1.0]) / 3 - 0.5 * np.array([1.0, 3.0, 2.0]) / 2
    w2 = w * np.exp(step2) / (w * np.exp(step2)).sum()
    assert np.allclose(c.weights, w2, rtol=1e-12, atol=0)
    assert np.allclose(c.average_weights, (w + w2) / 2, rtol=1e-12, atol=0)


def test_pike_update_by_hand_raw_constants():
    c = pike({"normalise": "none", "zeta1": 10.0, "zeta2": 2.0, "floor": 0.3})
    c.observe(stats(norms=[0.1, 0.2, 0.3], grad_var=[0.8, 0.4, 2.0], batch=4))
    step = 10.0 * np.array([0.01, 0.04, 0.09]) - 2.0 * np.array([0.8, 0.4, 2.0]) / 8
    w = softmax(np.log(U) + step)
    assert np.allclose(c.mixture, 0.7 * w + 0.1, rtol=1e-12, atol=0)
    assert np.allclose(c.weights, 0.7 * w + 0.1, rtol=1e-12, atol=0)  # resample: the sampler draws the mixture
    assert np.allclose(np.exp(c.state_dict()["logw"]), w, rtol=1e-12, atol=0)  # the floor is not in the state


def test_balanced_pike_by_hand():
    tau = 1.5
    c = pike({"tau": tau})
    assert np.array_equal(c.loss_weights, np.ones(3))
    loss = np.array([2.0, 3.0, 4.0])
    c.observe(stats(loss=loss, norms=[1.0, 2.0, 3.0], grad_var=[8.0, 4.0, 20.0], batch=4))
    y = 3 * np.exp(tau * loss) / np.exp(tau * loss).sum()  # K·softmax(τL)
    a = y**2 * np.array([1.0, 4.0, 9.0])
    noise = y**2 * np.array([1.0, 0.5, 2.5])
    step = a / a.mean() - noise / noise.mean()
    w = softmax(np.log(U) + step)
    assert np.allclose(c.loss_weights, y, rtol=1e-12, atol=0) and c.loss_weights.sum() == pytest.approx(3.0)
    assert np.allclose(c.weights, w, rtol=1e-12, atol=0)
    # The next update re-tilts from the new losses (no compounding of y).
    loss2 = np.array([3.0, 1.0, 2.0])
    c.observe(stats(step=19, loss=loss2, norms=[1.0, 1.0, 1.0], grad_var=[1.0, 1.0, 1.0]))
    y2 = 3 * softmax(tau * loss2)
    step2 = y2**2 / (y2**2).mean() - y2**2 / (y2**2).mean()  # equal norms and variances: the terms cancel
    assert np.allclose(c.loss_weights, y2, rtol=1e-12, atol=0)
    assert np.allclose(c.weights, softmax(np.log(w) + step2), rtol=1e-12, atol=0)


def test_balanced_pike_raw_constants_carry_y_squared():
    tau = 0.5
    c = pike({"tau": tau, "normalise": "none"})
    loss = np.array([1.0, 2.0, 4.0])
    c.observe(stats(loss=loss, norms=[0.5, 0.5, 0.5], grad_var=[0.4, 0.8, 1.6], batch=2))
    y = 3 * softmax(tau * loss)
    step = y**2 * 0.25 - y**2 * np.array([0.4, 0.8, 1.6]) / 4
    assert np.allclose(c.weights, softmax(np.log(U) + step), rtol=1e-12, atol=0)
    assert np.allclose(c.loss_weights, y, rtol=1e-12, atol=0)


def test_pike_absent_domain_keeps_its_weight_and_y():
    tau = 1.0
    c = pike({"source": "in_batch", "tau": tau})
    c.observe(
        stats(
            loss=[1.0, 2.0, NAN],
            tokens=[50, 50, 0],
            norms=[1.0, 3.0, NAN],
            grad_var=[4.0, 2.0, NAN],
            batch=4,
        )
    )
    y = np.ones(3)
    y[:2] = 2 * softmax(tau * np.array([1.0, 2.0]))  # the present domains' y mass (2), re-tilted
    a = y[:2] ** 2 * np.array([1.0, 9.0])
    noise = y[:2] ** 2 * np.array([4.0, 2.0]) / 8
    step = a / a.mean() - noise / noise.mean()  # means over the present domains only
    present = (1 / 3) * np.exp(step)
    present *= (2 / 3) / present.sum()  # renormalised within the present domains' mass
    assert np.allclose(c.weights, [present[0], present[1], 1 / 3], rtol=1e-12, atol=0)
    assert c.weights[2] == pytest.approx(1 / 3, abs=1e-15)
    assert np.allclose(c.loss_weights, y, rtol=1e-12, atol=0) and c.loss_weights[2] == 1.0


def test_pike_probe_batch_scores_a_domain_outside_the_batch():
    """With probe batches a domain the sampler left out still has norms and variances: it takes
    part in the PiKE step; its y (no training loss this step) is kept."""
    c = pike({"source": "probe_batch", "tau": 1.0})
    c.observe(stats(loss=[1.0, 3.0, NAN], tokens=[50, 50, 0], norms=[1.0, 1.0, 2.0], grad_var=[1.0, 1.0, 1.0]))
    y = np.array([*(2 * softmax(np.array([1.0, 3.0]))), 1.0])
    a, noise = y**2 * np.array([1.0, 1.0, 4.0]), y**2
    step = a / a.mean() - noise / noise.mean()
    assert np.allclose(c.weights, softmax(np.log(U) + step), rtol=1e-12, atol=0)
    assert np.allclose(c.loss_weights, y, rtol=1e-12, atol=0)
    # A domain whose rows are all NaN is absent even with probe batches.
    d = pike({"source": "probe_batch"})
    d.observe(stats(norms=[1.0, 2.0, NAN], grad_var=[1.0, 1.0, NAN]))
    assert d.weights[2] == pytest.approx(1 / 3, abs=1e-15) and d.weights[1] > d.weights[0]


def test_pike_nan_variance_domain_sits_out_the_update():
    """σ_k² NaN (fewer than two pieces) with a finite norm: that domain is absent for the update,
    the others still update (means over them alone)."""
    c = pike({})
    c.observe(stats(norms=[1.0, 5.0, 2.0], grad_var=[2.0, NAN, 6.0], batch=4))
    a, noise = np.array([1.0, 4.0]), np.array([2.0, 6.0]) / 8
    step = a / a.mean() - noise / noise.mean()
    present = (1 / 3) * np.exp(step)
    present *= (2 / 3) / present.sum()
    assert np.allclose(c.weights, [present[0], 1 / 3, present[1]], rtol=1e-12, atol=0)
    assert c.weights[1] == pytest.approx(1 / 3, abs=1e-15)
    # Every variance unknown: no update at all (and nothing recorded in the average).
    d = pike({})
    before = d.state_dict()
    d.observe(stats(norms=[1.0, 5.0, 2.0], grad_var=[NAN, NAN, NAN]))
    assert same_state(d.state_dict(), before)


@pytest.mark.parametrize(
    "change",
    [
        {"grad_var": [1.0, np.inf, 1.0]},
        {"grad_var": [1.0, -np.inf, 1.0]},
        {"norms": [1.0, NAN, 2.0]},  # a NaN norm with a known variance is not an absent domain
        {"norms": [1.0, np.inf, 2.0]},
        {"loss": [2.0, np.inf, 4.0]},
        {"lr": NAN},
        {"norms": [1.0, 1e200, 2.0]},  # ‖g‖² overflows
    ],
)
def test_pike_non_finite_step_changes_nothing(change):
    c = pike({"tau": 1.0})
    c.observe(stats(norms=[1.0, 2.0, 3.0], grad_var=[1.0, 2.0, 3.0]))
    before, weights, lw = c.state_dict(), c.weights.copy(), c.loss_weights.copy()
    good = dict(step=19, norms=[1.0, 2.0, 2.0], grad_var=[1.0, 1.0, 3.0])
    c.observe(stats(**{**good, **change}))
    assert same_state(c.state_dict(), before)
    assert np.array_equal(c.weights, weights) and np.array_equal(c.loss_weights, lw)
    c.observe(stats(**good))
    assert not same_state(c.state_dict(), before)


def test_pike_zero_normaliser_drops_that_term():
    c = pike({})
    c.observe(stats(norms=[1.0, 2.0, 3.0], grad_var=[0.0, 0.0, 0.0]))  # no noise at all
    a = np.array([1.0, 4.0, 9.0])
    assert np.allclose(c.weights, softmax(a / a.mean()), rtol=1e-12, atol=0)
    d = pike({})
    d.observe(stats(norms=[0.0, 0.0, 0.0], grad_var=[1.0, 2.0, 3.0]))  # a zero gradient everywhere
    noise = np.array([1.0, 2.0, 3.0]) / 8
    assert np.allclose(d.weights, softmax(-noise / noise.mean()), rtol=1e-12, atol=0)


def test_pike_needs_the_batch_size_and_its_statistics():
    c = pike({})
    with pytest.raises(ValueError, match=r"batch_sequences"):
        c.observe(stats(norms=[1.0, 1.0, 1.0], grad_var=[1.0, 1.0, 1.0], batch=None))
    with pytest.raises(ValueError, match=r"batch_sequences"):
        c.observe(stats(norms=[1.0, 1.0, 1.0], grad_var=[1.0, 1.0, 1.0], batch=0))
    c.observe(stats(norms=[1.0, 1.0, 1.0], grad_var=[1.0, 1.0, 1.0], batch=np.int64(8)))  # any real number
    with pytest.raises(ValueError, match=r"DomainStats\.grad_var"):
        c.observe(stats(norms=[1.0, 1.0, 1.0]))


def test_pike_noisy_domain_loses_weight():
    """Recovery: equal gradient norms, one domain ten times noisier, statistics jittered per update.
    The noisy domain's weight falls update after update; without the noise term (ζ2 = 0) it
    would not."""
    rng = np.random.default_rng(0)
    c = pike({})
    ablated = pike({"zeta2": 0.0})
    trajectory = []
    for t in range(30):
        s = stats(
            step=10 * t + 9,
            norms=1.0 + 0.02 * rng.standard_normal(3),
            grad_var=np.array([1.0, 1.0, 10.0]) * (1.0 + 0.2 * rng.uniform(-1, 1, 3)),
            batch=16,
        )
        c.observe(s)
        ablated.observe(s)
        trajectory.append(c.weights[2])
    assert trajectory[-1] < 0.01 and all(later < earlier for earlier, later in zip(trajectory, trajectory[1:]))
    assert c.weights[0] == pytest.approx(c.weights[1], rel=0.5)
    assert ablated.weights[2] > 0.2


def test_pike_high_norm_domain_gains_weight():
    c = pike({})
    for t in range(10):
        c.observe(stats(step=10 * t + 9, norms=[1.0, 1.0, 2.0], grad_var=[1.0, 1.0, 1.0]))
    assert c.weights[2] > 0.9


# ---------------------------------------------------------------- R&B

G = np.array([[4.0, 1.0, 0.0], [1.0, 2.0, -1.0], [0.0, -1.0, 3.0]])


def test_rnb_requests_a_round():
    c = build_controller("rnb", DOMAINS, {})
    assert c.adaptive and c.accumulates
    for step in range(9):
        assert c.request(step) == Request(gram=True, params="final", source="in_batch", accumulate=True)
    assert c.request(9) == Request(gram=True, params="final", source="in_batch", accumulate=False)
    assert c.request(10).accumulate and not c.request(19).accumulate
    three = build_controller("rnb", DOMAINS, {"round_steps": 3, "params": "all"})
    assert [s for s in range(9) if not three.request(s).accumulate] == [2, 5, 8]
    assert three.request(0).params == "all"
    one = build_controller("rnb", DOMAINS, {"round_steps": 1})
    assert not one.accumulates and not any(one.request(s).accumulate for s in range(5))


def test_rnb_update_by_hand():
    lam = 5.0  # the default
    c = build_controller("rnb", DOMAINS, {})
    before = c.state_dict()
    c.observe(stats(step=4, gram=G))  # not a round's last step: ignored
    c.observe(stats(step=5))  # accumulating steps carry no Gram
    assert same_state(c.state_dict(), before)
    c.observe(stats(step=9, gram=G))
    v = G @ U  # 5/3, 2/3, 2/3
    p = softmax(lam * v / np.sqrt(np.sum(v**2)))
    assert np.allclose(c.weights, p, rtol=1e-12, atol=0) and np.allclose(c.mixture, p, rtol=1e-12, atol=0)
    assert np.array_equal(c.loss_weights, np.ones(3))
    # The next round overwrites p from G p_t with the new p_t.
    G2 = np.array([[1.0, 0.5, 0.5], [0.5, 1.0, 0.0], [0.5, 0.0, 2.0]])
    c.observe(stats(step=19, gram=G2))
    v2 = G2 @ p
    p2 = np.exp(lam * v2 / np.linalg.norm(v2)) / np.exp(lam * v2 / np.linalg.norm(v2)).sum()
    assert np.allclose(c.weights, p2, rtol=1e-12, atol=0)
    assert np.allclose(c.average_weights, (p + p2) / 2, rtol=1e-12, atol=0)


def test_rnb_lam_and_floor():
    c = build_controller("rnb", DOMAINS, {"lam": 1.0, "floor": 0.3, "round_steps": 2})
    c.observe(stats(step=1, gram=G))
    v = G @ U
    p = softmax(v / np.linalg.norm(v))
    assert np.allclose(c.weights, 0.7 * p + 0.1, rtol=1e-12, atol=0)
    assert np.allclose(c.state_dict()["p"], p, rtol=1e-12, atol=0)  # the floor is not in the state


def test_rnb_absent_domain_keeps_its_weight():
    gram = G.copy()
    gram[2, :] = gram[:, 2] = NAN  # absent from the whole round
    c = build_controller("rnb", DOMAINS, {})
    c.observe(stats(step=9, gram=gram, loss=[2.0, 3.0, NAN], tokens=[10, 10, 0]))
    v = np.array([[4.0, 1.0], [1.0, 2.0]]) @ np.array([1 / 3, 1 / 3])
    present = (2 / 3) * softmax(5.0 * v / np.linalg.norm(v))
    assert np.allclose(c.weights, [present[0], present[1], 1 / 3], rtol=1e-12, atol=0)
    assert c.weights[2] == pytest.approx(1 / 3, abs=1e-15)
    # In the round but not in its last step's batch: present (its loss is NaN, its Gram row is not).
    d = build_controller("rnb", DOMAINS, {})
    d.observe(stats(step=9, gram=G, loss=[2.0, 3.0, NAN], tokens=[10, 10, 0]))
    v = G @ U
    assert np.allclose(d.weights, softmax(5.0 * v / np.linalg.norm(v)), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "change",
    [
        {"gram": np.where(np.eye(3, k=1, dtype=bool), NAN, G)},  # a NaN entry, not a whole row and column
        {"gram": np.where(np.arange(3)[:, None] == 0, NAN, G)},  # a NaN row with a finite column
        {"gram": np.where(np.eye(3, dtype=bool), np.inf, G)},
        {"gram": np.zeros((3, 3))},  # ‖G p‖ = 0
        {"gram": np.full((3, 3), 1e300)},  # ‖G p‖ overflows
        {"gram": np.full((3, 3), NAN)},  # no domain in the round
        {"loss": [2.0, np.inf, 4.0]},
        {"lr": np.inf},
    ],
)
def test_rnb_non_finite_round_changes_nothing(change):
    c = build_controller("rnb", DOMAINS, {})
    c.observe(stats(step=9, gram=G))
    before, weights = c.state_dict(), c.weights.copy()
    c.observe(stats(**{"step": 19, "gram": G, **change}))
    assert same_state(c.state_dict(), before) and np.array_equal(c.weights, weights)
    c.observe(stats(step=19, gram=G * 2 + np.eye(3)))
    assert not same_state(c.state_dict(), before)


def test_rnb_needs_the_gram():
    c = build_controller("rnb", DOMAINS, {})
    with pytest.raises(ValueError, match=r"DomainStats\.gram"):
        c.observe(stats(step=9))


def test_rnb_opposing_domain_loses_weight():
    """Recovery: three domains whose gradients share a direction, a fourth that opposes it (negative
    Gram entries with the others); per-domain mean gradients jittered every round."""
    rng = np.random.default_rng(0)
    domains = ["a", "b", "c", "d"]
    c = build_controller("rnb", domains, {"round_steps": 5})
    e = np.zeros(16)
    e[0] = 1.0
    for t in range(20):
        g = np.stack([e, e, e, -e]) + 0.3 * rng.standard_normal((4, 16))
        gram = g @ g.T
        assert np.all(gram[3, :3] < 0)
        c.observe(stats(step=5 * t + 4, loss=[1.0] * 4, tokens=[10] * 4, gram=gram))
        assert c.weights[3] < c.weights[:3].min()
    assert c.weights[3] < 0.5 * c.weights[:3].min() and c.weights[3] < 0.05


# ---------------------------------------------------------------- both


@pytest.mark.parametrize(
    "name, values, make",
    [
        (
            "pike",
            {"tau": 1.0, "update_every": 2},
            lambda s, rng: stats(
                step=s,
                loss=rng.uniform(1, 4, 3),
                norms=rng.uniform(0.5, 2, 3),
                grad_var=rng.uniform(0.5, 5, 3),
                sequences=rng.integers(1, 9, 3),
            ),
        ),
        (
            "rnb",
            {"round_steps": 3},
            lambda s, rng: stats(step=s, gram=(lambda v: v @ v.T)(rng.standard_normal((3, 5)))),
        ),
    ],
)
def test_state_dict_round_trip_mid_run(name, values, make):
    rng = np.random.default_rng(4)
    a = build_controller(name, DOMAINS, values)
    for s in range(7):  # mid-round for R&B, between updates for PiKE
        a.observe(make(s, rng))
    state = copy.deepcopy(a.state_dict())
    b = build_controller(name, DOMAINS, values)
    b.load_state_dict(state)
    assert same_state(b.state_dict(), state)
    for s in range(7, 20):
        x = make(s, rng)
        a.observe(x)
        b.observe(copy.deepcopy(x))
        assert same_state(a.state_dict(), b.state_dict())
        for attr in ("weights", "loss_weights", "average_weights", "mixture"):
            assert np.array_equal(getattr(a, attr), getattr(b, attr)), attr
    assert a.state_dict()["count"] > state["count"]


@pytest.mark.parametrize("name", ["pike", "rnb"])
def test_hydra_config_file_selects_the_defaults(name):
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mixtures.base import REGISTRY
    from trainer import schema

    schema.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[f"mixture={name}", "run.name=x"])
    mixture = OmegaConf.to_container(cfg, resolve=True)["mixture"]
    defaults = {f.name: f.default for f in dataclasses.fields(REGISTRY[name].Config)}
    assert mixture == {**defaults, "name": name}
    build_controller(name, DOMAINS, {k: v for k, v in mixture.items() if k != "name"})


def test_pike_defaults_debias_the_squared_norm_and_take_tenth_steps():
    """The defaults: ζ1 = ζ2 = 0.1 and a_k = ‖g_k‖² − σ̂_k²/n_k (floored at 0), n_k the sequences
    behind domain k's statistics."""
    c = build_controller("pike", DOMAINS, {})
    assert (c.cfg.zeta1, c.cfg.zeta2, c.cfg.debias) == (0.1, 0.1, True)
    st = stats(norms=[1.0, 2.0, 3.0], grad_var=[8.0, 4.0, 20.0], batch=4)
    st.extra["sequences"] = np.array([4.0, 2.0, 1.0])
    c.observe(st)
    a = np.maximum(np.array([1.0, 4.0, 9.0]) - np.array([8.0, 4.0, 20.0]) / np.array([4.0, 2.0, 1.0]), 0.0)
    assert np.array_equal(a, [0.0, 2.0, 0.0])  # the first and last are all noise
    noise = np.array([1.0, 0.5, 2.5])
    step = 0.1 * a / a.mean() - 0.1 * noise / noise.mean()
    assert np.allclose(c.weights, softmax(np.log(U) + step), rtol=1e-12, atol=0)
    missing = build_controller("pike", DOMAINS, {})
    with pytest.raises(ValueError, match=r"extra\['sequences'\]"):
        missing.observe(stats(norms=[1.0, 2.0, 3.0], grad_var=[8.0, 4.0, 20.0], batch=4))
