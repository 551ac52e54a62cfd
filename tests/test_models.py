"""dspark.models against transformers, checkpoint formats, and bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.models import Batch, CheckpointError, DSparkDrafter, PagedKVCache, TargetModel
from tiny_models import hf_model, random_drafter

PAGE = 8


def run_ragged(model: TargetModel, sequences, split, hidden_layers=()):
    """Runs the sequences through the paged cache in two ragged steps (the first
    `split[i]` tokens of each, then the rest) and returns per-sequence logits and
    hidden states of every position."""
    R = len(sequences)
    dev = next(model.parameters()).device
    pages_per = (max(len(s) for s in sequences) + PAGE - 1) // PAGE
    cache = model.new_cache(R * pages_per, PAGE, R, pages_per)
    for r, s in enumerate(sequences):
        cache.allocate(r, len(s))
    logits = [[] for _ in sequences]
    hidden = [[] for _ in sequences]
    for step in range(2):
        pieces = [(r, list(range(0, split[r]) if step == 0 else range(split[r], len(s))))
                  for r, s in enumerate(sequences)]
        tokens = torch.tensor([sequences[r][p] for r, ps in pieces for p in ps], dtype=torch.int64, device=dev)
        positions = torch.tensor([p for _, ps in pieces for p in ps], dtype=torch.int64, device=dev)
        requests = torch.tensor([r for r, ps in pieces for _ in ps], dtype=torch.int64, device=dev)
        cu = [0]
        for _, ps in pieces:
            cu.append(cu[-1] + len(ps))
        kv_lens = torch.tensor([split[r] if step == 0 else len(s) for r, s in enumerate(sequences)], dtype=torch.int32,
                               device=dev)
        batch = Batch(tokens, positions, torch.tensor(cu, dtype=torch.int32, device=dev), cache.block_table, kv_lens,
                      cache.slots(requests, positions))
        out = model(batch, cache, hidden_layers=hidden_layers)
        for r in range(R):
            logits[r].append(out.logits[cu[r]:cu[r + 1]].cpu())
            if out.hidden is not None:
                hidden[r].append(out.hidden[cu[r]:cu[r + 1]].cpu())
    return [torch.cat(x) for x in logits], [torch.cat(x) if x else None for x in hidden]


SEQUENCES = [[5, 9, 17, 3, 3, 80, 2, 44, 61, 7, 1, 100, 99], [11], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
                                                                     4, 4, 9], [120, 0, 3, 6]]
SPLIT = [7, 0, 16, 4]  # an empty first step for one request, none in the second for another


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen3", False), ("qwen3", True)])
def test_target_matches_transformers_fp32(tmp_path, kind, tie):
    hf = hf_model(tmp_path, kind, tie=tie)
    model = TargetModel.load(tmp_path)
    logits, hidden = run_ragged(model, SEQUENCES, SPLIT, hidden_layers=(0, 1))
    for r, seq in enumerate(SEQUENCES):
        with torch.no_grad():
            ref = hf(torch.tensor([seq]), output_hidden_states=True)
        torch.testing.assert_close(logits[r], ref.logits[0], rtol=1e-4, atol=1e-4)
        # hidden_states[i + 1] is decoder layer i's raw output (for i < num_layers - 1)
        torch.testing.assert_close(hidden[r][:, 0], ref.hidden_states[1][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden[r][:, 1], ref.hidden_states[2][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_target_matches_transformers_bf16(tmp_path, kind):
    """bf16: dspark's error against transformers' bf16 model is of the size of
    transformers' own bf16 rounding error (both measured against float32)."""
    hf = hf_model(tmp_path, kind)
    model = TargetModel.load(tmp_path, dtype=torch.bfloat16)
    hf16 = hf_model(tmp_path / "copy", kind).to(torch.bfloat16)
    logits, hidden = run_ragged(model, SEQUENCES, SPLIT, hidden_layers=(1,))
    for r, seq in enumerate(SEQUENCES):
        with torch.no_grad():
            exact = hf(torch.tensor([seq]), output_hidden_states=True)
            ref = hf16(torch.tensor([seq]), output_hidden_states=True)
        hf_error = (ref.logits[0].float() - exact.logits[0]).abs().max().item()
        ours_error = (logits[r] - exact.logits[0]).abs().max().item()
        assert ours_error <= 2.0 * hf_error + 1e-3, (ours_error, hf_error)
        hf_hidden_error = (ref.hidden_states[2][0].float() - exact.hidden_states[2][0]).abs().max().item()
        ours_hidden_error = (hidden[r][:, 0].float() - exact.hidden_states[2][0]).abs().max().item()
        assert ours_hidden_error <= 2.0 * hf_hidden_error + 1e-3, (ours_hidden_error, hf_hidden_error)
        assert logits[r].dtype == torch.float32


def test_target_logits_rows_and_llama3_rope(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8, "rope_theta": 10000.0}
    hf = hf_model(tmp_path, "llama", rope_scaling=rope)
    model = TargetModel.load(tmp_path)
    seq = SEQUENCES[0] + SEQUENCES[2]
    logits, _ = run_ragged(model, [seq], [5])
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0]
    torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- formats


def test_target_round_trip(tmp_path):
    hf_model(tmp_path / "a", "qwen3", tie=True)
    model = TargetModel.load(tmp_path / "a")
    model.save(tmp_path / "b")
    assert "lm_head.weight" not in load_file(str(tmp_path / "b" / "model.safetensors"))  # tied: not written
    again = TargetModel.load(tmp_path / "b")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    # what dspark writes, transformers reads
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "b")).eval()
    logits, _ = run_ragged(again, [SEQUENCES[0]], [3])
    with torch.no_grad():
        torch.testing.assert_close(logits[0], hf(torch.tensor([SEQUENCES[0]])).logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head,rank,confidence,draft_vocab", [
    ("vanilla", 16, True, 0), ("gated", 16, True, 0), ("rnn", 32, True, 0), ("vanilla", 0, True, 0),
    ("vanilla", 16, False, 0), ("vanilla", 16, True, 40), ("rnn", 16, True, 40), ("vanilla", 0, False, 40)])
def test_drafter_round_trip(tmp_path, head, rank, confidence, draft_vocab):
    hf_model(tmp_path / "t")
    target = TargetModel.load(tmp_path / "t")
    drafter = random_drafter(target, head=head, rank=rank, confidence=confidence, draft_vocab=draft_vocab)
    from dspark.calibration import STS

    drafter.sts = STS([1.5, 1.0, 0.7, 2.0]) if confidence else None
    drafter.save(tmp_path / "d", copies=False)
    again = DSparkDrafter.load(tmp_path / "d", target)
    assert again.config.to_dict() == drafter.config.to_dict()
    state, state2 = drafter.state_dict(), again.state_dict()
    assert state.keys() == state2.keys()
    for name in state:
        assert torch.equal(state[name], state2[name]), name
    if confidence:
        assert again.sts.temperatures == drafter.sts.temperatures
    if draft_vocab:
        assert again.draft_vocab.dtype == torch.int32 and torch.equal(again.draft_vocab, drafter.draft_vocab)
        assert json.loads((tmp_path / "d" / "config.json").read_text())["draft_vocab_size"] == draft_vocab
        if rank:
            assert again.markov_head.markov_w2.weight.shape == (draft_vocab, rank)
            assert again.markov_head.markov_w1.weight.shape == (128, rank)


def test_drafter_draft_vocabulary_scores_only_its_ids(tmp_path):
    """The base logits of a drafter with a draft vocabulary are the full
    drafter's logits at the map's ids; a map with a repeated or out-of-range id
    does not load."""
    hf_model(tmp_path / "t")
    target = TargetModel.load(tmp_path / "t")
    full = random_drafter(target, seed=3)
    sub = random_drafter(target, seed=3, draft_vocab=40)
    sub.load_state_dict({**{k: v for k, v in full.state_dict().items() if not k.startswith("markov_head.markov_w2")},
                         "markov_head.markov_w2.weight": full.markov_head.markov_w2.weight[sub.draft_vocab.long()],
                         "draft_vocab": sub.draft_vocab})
    engine_args = dict(anchors=torch.tensor([5, 9]), starts=torch.tensor([0, 0]), request_slots=torch.tensor([0, 1]))
    outs = []
    for drafter in (full, sub):
        cache = drafter.new_cache(4, 16, 2, 2)
        for r in range(2):
            cache.allocate(r, 8)
        outs.append(drafter.draft(target, cache=cache, **engine_args).base_logits)
    torch.testing.assert_close(outs[1], outs[0][..., sub.draft_vocab.long()])
    sub.save(tmp_path / "d")
    tensors = load_file(str(tmp_path / "d" / "model.safetensors"))
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    for name, ids in (("twice", [1] * 40), ("outside", [200] + list(range(39)))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        save_file(dict(tensors, draft_vocab=torch.tensor(ids, dtype=torch.int32)), str(folder / "model.safetensors"))
        with pytest.raises(CheckpointError, match="draft_vocab"):
            DSparkDrafter.load(folder, target)


def deepspec_tensors(target: TargetModel, layers: int, rank: int, head: str, ctx_layers: int):
    """A drafter's tensors under the DeepSpec key names, written by hand."""
    t = target.config
    d, H, Hkv, D, V, inter = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.vocab_size, 96
    g = torch.Generator().manual_seed(7)
    rand = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    ones = lambda n: 1.0 + 0.1 * torch.randn(n, generator=g)  # noqa: E731
    tensors = {"fc.weight": rand(d, ctx_layers * d), "hidden_norm.weight": ones(d), "norm.weight": ones(d)}
    for i in range(layers):
        p = f"layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": rand(H * D, d), p + "self_attn.k_proj.weight": rand(Hkv * D, d),
            p + "self_attn.v_proj.weight": rand(Hkv * D, d), p + "self_attn.o_proj.weight": rand(d, H * D),
            p + "self_attn.q_norm.weight": ones(D), p + "self_attn.k_norm.weight": ones(D),
            p + "mlp.gate_proj.weight": rand(inter, d), p + "mlp.up_proj.weight": rand(inter, d),
            p + "mlp.down_proj.weight": rand(d, inter), p + "input_layernorm.weight": ones(d),
            p + "post_attention_layernorm.weight": ones(d)})
    if rank:
        tensors["markov_head.markov_w1.weight"] = rand(V, rank)
        tensors["markov_head.markov_w2.weight"] = rand(V, rank)
        if head == "gated":
            tensors["markov_head.gate_proj.weight"] = rand(rank, d + rank)
            tensors["markov_head.gate_proj.bias"] = rand(rank)
        if head == "rnn":
            tensors["markov_head.joint_proj.weight"] = rand(3 * rank, 2 * rank + d)
            tensors["markov_head.joint_proj.bias"] = rand(3 * rank)
    tensors["confidence_head.proj.weight"] = rand(1, d + rank)
    tensors["confidence_head.proj.bias"] = rand(1)
    return tensors, inter


@pytest.mark.parametrize("head,rank", [("vanilla", 32), ("gated", 16), ("rnn", 16), ("vanilla", 0)])
def test_deepspec_layout_loads_and_runs(tmp_path, head, rank):
    from dspark.engine import SamplingParams, SpeculativeEngine

    hf_model(tmp_path / "t")
    target = TargetModel.load(tmp_path / "t")
    tensors, inter = deepspec_tensors(target, layers=2, rank=rank, head=head, ctx_layers=2)
    folder = tmp_path / "d"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    t = target.config
    config = {"architectures": ["DSparkDraftModel"], "model_type": "qwen3", "hidden_size": t.hidden_size,
              "intermediate_size": inter, "num_hidden_layers": 2, "num_attention_heads": t.num_attention_heads,
              "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "vocab_size": t.vocab_size,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "block_size": 5,
              "dflash_config": {"target_layer_ids": [0, 2], "mask_token_id": t.vocab_size - 1,
                                "markov_rank": rank, "markov_head_type": head, "enable_confidence_head": True,
                                "confidence_head_with_markov": True}}
    (folder / "config.json").write_text(json.dumps(config))
    drafter = DSparkDrafter.load(folder, target)
    assert drafter.block_size == 5 and drafter.config.target_layer_ids == [0, 2]
    assert torch.equal(drafter.fc.weight, tensors["fc.weight"])
    if rank:
        assert torch.equal(drafter.markov_head.markov_w2.weight, tensors["markov_head.markov_w2.weight"])
    prompts = [[3, 4, 5, 6], [9] * 11]
    base = SpeculativeEngine(target, max_model_len=64).generate(prompts, SamplingParams(0.0, max_new_tokens=12))
    engine = SpeculativeEngine(target, drafter, max_model_len=64)
    out = engine.generate(prompts, SamplingParams(0.0, max_new_tokens=12))
    assert [r.tokens for r in out] == [r.tokens for r in base]
    assert engine.metrics.verified_drafts > 0
    # written back in the same layout (nested config keys become top-level ones), with the copies of the
    # target's embedding and LM head that DeepSpec's loader needs
    drafter.save(tmp_path / "again")
    written = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(written) == set(tensors) | {"embed_tokens.weight", "lm_head.weight"}
    assert torch.equal(written["embed_tokens.weight"], target.model.embed_tokens.weight)
    assert torch.equal(written["lm_head.weight"], target.lm_head.weight)


# ------------------------------------------------------------ bad inputs


def test_bad_target_checkpoints(tmp_path):
    hf_model(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="no config.json"):
        TargetModel.load(tmp_path / "nothing")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "ok" / "model.safetensors"))

    def write(name, cfg, ts):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        if ts is not None:
            save_file(ts, str(folder / "model.safetensors"))
        return folder

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
        TargetModel.load(write("missing", config, missing))
    extra = dict(tensors, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \['model.layers.9.mlp.up_proj.weight'\]"):
        TargetModel.load(write("extra", config, extra))
    wrong = dict(tensors, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match="model.norm.weight has shape"):
        TargetModel.load(write("shape", config, wrong))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        TargetModel.load(write("kind", dict(config, model_type="gpt2"), tensors))
    with pytest.raises(CheckpointError, match="lacks 'hidden_size'"):
        TargetModel.load(write("key", {k: v for k, v in config.items() if k != "hidden_size"}, tensors))
    with pytest.raises(CheckpointError, match="no safetensors"):
        TargetModel.load(write("empty", config, None))
    with pytest.raises(CheckpointError, match="rope type 'yarn'"):
        TargetModel.load(write("rope", dict(config, rope_scaling={"rope_type": "yarn", "factor": 2.0}), tensors))


def test_bad_drafter_checkpoints(tmp_path):
    hf_model(tmp_path / "t")
    target = TargetModel.load(tmp_path / "t")
    hf_model(tmp_path / "other", vocab=100)
    other = TargetModel.load(tmp_path / "other")
    hf_model(tmp_path / "wide", hidden=96, head_dim=24)
    wide = TargetModel.load(tmp_path / "wide")
    drafter = random_drafter(target)
    drafter.save(tmp_path / "d", copies=False)
    with pytest.raises(CheckpointError, match="vocabulary 128 != target vocabulary 100"):
        DSparkDrafter.load(tmp_path / "d", other)
    with pytest.raises(CheckpointError, match="hidden size 64 != target hidden size 96"):
        DSparkDrafter.load(tmp_path / "d", wide)
    from dspark.engine import SpeculativeEngine

    with pytest.raises(CheckpointError, match="vocabulary"):
        SpeculativeEngine(other, drafter)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "d" / "model.safetensors"))

    def write(name, cfg, ts):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        save_file(ts, str(folder / "model.safetensors"))
        return folder

    with pytest.raises(CheckpointError, match="not layers of the target"):
        DSparkDrafter.load(write("ids", dict(config, target_layer_ids=[0, 7]), tensors), target)
    no_markov = {k: v for k, v in tensors.items() if not k.startswith("markov_head.markov_w2")}
    with pytest.raises(CheckpointError, match="markov_head.markov_w2.weight"):
        DSparkDrafter.load(write("w2", config, no_markov), target)
    with pytest.raises(CheckpointError, match="markov_head_type"):
        DSparkDrafter.load(write("head", dict(config, markov_head_type="lstm"), tensors), target)
    with pytest.raises(CheckpointError, match="lacks 'block_size'"):
        DSparkDrafter.load(write("block", {k: v for k, v in config.items() if k != "block_size"}, tensors), target)
    bad_rank = dict(tensors, **{"markov_head.markov_w1.weight": torch.zeros(128, 8)})
    with pytest.raises(CheckpointError, match="markov_w1.weight has shape"):
        DSparkDrafter.load(write("rank", config, bad_rank), target)


def test_paged_cache_accounting():
    cache = PagedKVCache(1, num_pages=5, page_size=4, kv_heads=1, head_dim=8, dtype=torch.float32,
                         device=torch.device("cpu"), max_requests=3, max_pages_per_request=3)
    assert cache.can_hold(12) and not cache.can_hold(13) and not cache.could_ever_hold(13)
    cache.allocate(0, 9)  # 3 pages
    assert not cache.can_hold(9) and cache.can_hold(8) and cache.could_ever_hold(9)
    from dspark.models import CacheFull

    with pytest.raises(CacheFull):
        cache.allocate(1, 12)
    cache.allocate(1, 8)
    slots = cache.slots(torch.tensor([0, 0, 1]), torch.tensor([0, 5, 7]))
    pages0, pages1 = cache.block_table[0].tolist(), cache.block_table[1].tolist()
    assert slots.tolist() == [pages0[0] * 4, pages0[1] * 4 + 1, pages1[1] * 4 + 3]
    assert len(set(pages0) | set(pages1[:2])) == 5
    cache.release(0)
    assert cache.can_hold(12)


@pytest.mark.parametrize("rows", [1, 8, 33])
def test_packed_bfloat16_linear_equals_torch_and_never_goes_stale(rows):
    """A Linear packed for CPU inference gives torch's linear results; after its
    weight changes (or under autograd) it uses the weight itself."""
    from dspark.models.common import Linear, cpu_weight_usable

    torch.manual_seed(rows)
    layer = Linear(96, 200, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    packed = layer.pack_cpu()
    assert packed == cpu_weight_usable(layer.weight)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-2,
                                   atol=1e-2)
    with torch.no_grad():
        layer.weight.mul_(-1.0)  # the packed copy is stale now
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    layer.pack_cpu()
    y = layer(x.requires_grad_(True))  # autograd: the plain path, with gradients
    y.float().sum().backward()
    assert x.grad is not None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSPARK_CPU_PACK_FLOAT32", "off")
        assert not Linear(4, 4).pack_cpu()  # float32 weights are packed only where it pays


@pytest.mark.parametrize("rows", [1, 8, 33])
def test_packed_float32_linear_equals_torch_where_enabled(monkeypatch, rows):
    """With float32 packing on, a float32 Linear runs on the packed weight and
    gives torch's results to float32 rounding; off, it is not packed."""
    from dspark.models.common import Linear, PackedWeight, _packing_available

    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "on")
    torch.manual_seed(rows)
    layer = Linear(96, 200, bias=True)
    x = torch.randn(rows, 96)
    assert layer.pack_cpu() == _packing_available()
    if layer.packed is None:
        pytest.skip("this PyTorch has no oneDNN packed linear")
    with torch.inference_mode():
        y = layer(x)
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert not torch.equal(layer.packed(x, layer.bias), ref) or torch.equal(y, ref)  # it ran the packed path
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(-1.0)
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # stale: not used
    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "off")
    assert not PackedWeight.usable(layer.weight)
    assert not layer.pack_cpu() and layer.packed is None


def test_float32_packing_setting_is_checked(monkeypatch):
    """The older setting is still checked (the backend setting itself:
    tests/test_linear.py)."""
    from dspark.models import common

    monkeypatch.delenv("DSPARK_CPU_LINEAR", raising=False)
    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "sometimes")
    with pytest.raises(ValueError, match="DSPARK_CPU_PACK_FLOAT32"):
        common.float32_packing_pays()
    monkeypatch.setattr(common, "_float32_decision", {})
    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "auto")
    measured = {"backend": "blas", "pays": False, "packed_ms": 3.0, "blas_ms": 2.0}
    monkeypatch.setattr(common, "_measure_float32_packing", lambda shapes=None: measured)
    assert not common.float32_packing_pays()
    assert "through BLAS" in common.float32_packing_report()


def test_float32_packing_measurement_returns_timings():
    from dspark.models import common

    d = common._measure_float32_packing()
    assert d["backend"] in ("onednn", "blas") and d["pays"] == (d["backend"] == "onednn")
    if common._packing_available():
        assert d["packed_ms"] > 0 and d["blas_ms"] > 0
        assert d["pays"] == (d["packed_ms"] < common._PACK_FLOAT32_GAIN * d["blas_ms"])


def _three_projections(bias: bool, dtype: torch.dtype):
    from dspark.models.common import FusingModule, Linear

    class Projections(FusingModule):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = Linear(96, 64, bias=bias), Linear(96, 32, bias=bias), Linear(96, 40, bias=bias)

        def fusable(self):
            return self.a, self.b, self.c

    return Projections().to(dtype)


@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)])
def test_fused_linears_equal_their_members_and_never_go_stale(monkeypatch, dtype, bias):
    """Linears packed as one weight (FusedLinears) give each member's own
    results; after a member's weight or bias changes, or under autograd, each
    member runs on its own weight; copies come out unfused and compute the
    same."""
    import copy

    from dspark.models.common import FusedLinears, pack_cpu_linears

    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "on")
    torch.manual_seed(3)
    m = _three_projections(bias, dtype)
    members = m.fusable()
    if not FusedLinears.usable(members):
        pytest.skip(f"this CPU or PyTorch cannot pack {dtype} weights")
    assert pack_cpu_linears(m) == 3
    assert m.fused is not None and all(layer.packed is None for layer in members)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for rows in (1, 8, 33):
        x = torch.randn(rows, 96).to(dtype)
        with torch.inference_mode():
            outs = m.project(x)
            assert [o.shape for o in outs] == [(rows, 64), (rows, 32), (rows, 40)]
            for out, layer in zip(outs, members):
                torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias), **tol)
            if dtype == torch.float32:  # one row at a time: the same values (no dependence on the other rows)
                one = [m.project(x[i:i + 1]) for i in range(rows)]
                for k in range(3):
                    torch.testing.assert_close(torch.cat([o[k] for o in one]), outs[k], rtol=1e-6, atol=1e-6)
    x = torch.randn(5, 96).to(dtype)
    with torch.no_grad():
        (members[1].bias if bias else members[1].weight).mul_(-1.0)  # the fused copy is stale now
    with torch.inference_mode():
        outs = m.project(x)
        assert torch.equal(outs[1], torch.nn.functional.linear(x, members[1].weight, members[1].bias))
    pack_cpu_linears(m)
    x.requires_grad_(True)
    sum(o.float().sum() for o in m.project(x)).backward()  # autograd: each member, with gradients
    assert x.grad is not None and members[2].weight.grad is not None
    members[0].weight.requires_grad_(False)  # autograd through a later member only: still each on its own
    members[2].weight.grad = None
    sum(o.float().sum() for o in m.project(x.detach())).backward()
    assert members[2].weight.grad is not None
    members[0].weight.requires_grad_(True)
    twin = copy.deepcopy(m)
    assert twin.fused is None and m.fused is not None
    with torch.inference_mode():
        for a, b in zip(twin.project(x.detach()), m.project(x.detach())):
            torch.testing.assert_close(a, b, **tol)


def test_linears_fuse_only_when_alike(monkeypatch):
    """Members of one fused weight need one dtype and input width, and all or
    none with a bias; otherwise each is packed on its own."""
    from dspark.models.common import FusedLinears, Linear, pack_cpu_linears

    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "on")
    m = _three_projections(True, torch.float32)
    if not FusedLinears.usable(m.fusable()):
        pytest.skip("this PyTorch has no oneDNN packed linear")
    assert not FusedLinears.usable(m.fusable()[:1])
    m.c = Linear(96, 40, bias=False)
    assert not FusedLinears.usable(m.fusable())
    m.c = Linear(80, 40, bias=True)
    assert not FusedLinears.usable(m.fusable())
    m.c = Linear(96, 40, bias=True).to(torch.bfloat16)
    assert not FusedLinears.usable(m.fusable())
    assert pack_cpu_linears(m) == 2 + int(m.c.packed is not None)
    assert m.fused is None and m.a.packed is not None
    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "off")
    assert not FusedLinears.usable(_three_projections(True, torch.float32).fusable())


@pytest.mark.parametrize("backend", ["onednn", "dspark", "split"])
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_packed_target_matches_transformers(tmp_path, monkeypatch, kind, backend):
    """The target as the engine runs it on the CPU (q / k / v and gate / up each
    one product, the rest one by one; on oneDNN's packed weights, on dspark's
    linear, or split by rows between the two) gives transformers' logits and
    hidden states."""
    from dspark.models import common
    from dspark.models.common import FusingModule, cpu_weight_usable, pack_cpu_linears

    if backend == "split":  # SEQUENCES' prefill and steps take both sides of FEW_ROWS
        monkeypatch.delenv("DSPARK_CPU_LINEAR", raising=False)
        monkeypatch.delenv("DSPARK_CPU_PACK_FLOAT32", raising=False)
        monkeypatch.setattr(common, "float32_few_rows_backend", lambda shapes=None: "dspark")
        monkeypatch.setattr(common, "float32_backend", lambda shapes=None: "onednn")
    else:
        monkeypatch.setenv("DSPARK_CPU_LINEAR", backend)
    hf = hf_model(tmp_path, kind, attention_bias=True)
    with torch.no_grad():  # transformers starts biases at 0: random ones, so the fused bias is tested
        for name, p in hf.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0.0, 0.1)
    hf.save_pretrained(str(tmp_path))
    model = TargetModel.load(tmp_path)
    if not cpu_weight_usable(model.lm_head.weight):
        pytest.skip("this PyTorch has no oneDNN packed linear")
    layers = model.config.num_hidden_layers
    assert pack_cpu_linears(model) == 7 * layers + 1
    assert sum(m.fused is not None for m in model.modules() if isinstance(m, FusingModule)) == 2 * layers
    logits, hidden = run_ragged(model, SEQUENCES, SPLIT, hidden_layers=(0,))
    for r, seq in enumerate(SEQUENCES):
        with torch.no_grad():
            ref = hf(torch.tensor([seq]), output_hidden_states=True)
        torch.testing.assert_close(logits[r], ref.logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden[r][:, 0], ref.hidden_states[1][0], rtol=1e-4, atol=1e-4)


def test_packed_drafter_drafts_as_unpacked(tmp_path, monkeypatch):
    """The drafter as the engine runs it on the CPU (the block's q / k / v one
    packed product, k / v also packed alone for the context, gate / up one
    product) writes the same context and drafts the same block as unpacked."""
    from dspark.models.common import FusingModule, PackedWeight, pack_cpu_linears

    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "on")
    hf_model(tmp_path / "t")
    target = TargetModel.load(tmp_path / "t")
    drafter = random_drafter(target, seed=5, layers=2, draft_vocab=40)
    if not PackedWeight.usable(target.lm_head.weight):
        pytest.skip("this PyTorch has no oneDNN packed linear")
    torch.manual_seed(0)
    hidden = torch.randn(11, len(drafter.config.target_layer_ids), target.config.hidden_size)

    def run():
        cache = drafter.new_cache(8, 8, 2, 4)
        for r in range(2):
            cache.allocate(r, 16)
        positions = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4])
        requests = torch.tensor([0] * 6 + [1] * 5)
        drafter.extend_context(hidden, positions, cache.slots(requests, positions), cache)
        draft = drafter.draft(target, torch.tensor([5, 9]), torch.tensor([6, 5]), torch.tensor([0, 1]), cache)
        return draft.hidden, draft.base_logits

    with torch.inference_mode():
        want = run()
        pack_cpu_linears(target)
        drafter.pack_cpu()
        attentions = [layer.self_attn for layer in drafter.layers]
        assert all(a.fused is not None and a.k_proj.packed is not None and a.v_proj.packed is not None
                   for a in attentions)
        assert all(layer.mlp.fused is not None and layer.mlp.gate_proj.packed is None for layer in drafter.layers)
        assert sum(isinstance(m, FusingModule) and m.fused is not None for m in drafter.modules()) == 4
        got = run()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_target_refuses_a_bad_batch_naming_the_argument(tmp_path):
    """The models launch their attention ops without the Python wrappers'
    checks; a batch of the wrong dtypes or out-of-range slots, pages and
    lengths still ends in a clean error naming the argument."""
    hf_model(tmp_path)
    model = TargetModel.load(tmp_path)
    cache = model.new_cache(8, 8, 2, 4)
    cache.allocate(0, 5)
    positions = torch.arange(5)
    good = dict(tokens=torch.tensor([1, 2, 3, 4, 5]), positions=positions,
                cu_q=torch.tensor([0, 5], dtype=torch.int32), block_table=cache.block_table[:1],
                kv_lens=torch.tensor([5], dtype=torch.int32),
                slots=cache.slots(torch.zeros(5, dtype=torch.int64), positions))
    want = model(Batch(**good), cache).logits
    assert want.shape == (5, model.config.vocab_size)
    bad = [(dict(slots=good["slots"].int()), TypeError, "slot_mapping"),
           (dict(kv_lens=good["kv_lens"].long()), TypeError, "kv_lens"),
           (dict(cu_q=good["cu_q"].long()), TypeError, "cu_q"),
           (dict(block_table=good["block_table"].long()), TypeError, "block_table"),
           (dict(slots=good["slots"] + 1000), ValueError, "slot"),
           (dict(kv_lens=torch.tensor([100], dtype=torch.int32)), ValueError, "kv_lens"),
           (dict(cu_q=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "cu_q"),
           (dict(positions=positions.view(5, 1)), ValueError, "positions"),
           (dict(block_table=torch.full((1, 4), 99, dtype=torch.int32)), ValueError, "block_table")]
    for change, error, name in bad:
        with pytest.raises(error, match=name):
            model(Batch(**{**good, **change}), cache)


def test_packed_layers_and_drafters_can_be_copied_and_pickled(monkeypatch):
    """A packed layer's oneDNN tensor has no storage: copies and pickles of a
    packed Linear (and of a drafter with packed LM head rows) come out unpacked
    and compute the same."""
    import copy
    import pickle

    from dspark.models.common import Linear

    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "on")
    torch.manual_seed(0)
    layer = Linear(32, 48)
    if not layer.pack_cpu():
        pytest.skip("this PyTorch has no oneDNN packed linear")
    x = torch.randn(3, 32)
    with torch.inference_mode():
        want = layer(x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin.packed is None and layer.packed is not None
        with torch.inference_mode():
            torch.testing.assert_close(twin(x), want, rtol=1e-5, atol=1e-5)
        assert twin.pack_cpu()
