"""engine=deepspeed against engine=torch at the Engine contract, one process (run by
tests/test_deepspeed.py in a subprocess: DeepSpeed leaves a process group behind).

For ZeRO stages 0-3, the same model and micro-batches: per-domain loss weights != 1, two micro-batches
per step (accumulation), a probe recording alignments with a reference gradient and per-domain norms,
an ``on_losses`` hook, and the optimizer step's gradient norm. Also: model weights loaded with
``load_state_dict`` are the ones the next step starts from (DeepSpeed's fp32 master copies follow),
and DeepSpeed's own ZeRO-3 (partitioned parameters, also offloaded to CPU) gives the same probe
statistics and still evaluates under no_grad.

Writes a JSON report to argv[1].
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.config import DeepSpeedConfig, EngineConfig, ModelConfig, TrainConfig  # noqa: E402
from trainer.engines import MicroBatch  # noqa: E402
from trainer.engines.deepspeed_engine import DeepSpeedEngine  # noqa: E402
from trainer.engines.torch_ddp import TorchEngine  # noqa: E402
from trainer.models import token_losses  # noqa: E402
from trainer.probe import Probe, ProbeSpec  # noqa: E402

K, STEPS = 4, 3
MODEL = ModelConfig(n_layer=2, n_head=2, d_model=32, max_seq_len=16, vocab_size=64)
TRAIN = TrainConfig(micro_batch=4, grad_accum=2, lr=3e-3, weight_decay=0.1, grad_clip=0.05, seed=7)
LOSS_WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=torch.float64)


def batches(step: int) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(100 + step)
    doms = [torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 3])]
    return [MicroBatch(torch.randint(0, 64, (4, 13), generator=g), d) for d in doms]


def ref_batch() -> torch.Tensor:
    return torch.randint(0, 64, (3, 13), generator=torch.Generator().manual_seed(5))


def train(engine) -> dict:
    probe = Probe(engine.model, K)
    out = {"sums": [], "norm": [], "align": [], "norms": [], "hook_rows": 0}

    def hook(tokens, domains, losses):
        out["hook_rows"] += int(losses.shape[0])

    for step in range(STEPS):
        ref = probe.reference_gradient(token_losses(engine.model, ref_batch()).mean())
        probe.start(ProbeSpec(refs=1, norms=True), [ref])
        sums, counts = engine.forward_backward(batches(step), LOSS_WEIGHTS, K, probe=probe, on_losses=hook)
        result = probe.finish(np.ones(K))
        out["sums"].append((sums / counts).tolist())
        out["align"].append(result.align[:, 0].tolist())
        out["norms"].append(result.norms.tolist())
        out["norm"].append(engine.optimizer_step(TRAIN.lr))
    out["params"] = {k: v.double().flatten().tolist() for k, v in engine.state_dict()["model"].items()}
    return out


def loaded_weights_stick(engine) -> float:
    """Load another model's weights, take a near-zero step: the parameters must stay the loaded
    ones (not jump back to DeepSpeed's stale master copies). Returns the max abs deviation."""
    other = TorchEngine(EngineConfig(threads=1), MODEL, TrainConfig(seed=99, micro_batch=4, grad_accum=2))
    target = other.state_dict()["model"]
    engine.load_state_dict({"model": target})
    engine.forward_backward(batches(9), LOSS_WEIGHTS, K)
    engine.optimizer_step(1e-12)
    now = engine.state_dict()["model"]
    return max(float((now[k] - target[k]).abs().max()) for k in target)


def main() -> None:
    report = {"torch": train(TorchEngine(EngineConfig(threads=1), MODEL, TRAIN))}
    for stage in (0, 1, 2, 3):
        cfg = EngineConfig(
            name="deepspeed", threads=1, deepspeed=DeepSpeedConfig(zero_stage=stage, zero3_whole_params=stage == 3)
        )
        engine = DeepSpeedEngine(cfg, MODEL, TRAIN)
        report[f"zero{stage}"] = train(engine)
        report[f"zero{stage}"]["loaded_deviation"] = loaded_weights_stick(engine)
    for name, offload in (("zero3p", "none"), ("zero3p_offload", "cpu")):  # partitioned parameters
        engine = DeepSpeedEngine(
            EngineConfig(name="deepspeed", threads=1, deepspeed=DeepSpeedConfig(zero_stage=3, offload_param=offload)),
            MODEL,
            TRAIN,
        )
        report[name] = train(engine)
        report[name]["loaded_deviation"] = loaded_weights_stick(engine)
    partitioned = engine
    with torch.no_grad():  # evaluation (no gradient) still runs on partitioned parameters
        sums = partitioned.sequence_loss_sums(ref_batch())
    report["partitioned_eval"] = [len(sums), bool(torch.isfinite(sums).all())]
    Path(sys.argv[1]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
