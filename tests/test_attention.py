"""append_kv, paged_attention and rope: against the PyTorch reference on
random ragged batches, the special cases that define the masks, the cache
round trip, bad input, torch integration, and CUDA."""


import pytest
import torch

from dspark import ops, reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def name(value):
    """Test ids with dtype names (float32, bfloat16), which bench/gpu_check.sh selects by."""
    return str(value).replace("torch.", "")


def make_batch(R, Hq, Hkv, D, page_size, dtype, *, seed, max_q=6, max_ctx=300, empty_ctx=False):
    """A ragged batch over a paged cache with pages in random order."""
    g = torch.Generator().manual_seed(seed)
    q_lens = torch.randint(0, max_q + 1, (R,), generator=g)
    ctx = torch.randint(0, max_ctx + 1, (R,), generator=g)
    if empty_ctx:
        ctx[0] = 0
    kv = (ctx + q_lens).int()
    max_pages = int((kv.max() + page_size - 1) // page_size) + 1 if R else 1
    pages = R * max_pages + 3
    k_cache = torch.randn(pages, page_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(pages, page_size, Hkv, D, generator=g).to(dtype)
    table = torch.randperm(pages, generator=g)[: R * max_pages].reshape(R, max_pages).int()
    cu = torch.zeros(R + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(q_lens, 0)
    q = torch.randn(int(cu[-1]), Hq, D, generator=g).to(dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, kv_lens=kv, cu_q=cu)


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / max(float(want.double().norm()), 1e-12))


def check_against_reference(b, mask, dtype, device="cpu", window=None):
    args = {k: v.to(device) for k, v in b.items()}
    out, lse = ops.paged_attention(**args, mask=mask, window=window, return_lse=True)
    ref_out, ref_lse = reference.paged_attention(**b, mask=mask, window=window)
    assert out.dtype == dtype and out.shape == b["q"].shape
    assert rel_err(out.cpu(), ref_out) < TOLERANCE[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu()[finite], ref_lse[finite], atol=1e-4 if dtype == torch.float32 else 2e-2,
                               rtol=1e-5)
    assert (out.cpu()[~finite] == 0).all()


@pytest.mark.parametrize("mask", ["causal", "block"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=name)
def test_matches_reference(mask, Hq, Hkv, D, dtype):
    page_size = {64: 16, 128: 32}[D] if dtype != torch.float16 else 64
    b = make_batch(7, Hq, Hkv, D, page_size, dtype, seed=Hq * 100 + D + len(mask), empty_ctx=True)
    check_against_reference(b, mask, dtype)


def test_uneven_lengths_long_context_and_block_longer_than_context():
    b = make_batch(5, 8, 2, 64, 16, torch.float32, seed=3, max_q=32, max_ctx=3000)
    b["kv_lens"][1] = int(b["cu_q"][2] - b["cu_q"][1]) // 2  # fewer keys than queries
    check_against_reference(b, "causal", torch.float32)
    check_against_reference(b, "block", torch.float32)


def test_odd_head_dim_on_cpu():
    check_against_reference(make_batch(3, 6, 3, 80, 16, torch.float32, seed=4), "causal", torch.float32)


@pytest.mark.parametrize("mask", ["causal", "block"])
@pytest.mark.parametrize("window", [1, 3, 64, 150, 5000])
@pytest.mark.parametrize("D,dtype", [(64, torch.float32), (64, torch.bfloat16), (256, torch.float32),
                                     (512, torch.bfloat16)], ids=name)
def test_sliding_window_matches_reference(mask, window, D, dtype):
    """Query i at position p = kv - q_len + i sees keys j > p - window (and what
    the mask allows): window 1 is the query's own key under the causal mask, a
    window longer than the context is no window."""
    b = make_batch(7, 8, 2, D, 16, dtype, seed=window + D, max_q=9, max_ctx=400, empty_ctx=True)
    check_against_reference(b, mask, dtype, window=window)


def test_sliding_window_is_gemmas_mask():
    """The window against a dense mask written as transformers writes Gemma's
    sliding layers (kv_idx > q_idx - window, kv_idx <= q_idx), decode and a
    verification block."""
    g = torch.Generator().manual_seed(21)
    window, kv, q_len, D = 5, 17, 4, 32
    k = torch.randn(kv, 1, D, generator=g)
    v = torch.randn(kv, 1, D, generator=g)
    q = torch.randn(q_len, 2, D, generator=g)
    k_cache, v_cache = k.reshape(1, kv, 1, D), v.reshape(1, kv, 1, D)
    out = ops.paged_attention(q, k_cache, v_cache, torch.zeros(1, 1, dtype=torch.int32),
                              torch.tensor([kv], dtype=torch.int32), torch.tensor([0, q_len], dtype=torch.int32),
                              window=window, scale=1.0)
    q_idx = torch.arange(kv - q_len, kv).unsqueeze(1)
    kv_idx = torch.arange(kv).unsqueeze(0)
    allowed = (kv_idx > q_idx - window) & (kv_idx <= q_idx)
    scores = torch.einsum("qhd,kd->hqk", q.double(), k[:, 0].double()).masked_fill(~allowed, float("-inf"))
    want = torch.einsum("hqk,kd->qhd", torch.softmax(scores, -1), v[:, 0].double())
    assert rel_err(out, want) < 1e-6


def _poison_before_window(b, window):
    """NaN keys and values before the first key any query of its request sees:
    an implementation that reads them (even to mask them) returns NaN."""
    poisoned = {k: v.clone() for k, v in b.items()}
    page_size = b["k_cache"].shape[1]
    for r in range(b["kv_lens"].shape[0]):
        q_len = int(b["cu_q"][r + 1] - b["cu_q"][r])
        first = int(b["kv_lens"][r]) - q_len - window + 1  # the first query's first key
        for j in range(max(first, 0)):
            page = int(b["block_table"][r, j // page_size])
            for name in ("k_cache", "v_cache"):
                poisoned[name][page, j % page_size] = float("nan")
                b[name][page, j % page_size] = 0.0  # what the reference sees instead (never visible)
    return poisoned


@pytest.mark.parametrize("mask", ["causal", "block"])
def test_sliding_window_never_reads_keys_before_the_window(mask):
    b = make_batch(5, 4, 2, 64, 16, torch.float32, seed=22, max_q=6, max_ctx=700)
    poisoned = _poison_before_window(b, 40)
    out = ops.paged_attention(**poisoned, mask=mask, window=40)
    assert torch.isfinite(out).all()
    ref, _ = reference.paged_attention(**b, mask=mask, window=40)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("D", [256, 512])
@pytest.mark.parametrize("mask", ["causal", "block"])
def test_large_head_dims_on_cpu(D, mask):
    """Gemma 4's head dims: 256 (sliding layers) and 512 (global layers)."""
    b = make_batch(4, 8, 1, D, 16, torch.bfloat16, seed=D, max_q=8, max_ctx=200, empty_ctx=True)
    check_against_reference(b, mask, torch.bfloat16)


def test_block_mask_is_bidirectional_inside_the_block():
    """Dense check: every query of a request sees every key, including the
    block's own later positions (the drafter's pattern)."""
    b = make_batch(3, 4, 2, 64, 16, torch.float32, seed=5, max_q=7, max_ctx=40)
    out = ops.paged_attention(**b, mask="block")
    for r in range(3):
        q0, q1, kv = int(b["cu_q"][r]), int(b["cu_q"][r + 1]), int(b["kv_lens"][r])
        if q1 == q0:
            continue
        K = reference.gather_pages(b["k_cache"], b["block_table"][r], kv).repeat_interleave(2, dim=1)
        V = reference.gather_pages(b["v_cache"], b["block_table"][r], kv).repeat_interleave(2, dim=1)
        scores = torch.einsum("qhd,khd->hqk", b["q"][q0:q1].double(), K.double()) / 8.0
        want = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), V.double())
        assert rel_err(out[q0:q1], want) < 1e-5


def test_causal_with_one_query_is_decode_attention():
    b = make_batch(6, 8, 2, 64, 16, torch.float32, seed=6, max_q=1, max_ctx=100)
    b["cu_q"] = torch.arange(7, dtype=torch.int32)
    b["q"] = torch.randn(6, 8, 64, generator=torch.Generator().manual_seed(1))
    b["kv_lens"] = b["kv_lens"].clamp(min=1)
    out = ops.paged_attention(**b, mask="causal")
    for r in range(6):
        kv = int(b["kv_lens"][r])
        K = reference.gather_pages(b["k_cache"], b["block_table"][r], kv).repeat_interleave(4, dim=1)
        V = reference.gather_pages(b["v_cache"], b["block_table"][r], kv).repeat_interleave(4, dim=1)
        p = torch.softmax(torch.einsum("hd,khd->hk", b["q"][r].double(), K.double()) / 8.0, -1)
        assert rel_err(out[r], torch.einsum("hk,khd->hd", p, V.double())) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=name)
def test_a_query_does_not_depend_on_the_queries_after_it(dtype):
    """Greedy speculative decoding equals plain decoding only if a
    verification row computes what a one-token step computes: the causal
    output (and RoPE) of a request's first query, bit for bit, whether 1 or up
    to 17 queries follow, at every context length around the key tiles, under
    every instruction set the CPU has (their register blocks group different
    rows for 1 and for n queries)."""
    import dspark

    g = torch.Generator().manual_seed(2)
    H, Hkv, D, page, pages = 8, 4, 64, 16, 16
    k_cache = torch.randn(pages, page, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(pages, page, Hkv, D, generator=g).to(dtype)
    table = torch.arange(pages, dtype=torch.int32).unsqueeze(0)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    before_isa = dspark.cpu_isa()
    try:
        for context in (0, 1, 15, 16, 31, 63, 64, 100, 200):
            for n in (2, 5, 9, 17):
                q = torch.randn(n, H, D, generator=g).to(dtype)
                k = torch.randn(n, Hkv, D, generator=g).to(dtype)
                q1, k1 = q[:1].clone(), k[:1].clone()
                positions = torch.arange(context, context + n)
                ops.rope(q, k, positions, inv_freq=inv_freq)
                ops.rope(q1, k1, positions[:1].clone(), inv_freq=inv_freq)
                assert torch.equal(q[0], q1[0]) and torch.equal(k[0], k1[0]), (context, n)
                lens = lambda m: torch.tensor([context + m], dtype=torch.int32)  # noqa: E731
                cu = lambda m: torch.tensor([0, m], dtype=torch.int32)  # noqa: E731
                for isa in dspark.backends()["cpu"]["isas"]:
                    dspark.set_cpu_isa(isa)
                    many = ops.paged_attention(q, k_cache, v_cache, table, lens(n), cu(n))
                    one = ops.paged_attention(q1, k_cache, v_cache, table, lens(1), cu(1))
                    assert torch.equal(many[0], one[0]), (isa, context, n)
    finally:
        dspark.set_cpu_isa(before_isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=name)
def test_append_then_attend_equals_contiguous_attention(dtype):
    """append_kv into a fresh paged cache (with padding slots), then
    paged_attention, equals attention over the contiguous keys."""
    g = torch.Generator().manual_seed(7)
    page_size, pages, Hkv, D = 16, 20, 2, 64
    k_cache = torch.zeros(pages, page_size, Hkv, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    lengths = [37, 5]
    table = torch.tensor([[3, 9, 0, 17], [12, 4, 1, 2]], dtype=torch.int32)
    keys = [torch.randn(n, Hkv, D, generator=g).to(dtype) for n in lengths]
    values = [torch.randn(n, Hkv, D, generator=g).to(dtype) for n in lengths]
    slots, k_new, v_new = [], [], []
    for r, n in enumerate(lengths):
        for j in range(n):
            slots.append(int(table[r, j // page_size]) * page_size + j % page_size)
        slots.append(-1)  # a padding row in the middle of the batch
        k_new += [keys[r], torch.full((1, Hkv, D), 99.0).to(dtype)]
        v_new += [values[r], torch.full((1, Hkv, D), 99.0).to(dtype)]
    ops.append_kv(torch.cat(k_new), torch.cat(v_new), k_cache, v_cache, torch.tensor(slots))
    assert not (k_cache == 99).any()
    q = torch.randn(2, 4, D, generator=g).to(dtype)
    out = ops.paged_attention(q, k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32),
                              torch.tensor([0, 1, 2], dtype=torch.int32))
    for r, n in enumerate(lengths):
        K, V = keys[r].double().repeat_interleave(2, dim=1), values[r].double().repeat_interleave(2, dim=1)
        p = torch.softmax(torch.einsum("hd,khd->hk", q[r].double(), K) / 8.0, -1)
        assert rel_err(out[r], torch.einsum("hk,khd->hd", p, V)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=name)
@pytest.mark.parametrize("rotary_dim", [None, 32])
def test_rope_matches_reference(dtype, rotary_dim):
    g = torch.Generator().manual_seed(8)
    q = torch.randn(9, 4, 64, generator=g).to(dtype)
    k = torch.randn(9, 2, 64, generator=g).to(dtype)
    positions = torch.tensor([0, 1, 2, 7, 100, 4096, 131071, 5, 5])
    inv_freq = ops.rope_inv_freq(rotary_dim or 64, 1e6)
    want_q, want_k = reference.rope(q, positions, inv_freq), reference.rope(k, positions, inv_freq)
    ops.rope(q, k, positions.int(), theta=1e6, rotary_dim=rotary_dim)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(q, want_q, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(k, want_k, atol=tol * 4, rtol=tol)
    if rotary_dim:  # the dimensions past the rotary part are untouched
        assert torch.equal(q[..., 32:], torch.randn(9, 4, 64, generator=torch.Generator().manual_seed(8)).to(dtype)[..., 32:])


def test_rope_is_the_llama_formula():
    """q_embed = q cos + rotate_half(q) sin, as transformers writes it."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 3, 16, generator=g)
    positions = torch.arange(5) * 3
    inv_freq = ops.rope_inv_freq(16)
    angles = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat([angles, angles], -1)[:, None]
    rotate_half = torch.cat([-x[..., 8:], x[..., :8]], -1)
    want = x * emb.cos() + rotate_half * emb.sin()
    got = x.clone()
    ops.rope(got, None, positions)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ bad input


def _args():
    return make_batch(3, 4, 2, 64, 16, torch.float32, seed=10)


@pytest.mark.parametrize("change,exc,words", [
    (lambda b: b.update(q=b["q"][..., :32]), ValueError, "head dim"),
    (lambda b: b.update(q=b["q"].double()), TypeError, "q"),
    (lambda b: b.update(q=torch.zeros(b["q"].shape[0], 3, 64)), ValueError, "multiple"),
    (lambda b: b.update(k_cache=b["k_cache"].bfloat16(), v_cache=b["v_cache"].bfloat16()), ValueError, "dtype"),
    (lambda b: b.update(v_cache=b["v_cache"][:, :8]), ValueError, "v_cache"),
    (lambda b: b.update(block_table=b["block_table"].long()), TypeError, "block_table"),
    (lambda b: b.update(block_table=b["block_table"] + 1000), ValueError, "block_table"),
    (lambda b: b.update(kv_lens=b["kv_lens"] + 10000), ValueError, "kv_lens"),
    (lambda b: b.update(kv_lens=b["kv_lens"][:2]), ValueError, "kv_lens"),
    (lambda b: b.update(cu_q=b["cu_q"] + 1), ValueError, "cu_q"),
    (lambda b: b.update(mask="sliding"), ValueError, "mask"),
    (lambda b: b.update(scale=-1.0), ValueError, "scale"),
    (lambda b: b.update(scale="abc"), TypeError, "'scale' must be a number"),
    (lambda b: b.update(window=-1), ValueError, "'window' must be an int"),
    (lambda b: b.update(window=2.5), ValueError, "'window' must be an int"),
    (lambda b: b.update(window=True), ValueError, "'window' must be an int"),
    (lambda b: b.update(window=2 ** 31), ValueError, "'window' must be an int"),
    (lambda b: b.update(q=b["q"][..., :0], k_cache=b["k_cache"][..., :0], v_cache=b["v_cache"][..., :0]),
     ValueError, "head dim >= 1"),
])
def test_bad_input(change, exc, words):
    b = _args()
    change(b)
    with pytest.raises(exc, match=words):
        ops.paged_attention(**b)


def test_append_and_rope_bad_input():
    cache = torch.zeros(4, 16, 2, 64)
    k = torch.zeros(3, 2, 64)
    with pytest.raises(ValueError, match="slot"):
        ops.append_kv(k, k, cache, cache.clone(), torch.tensor([0, 1, 64]))
    with pytest.raises(ValueError, match="k"):
        ops.append_kv(torch.zeros(3, 4, 64), torch.zeros(3, 4, 64), cache, cache.clone(), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="slot_mapping"):
        ops.append_kv(k, k, cache, cache.clone(), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="rotary_dim"):
        ops.rope(torch.zeros(3, 2, 64), None, torch.arange(3), rotary_dim=65)
    with pytest.raises(ValueError, match="positions"):
        ops.rope(torch.zeros(3, 2, 64), None, torch.arange(4))


def test_append_kv_refuses_k_and_v_of_different_dtypes():
    cache = torch.zeros(4, 16, 2, 64)
    k = torch.zeros(3, 2, 64)
    with pytest.raises(TypeError, match="'v' must have k's dtype float32, got bfloat16"):
        ops.append_kv(k, k.bfloat16(), cache, cache.clone(), torch.tensor([0, 1, 2]))


def test_rope_builds_its_frequencies_once_per_device(monkeypatch):
    """Without inv_freq, the frequencies are built (and, on CUDA, copied to the
    device) on the first call only: a later call, inside a captured CUDA graph
    too, reuses them."""
    from dspark.ops import attention as ops_module
    calls = []
    real = ops_module.rope_inv_freq
    monkeypatch.setattr(ops_module, "rope_inv_freq", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    monkeypatch.setattr(ops_module, "_INV_FREQ", {})
    q = torch.randn(5, 2, 32)
    for _ in range(3):
        ops.rope(q, None, torch.arange(5), theta=12345.0)
    assert len(calls) == 1
    ops.rope(q, None, torch.arange(5), theta=54321.0)
    assert len(calls) == 2


@pytest.mark.parametrize("theta", [0.0, -1.0, float("nan"), float("inf"), "1e4", True])
def test_rope_refuses_bad_theta(theta):
    q = torch.randn(5, 2, 32)
    before = q.clone()
    with pytest.raises(ValueError, match="theta"):
        ops.rope(q, None, torch.arange(5), theta=theta)
    assert torch.equal(q, before)


def test_split_plan_does_not_over_split_decode():
    """Decode (one query per request) has R x H_kv busy blocks: at R = 512,
    H_kv = 8 that fills an H200 twice over, so no split and no partials."""
    from dspark._ext import C
    codes = {torch.bfloat16: 2}
    T = R = 512
    decode = C.paged_attention_workspace_bytes(T, R, 32, 8, 128, 4096 // 16, 16, codes[torch.bfloat16])
    assert decode < 8192  # the tile prefix only: no [splits, T, H_q, D] partials
    long_prefill = C.paged_attention_workspace_bytes(1, 1, 32, 8, 128, 100000 // 16, 16, codes[torch.bfloat16])
    assert long_prefill > 4 * 32 * 128  # one long request is split


def test_split_plan_covers_only_the_window():
    """With a sliding window the splits cover the keys a tile can see (window +
    tile - 1 under the causal mask), not the whole context: a 100k-token decode
    with a 512-key window needs at most ceil(575 / 256) = 3 splits of partials."""
    from dspark._ext import C
    bf16 = 2
    full = C.paged_attention_workspace_bytes(1, 1, 32, 8, 128, 100000 // 16, 16, bf16)
    windowed = C.paged_attention_workspace_bytes(1, 1, 32, 8, 128, 100000 // 16, 16, bf16, 512, 0)
    assert windowed < full
    partials_per_split = 32 * (128 + 1) * 4  # T = 1 query, H_q = 32: output and lse in float32
    assert windowed <= 3 * partials_per_split + 4096
    # the block mask with a window: window + T - 1 keys
    block = C.paged_attention_workspace_bytes(8, 1, 32, 8, 128, 100000 // 16, 16, bf16, 512, 1)
    assert block < C.paged_attention_workspace_bytes(8, 1, 32, 8, 128, 100000 // 16, 16, bf16, 0, 1)


def test_custom_ops_and_compile():
    b = _args()
    for window in (0, 7):
        args = (b["q"], b["k_cache"], b["v_cache"], b["block_table"], b["kv_lens"], b["cu_q"], 0, 0.125, window)
        torch.library.opcheck(torch.ops.dspark.paged_attention.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

    def layer(q, k, positions, k_cache, v_cache, table, kv_lens, cu):
        q, k = q.clone(), k.clone()
        ops.rope(q, k, positions)
        ops.append_kv(k, k, k_cache, v_cache, torch.arange(q.shape[0]) + 5)
        return ops.paged_attention(q, k_cache, v_cache, table, kv_lens, cu)

    inputs = (b["q"], b["q"][:, :2].contiguous(), torch.arange(b["q"].shape[0]), b["k_cache"].clone(),
              b["v_cache"].clone(), b["block_table"], b["kv_lens"], b["cu_q"])
    got = torch.compile(layer, backend="aot_eager", fullgraph=True)(*[x.clone() for x in inputs])
    want = layer(*[x.clone() for x in inputs])
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("mask", ["causal", "block"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (32, 4)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=name)
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_cuda_matches_reference(mask, Hq, Hkv, D, dtype, page_size):
    b = make_batch(9, Hq, Hkv, D, page_size, dtype, seed=D + page_size + Hq, max_q=32, max_ctx=2000, empty_ctx=True)
    check_against_reference(b, mask, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("mask,window", [("causal", None), ("causal", 100), ("block", 37)])
@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (32, 4), (64, 1)])
@pytest.mark.parametrize("D", [256, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=name)
def test_cuda_large_head_dims_match_reference_and_cpu(mask, window, Hq, Hkv, D, dtype):
    """Head dims 256 and 512 (Gemma 4's sliding and global layers): the
    tensor-core kernel for 16-bit caches when G = H_q / H_kv fits a tile (64
    rows; 32 at 512), the float32 kernel otherwise (G = 64 at 512, float32),
    against the reference and the CPU backend."""
    b = make_batch(6, Hq, Hkv, D, 16, dtype, seed=D + Hq + Hkv, max_q=12, max_ctx=700, empty_ctx=True)
    check_against_reference(b, mask, dtype, device="cuda", window=window)
    cuda = ops.paged_attention(**{k: v.cuda() for k, v in b.items()}, mask=mask, window=window)
    cpu = ops.paged_attention(**b, mask=mask, window=window)
    assert rel_err(cuda.cpu(), cpu) < TOLERANCE[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("mask", ["causal", "block"])
@pytest.mark.parametrize("window", [1, 7, 65, 300, 4096])
@pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (128, torch.float16), (512, torch.float16),
                                     (128, torch.float32)], ids=name)
def test_cuda_sliding_window_matches_reference_and_cpu(mask, window, D, dtype):
    """Windows shorter than a key step, across step and split boundaries, and
    longer than the context; long contexts so that the splits matter."""
    b = make_batch(5, 8, 2, D, 16, dtype, seed=window + D, max_q=20, max_ctx=3000, empty_ctx=True)
    check_against_reference(b, mask, dtype, device="cuda", window=window)
    cuda = ops.paged_attention(**{k: v.cuda() for k, v in b.items()}, mask=mask, window=window)
    assert rel_err(cuda.cpu(), ops.paged_attention(**b, mask=mask, window=window)) < TOLERANCE[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("D,dtype", [(128, torch.bfloat16), (512, torch.bfloat16), (64, torch.float32)], ids=name)
def test_cuda_sliding_window_never_reads_keys_before_the_window(D, dtype):
    """NaN keys and values before the window: the CUDA kernels skip those
    keys (the tensor-core kernel's splits start at the window), they do not
    load and mask them."""
    b = make_batch(6, 8, 2, D, 16, dtype, seed=23, max_q=10, max_ctx=5000)
    poisoned = _poison_before_window(b, 200)
    out = ops.paged_attention(**{k: v.cuda() for k, v in poisoned.items()}, window=200)
    assert torch.isfinite(out).all()
    ref, _ = reference.paged_attention(**b, window=200)
    assert rel_err(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.cuda
def test_cuda_long_context_single_request_and_many_requests():
    one = make_batch(1, 32, 8, 128, 64, torch.bfloat16, seed=11, max_q=1, max_ctx=0)
    one["kv_lens"][0] = 100000
    pages = (100000 + 63) // 64
    one["k_cache"] = torch.randn(pages + 1, 64, 8, 128).bfloat16()
    one["v_cache"] = torch.randn(pages + 1, 64, 8, 128).bfloat16()
    one["block_table"] = torch.randperm(pages + 1)[:pages].int().unsqueeze(0)
    one["q"], one["cu_q"] = torch.randn(1, 32, 128).bfloat16(), torch.tensor([0, 1], dtype=torch.int32)
    check_against_reference(one, "causal", torch.bfloat16, device="cuda")
    many = make_batch(300, 8, 2, 128, 16, torch.bfloat16, seed=12, max_q=16, max_ctx=500)
    check_against_reference(many, "causal", torch.bfloat16, device="cuda")


@pytest.mark.cuda
def test_cuda_more_requests_than_one_tile_scan_pass():
    """5000 requests (some without queries): the tile prefix is a block scan of
    4096 requests per pass, carried across passes."""
    b = make_batch(5000, 8, 2, 64, 16, torch.bfloat16, seed=14, max_q=3, max_ctx=40)
    check_against_reference(b, "causal", torch.bfloat16, device="cuda")
    check_against_reference(b, "block", torch.bfloat16, device="cuda")


@pytest.mark.cuda
def test_cuda_append_rope_and_graph_capture():
    b = {k: v.cuda() for k, v in make_batch(8, 8, 2, 64, 16, torch.bfloat16, seed=13).items()}
    cpu = {k: v.cpu() for k, v in b.items()}
    k = torch.randn(b["q"].shape[0], 2, 64, device="cuda").bfloat16()
    positions = torch.arange(b["q"].shape[0], device="cuda")
    slots = torch.arange(b["q"].shape[0], device="cuda") + 7
    q_cpu, k_cpu = cpu["q"].clone(), k.cpu().clone()
    ops.rope(q_cpu, k_cpu, positions.cpu())
    ops.append_kv(k_cpu, k_cpu, cpu["k_cache"], cpu["v_cache"], slots.cpu())
    want = ops.paged_attention(q_cpu, cpu["k_cache"], cpu["v_cache"], cpu["block_table"], cpu["kv_lens"], cpu["cu_q"])
    q_static, k_static = b["q"].clone(), k.clone()
    out = torch.empty_like(b["q"])

    def step():
        q_step, k_step = q_static.clone(), k_static.clone()
        ops.rope(q_step, k_step, positions)
        ops.append_kv(k_step, k_step, b["k_cache"], b["v_cache"], slots, validate=False)
        ops.paged_attention(q_step, b["k_cache"], b["v_cache"], b["block_table"], b["kv_lens"], b["cu_q"],
                            out=out, validate=False)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out.cpu(), want) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=name)
@pytest.mark.parametrize("D", [64, 72, 80, 128])
def test_every_isa_matches_reference_and_threads_do_not_change_bits(dtype, D):
    """The CPU kernel under each instruction set (register blocks of 8, 16 and
    32 columns and their tails: D = 72, 80) matches the reference; one request
    with 8 queries is split over the threads by queries (R = 1 with 1,000 keys
    and more: smaller calls run on the calling thread), and the split does not
    change a bit (every row is computed alone)."""
    import dspark

    before_isa, before_threads = dspark.cpu_isa(), dspark.num_threads()
    try:
        for isa in dspark.backends()["cpu"]["isas"]:
            dspark.set_cpu_isa(isa)
            for R, low, high in ((1, 1000, 1300), (5, 8, 200)):
                g = torch.Generator().manual_seed(D + R)
                kv = torch.randint(low, high, (R,), generator=g).int()  # 8 new queries after a context
                pages = int((kv.max() + 15) // 16)
                b = dict(q=torch.randn(8 * R, 6, D, generator=g).to(dtype),
                         k_cache=torch.randn(R * pages + 2, 16, 2, D, generator=g).to(dtype),
                         v_cache=torch.randn(R * pages + 2, 16, 2, D, generator=g).to(dtype),
                         block_table=torch.randperm(R * pages + 2, generator=g)[: R * pages].reshape(R, pages).int(),
                         kv_lens=kv, cu_q=torch.arange(R + 1, dtype=torch.int32) * 8)
                for mask in ("causal", "block"):
                    check_against_reference(b, mask, dtype)
                    dspark.set_num_threads(1)
                    one = ops.paged_attention(**b, mask=mask, return_lse=True)
                    dspark.set_num_threads(before_threads)
                    many = ops.paged_attention(**b, mask=mask, return_lse=True)
                    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1]), (isa, R, mask)
    finally:
        dspark.set_cpu_isa(before_isa)
        dspark.set_num_threads(before_threads)
