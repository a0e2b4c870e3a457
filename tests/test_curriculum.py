"""Irreducible curriculum (controllers reference §4): holdout, proxy scoring, paced within-domain
order, refusal of mismatched scores, and bit-exact resume of static and online curricula."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, losses_by_step, run_torchrun, tiny_config, tiny_values

from trainer.config import ConfigError, load_config
from trainer.curriculum.holdout import holdout_mask, subset_pools
from trainer.curriculum.pacing import OnlineOrder, ScoreOrder, pacing_fraction, replay
from trainer.data.indexed import write_indexed
from trainer.data.sampler import DomainSampler, SamplerState, rank_slice
from trainer.data.shardset import write_manifest
from trainer.data.tokenizer import get_tokenizer

SCRIPT = REPO / "tests" / "scripts" / "run_config.py"
SEQ = 32
DOC = 10 * SEQ  # a document spans about ten samples, so most samples lie inside one document


# ---- a shard set with learnable and unlearnable samples in one domain -------------------------
def _mixed_shardset(root, n_docs=60, seed=0):
    """Domain 'mixed': documents alternate highly regular text and uniformly random bytes;
    domain 'words': regular word salad. Returns the root and, per sample of 'mixed', 1 = regular,
    0 = random, -1 = straddles both (excluded from the check)."""
    tok = get_tokenizer("bytes")
    rng = np.random.default_rng(seed)
    docs, kinds = [], []
    for i in range(n_docs):
        if i % 2 == 0:
            text = np.frombuffer(("abcdefgh" * (DOC // 8)).encode(), dtype=np.uint8)
            kinds.append(1)
        else:
            text = rng.integers(0, 256, size=DOC)
            kinds.append(0)
        docs.append(np.concatenate([text, [tok.eod]]).astype(tok.dtype))
    token_kind = np.concatenate([np.full(d.size, k) for d, k in zip(docs, kinds)])
    root.mkdir(parents=True, exist_ok=True)

    def write(prefix, arrays):
        return {"prefix": prefix, **write_indexed(root / prefix, arrays, dtype=tok.dtype)}

    words = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "far"]
    word_docs = [
        np.array(tok.encode(" ".join(rng.choice(words, size=80))) + [tok.eod], dtype=tok.dtype) for _ in range(30)
    ]
    valid = [np.array(tok.encode("abcdefgh" * 20) + [tok.eod], dtype=tok.dtype)]
    domains = {
        "mixed": {"splits": {"train": write("mixed/train", docs), "valid": write("mixed/valid", valid)}},
        "words": {"splits": {"train": write("words/train", word_docs), "valid": write("words/valid", word_docs[:2])}},
    }
    write_manifest(
        root,
        {"tokenizer": tok.identity(), "recipe_hash": "synthetic", "domains": domains, "targets": {}, "missing": {}},
    )
    n = (token_kind.size - 1) // SEQ
    labels = np.full(n, -1)
    for j in range(n):
        k = token_kind[j * SEQ : j * SEQ + SEQ + 1]
        if (k == k[0]).all():
            labels[j] = k[0]
    return root, labels


def _mixtrain(args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """A real proxy trained by `mixtrain train +experiment=curriculum_proxy`, then `mixtrain score`."""
    from trainer.cli import main

    base = tmp_path_factory.mktemp("curriculum")
    data, labels = _mixed_shardset(base / "data")
    run = base / "proxy"
    _mixtrain(
        [
            "train",
            "+experiment=curriculum_proxy",
            "data=shards",
            f"data.path={data}",
            "data.tokenizer=bytes",
            f"data.seq_len={SEQ}",
            "data.steps_per_shard=4",
            "data.eval_sequences=4",
            "model.d_model=32",
            "model.max_seq_len=64",
            "train.steps=40",
            "train.micro_batch=8",
            "train.lr=3e-3",
            "train.min_lr=3e-4",
            "train.warmup_steps=2",
            "train.eval_every=0",
            "engine.threads=1",
            "run.progress=false",
            "run.wandb=disabled",
            "run.plots=false",
            f"hydra.run.dir={run}",
        ],
        base,
    )
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert steps == list(range(4, 41, 4))  # every 10% of the steps, all kept
    main(["score", str(run), "--batch", "32", "--no-progress"])
    (scores_dir,) = (run / "scores").iterdir()
    return {"data": data, "labels": labels, "run": run, "scores": scores_dir, "base": base}


# ---- holdout ------------------------------------------------------------------------------------
def test_holdout_is_a_fixed_hash_of_domain_and_sample_index():
    m = holdout_mask("code", 20000, 0.1)
    assert abs(m.mean() - 0.1) < 0.01
    assert np.array_equal(m, holdout_mask("code", 20000, 0.1))  # pure
    assert np.array_equal(holdout_mask("code", 5000, 0.1), m[:5000])  # a growing stream keeps membership
    assert not np.array_equal(holdout_mask("math", 20000, 0.1), m)  # depends on the domain's name
    main, hold = subset_pools(["code"], [20000], 0.1, "main")[0], subset_pools(["code"], [20000], 0.1, "holdout")[0]
    assert np.intersect1d(main, hold).size == 0 and np.union1d(main, hold).tolist() == list(range(20000))
    assert subset_pools(["code"], [20000], 0.1, "all") is None
    with pytest.raises(ValueError, match="data.holdout_fraction"):
        subset_pools(["tiny"], [2], 0.01, "holdout")


def test_pools_keep_the_sampler_invariants_and_identity_pools_change_nothing():
    sizes = [300, 200]
    pools = subset_pools(["a", "b"], sizes, 0.1, "main")
    s = DomainSampler(sizes, shard_size=24, seed=3, pools=pools)
    w = np.array([0.6, 0.4])
    seen = {0: [], 1: []}
    for _ in range(40):
        plan = s.plan_shard(w)
        for d, i in zip(plan.domains, plan.indices):
            seen[int(d)].append(int(i))
        s.advance(plan)
    for d in (0, 1):
        n = pools[d].size
        epochs = len(seen[d]) // n
        assert epochs >= 1
        for e in range(epochs):  # each epoch is a permutation of the restricted set: no holdout sample, no repeat
            assert sorted(seen[d][e * n : (e + 1) * n]) == pools[d].tolist()
    # explicit all-sample pools reproduce the plain sampler bit for bit
    a, b = DomainSampler(sizes, 24, seed=3), DomainSampler(sizes, 24, seed=3, pools=[np.arange(n) for n in sizes])
    for _ in range(5):
        p, q = a.plan_shard(w), b.plan_shard(w)
        assert np.array_equal(p.indices, q.indices) and np.array_equal(p.domains, q.domains)
        assert p.scores is None and "consumed" not in p.next_state.to_dict()
        a.advance(p)
        b.advance(q)


# ---- paced order --------------------------------------------------------------------------------
def _score_sampler(sizes, scores, pools, shard_size=20, steps_per_shard=2, total_steps=40, seed=7, f0=0.25, u_full=0.5):
    order = ScoreOrder(
        scores, pools, seed=seed, steps_per_shard=steps_per_shard, total_steps=total_steps, f0=f0, u_full=u_full
    )
    return DomainSampler(sizes, shard_size, seed=seed, pools=pools, order=order)


def test_pacing_fraction():
    assert pacing_fraction(0.0, 0.25, 0.5) == 0.25
    assert pacing_fraction(0.25, 0.25, 0.5) == 0.625
    assert pacing_fraction(0.5, 0.25, 0.5) == pacing_fraction(0.9, 0.25, 0.5) == 1.0


def test_curriculum_draws_most_learnable_first_and_covers_each_sample_once_per_epoch():
    rng = np.random.default_rng(0)
    sizes = [240, 160]
    scores = [rng.normal(size=n).astype(np.float32) for n in sizes]
    pools = subset_pools(["a", "b"], sizes, 0.1, "main")
    s = _score_sampler(sizes, scores, pools)
    w = np.array([0.5, 0.5])
    per_shard = []
    seen = {0: [], 1: []}
    while len(seen[0]) < 2 * pools[0].size:
        plan = s.plan_shard(w)
        per_shard.append(plan)
        for d, i in zip(plan.domains, plan.indices):
            seen[int(d)].append(int(i))
        s.advance(plan)
    for d in (0, 1):
        n = pools[d].size
        pool_scores = scores[d][pools[d]]
        first = per_shard[0]
        drawn = first.indices[first.domains == d]
        # the first shard (u = 0) draws only from the top f0 = 25% of the domain by score
        top = np.sort(pool_scores)[::-1][int(np.ceil(0.25 * n)) - 1]
        assert np.all(scores[d][drawn] >= top)
        # every sample of the restricted set exactly once per epoch, no repeats, no holdout
        assert sorted(seen[d][:n]) == pools[d].tolist()
        assert sorted(seen[d][n : 2 * n]) == pools[d].tolist()
        # mean score of the drawn samples falls as the curriculum widens (first epoch)
        means = [p.scores[p.domains == d].mean() for p in per_shard if p.shard_index * 2 < 20]
        assert means[0] > means[-1] and means[0] > np.mean(means[len(means) // 2 :])
        assert np.allclose(first.scores[first.domains == d], scores[d][drawn])
    assert [p.fraction for p in per_shard[:3]] == [
        0.25,
        pacing_fraction(2 / 40, 0.25, 0.5),
        pacing_fraction(4 / 40, 0.25, 0.5),
    ]


def test_curriculum_plan_is_pure_identical_on_every_rank_and_across_a_state_dict_round_trip():
    rng = np.random.default_rng(1)
    sizes = [150, 90, 60]
    scores = [rng.normal(size=n) for n in sizes]
    pools = subset_pools(["a", "b", "c"], sizes, 0.1, "main")
    w = np.array([0.2, 0.5, 0.3])
    ranks = [_score_sampler(sizes, scores, pools, shard_size=24) for _ in range(2)]  # separate "processes"
    for _ in range(5):
        plans = [r.plan_shard(w) for r in ranks]
        assert np.array_equal(plans[0].indices, plans[1].indices) and np.array_equal(plans[0].domains, plans[1].domains)
        for r, p in zip(ranks, plans):
            r.advance(p)
    state = ranks[0].state
    assert state.consumed is not None and any(c.any() for c in state.consumed)
    restored = _score_sampler(sizes, scores, pools, shard_size=24)
    restored.load_state_dict(json.loads(json.dumps(state.to_dict())))  # through JSON: plain data only
    for _ in range(8):  # crosses an epoch boundary of the small domains
        p, q = ranks[0].plan_shard(w), restored.plan_shard(w)
        assert np.array_equal(p.indices, q.indices) and np.array_equal(p.domains, q.domains)
        assert np.array_equal(p.next_state.to_dict()["consumed"], q.next_state.to_dict()["consumed"])
        ranks[0].advance(p)
        restored.advance(q)
    # ranks take disjoint slices of one step's batch: together they hold the step's samples once
    plan = ranks[0].plan_shard(w)
    got = [
        (int(plan.domains[i]), int(plan.indices[i]))
        for r in range(4)
        for i in range(*rank_slice(8, 8, r, 4).indices(plan.domains.size))
    ]
    assert len(set(got)) == 8
    # another seed gives another order; a plain state does not load into a curriculum sampler
    other = _score_sampler(sizes, scores, pools, shard_size=24, seed=8)
    other.load_state_dict(state.to_dict())
    assert not np.array_equal(other.plan_shard(w).indices, ranks[0].plan_shard(w, state=state).indices)
    with pytest.raises(ValueError, match="curriculum"):
        restored.load_state_dict(SamplerState(cursors=state.cursors).to_dict())


def test_online_order_takes_the_top_of_a_pool_and_replays_exactly():
    sizes = [100, 80]
    truth = [np.arange(n, dtype=np.float64) for n in sizes]  # score = sample index
    calls = []

    def score_fn(d, idx):
        calls.append((d, len(idx)))
        return truth[d][idx]

    pools = subset_pools(["a", "b"], sizes, 0.1, "main")
    s = DomainSampler(sizes, 20, seed=2, pools=pools, order=OnlineOrder(pools, seed=2, pool_factor=4))
    w = np.array([0.5, 0.5])
    plan = s.plan_shard(w, score_fn=score_fn)
    assert calls == [(0, 40), (1, 40)]  # a pool of 4x each domain's count
    for d, rec in enumerate(plan.recorded):
        drawn = np.sort(plan.indices[plan.domains == d])
        assert np.array_equal(drawn, np.sort(rec)[-10:])  # the top 10 of the 40 candidates
    again = s.plan_shard(w, score_fn=replay(plan.recorded))
    assert np.array_equal(again.indices, plan.indices) and np.array_equal(again.domains, plan.domains)
    seen = {0: [], 1: []}
    for _ in range(12):
        p = s.plan_shard(w, score_fn=score_fn)
        for d, i in zip(p.domains, p.indices):
            seen[int(d)].append(int(i))
        s.advance(p)
    for d in (0, 1):
        n = pools[d].size
        assert sorted(seen[d][:n]) == pools[d].tolist()  # still every sample once per epoch


# ---- proxy scores -------------------------------------------------------------------------------
def test_proxy_scores_rank_random_samples_as_least_learnable(proxy):
    meta = json.loads((proxy["scores"] / "meta.json").read_text())
    assert proxy["scores"].parent == proxy["run"] / "scores" and proxy["scores"].name == meta["key"]
    assert meta["early"]["step"] == 4 and meta["late"]["step"] == 40 and meta["data"]["seq_len"] == SEQ
    s = np.load(proxy["scores"] / "mixed.npy")
    labels = proxy["labels"]
    assert s.dtype == np.float32 and s.size == labels.size  # aligned with the domain's sample index
    regular, random = s[labels == 1], s[labels == 0]
    assert regular.size > 100 and random.size > 100
    auc = (random[:, None] < regular[None, :]).mean()
    assert auc >= 0.9, auc
    assert np.all(random < np.median(regular))
    assert np.load(proxy["scores"] / "words.npy").size == meta["data"]["samples"]["words"]


def test_mismatched_scores_are_refused(proxy, tmp_path):
    from trainer.loop import Loop

    def cfg(data, **kw):
        return tiny_config(
            data,
            tmp_path / "run",
            **{
                "data.holdout_fraction": 0.1,
                "data.subset": "main",
                "data.seq_len": SEQ,
                "curriculum": {"name": "irreducible", "scores": str(proxy["run"])},
                **kw,
            },
        )

    with pytest.raises(ConfigError, match=r"curriculum.scores.*(?s:.*)data.seq_len: scores 32 vs this run 16"):
        Loop(cfg(proxy["data"], **{"data.seq_len": 16}))
    other, _ = _mixed_shardset(tmp_path / "other", n_docs=50, seed=1)
    with pytest.raises(ConfigError, match=r"curriculum.scores(?s:.*)shard set"):
        Loop(cfg(other))
    with pytest.raises(ConfigError, match=r"(?s)curriculum.scores.*data.seq_len"):
        Loop(cfg(other, **{"curriculum": {"name": "irreducible", "scores": str(proxy["scores"])}, "data.seq_len": 16}))
    bad = tmp_path / "bad"
    shutil.copytree(proxy["scores"], bad)
    np.save(bad / "mixed.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ConfigError, match="mixed.npy holds 5 scores"):
        Loop(cfg(proxy["data"], **{"curriculum": {"name": "irreducible", "scores": str(bad)}}))
    with pytest.raises(ConfigError, match="data.holdout_fraction"):
        Loop(cfg(proxy["data"], **{"data.holdout_fraction": 0.2}))
    own = tmp_path / "own"  # scores of a proxy that trained on the main run's own samples
    shutil.copytree(proxy["scores"], own)
    meta = json.loads((own / "meta.json").read_text())
    meta["proxy"]["subset"] = "all"
    (own / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="data.subset='all'.*main run's own samples"):
        Loop(cfg(proxy["data"], **{"curriculum": {"name": "irreducible", "scores": str(own)}}))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="data.subset"):
        load_config(tiny_values(proxy["data"], tmp_path / "r", curriculum={"name": "irreducible", "scores": "x"}))
    with pytest.raises(ConfigError, match="curriculum.f0"):
        load_config(
            tiny_values(
                proxy["data"],
                tmp_path / "r",
                **{
                    "data.holdout_fraction": 0.1,
                    "data.subset": "main",
                    "curriculum": {"name": "irreducible", "scores": "x", "f0": 0},
                },
            )
        )


# ---- training with a curriculum: bit-exact resume -----------------------------------------------
def _launch(nproc, values, cfg_path):
    cfg_path.write_text(json.dumps(values))
    if nproc == 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, str(SCRIPT), str(cfg_path)], capture_output=True, text=True, timeout=300, env=env
        )
    return run_torchrun(nproc, SCRIPT, str(cfg_path))


def _resume_case(tmp_path, data, curriculum, nproc=1):
    def values(run_dir, **extra):
        return tiny_values(
            data,
            run_dir,
            **{
                "data.seq_len": SEQ,
                "data.holdout_fraction": 0.1,
                "data.subset": "main",
                "curriculum": curriculum,
                "train.steps": 10,
                "train.checkpoint_every": 3,
                "train.eval_every": 5,
                "train.micro_batch": 4 // nproc,
                "train.grad_accum": 2,
                "data.steps_per_shard": 2,
                "mixture": {"name": "test_loss_softmax", "tau": 0.5},
                **extra,
            },
        )

    ref = _launch(nproc, values(tmp_path / "ref"), tmp_path / "ref.json")
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    crashed = _launch(nproc, values(tmp_path / "run", **{"train.fail_at_step": 7}), tmp_path / "a.json")
    assert crashed.returncode != 0
    resumed = _launch(nproc, values(tmp_path / "run"), tmp_path / "b.json")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 6" in resumed.stdout
    ref_log, run_log = losses_by_step(tmp_path / "ref"), losses_by_step(tmp_path / "run")
    assert run_log == ref_log
    ranks = [[json.loads((tmp_path / d / f"rank{r}.json").read_text()) for r in range(nproc)] for d in ("ref", "run")]
    assert ranks[1][0]["history"] == ranks[0][0]["history"]
    assert ranks[1][0]["params_sha256"] == ranks[0][0]["params_sha256"]
    for r in range(1, nproc):
        assert ranks[1][r]["history"] == ranks[1][0]["history"]
        assert ranks[1][r]["params_sha256"] == ranks[1][0]["params_sha256"]
    assert len({json.dumps(h["weights"]) for h in ranks[0][0]["history"]}) > 1  # the controller steered the counts
    return ref_log, ranks[0][0]["history"]


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_static_curriculum_trains_and_resumes_bit_exactly(proxy, tmp_path):
    log, history = _resume_case(tmp_path, proxy["data"], {"name": "irreducible", "scores": str(proxy["run"])})
    shards = [h["curriculum"] for h in history if "curriculum" in h]
    assert len(shards) == 5
    assert shards[0]["curriculum/fraction"] == 0.25 and shards[-1]["curriculum/fraction"] == 1.0
    # the first shard takes the most learnable samples of the mixed domain: its mean score beats the last's
    assert shards[0]["curriculum/score/mixed"] > shards[-1]["curriculum/score/mixed"]
    assert log[0]["curriculum/fraction"] == 0.25


@pytest.mark.slow  # the default suite stays under 10 minutes
def test_online_curriculum_trains_and_resumes_bit_exactly(proxy, tmp_path):
    log, history = _resume_case(
        tmp_path,
        proxy["data"],
        {"name": "irreducible_online", "proxy_model": {"d_model": 32}, "proxy_lr": 3e-3, "score_batch": 8},
    )
    assert all("curriculum/proxy_loss" in log[s] for s in range(10))
    assert log[9]["curriculum/proxy_loss"] < log[0]["curriculum/proxy_loss"]  # the proxy learns on the holdout
    scored = [h["curriculum"] for h in history[1:]]
    assert all("curriculum/score" in c for c in scored) and any(c["curriculum/score"] != 0 for c in scored)


@pytest.mark.slow
def test_online_curriculum_resumes_bit_exactly_on_two_ranks(proxy, tmp_path):
    _resume_case(
        tmp_path,
        proxy["data"],
        {"name": "irreducible_online", "proxy_model": {"d_model": 32}, "score_batch": 8},
        nproc=2,
    )


def test_score_help_and_usage():
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "score", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0 and "--early" in proc.stdout and "PROXY_RUN" in proc.stdout
    from trainer.cli import USAGE

    assert "mixtrain score" in USAGE and "curriculum=irreducible" in USAGE
