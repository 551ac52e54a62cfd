"""The CPU kernels' instruction sets (baseline, AVX2, AVX-512, AVX-512 BF16):
the ops that decide sampled tokens give the same bits under every ISA this
CPU runs; matrix products agree to their rounding; the choice can be made by
DSPARK_CPU_ISA or dspark.set_cpu_isa."""

import os
import subprocess
import sys

import pytest
import torch

import dspark
from dspark import ops
from rejection_cases import random_batch, sub_vocab_batch

ISAS = dspark.backends()["cpu"]["isas"]


@pytest.fixture
def restore_isa():
    before = dspark.cpu_isa()
    yield
    dspark.set_cpu_isa(before)


def under_each_isa(fn):
    """fn() under every supported ISA: {isa: result}."""
    out = {}
    for isa in ISAS:
        dspark.set_cpu_isa(isa)
        out[isa] = fn()
    return out


def test_every_listed_isa_is_selectable_and_unknown_ones_are_refused(restore_isa):
    assert "baseline" in ISAS and dspark.cpu_isa() in ISAS
    for isa in ISAS:
        dspark.set_cpu_isa(isa)
        assert dspark.cpu_isa() == isa and dspark.backends()["cpu"]["isa"] == isa
    with pytest.raises(ValueError, match="'name' must be one of"):
        dspark.set_cpu_isa("sse9")
    with pytest.raises(TypeError, match="'name'"):
        dspark.set_cpu_isa(3)


def test_environment_variable_chooses_the_isa():
    code = "import dspark; print(dspark.cpu_isa())"
    env = dict(os.environ, DSPARK_CPU_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "baseline"
    env["DSPARK_CPU_ISA"] = "no-such-isa"  # ignored: the widest available runs
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ISAS[-1]


@pytest.mark.parametrize("mode", ["onehot", "logits", "probs"])
def test_rejection_sample_is_bit_identical_under_every_isa(restore_isa, mode):
    b = random_batch(40, 5000, 6, seed=17, spread=2.0, agreement=0.7)
    temps = torch.linspace(0.0, 1.5, 40)

    top_k = torch.arange(40, dtype=torch.int32) % 7 * 30  # 0 (off) and 30..180
    top_p = torch.where(torch.arange(40) % 3 == 0, 0.8, 1.0)

    def run():
        out = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps, seed=3,
                                   return_soft_acceptance=True, **b.kwargs(mode))
        cut = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps, seed=3,
                                   top_k=top_k, top_p=top_p, min_p=0.01, return_soft_acceptance=True,
                                   return_logprobs=True, **b.kwargs(mode))
        return (out.output_tokens, out.num_accepted, out.soft_acceptance, cut.output_tokens, cut.soft_acceptance,
                cut.logprobs)

    results = under_each_isa(run)
    first = results[ISAS[0]]
    for isa, r in results.items():
        for got, want in zip(r, first):
            assert torch.equal(got, want), isa
    s = sub_vocab_batch(30, 3000, 700, 5, seed=2)
    subs = under_each_isa(lambda: ops.rejection_sample(s.target_logits, s.draft_tokens, s.cu_num_draft, seed=1,
                                                       return_soft_acceptance=True, **s.kwargs("logits")))
    for isa, r in subs.items():
        assert torch.equal(r.output_tokens, subs[ISAS[0]].output_tokens), isa
        assert torch.equal(r.soft_acceptance, subs[ISAS[0]].soft_acceptance), isa


def test_markov_sampling_epilogue_is_bit_identical_under_every_isa(restore_isa):
    """With W2 = 0 the product is exactly 0 on every ISA, so what remains (the
    corrected rows, the race, the fixed-point sums) must agree to the bit."""
    g = torch.Generator().manual_seed(4)
    U = torch.randn(6, 5, 3001, generator=g) * 2
    w1 = torch.randn(3001, 32, generator=g)
    w2 = torch.zeros(3001, 32)
    temps = torch.tensor([0.0, 0.5, 1.0, 1.3, 0.8, 1.0])
    results = under_each_isa(lambda: ops.markov_sample(U, torch.arange(6) * 7, w1, w2, temperature=temps, seed=9))
    for isa, r in results.items():
        for got, want in zip(r[:3], results[ISAS[0]][:3]):
            assert torch.equal(got, want), isa


def test_schedule_prefix_is_bit_identical_under_every_isa(restore_isa):
    conf = torch.rand(64, 7, generator=torch.Generator().manual_seed(5))
    sps = torch.linspace(100, 10, 600)
    results = under_each_isa(lambda: ops.schedule_prefix(conf, mode="causal", sps=sps))
    for isa, r in results.items():
        assert torch.equal(r.lengths, results[ISAS[0]].lengths) and torch.equal(r.throughput, results[ISAS[0]].throughput)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16])
def test_markov_products_agree_to_rounding_under_every_isa(restore_isa, w_dtype, m):
    """The product B = A W2^T (not part of the shared numerics): the corrected
    logits of every ISA agree with float64 to the rounding of a float32 dot
    product of length rank (267: a K tail for every vector width)."""
    g = torch.Generator().manual_seed(m)
    V, rank = 1031, 267
    U = torch.randn(m, 2, V, generator=g)
    w1 = (torch.randn(V, rank, generator=g) * 0.3).to(w_dtype)
    w2 = (torch.randn(V, rank, generator=g) * 0.3).to(w_dtype)
    anchors = torch.randint(0, V, (m,), generator=g)
    results = under_each_isa(lambda: ops.markov_sample(U, anchors, w1, w2, temperature=0.0,
                                                       return_corrected_logits=True))
    e = w1[anchors].double()  # position 0's A rows (16-bit values when w1 is 16-bit: exact)
    want = U[:, 0].double() + e @ w2.double().T
    for isa, r in results.items():
        torch.testing.assert_close(r.corrected_logits[:, 0].double(), want, atol=2e-4, rtol=1e-5, msg=isa)
