"""Run one training from a JSON config (used under torchrun by the multi-rank tests).

Writes ``rank<r>.json`` into the run dir: the shard weights this rank used and a hash of its full
final parameters (the engine's state dict: gathered under ZeRO-3, where the module holds
partitions), so tests can check every rank agrees.

``run_config.py CONFIG [LOGITS]``: with LOGITS, every rank then runs the trained model (eval mode; a
collective under tensor parallelism and partitioned ZeRO-3) on a fixed batch of token ids, and rank 0
saves ``{"ids", "logits"}`` there: what an exported model must reproduce.
"""

import gc
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adaptive_controller  # noqa: F401,E402  (registers test_loss_softmax)

from trainer import dist  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loop import Loop  # noqa: E402


def main() -> None:
    cfg = load_config(json.loads(Path(sys.argv[1]).read_text()))
    loop = Loop(cfg)
    loop.train()
    h = hashlib.sha256()
    for name, p in sorted(loop.engine.state_dict()["model"].items()):  # a collective under ZeRO-3
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())  # bf16 weights hashed as fp32
    out = {"history": loop.history, "params_sha256": h.hexdigest(), "step": loop.step}
    (Path(loop.run_dir) / f"rank{loop.rank}.json").write_text(json.dumps(out))
    if len(sys.argv) > 2:
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
        loop.engine.model.eval()
        with torch.no_grad():
            logits = loop.engine.model(ids.to(loop.engine.device)).float().cpu()
        if loop.rank == 0:
            torch.save({"ids": ids, "logits": logits}, sys.argv[2])
    del loop
    gc.collect()  # free gloo-backed tensors before the group goes: avoids an abort at interpreter exit
    dist.shutdown()


if __name__ == "__main__":
    main()
