"""Per-domain gradient variance σ_k² from the probe against a per-sequence oracle (one backward per
sequence, probe off): with one piece per sequence it is the sample variance of the sequences'
gradients; with micro-batch pieces it is the pieces estimator evaluated on the oracle's piece means;
the pieces estimator is unbiased for the per-sequence variance (exactly, over random partitions);
and recording it leaves the training gradient alone."""

import itertools
import sys

import numpy as np
import pytest
import torch
from helpers import REPO

sys.path.insert(0, str(REPO / "tests" / "scripts"))

from probe_case import LOSS_WEIGHTS, K, micro_batches, probed_step, tiny_model  # noqa: E402

from trainer.models import token_losses  # noqa: E402
from trainer.probe import Probe, ProbeSpec  # noqa: E402

TOL = 1e-5
TWO_MB = [[0, 0, 0, 1, 1, 3], [0, 0, 1, 2, 2, 3, 3]]  # domain 2 in one micro-batch only: one piece
FOUR_MB = [[0, 0, 1, 3], [0, 1, 1, 3], [0, 2, 2, 3], [1, 1, 2, 3]]


def sequence_gradients(model, mbs) -> list[tuple[int, int, np.ndarray]]:
    """(micro-batch, domain, gradient of the sequence's mean token loss) of every sequence."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for j, (tokens, doms) in enumerate(mbs):
        for s in range(tokens.shape[0]):
            model.zero_grad(set_to_none=True)
            token_losses(model, tokens[s : s + 1]).mean().backward()
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            out.append((j, int(doms[s]), g.double().numpy()))
    model.zero_grad(set_to_none=True)
    return out


def pieces_estimate(pieces: list[np.ndarray]) -> float:
    """The documented estimator: pieces[j] is [b_j, P] (the sequences' gradients of piece j)."""
    n = sum(len(p) for p in pieces)
    mean = np.concatenate(pieces).mean(axis=0)
    spread = sum(len(p) * np.sum(p.mean(axis=0) ** 2) for p in pieces) - n * np.sum(mean**2)
    return spread / (len(pieces) - 1)


def oracle_variance(seqs, domain: int, by_piece: bool) -> float:
    rows = [(j, g) for j, d, g in seqs if d == domain]
    if by_piece:
        groups = sorted({j for j, _ in rows})
        pieces = [np.stack([g for j, g in rows if j == piece]) for piece in groups]
    else:
        pieces = [g[None] for _, g in rows]
    return pieces_estimate(pieces) if len(pieces) >= 2 else np.nan


def run(model, layout, variance, seed=3):
    mbs = micro_batches(layout, seed)
    probe = Probe(model, K)
    return probe, mbs, probed_step(probe, model, mbs, ProbeSpec(norms=True, gram=True, variance=variance))


@pytest.mark.parametrize("layout", [TWO_MB, FOUR_MB], ids=["two_micro_batches", "four_micro_batches"])
@pytest.mark.parametrize("variance", ["sequence", "pieces"])
@pytest.mark.parametrize("family,tied", [("gpt", True), ("gpt", False), ("llama", False)])
def test_variance_matches_the_per_sequence_oracle(layout, variance, family, tied):
    model = tiny_model(tied, family=family)
    _, mbs, result = run(model, layout, variance)
    seqs = sequence_gradients(model, mbs)
    for d in range(K):
        want = oracle_variance(seqs, d, by_piece=variance == "pieces") if any(s[1] == d for s in seqs) else np.nan
        if np.isnan(want):
            assert np.isnan(result.grad_var[d]), (d, result.grad_var)
            continue
        scale = np.mean([np.sum(g**2) for _, dd, g in seqs if dd == d])  # the per-sequence gradient size
        assert abs(result.grad_var[d] - want) <= TOL * scale, (d, result.grad_var[d], want)
    if variance == "pieces":
        assert result.pieces[2] == (1 if layout is TWO_MB else 2)
    assert np.isnan(result.grad_var[4]) and result.pieces[4] == 0  # absent everywhere


def test_direct_tier_single_micro_batch_sequence_variance():
    """One micro-batch on one rank: the norms come from the direct tier, the variance per sequence."""
    model = tiny_model(True)
    mbs = micro_batches([[0, 0, 0, 1, 1, 2, 3, 3]], 5)
    probe = Probe(model, K)
    spec = ProbeSpec(norms=True, variance="sequence", micro_batches=1)
    result = probed_step(probe, model, mbs, spec)
    seqs = sequence_gradients(model, mbs)
    for d in (0, 1, 3):
        want = oracle_variance(seqs, d, by_piece=False)
        assert abs(result.grad_var[d] - want) <= TOL * np.mean([np.sum(g**2) for _, dd, g in seqs if dd == d])
    assert np.isnan(result.grad_var[2])  # one sequence: no spread to measure
    # with pieces a lone micro-batch is one piece per domain: nothing to estimate, and the direct tier stays
    pieces = probed_step(probe, model, mbs, ProbeSpec(norms=True, variance="pieces", micro_batches=1))
    assert np.isnan(pieces.grad_var[:K]).all()


def test_pieces_estimator_is_unbiased_over_random_partitions():
    """Over every split of a domain's 8 sequences into two pieces of 4 (the micro-batches a shuffled
    batch would give), the pieces estimator averages to the per-sequence sample variance exactly."""
    model = tiny_model(True)
    seqs = sequence_gradients(model, micro_batches([[0] * 8], 9))
    grads = np.stack([g for _, _, g in seqs])
    per_sequence = pieces_estimate([g[None] for g in grads])
    splits = [c for c in itertools.combinations(range(8), 4) if 0 in c]
    estimates = [pieces_estimate([grads[list(c)], grads[[i for i in range(8) if i not in c]]]) for c in splits]
    assert abs(np.mean(estimates) - per_sequence) <= 1e-9 * per_sequence
    assert np.std(estimates) > 0.05 * per_sequence  # one split alone is a noisy estimate (1 degree of freedom)


def test_recording_the_variance_leaves_the_training_gradient_alone():
    model = tiny_model(True)
    mbs = micro_batches(FOUR_MB, 4)
    probed_step(None, model, mbs)
    stock = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    probed_step(Probe(model, K), model, mbs, ProbeSpec(norms=True, variance="sequence"))
    for p, g in zip(model.parameters(), stock):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_variance_needs_norms():
    model = tiny_model(True)
    probe = Probe(model, K)
    with pytest.raises(ValueError, match="needs norms"):
        probe.start(ProbeSpec(variance="pieces"))
    assert LOSS_WEIGHTS.numel() == K
