"""The gradient probe on megatron's tensor-parallel layers, against an oracle (run under torchrun).

``megatron_probe.py TP OUT_DIR [MODEL [PRECISION]]``: one engine=megatron step on a fixed micro-batch
of 3 domains, with engine.megatron.tensor_parallel = TP and MODEL gpt (tied head, biases, learned
positions; the default) or llama (RMSNorm, SwiGLU, grouped-query attention, rotary, untied head):

- the training gradient with the probe recording equals the probe-off gradient (route M's sum);
- per-domain norms, Gram and alignments with a reference gradient equal the oracle: one
  ``torch.autograd.grad`` per domain of that domain's share of the same objective, with inner
  products summed over the TP group and replicated parameters counted once;
- sketched norms are refused under TP > 1.

PRECISION bf16 (default fp32) first takes the same step with engine.precision=bf16, then builds the
fp32 engine on its weights (the checkpointed fp32 masters: the bf16 weights exactly) for the fp32
checks above and an fp32 oracle the bf16 statistics are measured against.

Writes ``probe_rank<r>.json`` (max relative errors; the bf16 ones under "bf16") into OUT_DIR.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from helpers import TINY_LLAMA  # noqa: E402

from trainer import dist  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engines import MicroBatch, build_engine  # noqa: E402
from trainer.models import token_losses  # noqa: E402
from trainer.probe import Probe, ProbeSpec  # noqa: E402

K = 3
MODELS = {
    "gpt": {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64, "vocab_size": 320},
    "llama": {**TINY_LLAMA, "vocab_size": 320, "tie_embeddings": False},
}


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main() -> None:
    tp, out_dir = int(sys.argv[1]), Path(sys.argv[2])
    model = sys.argv[3] if len(sys.argv) > 3 else "gpt"
    precision = sys.argv[4] if len(sys.argv) > 4 else "fp32"

    def engine(precision: str):
        engine = {"name": "megatron", "threads": 1, "precision": precision, "megatron": {"tensor_parallel": tp}}
        return build_engine(load_config({"model": MODELS[model], "engine": engine, "train": {"grad_clip": 0.0}}))

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (2, 5, 17), generator=gen)  # one micro-batch per data-parallel replica
    doms = torch.tensor([0, 0, 1, 2, 2])
    lw = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    ref_batch = torch.randint(0, 300, (3, 17), generator=gen)

    def probed_step(eng):
        """(probe, reference gradient, probe-off and probed training gradients, the probe's result)."""
        mine = tokens[eng.layout.dp_rank]  # every TP rank of a replica sees the same rows
        probe = Probe(eng.model, K)
        ref = probe.reference_gradient(token_losses(eng.model, ref_batch).mean())

        def train_grads(use_probe: bool):
            eng.forward_backward([MicroBatch(mine, doms)], lw, K, probe=probe if use_probe else None)
            grads = [p.main_grad.clone() for p in probe.params]
            eng.ddp.zero_grad_buffer()
            return grads

        plain = train_grads(False)
        probe.start(ProbeSpec(refs=1, norms=True, gram=True), [ref])
        probed = train_grads(True)
        return probe, ref, plain, probed, probe.finish(np.ones(K))

    half = None
    if precision == "bf16":
        eng = engine("bf16")
        dtypes = sorted({str(p.dtype) for p in eng.model.parameters()})
        half = probed_step(eng)
        weights = eng.state_dict()["model"]
        saved = sorted({str(t.dtype) for t in weights.values()})
        eng = engine("fp32")
        eng.load_state_dict({"model": weights})
    else:
        eng = engine("fp32")
    probe, ref, plain, probed, result = probed_step(eng)

    # oracle: domain i's share of this replica's objective, summed over replicas like the probe
    mine = tokens[eng.layout.dp_rank]
    tokens_per_rank = mine.shape[0] * (mine.shape[1] - 1)
    pieces = []
    for i in range(K):
        losses = token_losses(eng.model, mine)  # a fresh graph per domain (reference_gradient frees it)
        share = (losses[doms == i] * lw[i].float()).sum() / tokens_per_rank
        g = probe.reference_gradient(share)
        pieces.append([probe.dp_sum(t.clone()) for t in g])
    total = [sum(parts) / probe.dp_size for parts in zip(*pieces)]  # megatron's DDP averages over DP

    def dot(a, b):
        sq = sum(
            ((x.double() * y.double()).sum() for x, y, p in zip(a, b, probe.params) if probe._slots[id(p)].counted),
            torch.zeros((), dtype=torch.float64),
        )
        return float(probe._tp_sum(sq.reshape(1)))

    gram = np.array([[dot(pieces[i], pieces[j]) for j in range(K)] for i in range(K)])
    align = np.array([dot(pieces[i], ref) for i in range(K)])

    def errors(plain, probed, result) -> dict:
        return {
            "grad_err": max(rel(a, b) for a, b in zip(probed, plain)),
            "probed_vs_oracle": max(rel(a, b) for a, b in zip(probed, total)),
            "plain_vs_oracle": max(rel(a, b) for a, b in zip(plain, total)),
            "gram_err": rel(result.gram, gram),
            "norm_err": rel(result.norms, np.sqrt(np.diag(gram))),
            "align_err": rel(result.align[:, 0], align),
        }

    refused = None
    if tp > 1:
        try:
            probe.start(ProbeSpec(norms=True, sketch_dim=64))
        except ValueError as e:
            refused = str(e)
    out = {
        "tp": tp,
        **errors(plain, probed, result),
        "ref_norm": float(torch.sqrt(probe.squared_norm(ref))),
        "local_ref_norm": float(torch.sqrt(sum((t.double() ** 2).sum() for t in ref))),  # this rank's shard only
        "norms": result.norms.tolist(),
        "sketch_refused": refused,
        "tp_rank": eng.layout.tp_rank,
    }
    if half is not None:
        _, _, *measured = half
        out["bf16"] = {**errors(*measured), "param_dtypes": dtypes, "checkpoint_dtypes": saved}
    (out_dir / f"probe_rank{eng.rank}.json").write_text(json.dumps(out))
    eng = half = None  # released before the process group goes
    dist.shutdown()


if __name__ == "__main__":
    main()
