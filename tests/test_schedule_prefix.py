"""schedule_prefix: the paper's counterexample run through the op and
rejection_sample, agreement with the literal Algorithm 1 (dspark.reference)
and with brute force on small instances, the other modes, edge cases, bad
input, torch integration, and CUDA against the CPU."""

import functools
import itertools
import random

import pytest
import torch

from dspark import ops, reference
from stats import assert_fits, assert_rejects

A, B = 0, 1


# ----------------------------------------------------------- counterexample


COUNTEREXAMPLE_SPS = torch.tensor([0.0, 1.0, 0.5, 0.45])


@functools.lru_cache(maxsize=None)
def _no_early_stop_cached(conf: tuple, sps: tuple) -> tuple:
    return tuple(reference.schedule_prefix(torch.tensor(conf), mode="global", sps=torch.tensor(sps)).lengths.tolist())


def _no_early_stop(conf: torch.Tensor, sps: torch.Tensor) -> torch.Tensor:
    """The search without the break (a test helper, not lossless): the best
    prefix of the sorted candidates over all steps."""
    return torch.tensor(_no_early_stop_cached(tuple(map(tuple, conf.tolist())), tuple(sps.tolist())))


def _counterexample_first_tokens(schedule, trials: int, seed: int) -> torch.Tensor:
    """One request, gamma = 2, vocabulary {A, B}: p_t = (0.7, 0.3) at the first
    position, p_d = (0.5, 0.5); c_1 = 0.8 and c_2 = 0.9 after drawing A, 0
    after B. Each trial drafts, schedules alone (R = 1) and verifies; returns
    the first committed token of every trial."""
    g = torch.Generator().manual_seed(seed)
    drafts = torch.randint(0, 2, (trials, 2), generator=g)
    lengths = torch.empty(trials, dtype=torch.int64)
    conf_a, conf_b = torch.tensor([[0.8, 0.9]]), torch.tensor([[0.8, 0.0]])
    for i in range(trials):
        conf = conf_a if int(drafts[i, 0]) == A else conf_b
        lengths[i] = int(schedule(conf, COUNTEREXAMPLE_SPS)[0])
    # Verify all trials at once: independent requests with their own seeds.
    cu = torch.zeros(trials + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    draft_tokens = torch.cat([drafts[i, : int(lengths[i])] for i in range(trials)])
    first_row = torch.log(torch.tensor([0.7, 0.3]))
    later_row = torch.log(torch.tensor([0.5, 0.5]))
    target = torch.cat([torch.stack([first_row] + [later_row] * int(lengths[i])) for i in range(trials)])
    out = ops.rejection_sample(target, draft_tokens, cu, draft_logits=torch.zeros(draft_tokens.numel(), 2),
                               seed=torch.randint(0, 2**62, (trials,), generator=g), max_num_draft=2)
    return out.output_tokens[:, 0].long()


def test_counterexample_causal_scheduler_is_lossless():
    """The first token is A with probability 0.7 exactly. 40000 trials: the
    chi-square test at 1e-6 has power >= 0.99 against any deviation of 2% (and
    ~1 against the 0.85 of a search without early stop)."""
    first = _counterexample_first_tokens(
        lambda conf, sps: ops.schedule_prefix(conf, mode="causal", sps=sps).lengths, 40000, seed=1)
    assert_fits(first, torch.tensor([0.7, 0.3], dtype=torch.float64), "causal", epsilon=0.02)


def test_counterexample_without_early_stop_is_caught():
    first = _counterexample_first_tokens(_no_early_stop, 40000, seed=2)
    assert_rejects(first, torch.tensor([0.7, 0.3], dtype=torch.float64), "no early stop")
    assert abs(float((first == A).double().mean()) - 0.85) < 0.01


def test_counterexample_decisions():
    ab = ops.schedule_prefix(torch.tensor([[0.8, 0.9], [0.8, 0.0]])[:1], mode="causal", sps=COUNTEREXAMPLE_SPS)
    assert ab.lengths.tolist() == [0]  # theta_1 = 1.8 * 0.5 = 0.9 < 1.0: stop at l = 0
    assert float(ab.throughput) == pytest.approx(1.0)
    assert _no_early_stop(torch.tensor([[0.8, 0.9]]), COUNTEREXAMPLE_SPS).tolist() == [2]
    assert _no_early_stop(torch.tensor([[0.8, 0.0]]), COUNTEREXAMPLE_SPS).tolist() == [0]


# -------------------------------------------------- reference and brute force


def _random_instance(rng: random.Random):
    R = rng.randint(1, 5)
    gamma = rng.randint(1, 4)
    conf = torch.tensor([[rng.choice([rng.random(), 1.0, 0.0, rng.random() ** 0.2]) for _ in range(gamma)]
                         for _ in range(R)], dtype=torch.float32)
    table = R * gamma + R + rng.randint(-2, 2)
    jagged = [rng.uniform(0.2, 1.0) * (0.9 ** b) for b in range(max(table, 1))]
    cap = torch.tensor([rng.randint(-1, gamma + 1) for _ in range(R)], dtype=torch.int32) if rng.random() < 0.5 else None
    return conf, torch.tensor(jagged, dtype=torch.float32), cap


@pytest.mark.parametrize("mode", ["causal", "global", "budget", "threshold", "fixed"])
def test_matches_reference_on_random_instances(mode):
    rng = random.Random(sum(map(ord, mode)))
    for _ in range(400):
        conf, sps, cap = _random_instance(rng)
        kw = dict(mode=mode, sps=sps, cap=cap)
        if mode == "budget":
            kw["budget"] = rng.randint(-1, conf.numel() + 2)
        if mode == "threshold":
            kw["threshold"] = rng.random()
        got = ops.schedule_prefix(conf, **kw)
        want = reference.schedule_prefix(conf, **kw)
        assert got.lengths.tolist() == want.lengths.tolist(), (conf, sps, cap, kw)
        assert int(got.capacity) == want.capacity
        assert float(got.throughput) == pytest.approx(want.throughput, rel=1e-6)
        limits = conf.shape[1] if cap is None else cap.clamp(0, conf.shape[1])
        assert (got.lengths <= limits).all() and (got.lengths >= 0).all()


def _best_over_all_length_vectors(conf, sps):
    R, gamma = conf.shape
    best = -1.0
    for lengths in itertools.product(range(gamma + 1), repeat=R):
        total = sum(lengths)
        if R + total >= sps.numel():
            continue
        tokens = R + sum(sum(reference._survivals(conf[r], lengths[r])) for r in range(R))
        best = max(best, tokens * float(sps[R + total]))
    return best


def test_causal_equals_the_global_optimum_when_theta_is_unimodal():
    """With SPS non-increasing per token and theta unimodal along the sorted
    path, early stopping loses nothing: the causal choice is the best of all
    (gamma + 1)^R length vectors."""
    rng = random.Random(5)
    checked = 0
    while checked < 150:
        R, gamma = rng.randint(1, 4), rng.randint(1, 3)
        conf = torch.rand(R, gamma, generator=torch.Generator().manual_seed(rng.randint(0, 10**6))) ** 0.3
        per_token = [rng.uniform(0.7, 1.0) for _ in range(R * gamma + R + 1)]
        sps = torch.tensor([1.0] + list(itertools.accumulate(per_token, lambda x, y: x * y)), dtype=torch.float32)
        path = reference.schedule_prefix(conf, mode="global", sps=sps).thetas
        peak = max(range(len(path)), key=lambda t: path[t])
        unimodal = all(path[t] < path[t + 1] for t in range(peak)) and \
            all(path[t] >= path[t + 1] for t in range(peak, len(path) - 1))
        if not unimodal:
            continue
        got = ops.schedule_prefix(conf, mode="causal", sps=sps)
        assert float(got.throughput) == pytest.approx(_best_over_all_length_vectors(conf, sps), rel=1e-6)
        checked += 1


def test_causal_stops_at_the_first_step_that_does_not_improve():
    """A jagged curve: theta dips at B = 3 and recovers at B = 4. Causal stops
    before the dip; global steps over it."""
    conf = torch.tensor([[0.9, 0.9, 0.9]])
    sps = torch.tensor([0.0, 1.0, 0.7, 0.45, 0.5])
    assert ops.schedule_prefix(conf, mode="causal", sps=sps).lengths.tolist() == [1]
    assert ops.schedule_prefix(conf, mode="global", sps=sps).lengths.tolist() == [3]


def test_budget_admits_the_top_candidates_as_prefixes():
    rng = random.Random(9)
    for _ in range(300):
        conf, _, cap = _random_instance(rng)
        K = rng.randint(0, conf.numel() + 1)
        lengths = ops.schedule_prefix(conf, mode="budget", budget=torch.tensor([K]), cap=cap).lengths
        limits = [conf.shape[1] if cap is None else max(0, min(conf.shape[1], int(c))) for c in
                  (cap if cap is not None else [0] * conf.shape[0])]
        candidates = [(a, j, r) for r in range(conf.shape[0])
                      for j, a in enumerate(reference._survivals(conf[r], limits[r]), 1) if a > 0]
        assert int(lengths.sum()) == min(K, len(candidates))
        admitted = {(j, r) for r in range(conf.shape[0]) for j in range(1, int(lengths[r]) + 1)}
        top = sorted(candidates, key=lambda x: (-x[0], x[1], x[2]))[:K]
        assert admitted == {(j, r) for _, j, r in top}


def test_ties_with_confidence_one_keep_prefixes():
    conf = torch.ones(3, 2)
    assert ops.schedule_prefix(conf, mode="budget", budget=4).lengths.tolist() == [2, 1, 1]
    assert ops.schedule_prefix(conf, mode="budget", budget=2).lengths.tolist() == [1, 1, 0]


def test_zero_survival_is_never_admitted():
    conf = torch.tensor([[1.0, 0.0, 1.0], [float("nan"), 1.0, 1.0], [0.5, 0.5, -3.0]])
    out = ops.schedule_prefix(conf, mode="budget", budget=100)
    assert out.lengths.tolist() == [1, 0, 2] and int(out.capacity) == 3
    sps = torch.full((20,), 1.0)  # a flat curve admits every candidate
    assert ops.schedule_prefix(conf, mode="causal", sps=sps).lengths.tolist() == [1, 0, 2]


def test_table_end_is_not_admitted():
    conf = torch.ones(2, 4)
    sps = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])  # B_max = 4: at most 2 drafts for R = 2
    out = ops.schedule_prefix(conf, mode="causal", sps=sps)
    assert int(out.capacity) == 2
    assert ops.schedule_prefix(torch.ones(5, 2), mode="causal", sps=sps).lengths.tolist() == [0] * 5


def test_throughput_saturates_instead_of_overflowing():
    """A finite table near the float32 limit: the expected throughput
    (tokens x SPS, computed in double) is reported as FLT_MAX, not inf."""
    conf = torch.ones(2, 3)
    sps = torch.full((10,), 3.0e38)
    sps[0] = 0.0
    for mode in ("causal", "global", "fixed"):
        out = ops.schedule_prefix(conf, mode=mode, sps=sps)
        assert torch.isfinite(out.throughput).all(), mode
        assert float(out.throughput) == torch.finfo(torch.float32).max


def test_empty_batch():
    out = ops.schedule_prefix(torch.zeros(0, 5), mode="causal", sps=torch.ones(4))
    assert out.lengths.shape == (0,) and int(out.capacity) == 0 and float(out.throughput) == 0.0
    assert ops.schedule_prefix(torch.zeros(0, 5), mode="fixed").lengths.shape == (0,)


def test_threshold_and_fixed_with_caps():
    conf = torch.tensor([[0.9, 0.8, 0.3, 0.9], [0.2, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]])
    cap = torch.tensor([4, 4, 2])
    assert ops.schedule_prefix(conf, mode="threshold", threshold=0.5, cap=cap).lengths.tolist() == [2, 0, 2]
    assert ops.schedule_prefix(conf, mode="fixed", cap=cap).lengths.tolist() == [4, 4, 2]
    assert ops.schedule_prefix(conf, mode="fixed").lengths.tolist() == [4, 4, 4]


def test_preallocated_outputs():
    conf = torch.rand(6, 5)
    out = (torch.full((6,), 9, dtype=torch.int32), torch.zeros(1), torch.zeros(1, dtype=torch.int32))
    got = ops.schedule_prefix(conf, mode="causal", sps=torch.linspace(1.0, 0.5, 40), out=out)
    assert got.lengths is out[0]
    want = ops.schedule_prefix(conf, mode="causal", sps=torch.linspace(1.0, 0.5, 40))
    assert torch.equal(out[0], want.lengths) and torch.equal(out[1], want.throughput)


@pytest.mark.parametrize("kw,exc,words", [
    (dict(conf=torch.zeros(3)), ValueError, "conf"),
    (dict(conf=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "conf"),
    (dict(conf=torch.zeros(2, 3), mode="greedy"), ValueError, "mode"),
    (dict(conf=torch.zeros(2, 3), mode="causal"), ValueError, "sps"),
    (dict(conf=torch.zeros(2, 3), mode="global", sps=torch.zeros(5, 2)), ValueError, "sps"),
    (dict(conf=torch.zeros(2, 3), mode="causal", sps=torch.tensor([1.0, -1.0, 1.0])), ValueError, "sps"),
    (dict(conf=torch.zeros(2, 3), mode="causal", sps=torch.tensor([1.0, float("nan")])), ValueError, "sps"),
    (dict(conf=torch.zeros(2, 3), mode="budget"), TypeError, "budget"),
    (dict(conf=torch.zeros(2, 3), mode="budget", budget=torch.tensor([1, 2])), ValueError, "budget"),
    (dict(conf=torch.zeros(2, 3), mode="budget", budget=torch.tensor([1.0])), TypeError, "budget"),
    (dict(conf=torch.zeros(2, 3), mode="threshold"), ValueError, "threshold"),
    (dict(conf=torch.zeros(2, 3), mode="fixed", cap=torch.zeros(3, dtype=torch.int32)), ValueError, "cap"),
    (dict(conf=torch.zeros(2, 3), mode="fixed", cap=torch.zeros(2)), TypeError, "cap"),
    (dict(conf=torch.zeros(2, 300), mode="fixed"), ValueError, "gamma"),
])
def test_bad_input(kw, exc, words):
    with pytest.raises(exc, match=words):
        ops.schedule_prefix(**kw)


def test_custom_ops_and_compile():
    conf, sps = torch.rand(4, 3), torch.linspace(1.0, 0.3, 30)
    args = (conf, None, 0, sps, 0, None, 0.0)
    torch.library.opcheck(torch.ops.dspark.schedule_prefix.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

    def step(c, s, k):
        causal = ops.schedule_prefix(c, mode="causal", sps=s)
        budget = ops.schedule_prefix(c, mode="budget", budget=k)
        return causal.lengths, budget.lengths

    k = torch.tensor([3])
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(conf, sps, k)
    want = step(conf, sps, k)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["causal", "global", "budget", "threshold", "fixed"])
@pytest.mark.parametrize("R,gamma", [(1, 5), (7, 3), (64, 7), (256, 7), (1024, 16), (16384, 1)])
def test_cuda_equals_cpu(mode, R, gamma):
    g = torch.Generator().manual_seed(R * gamma)
    conf = torch.rand(R, gamma, generator=g) ** 0.3
    conf[torch.rand(R, gamma, generator=g) < 0.05] = 1.0  # ties
    cap = torch.randint(0, gamma + 1, (R,), generator=g, dtype=torch.int32)
    sps = (torch.rand(R * gamma + R + 10, generator=g) * 0.3 + 1.0) / torch.arange(1, R * gamma + R + 11) ** 0.5
    kw = dict(mode=mode, sps=sps, cap=cap, budget=R * gamma // 3, threshold=0.6)
    if mode != "budget":
        kw.pop("budget")
    cpu = ops.schedule_prefix(conf, **kw)
    cuda_kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gpu = ops.schedule_prefix(conf.cuda(), **cuda_kw)
    assert torch.equal(cpu.lengths, gpu.lengths.cpu())
    assert torch.equal(cpu.capacity, gpu.capacity.cpu())
    assert torch.equal(cpu.throughput, gpu.throughput.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["causal", "global", "budget"])
@pytest.mark.parametrize("R,gamma", [(128, 8), (512, 8), (1024, 16), (7, 2)])
def test_cuda_equals_cpu_when_every_slot_is_admitted(mode, R, gamma):
    """R * gamma fills the kernel's slots exactly (256 x 4, 512 x 8, 1024 x 16)
    and every step improves (constant SPS, no zero confidence): the causal
    scan must admit all of them, not all but one."""
    g = torch.Generator().manual_seed(R + gamma)
    conf = torch.rand(R, gamma, generator=g) ** 0.05 * 0.5 + 0.5
    sps = torch.ones(R * gamma + R + 1)
    kw = dict(mode=mode, sps=sps, budget=R * gamma)
    if mode != "budget":
        kw.pop("budget")
    cpu = ops.schedule_prefix(conf, **kw)
    assert int(cpu.capacity) == R * gamma
    gpu = ops.schedule_prefix(conf.cuda(), **{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert torch.equal(cpu.lengths, gpu.lengths.cpu())
    assert torch.equal(cpu.capacity, gpu.capacity.cpu())
    assert torch.equal(cpu.throughput, gpu.throughput.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("R,gamma", [(64, 7), (600, 6), (1024, 16)])
def test_cuda_equals_cpu_with_many_ties(R, gamma):
    """Confidences from three values make long runs of equal survivals; budgets
    and SPS cliffs cut inside them, so the tie order (smaller j, then smaller r)
    decides which requests get the last admitted slots."""
    g = torch.Generator().manual_seed(R * gamma + 1)
    values = torch.tensor([0.5, 0.8, 1.0])
    conf = values[torch.randint(0, 3, (R, gamma), generator=g)]
    for budget in (1, R // 3, R, R * gamma // 2 + 1, R * gamma):
        cpu = ops.schedule_prefix(conf, mode="budget", budget=budget)
        gpu = ops.schedule_prefix(conf.cuda(), mode="budget", budget=budget)
        assert torch.equal(cpu.lengths, gpu.lengths.cpu()), budget
    B = torch.arange(R * gamma + R + 1, dtype=torch.float32)
    for cliff in (R + 1, R + R // 2, R + R * gamma // 3):
        sps = torch.where(B < cliff, 1.0, 0.6) / (1 + 1e-4 * B)
        for mode in ("causal", "global"):
            cpu = ops.schedule_prefix(conf, mode=mode, sps=sps)
            gpu = ops.schedule_prefix(conf.cuda(), mode=mode, sps=sps.cuda())
            assert torch.equal(cpu.lengths, gpu.lengths.cpu()), (mode, cliff)
            assert torch.equal(cpu.throughput, gpu.throughput.cpu())


@pytest.mark.cuda
def test_cuda_graph_capture_with_device_budget():
    conf = torch.rand(256, 7, device="cuda")
    budget = torch.tensor([100], device="cuda")
    out = (torch.empty(256, dtype=torch.int32, device="cuda"), torch.empty(1, device="cuda"),
           torch.empty(1, dtype=torch.int32, device="cuda"))
    ops.schedule_prefix(conf, mode="budget", budget=budget, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.schedule_prefix(conf, mode="budget", budget=budget, out=out)
    for k in (0, 5, 300, 2000):
        budget.fill_(k)
        conf.copy_(torch.rand(256, 7, device="cuda"))
        graph.replay()
        want = ops.schedule_prefix(conf.cpu(), mode="budget", budget=k)
        assert torch.equal(out[0].cpu(), want.lengths)
