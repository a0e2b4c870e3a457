"""The per-domain gradient probe against an oracle of one masked backward per domain (probe off):
exact alignments, norms and Gram on one rank (one micro-batch, accumulation 2) and on 2 gloo ranks,
tied and untied embeddings, absent domains; the training gradient it leaves; the sketch's bias and
spread; and that the probe-aware layers are the stock modules when no probe records.

Errors of inner products are measured relative to the product of the two vectors' norms
(|<a,b>' - <a,b>| / (||a|| ||b||)): an entrywise ratio blows up for nearly orthogonal gradients,
whose inner product can be far smaller than the fp32 rounding of its terms.
"""

import json
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import REPO, run_torchrun

sys.path.insert(0, str(REPO / "tests" / "scripts"))

from probe_case import (
    SKETCH,
    TWO_RANK_LAYOUT,
    K,
    flat,
    micro_batches,
    oracle_gradients,  # noqa: E402
    probed_step,
    reference_vectors,
    tiny_model,
)

from trainer.config import ModelConfig  # noqa: E402
from trainer.models import build_model, layers, token_losses  # noqa: E402
from trainer.probe import Probe, ProbeResult, ProbeSpec  # noqa: E402

TOL = 1e-5
PRESENT = [0, 1, 2, 3]  # domain 4 never occurs
EXACT = ProbeSpec(refs=2, norms=True, gram=True)
ONE_MB = [[0, 0, 1, 2, 3, 3]]
TWO_MB = [[0, 0, 1, 3], [0, 2, 2, 3]]  # micro-batch 1 lacks domain 2, micro-batch 2 lacks domain 1


def oracle_stats(model, mbs, refs) -> dict:
    """Alignments, norms and Gram of the oracle's per-domain gradients (float64)."""
    G = oracle_gradients(model, mbs)
    R = np.stack([flat(r) for r in refs])
    return {
        "align": G @ R.T,
        "gram": G @ G.T,
        "norms": np.linalg.norm(G, axis=1),
        "ref_norms": np.linalg.norm(R, axis=1),
    }


def check(result, oracle) -> None:
    """Every requested statistic within TOL of the oracle for present domains, NaN for domain 4."""
    norms, p = oracle["norms"], PRESENT
    if result.align is not None:
        err = np.abs(result.align[p] - oracle["align"][p]) / np.outer(norms[p], oracle["ref_norms"])
        assert err.max() <= TOL, err
        assert np.isnan(result.align[4]).all()
    if result.norms is not None:
        assert np.abs(result.norms[p] / norms[p] - 1).max() <= TOL
        assert np.isnan(result.norms[4])
    if result.gram is not None:
        err = np.abs(result.gram[np.ix_(p, p)] - oracle["gram"][np.ix_(p, p)]) / np.outer(norms[p], norms[p])
        assert err.max() <= TOL, err
        assert np.isnan(result.gram[4]).all() and np.isnan(result.gram[:, 4]).all()


@pytest.mark.parametrize("layout", [ONE_MB, TWO_MB], ids=["one_micro_batch", "accumulation_2"])
@pytest.mark.parametrize(
    "tied,bias", [(True, True), (False, True), (False, False)], ids=["tied", "untied", "untied_nobias"]
)
def test_exact_statistics_match_oracle(layout, tied, bias):
    model = tiny_model(tied, bias)
    probe = Probe(model, K)
    refs = reference_vectors(probe, model)
    mbs = micro_batches(layout, seed=1)
    results = [
        probed_step(probe, model, mbs, spec, refs[: spec.refs])
        for spec in (EXACT, ProbeSpec(refs=2), ProbeSpec(norms=True))
    ]  # K x P accumulators; Tier A alone; norms alone
    assert results[0].sketch_dim == 0 and results[1].gram is None and results[2].align is None
    oracle = oracle_stats(model, mbs, refs)
    for result in results:
        check(result, oracle)


@pytest.mark.parametrize("tied,bias", [(True, True), (False, False)], ids=["tied", "untied_nobias"])
def test_direct_tier_matches_oracle_without_accumulators(tied, bias):
    """One micro-batch on one rank: norms and Gram taken in the backward as the pieces arrive, the
    tied matrix's head/embedding cross terms included, with no K x P accumulator ever allocated."""
    model = tiny_model(tied, bias)
    probe = Probe(model, K)
    refs = reference_vectors(probe, model)
    mbs = micro_batches(ONE_MB, seed=1)
    spec = ProbeSpec(refs=2, norms=True, gram=True, micro_batches=1)
    assert probe.direct_applies(spec)
    result = probed_step(probe, model, mbs, spec, refs)
    assert probe._exact_rows is None
    check(result, oracle_stats(model, mbs, refs))
    norms_only = probed_step(probe, model, mbs, ProbeSpec(norms=True, micro_batches=1))
    check(norms_only, oracle_stats(model, mbs, refs))
    assert norms_only.gram is None and norms_only.align is None
    with pytest.raises(RuntimeError, match="second probed micro-batch"):
        probed_step(probe, model, micro_batches(TWO_MB, seed=2), ProbeSpec(norms=True, micro_batches=1))
    model.zero_grad(set_to_none=True)


def test_exact_at_gpt2_small_width():
    """A d = 768 block (7.2M parameters, the width of GPT-2 small): norms without the Gram and
    alignments without norms take their own paths, which must stay exact in long rows too (one fp32
    reduction over a whole row or tensor lost 7e-4 on the norms and 1.3e-4 on an alignment here)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=12, d_model=768, vocab_size=97, max_seq_len=16))
    probe = Probe(model, K)
    mbs = micro_batches([[0, 0, 1, 2, 3, 3]], seed=1)
    G = oracle_gradients(model, mbs)
    norms = np.linalg.norm(G[PRESENT], axis=1)
    # references well aligned with the pieces: domain 0's own gradient and the sum of all domains'
    refs, at = [[], []], 0
    for p in probe.params:
        block = G[PRESENT, at : at + p.numel()]
        refs[0].append(torch.from_numpy(block[0]).float().view(p.shape))
        refs[1].append(torch.from_numpy(block.sum(0)).float().view(p.shape))
        at += p.numel()
    R = np.stack([flat(r) for r in refs])
    tight = 1e-6
    for spec in (ProbeSpec(norms=True), ProbeSpec(norms=True, micro_batches=1)):  # K x P rows; the direct tier
        result = probed_step(probe, model, mbs, spec)
        assert np.abs(result.norms[PRESENT] / norms - 1).max() <= tight
    result = probed_step(probe, model, mbs, ProbeSpec(refs=2), refs)
    err = np.abs(result.align[PRESENT] - G[PRESENT] @ R.T) / np.outer(norms, np.linalg.norm(R, axis=1))
    assert err.max() <= tight, err
    result = probed_step(probe, model, mbs, ProbeSpec(refs=2, norms=True, gram=True), refs)
    gram = G[PRESENT] @ G[PRESENT].T
    assert np.abs(result.gram[np.ix_(PRESENT, PRESENT)] - gram).max() / norms.max() ** 2 <= tight


def test_training_gradient_unchanged_and_reference_gradient_leaves_grad():
    model = tiny_model()
    probe = Probe(model, K)
    mbs = micro_batches(TWO_MB, seed=2)
    probed_step(None, model, mbs)
    plain = torch.cat([p.grad.reshape(-1) for p in probe.params]).clone()
    model.zero_grad(set_to_none=True)
    probed_step(probe, model, mbs, EXACT, reference_vectors(probe, model))
    probed = torch.cat([p.grad.reshape(-1) for p in probe.params])
    assert ((probed - plain).norm() / plain.norm()).item() <= 1e-6

    before = [p.grad.clone() for p in probe.params]
    ref = probe.reference_gradient(token_losses(model, mbs[0][0]).mean())
    assert all(torch.equal(p.grad, b) for p, b in zip(probe.params, before))
    model.zero_grad(set_to_none=True)
    token_losses(model, mbs[0][0]).mean().backward()
    assert all(torch.allclose(r, p.grad, rtol=1e-6, atol=1e-9) for r, p in zip(ref, probe.params))


def test_two_ranks_match_union_oracle(tmp_path):
    proc = run_torchrun(2, REPO / "tests" / "scripts" / "probe_two_ranks.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "probe_two_ranks.json").read_text())
    everything = micro_batches(TWO_RANK_LAYOUT, seed=3)
    for tied in (True, False):
        got = out[str(tied)]
        assert got["ref_grad_untouched"] and got["same_grad"]
        model = tiny_model(tied)
        probe = Probe(model, K)
        refs = reference_vectors(probe, model)
        oracle = oracle_stats(model, everything, refs)
        check(ProbeResult(**{k: np.array(got[k], dtype=float) for k in ("align", "norms", "gram")}), oracle)
        # The sketch is linear: 2 ranks x 2 micro-batches sketch the same vectors as 1 rank x 4.
        single = probed_step(probe, model, everything, SKETCH).gram
        n = oracle["norms"][PRESENT]
        err = np.abs(
            np.array(got["sketch_gram"])[np.ix_(PRESENT, PRESENT)] - single[np.ix_(PRESENT, PRESENT)]
        ) / np.outer(n, n)
        assert err.max() <= TOL
        # Variance pieces are (rank, micro-batch) pairs: 2 ranks x 2 equal 1 rank x 4 (test_grad_var
        # checks that one against the per-sequence oracle); per sequence the layout does not matter.
        for variance, want in got["grad_var"].items():
            model.zero_grad(set_to_none=True)
            single = probed_step(probe, model, everything, ProbeSpec(norms=True, variance=variance)).grad_var
            np.testing.assert_allclose(np.array(want, dtype=float), single, rtol=1e-5, equal_nan=True)


def test_sketch_is_unbiased_with_the_iid_spread():
    """CountSketch, m = 256: over 100 seeds the mean sketched Gram is within 3 standard errors of the
    exact one (every entry among present domains), and the relative std of the squared norms is
    within 1.5·sqrt(2/m) = 0.133."""
    m, seeds = 256, 100
    model = tiny_model()
    probe = Probe(model, K)
    mbs = micro_batches(TWO_MB, seed=4)
    exact = probed_step(probe, model, mbs, ProbeSpec(gram=True)).gram[np.ix_(PRESENT, PRESENT)]
    draws = np.stack(
        [
            probed_step(probe, model, mbs, ProbeSpec(norms=True, gram=True, sketch_dim=m, seed=s)).gram[
                np.ix_(PRESENT, PRESENT)
            ]
            for s in range(seeds)
        ]
    )
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(seeds)
    assert (np.abs(mean - exact) <= 3 * se).all(), (mean - exact) / se
    spread = np.diagonal(draws, axis1=1, axis2=2).std(0, ddof=1) / np.diag(exact)
    assert spread.max() <= 1.5 * np.sqrt(2 / m), spread


def test_over_budget_falls_back_to_sketch_and_warns_once():
    model = tiny_model()
    probe = Probe(model, K, exact_budget_bytes=1024, fallback_sketch_dim=128)
    mbs = micro_batches(ONE_MB, seed=5)
    with pytest.warns(UserWarning, match="sketching"):
        first = probed_step(probe, model, mbs, ProbeSpec(gram=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probed_step(probe, model, mbs, ProbeSpec(gram=True))
    assert first.sketch_dim == 128 and np.isfinite(first.gram[np.ix_(PRESENT, PRESENT)]).all()


def test_probe_off_is_the_stock_modules():
    """Same losses and gradients, bit for bit, after turning every probe-aware layer back into its
    torch base class; and the probe refuses a model with parameters it cannot see."""
    model = tiny_model()
    Probe(model, K)  # attached but not recording
    batch = micro_batches(ONE_MB, seed=6)[0][0]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = token_losses(model, batch).mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    ours = loss_and_grads()
    for module in model.modules():
        if isinstance(module, layers.ProbeAware):
            module.__class__ = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
    assert all(torch.equal(a, b) for a, b in zip(ours, loss_and_grads()))

    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra.weight"):
        Probe(model, K)


def test_misuse_is_reported():
    model = tiny_model()
    probe = Probe(model, K)
    with pytest.raises(RuntimeError, match="before start"):
        with probe.micro_batch(torch.tensor([0, 1])):
            pass
    probe.start(ProbeSpec(refs=0, norms=True))
    with pytest.raises(ValueError, match="sorted"):
        with probe.micro_batch(torch.tensor([1, 0])):
            pass
    with pytest.raises(ValueError, match="reference vectors"):
        probe.start(ProbeSpec(refs=1))
    tokens, doms = micro_batches(ONE_MB, seed=7)[0]
    with probe.micro_batch(doms):
        loss = token_losses(model, tokens).sum()
    probe.finish(np.ones(K))
    with pytest.raises(RuntimeError, match="after Probe.finish"):
        loss.backward()
    Probe(model, K)
    probe.start(ProbeSpec(norms=True))
    with pytest.raises(RuntimeError, match="another Probe"):
        with probe.micro_batch(doms):
            pass
