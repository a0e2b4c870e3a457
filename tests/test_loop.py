"""Loop-level contract: a controller's new weights act exactly from the next shard boundary."""

import adaptive_controller  # noqa: F401  (registers test_loss_softmax)
import numpy as np
from helpers import make_shardset, tiny_config

from trainer.data.sampler import largest_remainder
from trainer.loop import Loop, lr_at
from trainer.tracking import read_jsonl


def test_weights_apply_at_the_next_shard_boundary_and_not_before(tmp_path):
    data = make_shardset(tmp_path / "data")
    cfg = tiny_config(
        data,
        tmp_path / "run",
        **{
            "train.steps": 9,
            "data.steps_per_shard": 3,
            "train.eval_every": 0,
            "mixture": {"name": "test_loss_softmax", "tau": 0.3},
        },
    )
    loop = Loop(cfg)
    after_step = {}
    observe = loop.controller.observe

    def recording_observe(stats):
        observe(stats)
        after_step[stats.step] = loop.controller.weights.copy()

    loop.controller.observe = recording_observe
    loop.train()

    shards = [h for h in loop.history if "shard" in h]
    assert [h["step"] for h in shards] == [0, 3, 6]
    as_array = [np.array([h["weights"][d] for d in loop.data.domains]) for h in shards]
    assert np.allclose(as_array[0], 0.25)
    for k in (1, 2):
        # the weights of shard k are the controller's weights after the last step of shard k-1 ...
        assert np.array_equal(as_array[k], after_step[3 * k - 1])
        # ... while the weights it held after the shard's first step (different) were never used
        assert not np.allclose(after_step[3 * (k - 1)], as_array[k - 1])
    # what each shard actually fed the model follows that shard's weights exactly
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    seq = cfg.data.seq_len
    shard_size = loop.sampler.shard_size
    prev = np.zeros(len(loop.data.domains))
    for k, w in enumerate(as_array):
        end = records[3 * k + 2]
        tokens = np.array([end[f"mixture/tokens/{d}"] for d in loop.data.domains])
        assert np.array_equal((tokens - prev) / seq, largest_remainder(w, shard_size))
        assert [shards[k]["counts"][d] for d in loop.data.domains] == largest_remainder(w, shard_size).tolist()
        for r in records[3 * k : 3 * k + 3]:
            assert np.allclose([r[f"mixture/weight/{d}"] for d in loop.data.domains], w)
        prev = tokens


def test_lr_schedule_warmup_then_cosine():
    from trainer.config import TrainConfig

    t = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, t) == 0.1 and lr_at(9, t) == 1.0
    assert lr_at(10, t) == 1.0 and abs(lr_at(60, t) - 0.55) < 1e-12 and abs(lr_at(110, t) - 0.1) < 1e-12
