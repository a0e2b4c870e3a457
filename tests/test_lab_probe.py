"""The probe on what a lab trains with: the Llama model (RMSNorm gains, SwiGLU's three linears,
grouped-query projections), bf16 autocast, activation checkpointing and torch.compile, each
against the oracle of one masked backward per domain (tests/scripts/probe_case.py)."""

import sys

import numpy as np
import pytest
import torch
from helpers import REPO

sys.path.insert(0, str(REPO / "tests" / "scripts"))

from probe_case import K, micro_batches, oracle_gradients, probed_step, reference_vectors, tiny_model  # noqa: E402
from test_probe import EXACT, ONE_MB, TWO_MB, check, oracle_stats  # noqa: E402

from trainer.models import layers  # noqa: E402
from trainer.probe import Probe, ProbeSpec  # noqa: E402

BF16_TOL = 1e-2
"""Error allowed under bf16 autocast against the fp32 oracle (inner products relative to the norms'
product, norms relative): inputs and weights are rounded to bf16 (8 bits of mantissa, 2^-8 ≈ 4e-3
per operand) through two blocks and the head. Measured: alignments 1.1e-4, Gram 2.0e-3, norms
9.8e-4; against an oracle run under the same autocast the same (its own bf16 roundings differ)."""


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _case(family: str):
    """An untied 2-block model of ``family`` with its probe, references, an accumulation-2 step's
    micro-batches, the oracle's statistics and the unprobed training gradient (then zeroed)."""
    model = tiny_model(False, family=family)
    probe = Probe(model, K)
    refs = reference_vectors(probe, model)
    mbs = micro_batches(TWO_MB, seed=1)
    oracle = oracle_stats(model, mbs, refs)
    probed_step(None, model, mbs)
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    return model, probe, refs, mbs, oracle, plain


@pytest.mark.parametrize("layout", [ONE_MB, TWO_MB], ids=["one_micro_batch", "accumulation_2"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_statistics_match_oracle(layout, tied):
    model = tiny_model(tied, family="llama")
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.attn_norm.weight", "blocks.0.mlp.gate.weight", "blocks.0.attn.k.weight"} <= names
    assert model.blocks[0].attn.k.weight.shape[0] == model.blocks[0].attn.q.weight.shape[0] // 2  # GQA
    probe = Probe(model, K)
    refs = reference_vectors(probe, model)
    mbs = micro_batches(layout, seed=1)
    specs = [EXACT, ProbeSpec(refs=2)]
    if len(layout) == 1:
        specs.append(ProbeSpec(refs=2, norms=True, gram=True, micro_batches=1))  # the direct tier
    oracle = oracle_stats(model, mbs, refs)
    for spec in specs:
        check(probed_step(probe, model, mbs, spec, refs[: spec.refs]), oracle)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_activation_checkpointing_keeps_the_probe_exact(family):
    """Each block recomputed in the backward: the recomputed forward runs probed too, so statistics
    match the oracle (taken without checkpointing) and the training gradient is the unprobed one."""
    model, probe, refs, mbs, oracle, plain = _case(family)
    model.activation_checkpointing = True
    check(probed_step(probe, model, mbs, EXACT, refs), oracle)
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)
    # the recomputation really happens: every block runs its forward twice per step
    calls = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    probed_step(probe, model, mbs[:1], ProbeSpec(norms=True), None)
    hook.remove()
    assert len(calls) == 2
    model.zero_grad(set_to_none=True)


def test_bf16_autocast_probe_within_tolerance_of_fp32_oracle():
    """Under bf16 autocast (fp32 weights, bf16 compute) the pieces are bf16 GEMMs accumulated in fp32:
    every statistic within BF16_TOL of the fp32 oracle and of an oracle run under the same autocast."""
    model = tiny_model(False, family="llama")
    probe = Probe(model, K)
    refs = reference_vectors(probe, model)
    mbs = micro_batches(TWO_MB, seed=1)
    fp32 = oracle_stats(model, mbs, refs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(mbs[0][0][:, :-1]).dtype == torch.bfloat16  # the model computes under the caller's autocast
        G16 = oracle_gradients(model, mbs)
        result = probed_step(probe, model, mbs, EXACT, refs)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # fp32 master gradients
    p = [0, 1, 2, 3]
    norms = fp32["norms"][p]
    R = np.stack([torch.cat([t.reshape(-1) for t in r]).double().numpy() for r in refs])
    for oracle, tol in ((fp32, BF16_TOL), ({"align": G16 @ R.T, "gram": G16 @ G16.T}, BF16_TOL)):
        a = np.abs(result.align[p] - oracle["align"][p]) / np.outer(norms, fp32["ref_norms"])
        g = np.abs(result.gram[np.ix_(p, p)] - oracle["gram"][np.ix_(p, p)]) / np.outer(norms, norms)
        assert a.max() <= tol and g.max() <= tol, (a.max(), g.max(), tol)
    assert np.abs(result.norms[p] / norms - 1).max() <= BF16_TOL


def test_compiled_blocks_with_the_probe_match_the_oracle():
    """torch.compile on each block: unprobed micro-batches run the compiled graph; probed ones break it
    at each probe-aware layer (their Functions run eagerly) and stay exact. The aot_eager backend
    traces and splits the graphs as inductor would without generating C++ (~40 s here); inductor
    itself runs in tests/test_lab_engines.py's slow compiled-DoGE run."""
    torch._dynamo.reset()
    model, probe, refs, mbs, oracle, plain = _case("llama")
    layers.keep_probed_paths_eager()
    for block in model.blocks:
        block.compile(backend="aot_eager")
    probed_step(None, model, mbs)
    for g, q in zip(plain, model.parameters()):
        torch.testing.assert_close(q.grad, g, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    check(probed_step(probe, model, mbs, EXACT, refs), oracle)
    model.zero_grad(set_to_none=True)
    assert isinstance(model.blocks[0].attn.q, layers.Linear)
