"""Signals beyond the probe's own tests: task wildcards, per-sequence alignments on a probe batch,
and the Adam-preconditioned references TiKMiX's influence uses, each against a direct autograd oracle."""

import numpy as np
import pytest
import torch
from helpers import make_shardset, tiny_values

from mixtures import DomainStats, Request
from trainer.config import ConfigError, load_config
from trainer.loop import Loop
from trainer.models import token_losses
from trainer.signals import _PROBE_CHUNK


@pytest.fixture()
def loop(tmp_path):
    data = make_shardset(tmp_path / "data", targets={"wordy": "words", "abcs": "abc"})
    # DoGE declares the "heldout" reference, so the loop holds the reference slices out
    return Loop(load_config(tiny_values(data, tmp_path / "run", mixture={"name": "doge"})))


def _flat_grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


def _stats(loop):
    return DomainStats(step=0, lr=1e-3, loss=np.zeros(loop.K), tokens=np.ones(loop.K))


def _measure(loop, req, step=0):
    return loop.signals.begin(req, step).finish(_stats(loop), np.ones(loop.K), 1)


def test_wildcards_expand_to_every_target_and_validation_split(loop):
    names = loop.signals.expand(("target:*", "valid:*", "heldout", "heldout:*"))
    assert names == (
        "target:abcs",
        "target:wordy",
        *(f"valid:{d}" for d in loop.data.domains),
        "heldout",
        *(f"heldout:{d}" for d in loop.data.domains),
    )  # every domain here has a validation split
    with pytest.raises(ConfigError, match="valid:nowhere"):
        loop.signals._ref_batch("valid:nowhere", 2, 0, 0)


def _reference(loop, req, name, step, r):
    """The reference gradient Signals uses, recomputed: same batch (pure function of seed, step, r)."""
    n = req.ref_sequences
    batch = loop.signals._ref_batch(name, n, step, r)
    return _flat_grad(loop.engine.model, token_losses(loop.engine.model, batch).mean())


def test_per_sample_alignments_equal_one_backward_per_sequence(loop):
    req = Request(
        align=("target:*", "valid:counting"),
        source="probe_batch",
        probe_sequences=_PROBE_CHUNK // 2 + 3,
        per_sample=True,
        ref_sequences=3,
    )
    step = 5
    stats = _measure(loop, req, step)
    names = stats.align_names
    assert names == ("target:abcs", "target:wordy", "valid:counting")
    refs = torch.stack([_reference(loop, req, name, step, r) for r, name in enumerate(names)])
    tokens, doms, ids, n = loop.signals._probe_batch(req, step)  # spans two chunks: accumulation is exercised
    assert n == loop.K * req.probe_sequences and stats.sample_align.shape == (n, len(names))
    model = loop.engine.model
    oracle = np.stack(
        [(refs @ _flat_grad(model, token_losses(model, tokens[s : s + 1]).mean())).numpy() for s in range(n)]
    )
    np.testing.assert_allclose(stats.sample_align, oracle, rtol=1e-5, atol=1e-6 * np.abs(oracle).max())
    np.testing.assert_array_equal(stats.sample_domain, doms.numpy())
    # the per-domain rows are the token-mean gradient's alignments: the mean of the domain's sequences
    for d in range(loop.K):
        g = _flat_grad(model, token_losses(model, tokens[doms == d]).mean())
        np.testing.assert_allclose(stats.align[d], (refs @ g).numpy(), rtol=1e-5, atol=1e-6 * np.abs(oracle).max())
    assert all(p.grad is None for p in model.parameters())  # the training gradient was not touched


def test_per_domain_probe_batch_is_the_token_mean_gradient(loop):
    req = Request(align=("heldout",), source="probe_batch", probe_sequences=_PROBE_CHUNK, ref_sequences=4)
    stats = _measure(loop, req, 2)
    ref = _reference(loop, req, "heldout", 2, 0)
    tokens, doms, _, _ = loop.signals._probe_batch(req, 2)
    model = loop.engine.model
    for d in range(loop.K):
        g = _flat_grad(model, token_losses(model, tokens[doms == d]).mean())
        assert stats.align[d, 0] == pytest.approx(float(ref @ g), rel=1e-5)


def test_preconditioned_references_divide_by_adam_second_moments(loop):
    model, opt = loop.engine.model, loop.engine.optimizer
    req = Request(align=("valid:abc",), source="probe_batch", probe_sequences=4, ref_sequences=3, precondition=True)
    before = _measure(loop, req, 1)  # no optimizer state yet: identity curvature
    plain = _measure(loop, Request(align=("valid:abc",), source="probe_batch", probe_sequences=4, ref_sequences=3), 1)
    np.testing.assert_array_equal(before.align, plain.align)

    batch = loop.signals._ref_batch("valid:words", 4, 99, 0)
    token_losses(model, batch).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    stats = _measure(loop, req, 1)
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    inv = torch.cat(
        [(1.0 / ((opt.state[p]["exp_avg_sq"] / (1 - beta2)).sqrt() + eps)).reshape(-1) for p in model.parameters()]
    ).double()
    ref = _reference(loop, req, "valid:abc", 1, 0) * inv
    tokens, doms, _, _ = loop.signals._probe_batch(req, 1)
    for d in range(loop.K):
        g = _flat_grad(model, token_losses(model, tokens[doms == d]).mean())
        assert stats.align[d, 0] == pytest.approx(float(ref @ g), rel=1e-5)
    assert not np.allclose(
        stats.align,
        _measure(
            loop, Request(align=("valid:abc",), source="probe_batch", probe_sequences=4, ref_sequences=3), 1
        ).align,
    )


def test_per_sample_needs_a_probe_batch_and_alignments_only(loop):
    with pytest.raises(ValueError, match="per_sample"):
        loop.signals.begin(Request(align=("heldout",), per_sample=True), 0)
    with pytest.raises(ValueError, match="per_sample"):
        loop.signals.begin(Request(align=("heldout",), source="probe_batch", norms=True, per_sample=True), 0)


def test_auto_source_uses_the_training_batch_only_when_it_holds_every_domain(loop):
    req = Request(align=("heldout",), norms=True, source="auto", probe_sequences=4, ref_sequences=4)
    every = loop.signals.begin(req, 0, np.ones(loop.K, dtype=int))
    assert every.source == "in_batch" and every.probe is loop.signals.probe
    assert every.extra  # one micro-batch on one rank: the reference rides in the training batch
    loop.signals.probe.finish(np.ones(loop.K + 1))  # close the step begun above
    missing = np.ones(loop.K, dtype=int)
    missing[1] = 0
    some = loop.signals.begin(req, 0, missing)
    assert some.source == "probe_batch" and some.probe is None
    stats = some.finish(_stats(loop), np.ones(loop.K), 1)
    assert np.all(np.isfinite(stats.norms))  # the probe batch measured every domain, the absent one too


def test_fused_reference_rows_equal_a_separate_reference_pass(loop):
    """DoGE's request on one micro-batch: the references ride in the training batch (one backward)
    and come out as Gram entries; alignments, norms, reference norms and the training gradient equal
    the separate reference pass's, and the reference rows stay out of the loss accounting."""
    loop._next_shard()
    req = loop.controller.request(0)
    params = [p for p in loop.engine.model.parameters() if p.requires_grad]
    lw = torch.from_numpy(np.asarray(loop.controller.loss_weights, dtype=np.float64))

    def step(fused: bool):
        loop.engine.fuses_reference_rows = fused
        m = loop.signals.begin(req, 0, loop._step_counts())
        assert bool(m.extra) == fused
        batch = m.micro_batches(loop._batch())
        sums, counts = loop.engine.forward_backward(batch, lw, loop.K, probe=m.probe)
        grad = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        loop.engine.model.zero_grad(set_to_none=True)
        stats = DomainStats(step=0, lr=1e-3, loss=(sums / counts).numpy(), tokens=counts.numpy())
        t = loop.cfg.train
        stats = m.finish(stats, lw.numpy(), t.micro_batch * t.grad_accum * loop.cfg.data.seq_len)
        return stats, grad, sums, counts

    separate, g_sep, s_sep, c_sep = step(False)
    fused, g_fused, s_fused, c_fused = step(True)
    assert torch.equal(c_sep, c_fused) and torch.allclose(s_sep, s_fused, rtol=1e-6, atol=0)
    assert torch.allclose(g_sep, g_fused, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(fused.norms, separate.norms, rtol=1e-5)
    np.testing.assert_allclose(fused.ref_norms, separate.ref_norms, rtol=1e-5)
    scale = np.outer(separate.norms, separate.ref_norms)
    # NaN: a domain absent from the batch
    assert np.nanmax(np.abs(fused.align - separate.align)) / np.nanmax(scale) <= 1e-5
    assert fused.align_names == separate.align_names == ("heldout",)


def _train_measurement(loop, req, step=0):
    """``req`` measured on step ``step``'s real training batch (no optimizer step: θ stays), with the
    training gradient dropped afterwards; returns the stats and the micro-batches."""
    loop.state.step = step
    if loop.plan is None:
        loop._next_shard()
    lw = torch.ones(loop.K, dtype=torch.float64)
    m = loop.signals.begin(req, step, loop._step_counts())
    batch = loop._batch()
    sums, counts = loop.engine.forward_backward(m.micro_batches(batch), lw, loop.K, probe=m.probe)
    loop.engine.model.zero_grad(set_to_none=True)
    stats = DomainStats(step=step, lr=1e-3, loss=(sums / counts).numpy(), tokens=counts.numpy())
    t = loop.cfg.train
    return m.finish(stats, lw.numpy(), t.micro_batch * t.grad_accum * loop.cfg.data.seq_len), batch


@pytest.mark.parametrize("mode", ["sequence", "pieces"])
def test_training_batch_variance_equals_the_per_sequence_oracle(tmp_path, mode):
    """σ_k² of a real training step (2 micro-batches, so "pieces" has up to 2 per domain) against
    one backward per sequence of the same batch."""
    data = make_shardset(tmp_path / "data")
    values = tiny_values(data, tmp_path / "run", **{"train.micro_batch": 6, "train.grad_accum": 2})
    values["probe"] = {"grad_var": mode}
    loop = Loop(load_config(values))
    stats, batch = _train_measurement(loop, Request(norms=True, grad_var=True))
    model = loop.engine.model
    per_seq = {d: [] for d in range(loop.K)}
    for j, mb in enumerate(batch):
        for s in range(mb.tokens.shape[0]):
            g = _flat_grad(model, token_losses(model, mb.tokens[s : s + 1]).mean()).numpy()
            per_seq[int(mb.domains[s])].append((j, g))
    checked = 0
    for d, rows in per_seq.items():
        pieces = [np.stack([g for j, g in rows if j == mb]) for mb in sorted({j for j, _ in rows})]
        assert stats.extra["sequences"][d] == len(rows)
        if mode == "sequence":
            pieces = [g[None] for _, g in rows]
        if len(pieces) < 2:
            assert np.isnan(stats.grad_var[d])
            continue
        n = sum(len(p) for p in pieces)
        mean = np.concatenate(pieces).mean(axis=0)
        want = (sum(len(p) * np.sum(p.mean(axis=0) ** 2) for p in pieces) - n * np.sum(mean**2)) / (len(pieces) - 1)
        assert stats.grad_var[d] == pytest.approx(want, rel=1e-4)
        assert stats.norms[d] == pytest.approx(np.linalg.norm(mean), rel=1e-5)
        checked += 1
    assert checked >= 2


def test_gradient_round_is_the_gram_of_the_rounds_mean_final_block_gradients(tmp_path):
    """Three steps accumulated (the last one reporting): the Gram equals that of each domain's mean
    token-loss gradient over all three batches, over the last block's parameters only; and a full
    probe used afterwards gets its layers back."""
    from trainer.signals import GradientRound, final_block

    data = make_shardset(tmp_path / "data")
    loop = Loop(load_config(tiny_values(data, tmp_path / "run", **{"train.micro_batch": 8})))
    loop.signals.round = GradientRound(loop.K)
    batches = []
    for step in range(3):
        req = Request(gram=True, norms=True, params="final", source="in_batch", accumulate=step < 2)
        stats, batch = _train_measurement(loop, req, step)
        batches += batch
        assert (stats.gram is None) == (step < 2)
    assert not loop.signals.round.open
    model = loop.engine.model
    block = [p for p in final_block(model).parameters() if p.requires_grad]
    tokens = torch.cat([mb.tokens for mb in batches])
    doms = torch.cat([mb.domains for mb in batches])
    present = [d for d in range(loop.K) if (doms == d).any()]
    G = {}
    for d in present:
        G[d] = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(token_losses(model, tokens[doms == d]).mean(), block)]
        ).double()
    for a in present:
        for b in present:
            want = float(G[a] @ G[b])
            assert abs(stats.gram[a, b] - want) <= 1e-5 * float(G[a].norm() * G[b].norm())
    for d in set(range(loop.K)) - set(present):
        assert np.isnan(stats.gram[d]).all()
    # the full probe takes its layers back
    full, _ = _train_measurement(loop, Request(norms=True, source="in_batch"), 3)
    assert np.isfinite(full.norms[present]).all()
