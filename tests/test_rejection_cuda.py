"""rejection_sample on the CUDA backend (skipped without a usable GPU).

CUDA and CPU share every decision-making computation (csrc/include/dspark),
so they must agree bit for bit: tokens, counts and soft-acceptance floats.
"""

import pytest
import torch

from dspark import ops, reference
from markov import MODES
from rejection_cases import assert_matches_reference, random_batch, sub_vocab_batch
from test_rejection_exactness import check_lossless

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def _both(b, mode, **kw):
    cpu = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, return_soft_acceptance=True,
                               **b.kwargs(mode), **kw)
    g = b.to(CUDA)
    kw = {k: (v.to(CUDA) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gpu = ops.rejection_sample(g.target_logits, g.draft_tokens, g.cu_num_draft, return_soft_acceptance=True,
                               **g.kwargs(mode), **kw)
    torch.cuda.synchronize()
    return cpu, gpu


def _assert_same(cpu, gpu):
    assert torch.equal(cpu.output_tokens, gpu.output_tokens.cpu())
    assert torch.equal(cpu.num_accepted, gpu.num_accepted.cpu())
    assert torch.equal(cpu.soft_acceptance, gpu.soft_acceptance.cpu())  # bit-identical floats


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 2048, 4099, 32000, 151936])
def test_cuda_equals_cpu(mode, dtype, vocab):
    R = 64 if vocab < 100000 else 8
    b = random_batch(R, vocab, 7, seed=vocab + 3, dtype=dtype, spread=2.0, agreement=0.7)
    temps = torch.linspace(0.0, 1.6, R)
    cpu, gpu = _both(b, mode, temperature=temps, seed=77, offset=5)
    _assert_same(cpu, gpu)


@pytest.mark.parametrize("mode", ["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,draft_vocab", [(50, 7), (4099, 1000), (32000, 8192), (151936, 2049)])
def test_cuda_equals_cpu_with_a_draft_vocabulary(mode, dtype, vocab, draft_vocab):
    """Draft rows over V_d columns, the inverse map built on the device, races
    over the target vocabulary, soft sums over the draft columns: bit-equal."""
    R = 48 if vocab < 100000 else 8
    b = sub_vocab_batch(R, vocab, draft_vocab, 7, seed=vocab + draft_vocab, dtype=dtype, spread=2.0, agreement=0.7)
    temps = torch.linspace(0.0, 1.6, R)
    cpu = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, return_soft_acceptance=True,
                               temperature=temps, seed=77, offset=5, **b.kwargs(mode))
    g = b.to(CUDA)
    gpu = ops.rejection_sample(g.target_logits, g.draft_tokens, g.cu_num_draft, return_soft_acceptance=True,
                               temperature=temps.to(CUDA), seed=77, offset=5, **g.kwargs(mode))
    _assert_same(cpu, gpu)


@pytest.mark.parametrize("vocab", [1001, 4096])
def test_cuda_equals_cpu_unaligned_rows_and_per_request_seeds(vocab):
    """Rows that are not 16-byte aligned (odd base offset, odd row stride) take
    the scalar load path; 4096 columns would otherwise be all full chunks."""
    b = random_batch(33, vocab, 5, seed=1, dtype=torch.bfloat16)
    seeds = torch.randint(0, 2**62, (33,))
    cpu = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                               temperature=0.9, seed=seeds, return_soft_acceptance=True)
    g = b.to(CUDA)
    wide = torch.zeros(g.target_logits.shape[0], vocab + 3, dtype=torch.bfloat16, device=CUDA)
    wide[:, 1:vocab + 1] = g.target_logits
    target = wide[:, 1:vocab + 1]  # on the device: row stride vocab + 3, base offset 2 bytes
    assert target.data_ptr() % 16 != 0
    gpu = ops.rejection_sample(target, g.draft_tokens, g.cu_num_draft, draft_logits=g.draft_logits,
                               temperature=0.9, seed=seeds.to(CUDA), return_soft_acceptance=True)
    _assert_same(cpu, gpu)


@pytest.mark.parametrize("target_dtype,draft_dtype,mode", [
    (torch.bfloat16, torch.float32, "logits"),
    (torch.float32, torch.float16, "logits"),
    (torch.bfloat16, torch.float16, "probs"),
])
def test_cuda_equals_cpu_mixed_dtypes(target_dtype, draft_dtype, mode):
    b = random_batch(24, 5000, 6, seed=12, spread=2.0)
    b.target_logits = b.target_logits.to(target_dtype)
    b.draft_logits = b.draft_logits.to(draft_dtype)
    b.draft_probs = b.draft_probs.to(draft_dtype)
    cpu, gpu = _both(b, mode, temperature=torch.linspace(0, 1.5, 24), seed=8)
    _assert_same(cpu, gpu)


def test_cuda_malformed_layout_without_validation_is_safe_and_deterministic():
    """What validation would reject (here a request with more drafts than
    max_num_draft and offsets not starting at 0), run with validate=False as
    under graph capture: no crash, same result twice, and soft labels of rows
    outside the verified drafts are 0."""
    b = random_batch(6, 300, 4, seed=13).to(CUDA)
    cu = b.cu_num_draft.clone()
    cu[0] = 1
    runs = [ops.rejection_sample(b.target_logits, b.draft_tokens, cu, draft_logits=b.draft_logits, seed=2,
                                 max_num_draft=2, validate=False, return_soft_acceptance=True) for _ in range(2)]
    torch.cuda.synchronize()
    assert torch.equal(runs[0].output_tokens, runs[1].output_tokens)
    assert torch.equal(runs[0].soft_acceptance, runs[1].soft_acceptance)
    assert (runs[0].num_accepted <= 2).all()
    assert not torch.isnan(runs[0].soft_acceptance).any()
    assert float(runs[0].soft_acceptance[0]) == 0.0  # row 0 belongs to no request now


def test_cuda_matches_reference():
    b = random_batch(16, 151936, 5, seed=9, dtype=torch.bfloat16, spread=2.0, agreement=0.5)
    g = b.to(CUDA)
    out = ops.rejection_sample(g.target_logits, g.draft_tokens, g.cu_num_draft, draft_logits=g.draft_logits,
                               temperature=1.0, seed=5)
    ref = reference.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                     temperature=1.0, seed=5, return_margins=True)
    assert_matches_reference(out, ref, "cuda vs reference")


def test_cuda_many_requests():
    b = random_batch(512, 32000, 16, seed=4, dtype=torch.bfloat16)
    cpu, gpu = _both(b, "logits", temperature=1.0, seed=3)
    _assert_same(cpu, gpu)


@pytest.mark.parametrize("mode", MODES)
def test_cuda_lossless(mode):
    check_lossless(ops.rejection_sample, mode, device=CUDA)


def test_cuda_out_of_range_tokens():
    b = random_batch(4, 50, 3, seed=2).to(CUDA)
    bad = b.draft_tokens.clone()
    bad[0] = 50
    with pytest.raises(ValueError, match="draft_tokens"):
        ops.rejection_sample(b.target_logits, bad, b.cu_num_draft)
    # Without validation (as under graph capture) the token is rejected; no crash.
    out = ops.rejection_sample(b.target_logits, bad, b.cu_num_draft, validate=False, max_num_draft=3, seed=1)
    torch.cuda.synchronize()
    first = int(b.cu_num_draft[1].item())
    if first > 0:
        assert int(out.num_accepted[0]) == 0
        assert 0 <= int(out.output_tokens[0, 0]) < 50


def test_cuda_graph_capture_and_replay():
    b = random_batch(32, 5000, 5, seed=6, dtype=torch.bfloat16).to(CUDA)
    seeds = torch.randint(0, 2**62, (32,), device=CUDA)
    offsets = torch.zeros(1, dtype=torch.int64, device=CUDA)
    out = (torch.empty(32, 6, dtype=torch.int32, device=CUDA), torch.empty(32, dtype=torch.int32, device=CUDA),
           torch.empty(b.draft_tokens.shape[0], device=CUDA))

    def step():
        return ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                    temperature=1.0, seed=seeds, offset=offsets, max_num_draft=5,
                                    return_soft_acceptance=True, out=out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for round_index in range(3):
        offsets.fill_(round_index)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in out]
        eager = ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                     temperature=1.0, seed=seeds, offset=round_index, max_num_draft=5,
                                     return_soft_acceptance=True)
        assert torch.equal(replayed[0], eager.output_tokens)
        assert torch.equal(replayed[1], eager.num_accepted)
        assert torch.equal(replayed[2], eager.soft_acceptance)


def test_cuda_graph_with_default_generator_draws_fresh_seeds():
    b = random_batch(64, 3000, 4, seed=8).to(CUDA)

    def step():
        return ops.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, draft_logits=b.draft_logits,
                                    max_num_draft=4)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    results = []
    for _ in range(4):
        graph.replay()
        results.append(static.output_tokens.clone())
    assert any(not torch.equal(results[0], r) for r in results[1:])


def test_host_seed_tensor_is_refused_inside_graph_capture():
    """A host seed tensor would be copied once at capture and never again on
    replay: refused with an error that names it (device seeds capture fine)."""
    target = torch.randn(3, 50, device=CUDA)
    tokens = torch.tensor([1, 2], device=CUDA)
    cu = torch.tensor([0, 2], dtype=torch.int32, device=CUDA)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="'seed' must be on cuda"):
        with torch.cuda.graph(graph):
            ops.rejection_sample(target, tokens, cu, seed=torch.tensor([5]), max_num_draft=2)


# ---------------------------------------------- truncation, placeholders, bonus


def _truncation_mix(R: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    top_k = torch.where(torch.rand(R, generator=g) < 0.5, torch.randint(1, vocab + 1, (R,), generator=g), 0)
    top_p = torch.where(torch.rand(R, generator=g) < 0.5, torch.rand(R, generator=g) * 0.9 + 0.05, 1.0)
    min_p = torch.where(torch.rand(R, generator=g) < 0.3, torch.rand(R, generator=g) * 0.2, 0.0)
    return dict(top_k=top_k.to(torch.int32), top_p=top_p, min_p=min_p)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 4099, 32000, 151936])
def test_cuda_equals_cpu_with_truncation_and_logprobs(mode, dtype, vocab):
    """Per-request top-k / top-p / min-p (radix selects in one block per row),
    greedy and sampled requests, log-probabilities: bit-equal to the CPU."""
    R = 48 if vocab < 100000 else 8
    b = random_batch(R, vocab, 7, seed=vocab + 11, dtype=dtype, spread=2.0, agreement=0.7)
    temps = torch.linspace(0.0, 1.6, R)
    cpu, gpu = _both(b, mode, temperature=temps, seed=5, offset=1, return_logprobs=True,
                     **_truncation_mix(R, vocab, vocab))
    _assert_same(cpu, gpu)
    assert torch.equal(cpu.logprobs, gpu.logprobs.cpu())
    ref = reference.rejection_sample(b.target_logits, b.draft_tokens, b.cu_num_draft, temperature=temps, seed=5,
                                     offset=1, return_margins=True, **b.kwargs(mode), **_truncation_mix(R, vocab, vocab))
    assert_matches_reference(gpu, ref, f"truncation {mode} V={vocab}")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cuda_equals_cpu_with_placeholders_and_bonus_tokens(temperature):
    R, V = 40, 3000
    b = random_batch(R, V, 6, seed=9, agreement=0.3)
    tokens = b.draft_tokens.clone()
    tokens[::5] = -1
    cu = b.cu_num_draft
    rows = [int(cu[r]) + r + k for r in range(R) for k in range(int(cu[r + 1] - cu[r]))]
    bonus = torch.randint(0, V, (R,))
    for kw in (dict(), dict(bonus_tokens=bonus)):
        target = b.target_logits[rows] if kw else b.target_logits
        args = dict(draft_logits=b.draft_logits, temperature=temperature, seed=4, return_soft_acceptance=True,
                    return_logprobs=True, top_p=0.9)
        cpu = ops.rejection_sample(target, tokens, cu, **args, **kw)
        gpu = ops.rejection_sample(target.to(CUDA), tokens.to(CUDA), cu.to(CUDA),
                                   **{k: (v.to(CUDA) if isinstance(v, torch.Tensor) else v) for k, v in
                                      dict(args, **kw).items()})
        _assert_same(cpu, gpu)
        assert torch.equal(cpu.logprobs, gpu.logprobs.cpu())
