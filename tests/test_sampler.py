"""DomainSampler invariants: counts, no repeats within an epoch, rank slices, purity, policies."""

import numpy as np
import pytest

from trainer.data.sampler import DataExhausted, DomainSampler, largest_remainder, rank_slice


def test_largest_remainder_sums_and_is_closest():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.dirichlet(np.ones(7))
        total = int(rng.integers(1, 5000))
        c = largest_remainder(w, total)
        assert c.sum() == total
        assert np.all(np.abs(c - w * total) < 1.0)  # Hamilton: each count within 1 of its quota


def test_largest_remainder_hand_example():
    # quotas 3.3, 3.3, 3.4 of 10 -> floors 3,3,3; the single extra seat goes to the largest remainder (0.4)
    assert largest_remainder(np.array([0.33, 0.33, 0.34]), 10).tolist() == [3, 3, 4]
    # a tie in remainders goes to the lower index
    assert largest_remainder(np.array([0.5, 0.5]), 3).tolist() == [2, 1]


def test_counts_follow_weights_exactly():
    s = DomainSampler([1000, 1000, 1000], shard_size=100, seed=0)
    plan = s.plan_shard(np.array([0.5, 0.3, 0.2]))
    assert plan.counts.tolist() == [50, 30, 20]
    assert np.bincount(plan.domains, minlength=3).tolist() == [50, 30, 20]


def test_zero_weight_domain_never_drawn():
    s = DomainSampler([50, 50], shard_size=20, seed=1)
    for _ in range(5):
        plan = s.plan_shard(np.array([1.0, 0.0]))
        assert set(plan.domains.tolist()) == {0}
        s.advance(plan)


def test_no_repeat_before_epoch_ends_and_full_coverage():
    sizes = [37, 23, 101]
    s = DomainSampler(sizes, shard_size=16, seed=3)
    seen = {d: [] for d in range(3)}
    w = np.array([0.4, 0.35, 0.25])
    for _ in range(40):
        plan = s.plan_shard(w)
        for d, i in zip(plan.domains, plan.indices):
            seen[int(d)].append(int(i))
        s.advance(plan)
    for d, n in enumerate(sizes):
        draws = seen[d]
        full_epochs = len(draws) // n
        assert full_epochs >= 1
        for e in range(full_epochs):
            epoch = draws[e * n : (e + 1) * n]
            assert sorted(epoch) == list(range(n)), f"domain {d} epoch {e} is not a permutation"
        rest = draws[full_epochs * n :]
        assert len(set(rest)) == len(rest)


def test_epochs_are_reshuffled_deterministically():
    s = DomainSampler([10], shard_size=10, seed=5)
    p1 = s.plan_shard(np.array([1.0]))
    s.advance(p1)
    p2 = s.plan_shard(np.array([1.0]))
    assert sorted(p1.indices) == sorted(p2.indices) == list(range(10))
    assert not np.array_equal(p1.indices, p2.indices) or not np.array_equal(np.sort(p1.indices), p1.indices)
    again = DomainSampler([10], shard_size=10, seed=5)
    q1 = again.plan_shard(np.array([1.0]))
    again.advance(q1)
    assert np.array_equal(again.plan_shard(np.array([1.0])).indices, p2.indices)


def test_plan_is_pure_function_of_seed_index_weights_cursors():
    w = np.array([0.2, 0.5, 0.3])
    a = DomainSampler([40, 50, 60], shard_size=24, seed=11)
    for _ in range(3):
        a.advance(a.plan_shard(w))
    state = a.state
    p = a.plan_shard(w)
    b = DomainSampler([40, 50, 60], shard_size=24, seed=11)
    b.load_state_dict(state.to_dict())
    q = b.plan_shard(w)
    assert np.array_equal(p.domains, q.domains) and np.array_equal(p.indices, q.indices)
    # planning does not move the cursors; only advance() does
    assert a.state is state
    c = DomainSampler([40, 50, 60], shard_size=24, seed=12)
    c.load_state_dict(state.to_dict())
    assert not np.array_equal(c.plan_shard(w).indices, p.indices)


def test_rank_slices_are_disjoint_and_cover_the_step():
    global_batch, world = 16, 4
    for step in range(3):
        got = []
        for r in range(world):
            sl = rank_slice(step * global_batch, global_batch, r, world)
            got.extend(range(sl.start, sl.stop))
        assert sorted(got) == list(range(step * global_batch, (step + 1) * global_batch))


def test_every_rank_computes_the_same_plan():
    plans = []
    for _rank in range(3):  # independent sampler objects, as on separate processes
        s = DomainSampler([70, 80, 90], shard_size=30, seed=9)
        for _ in range(4):
            plan = s.plan_shard(np.array([0.1, 0.6, 0.3]))
            s.advance(plan)
        plans.append(plan)
    for p in plans[1:]:
        assert np.array_equal(p.domains, plans[0].domains) and np.array_equal(p.indices, plans[0].indices)


def test_stop_policy_raises_when_a_domain_runs_out():
    s = DomainSampler([10, 100], shard_size=8, seed=0, exhaustion="stop")
    w = np.array([0.5, 0.5])
    s.advance(s.plan_shard(w))  # 4 of 10 used
    s.advance(s.plan_shard(w))  # 8 of 10 used
    with pytest.raises(DataExhausted, match="exhaustion=stop"):
        s.plan_shard(w)


def test_renormalize_policy_moves_share_to_remaining_domains():
    s = DomainSampler([6, 100, 100], shard_size=12, seed=0, exhaustion="renormalize")
    w = np.array([0.5, 0.25, 0.25])
    p1 = s.plan_shard(w)
    assert p1.counts.tolist() == [6, 3, 3]
    s.advance(p1)
    p2 = s.plan_shard(w)  # domain 0 exhausted: its half is spread over the other two
    assert p2.counts.tolist() == [0, 6, 6]
    assert 0 not in set(p2.domains.tolist())


def test_renormalize_raises_when_everything_is_used():
    s = DomainSampler([5, 5], shard_size=6, seed=0, exhaustion="renormalize")
    s.advance(s.plan_shard(np.array([0.5, 0.5])))
    with pytest.raises(DataExhausted):
        s.plan_shard(np.array([0.5, 0.5]))


def test_bad_policy_names_the_knob():
    with pytest.raises(ValueError, match="data.exhaustion"):
        DomainSampler([5], shard_size=2, seed=0, exhaustion="wrap")
