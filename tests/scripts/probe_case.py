"""Shared by tests/test_probe.py and the torchrun script probe_two_ranks.py: a tiny GPT, domain-sorted
micro-batches, one probed training step as the training loop runs it, and the oracle (one masked
backward per domain with the probe off)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.config import ModelConfig  # noqa: E402
from trainer.models import build_model, token_losses  # noqa: E402
from trainer.probe import Probe, ProbeResult, ProbeSpec  # noqa: E402

K = 5
"""Domains; the layouts below never use domain 4, so it is absent from every step."""
SEQ = 16
VOCAB = 97
LOSS_WEIGHTS = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.7])
"""Non-uniform, so the probe's rescaling by the loss weights is exercised."""
TWO_RANK_LAYOUT = [[0, 0, 1, 3], [0, 2, 2, 3], [1, 1, 3, 3], [0, 1, 2, 2]]
"""Four micro-batches of a 2-rank step with accumulation 2 (rank r: 2r and 2r+1); several lack a domain."""
SKETCH = ProbeSpec(norms=True, gram=True, sketch_dim=256, seed=11)


def tiny_model(tied: bool = True, bias: bool = True, family: str = "gpt") -> torch.nn.Module:
    """A 2-block model of ``family``: the GPT, or the Llama with grouped-query attention (4 query
    heads on 2 key/value heads; no biases)."""
    torch.manual_seed(0)
    shape = dict(n_layer=2, d_model=64, vocab_size=VOCAB, max_seq_len=SEQ, tie_embeddings=tied)
    if family == "llama":
        return build_model(ModelConfig(name="llama", n_head=4, n_kv_head=2, bias=False, **shape))
    return build_model(ModelConfig(n_head=2, bias=bias, **shape))


def micro_batches(layout: list[list[int]], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (tokens [b, SEQ + 1], domains [b]) per entry of ``layout`` (each a sorted list of row
    domains). Each domain draws from its own slice of the vocabulary so domain gradients differ."""
    rng = np.random.default_rng(seed)
    out = []
    for doms in layout:
        rows = [(rng.integers(0, 40, SEQ + 1) + 13 * d) % VOCAB for d in doms]
        out.append((torch.tensor(np.stack(rows), dtype=torch.long), torch.tensor(doms, dtype=torch.long)))
    return out


def reference_batch(seed: int = 99) -> torch.Tensor:
    """A mixed batch whose mean-loss gradient serves as a real reference vector."""
    return micro_batches([[0, 1, 2, 3]], seed)[0][0]


def reference_vectors(probe: Probe, model: torch.nn.Module) -> list[list[torch.Tensor]]:
    """Two references: a real reference gradient (unwrapped model, probe off) and a random vector
    (same seed on every rank)."""
    real = probe.reference_gradient(token_losses(model, reference_batch()).mean())
    gen = torch.Generator().manual_seed(7)
    return [real, [torch.randn(p.shape, generator=gen) for p in probe.params]]


def global_tokens(mbs) -> torch.Tensor:
    """Token count per domain over the given micro-batches."""
    counts = torch.zeros(K)
    for tokens, doms in mbs:
        counts.index_add_(0, doms, torch.full((doms.numel(),), float(tokens.shape[1] - 1)))
    return counts


def probed_step(
    probe: Probe | None,
    wrapped: torch.nn.Module,
    mbs,
    spec: ProbeSpec | None = None,
    refs=None,
    n_global: torch.Tensor | None = None,
) -> ProbeResult | None:
    """The training loop's forward/backward for one optimizer step (torch_ddp.py: loss-weighted sum
    over tokens / tokens per rank, DDP no_sync on all but the last micro-batch), with each
    micro-batch inside probe.micro_batch(); probe=None runs it unprobed."""
    tokens_per_rank = sum(doms.numel() * (tokens.shape[1] - 1) for tokens, doms in mbs)
    if probe is not None:
        probe.start(spec, refs)
    for i, (tokens, doms) in enumerate(mbs):
        last = i == len(mbs) - 1
        sync = wrapped.no_sync() if isinstance(wrapped, DDP) and not last else contextlib.nullcontext()
        record = probe.micro_batch(doms) if probe is not None else contextlib.nullcontext()
        with sync, record:
            losses = token_losses(wrapped, tokens)
            ((losses * LOSS_WEIGHTS[doms].unsqueeze(1)).sum() / tokens_per_rank).backward()
    if probe is None:
        return None
    n = (n_global if n_global is not None else global_tokens(mbs)).double().numpy()
    with np.errstate(divide="ignore"):
        return probe.finish(tokens_per_rank / (LOSS_WEIGHTS.double().numpy() * n))


def oracle_gradients(model: torch.nn.Module, mbs) -> np.ndarray:
    """[K, P] float64: row i = gradient of domain i's mean token loss over all the micro-batches, by
    one masked backward per domain (NaN row for an absent domain)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = global_tokens(mbs)
    rows = []
    for i in range(K):
        if n[i] == 0:
            rows.append(np.full(sum(p.numel() for p in params), np.nan))
            continue
        model.zero_grad(set_to_none=True)
        for tokens, doms in mbs:
            losses = token_losses(model, tokens)
            (losses[doms == i].sum() / n[i]).backward()
        rows.append(
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            .double()
            .numpy()
        )
    model.zero_grad(set_to_none=True)
    return np.stack(rows)


def flat(vector: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([t.reshape(-1) for t in vector]).double().numpy()
