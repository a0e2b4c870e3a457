"""Faithfulness of the signals controllers steer on (issue #10 §1): DoGE's held-out reference covers
every domain and comes from held-out *training* data, never from the validation splits evaluation
reports; the sampler never draws that data; a run says when it steers on evaluation data; a step
skipped for non-finite statistics stays out of the exported time average."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_shardset, tiny_config

from trainer import signals as signals_module
from trainer.data.reference import reference_slice
from trainer.loop import Loop
from trainer.signals import evaluation_overlap, mix_counts

SIX = {
    "counting": "counting",
    "abc": "abc",
    "words": "words",
    "noise": "noise",
    "more_words": "words",
    "digits": "counting",
}


@pytest.fixture()
def six_domains(tmp_path):
    return make_shardset(tmp_path / "data", kinds=SIX, n_docs=30)


def _domain_of_rows(loop, rows: np.ndarray) -> list[int]:
    """Which domain's reference slice each row is (every row must be in exactly one)."""
    slices = {}
    for d, (view, idx) in enumerate(zip(loop.data.train, loop.data.reference)):
        for row in view.get(idx):
            slices.setdefault(row.tobytes(), set()).add(d)
    out = []
    for row in rows:
        owners = slices.get(row.tobytes())
        assert owners is not None, "a reference row is not from any domain's held-out training slice"
        assert len(owners) == 1
        out.append(owners.pop())
    return out


def test_mix_counts_cover_every_domain():
    rng = np.random.default_rng(0)
    assert np.array_equal(mix_counts(16, 8, rng), np.full(8, 2))
    for n in (3, 4, 7, 11):
        counts = mix_counts(n, 8, rng)
        assert counts.sum() == n and counts.max() - counts.min() <= 1 and counts.min() == n // 8
    seen = np.zeros(8)
    for _ in range(50):  # fewer sequences than domains: the domains drawn vary, so each enters over steps
        seen += mix_counts(4, 8, rng)
    assert np.all(seen > 0)


def test_doge_reference_covers_every_domain_from_the_heldout_slices(six_domains, tmp_path):
    # global batch 4 and K = 6: b_T = max(4, 4 // 7) = 4 < K, the search's case (batch 8, K = 8)
    loop = Loop(tiny_config(six_domains, tmp_path / "run", mixture={"name": "doge"}))
    K = loop.K
    assert K == 6 and loop.data.reference is not None
    seen = np.zeros(K, dtype=int)
    for step in range(12):
        doms = _domain_of_rows(loop, loop.signals._ref_batch("heldout", 4, step, 0).numpy())
        assert len(set(doms)) == 4  # fewer sequences than domains: distinct domains drawn at random
        seen[doms] += 1
    assert np.all(seen > 0), seen  # on main the first four domains only, every step
    doms = _domain_of_rows(loop, loop.signals._ref_batch("heldout", 2 * K, 0, 0).numpy())
    assert np.array_equal(np.bincount(doms, minlength=K), np.full(K, 2))  # n >= K: equal counts
    # one domain's slice, and the validation rows that evaluation reports are never among them
    valid_rows = {r.tobytes() for d in loop.data.valid.values() for r in d.get(np.arange(len(d)))}
    words = loop.data.domains.index("words")
    for row in loop.signals._ref_batch("heldout:words", 5, 3, 0).numpy():
        assert _domain_of_rows(loop, row[None])[0] == words and row.tobytes() not in valid_rows


def test_the_sampler_never_draws_the_reference_slice(six_domains, tmp_path):
    loop = Loop(
        tiny_config(six_domains, tmp_path / "run", mixture={"name": "doge", "mode": "resample"}, **{"train.steps": 12})
    )
    drawn = [set() for _ in range(loop.K)]
    original = loop._next_shard

    def recording():
        original()
        for d, j in zip(loop.plan.domains, loop.plan.indices):
            drawn[int(d)].add(int(j))

    loop._next_shard = recording
    loop.train()
    for d, name in enumerate(loop.data.domains):
        held = set(reference_slice(name, int(loop.data.train_samples[d]), loop.cfg.data.reference_fraction).tolist())
        assert held and drawn[d] and not (drawn[d] & held)
    assert loop.fingerprint["data"]["reference_fraction"] == loop.cfg.data.reference_fraction
    static = Loop(tiny_config(six_domains, tmp_path / "static"))
    assert static.data.reference is None and static.sampler.pools is None  # static runs draw every sample


def test_steering_on_evaluation_data_is_said(six_domains, tmp_path, capsys):
    loop = Loop(tiny_config(six_domains, tmp_path / "run", mixture={"name": "dga", "target": "target:wordy"}))
    assert loop.steers_on_eval == []  # the target's train split steers, its valid split is reported
    one_split = dict(loop.data.targets)
    one_split["wordy"] = {"valid": one_split["wordy"]["valid"]}
    data = type(loop.data)(**{**loop.data.__dict__, "targets": one_split})
    assert evaluation_overlap(["target:wordy", "valid:abc", "heldout:abc"], data) == [
        "target:wordy (the target set has one split, reported as target/wordy/loss)",
        "valid:abc (reported as eval/abc/loss)",
    ]
    capsys.readouterr()
    loop = Loop(
        tiny_config(
            six_domains, tmp_path / "run2", mixture={"name": "doge", "target": "target:wordy"}, **{"train.steps": 2}
        )
    )
    assert loop.steers_on_eval == []
    monkey = Loop(
        tiny_config(
            six_domains,
            tmp_path / "run3",
            **{"train.steps": 3, "mixture": {"name": "dga", "target": "target:wordy", "update_every": 1}},
        )
    )
    monkey.steers_on_eval = ["valid:abc (reported as eval/abc/loss)"]
    monkey.train()
    assert "steered on data that evaluation reports" in capsys.readouterr().out


def test_a_skipped_step_stays_out_of_the_time_average(six_domains, tmp_path, monkeypatch):
    finish = signals_module.Measurement.finish

    def finish_with_a_bad_step(self, stats, *args):
        out = finish(self, stats, *args)
        if self.step == 3:
            out.align = np.full_like(out.align, np.nan)
        return out

    monkeypatch.setattr(signals_module.Measurement, "finish", finish_with_a_bad_step)
    loop = Loop(tiny_config(six_domains, tmp_path / "run", mixture={"name": "doge", "mu": 0.01}, **{"train.steps": 6}))
    updates, observe = [], loop.controller.observe

    def observing(stats):
        before = loop.controller.mixture.copy()
        observe(stats)
        if stats.step != 3:
            updates.append(loop.controller.mixture.copy())
        else:
            assert np.array_equal(loop.controller.mixture, before)  # skipped: weights untouched

    loop.controller.observe = observing
    loop.train()
    exported = json.loads((tmp_path / "run" / "weights.json").read_text())
    average = np.array([exported["train_domain_weights"][d] for d in loop.data.domains])
    assert len(updates) == 5
    np.testing.assert_allclose(average, np.mean(updates, axis=0), rtol=1e-9, atol=0)
