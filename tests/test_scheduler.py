"""dspark.scheduler: SPS tables and the policies the engine calls each round."""

import copy

import pytest
import torch

from dspark import ops
from dspark.scheduler import AsyncHardwareAware, Fixed, HardwareAware, SPSTable, Threshold
from stats import assert_fits


class FakeClock:
    """A forward pass of B tokens 'takes' cost(B) seconds, plus jitter on one
    repeat in five (the median must ignore it)."""

    def __init__(self, cost):
        self.now, self.cost, self.calls = 0.0, cost, 0

    def __call__(self):
        return self.now

    def forward(self, b):
        self.calls += 1
        self.now += self.cost(b) * (3.0 if self.calls % 5 == 0 else 1.0)


def test_profile_takes_the_median_and_keeps_the_jagged_curve():
    cost = lambda b: 0.01 + 0.001 * b + (0.004 if b % 8 == 1 else 0.0)  # a cliff after each tile of 8
    clock = FakeClock(cost)
    table = SPSTable.profile(clock.forward, 20, warmup=1, repeats=5, timer=clock)
    assert table.max_batch_tokens == 20 and table.steps_per_second[0] == 0.0
    for b in range(1, 21):
        assert table(b) == pytest.approx(1 / cost(b), rel=1e-9)
    assert table(9) < table(10)  # jagged, not smoothed
    assert clock.calls == 20 * 6


def test_profile_subset_and_roundtrip(tmp_path):
    clock = FakeClock(lambda b: 0.5)
    table = SPSTable.profile(clock.forward, 6, batch_sizes=[1, 3], repeats=3, timer=clock)
    assert table.steps_per_second == [0.0, 2.0, 0.0, 2.0, 0.0, 0.0, 0.0]
    table.save(tmp_path / "sps.json")
    loaded = SPSTable.load(tmp_path / "sps.json")
    assert loaded.steps_per_second == table.steps_per_second
    assert torch.equal(loaded.tensor(), torch.tensor(table.steps_per_second))
    with pytest.raises(ValueError):
        SPSTable([0.0, float("nan")])
    with pytest.raises(ValueError):
        SPSTable.profile(clock.forward, 0)


def test_simple_policies_match_the_op():
    conf = torch.rand(9, 6, generator=torch.Generator().manual_seed(1))
    cap = torch.tensor([6, 5, 4, 3, 2, 1, 0, 6, 6])
    sps = SPSTable.from_curve(lambda b: 1.0 / (1 + 0.05 * b), 80)
    assert Fixed()(conf, cap).tolist() == cap.tolist()
    assert Fixed(1)(conf).tolist() == [1] * 9
    assert torch.equal(Threshold(0.4)(conf, cap), ops.schedule_prefix(conf, mode="threshold", threshold=0.4, cap=cap).lengths)
    assert torch.equal(HardwareAware(sps)(conf, cap),
                       ops.schedule_prefix(conf, mode="causal", sps=sps.tensor(), cap=cap).lengths)


def test_async_policy_cold_start_and_capacity_from_two_steps_back():
    g = torch.Generator().manual_seed(3)
    sps = SPSTable.from_curve(lambda b: 1.0 / (1 + 0.02 * b) * (0.8 if b % 16 == 1 else 1.0), 200)
    policy = AsyncHardwareAware(sps)
    confs = [torch.rand(8, 5, generator=g) ** 0.3 for _ in range(3)] + [torch.rand(11, 5, generator=g) ** 0.3]
    # steps 0 and 1: the synchronous causal scheduler
    for t in range(2):
        assert torch.equal(policy(confs[t]), ops.schedule_prefix(confs[t], mode="causal", sps=sps.tensor()).lengths)
    found = [ops.schedule_prefix(c, mode="global", sps=sps.tensor()) for c in confs]
    # step 2: the batch size found at step 0, as a draft budget for the current batch
    k2 = max(0, int(found[0].capacity) + 8 - 8)
    got = policy(confs[2])
    assert torch.equal(got, ops.schedule_prefix(confs[2], mode="budget", budget=k2).lengths)
    # step 3: three requests joined; the batch size from step 1 is kept
    k3 = max(0, int(found[1].capacity) + 8 - 11)
    got = policy(confs[3])
    assert int(got.sum()) == min(k3, int(ops.schedule_prefix(confs[3], mode="budget", budget=10**6).capacity))
    policy.reset()
    assert torch.equal(policy(confs[2]), ops.schedule_prefix(confs[2], mode="causal", sps=sps.tensor()).lengths)


def test_async_policy_is_lossless_on_the_counterexample():
    """The counterexample of DSPARK.md at step 2 of the asynchronous policy: the
    budget comes from step 0, the admission from the current survivals. The
    first token is A with probability 0.7 (power >= 0.99 against a 2% bias)."""
    sps = torch.tensor([0.0, 1.0, 0.5, 0.45])
    trials = 40000
    g = torch.Generator().manual_seed(4)
    drafts = torch.randint(0, 2, (trials, 2), generator=g)
    lengths = torch.empty(trials, dtype=torch.int64)
    warm = AsyncHardwareAware(sps)
    for _ in range(2):  # steps 0 and 1 saw x_1 = A
        warm(torch.tensor([[0.8, 0.9]]))
    for i in range(trials):
        policy = copy.copy(warm)  # each trial continues from the same two steps
        policy._batch_tokens = list(warm._batch_tokens)
        conf = torch.tensor([[0.8, 0.9]]) if int(drafts[i, 0]) == 0 else torch.tensor([[0.8, 0.0]])
        lengths[i] = int(policy(conf)[0])
    assert set(lengths.tolist()) == {1, 2}  # x_1 is always verified
    cu = torch.zeros(trials + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    draft_tokens = torch.cat([drafts[i, : int(lengths[i])] for i in range(trials)])
    rows = [torch.log(torch.tensor([0.7, 0.3]))]
    target = torch.cat([torch.stack(rows + [torch.log(torch.tensor([0.5, 0.5]))] * int(n)) for n in lengths])
    out = ops.rejection_sample(target, draft_tokens, cu, draft_logits=torch.zeros(draft_tokens.numel(), 2),
                               seed=torch.randint(0, 2**62, (trials,), generator=g), max_num_draft=2)
    assert_fits(out.output_tokens[:, 0].long(), torch.tensor([0.7, 0.3], dtype=torch.float64), "async", epsilon=0.02)
