"""Conformance with DeepSpec's drafter checkpoints (tests/deepspec_fixture.py
writes them as DeepSpec's trainer does): they load (the copies of the
target's embedding and LM head are checked and shared), draft what DeepSpec's
computation gives, decode greedily equal to plain decoding, and save back in
a layout DeepSpec reads. For all three Markov heads, without a confidence
head, DFlash-style (rank 0), Qwen3 and Gemma 4 forms."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dspark import ops
from dspark.engine import SamplingParams, SpeculativeEngine
from dspark.models import Batch, CheckpointError, DSparkDrafter, TargetModel
from deepspec_fixture import greedy_block, reference_draft, write_checkpoint
from tiny_models import hf_gemma4_model, hf_model, uneven_prompts

CASES = {  # name: fixture arguments
    "vanilla": dict(markov_rank=16, markov_head_type="vanilla"),
    "gated": dict(markov_rank=16, markov_head_type="gated"),
    "rnn": dict(markov_rank=16, markov_head_type="rnn"),
    "vanilla-no-confidence": dict(markov_rank=16, markov_head_type="vanilla", confidence=False),
    "gated-confidence-without-markov": dict(markov_rank=16, markov_head_type="gated",
                                            confidence_head_with_markov=False),
    "dflash": dict(markov_rank=0, markov_head_type=None, confidence=False),
    "embedding-feature": dict(markov_rank=16, markov_head_type="RNN", target_layer_ids=(-1, 1)),
}
DRAFT_KEYS = {"fc.weight", "hidden_norm.weight", "norm.weight"}


@pytest.fixture(scope="module")
def qwen3_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-target")
    hf_model(folder, "qwen3", vocab=128, hidden=64, layers=3)
    return folder, TargetModel.load(folder)


@pytest.fixture(scope="module")
def gemma4_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4-target")
    hf_gemma4_model(folder, shared=0, ple=0, double_wide=False)
    return folder, TargetModel.load(folder)


def dspark_draft(target: TargetModel, drafter: DSparkDrafter, prompt, anchor: int):
    """dspark's draft of one request after its prompt: the target's context
    features, the backbone's hidden states and base logits, the greedy
    Markov-corrected sample and the confidences."""
    L, gamma, page = len(prompt), drafter.block_size, 8
    dev = next(target.parameters()).device
    pages = (L + gamma + page) // page + 1
    cache_t = target.new_cache(pages, page, 1, pages)
    cache_d = drafter.new_cache(pages, page, 1, pages)
    cache_t.allocate(0, L + gamma + 1)
    cache_d.allocate(0, L + gamma + 1)
    positions = torch.arange(L, device=dev)
    zeros = torch.zeros(L, dtype=torch.int64, device=dev)
    batch = Batch(torch.tensor(prompt, device=dev), positions, torch.tensor([0, L], dtype=torch.int32, device=dev),
                  cache_t.block_table, torch.tensor([L], dtype=torch.int32, device=dev), cache_t.slots(zeros, positions))
    out = target(batch, cache_t, hidden_layers=drafter.config.target_layer_ids)
    drafter.extend_context(out.hidden, positions, cache_d.slots(zeros, positions), cache_d)
    anchors = torch.tensor([anchor], device=dev)
    draft = drafter.draft(target, anchors, torch.tensor([L], device=dev), torch.tensor([0], device=dev), cache_d)
    w1, w2 = drafter.markov_weights(dev)
    sampled = ops.markov_sample(draft.base_logits, anchors, w1, w2, temperature=0.0, seed=0,
                                return_corrected_logits=True, **drafter.markov_kwargs(draft.hidden))
    conf = drafter.confidence(draft.hidden, anchors, sampled.draft_tokens)
    return out.hidden.reshape(L, -1).float().cpu(), draft, sampled, conf


def check_against_reference(target, drafter, tensors, folder, prompt, anchor, tol=5e-6):
    """dspark's draft against DeepSpec's computation in float32. A drafter that
    shares the target's embedding and LM head (its bfloat16 copies equal them
    to bfloat16 precision) is compared with DeepSpec's computation on the
    target's float32 weights, i.e. with the copies removed."""
    config = json.loads((folder / "config.json").read_text())
    features, draft, sampled, conf = dspark_draft(target, drafter, prompt, anchor)
    tokens = sampled.draft_tokens[0].tolist()
    tensors = dict(tensors)
    if not hasattr(drafter, "embed_tokens"):
        tensors["embed_tokens.weight"] = target.model.embed_tokens.weight.detach().cpu()
    if not hasattr(drafter, "lm_head"):
        tensors["lm_head.weight"] = target.lm_head.weight.detach().cpu()
    ref = reference_draft(tensors, config, features, anchor, [anchor] + tokens)
    close = dict(rtol=tol, atol=tol)
    torch.testing.assert_close(draft.hidden[0].float().cpu(), ref["hidden"], **close)
    torch.testing.assert_close(draft.base_logits[0].float().cpu(), ref["base_logits"], **close)
    torch.testing.assert_close(sampled.corrected_logits[0].float().cpu(), ref["corrected_logits"], **close)
    assert tokens == greedy_block(ref)  # DeepSpec's greedy block: argmax of each corrected row
    if ref["confidence_logits"] is None:
        assert conf is None
    else:
        torch.testing.assert_close(conf.logits[0].float().cpu(), ref["confidence_logits"], **close)
    return tokens


@pytest.mark.parametrize("case", sorted(CASES))
def test_deepspec_checkpoint_loads_drafts_and_decodes(tmp_path, qwen3_target, case):
    target_dir, target = qwen3_target
    tensors = write_checkpoint(tmp_path / "d", target_dir, target, **CASES[case])
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:  # what the fixture wrote
        assert {"embed_tokens.weight", "lm_head.weight"} <= set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    drafter = DSparkDrafter.load(tmp_path / "d", target)
    # the copies equal the target's weights (in bfloat16): shared, not kept
    assert not hasattr(drafter, "embed_tokens") and not hasattr(drafter, "lm_head")
    assert DRAFT_KEYS <= set(drafter.state_dict()) and "embed_tokens.weight" not in drafter.state_dict()
    assert drafter.config.markov_head_type == str(CASES[case]["markov_head_type"] or "vanilla").lower()
    # features, base and Markov-corrected logits, confidences as DeepSpec computes them (float32)
    prompt = [5, 9, 17, 3, 3, 80, 2, 44, 61, 7, 1]
    check_against_reference(target, drafter, tensors, tmp_path / "d", prompt, anchor=12)
    # greedy decoding equals plain decoding
    prompts = uneven_prompts(5, 128, seed=11, low=1, high=24)
    params = SamplingParams(temperature=0.0, max_new_tokens=14)
    base = SpeculativeEngine(target, max_model_len=64).generate(prompts, params)
    engine = SpeculativeEngine(target, drafter, max_concurrency=3, max_model_len=64)
    assert [r.tokens for r in engine.generate(prompts, params)] == [r.tokens for r in base]
    assert engine.metrics.verified_drafts > 0


def test_gemma4_deepspec_checkpoint(tmp_path, gemma4_target):
    """Gemma4DSparkModel's layout: the global layers' head dim, kv heads
    (keys = values) and proportional rotary embedding, Gemma norms, layer
    scalars, GELU MLP, soft-capped logits, the scaled embedding."""
    target_dir, target = gemma4_target
    tensors = write_checkpoint(tmp_path / "d", target_dir, target, form="gemma4", target_layer_ids=(-1, 2, 3),
                               markov_rank=16, markov_head_type="gated")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["global_head_dim"] == 32 and "per_layer_config" not in config
    assert "layers.0.self_attn.v_proj.weight" not in tensors  # attention_k_eq_v
    drafter = DSparkDrafter.load(tmp_path / "d", target)
    c = drafter.config
    assert c.form == "gemma4" and c.head_dim == 32 and c.num_key_value_heads == 1 and c.attention_k_eq_v
    assert c.rope["rope_type"] == "proportional"
    check_against_reference(target, drafter, tensors, tmp_path / "d", [5, 9, 17, 3, 3, 80, 2, 44, 61, 7, 1], 12)
    prompts = uneven_prompts(4, 128, seed=12, low=2, high=20)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    base = SpeculativeEngine(target, max_model_len=64).generate(prompts, params)
    engine = SpeculativeEngine(target, drafter, max_concurrency=4, max_model_len=64)
    assert [r.tokens for r in engine.generate(prompts, params)] == [r.tokens for r in base]
    # saved back in Gemma4DSparkModel's layout
    drafter.save(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["architectures"] == ["Gemma4DSparkModel"] and again["global_head_dim"] == 32
    assert again["num_global_key_value_heads"] == 1 and again["attention_k_eq_v"]
    assert set(load_file(str(tmp_path / "again" / "model.safetensors"))) == set(tensors)


def test_gemma4_drafter_with_double_width_layers(tmp_path, gemma4_target):
    """A Gemma 4 drafter whose config (copied from a KV-sharing target) makes
    some MLPs double width: the widths come from the weights."""
    target_dir, target = gemma4_target
    tensors = write_checkpoint(tmp_path / "d", target_dir, target, form="gemma4", target_layer_ids=(0, 2))
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    inter = config["intermediate_size"]
    g = torch.Generator().manual_seed(3)
    for name, shape in (("gate_proj", (2 * inter, 64)), ("up_proj", (2 * inter, 64)), ("down_proj", (64, 2 * inter))):
        tensors[f"layers.1.mlp.{name}.weight"] = (0.1 * torch.randn(*shape, generator=g)).bfloat16()
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "d" / "model.safetensors"), metadata={"format": "pt"})
    drafter = DSparkDrafter.load(tmp_path / "d", target)
    assert drafter.config.intermediate_sizes == [inter, 2 * inter]
    check_against_reference(target, drafter, tensors, tmp_path / "d", [4, 8, 15, 16, 23, 42], 7)


def test_copies_that_differ_are_refused_unless_asked_for(tmp_path, qwen3_target):
    target_dir, target = qwen3_target
    tensors = write_checkpoint(tmp_path / "d", target_dir, target, markov_head_type="gated")
    tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()
    tensors["lm_head.weight"][7, 3] += 0.25
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "d" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lm_head.weight differs from the target's LM head: 1 of 8192 entries, "
                                              r"largest absolute difference 0\.2"):
        DSparkDrafter.load(tmp_path / "d", target)
    with pytest.raises(ValueError, match="embeddings"):
        DSparkDrafter.load(tmp_path / "d", target, embeddings="mine")
    # the drafter's own copies: kept, used for drafting, and decoding stays exact
    drafter = DSparkDrafter.load(tmp_path / "d", target, embeddings="own")
    assert torch.equal(drafter.lm_head.weight, tensors["lm_head.weight"].float())
    check_against_reference(target, drafter, tensors, tmp_path / "d", [5, 9, 17, 3], 12)
    prompts = uneven_prompts(4, 128, seed=13, low=1, high=20)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    base = SpeculativeEngine(target, max_model_len=64).generate(prompts, params)
    out = SpeculativeEngine(target, drafter, max_model_len=64).generate(prompts, params)
    assert [r.tokens for r in out] == [r.tokens for r in base]
    # saved with its own copies
    drafter.save(tmp_path / "again")
    assert torch.equal(load_file(str(tmp_path / "again" / "model.safetensors"))["lm_head.weight"],
                       tensors["lm_head.weight"].float())


def test_copies_match_a_target_loaded_in_another_precision(tmp_path, qwen3_target):
    """bfloat16 copies of a float32 target, the target loaded in float16: the
    copies still match (to within one bfloat16 unit) and are shared."""
    target_dir, target = qwen3_target
    write_checkpoint(tmp_path / "d", target_dir, target)
    half = TargetModel.load(target_dir, dtype=torch.float16)
    drafter = DSparkDrafter.load(tmp_path / "d", half, dtype=torch.float16)
    assert not hasattr(drafter, "lm_head")


def test_without_target_the_copies_are_kept(tmp_path, qwen3_target):
    target_dir, target = qwen3_target
    write_checkpoint(tmp_path / "d", target_dir, target, markov_head_type="rnn")
    drafter = DSparkDrafter.load(tmp_path / "d")
    assert drafter.embed_tokens.weight.shape == (128, 64) and drafter.lm_head.weight.shape == (128, 64)
    prompts = uneven_prompts(3, 128, seed=14, low=1, high=20)
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    base = SpeculativeEngine(target, max_model_len=64).generate(prompts, params)
    out = SpeculativeEngine(target, drafter, max_model_len=64).generate(prompts, params)
    assert [r.tokens for r in out] == [r.tokens for r in base]


@pytest.mark.parametrize("case", ["vanilla", "dflash", "vanilla-no-confidence"])
def test_saved_layout_is_deepspecs(tmp_path, qwen3_target, case):
    """What dspark saves has the key set, dtypes and the config fields
    DeepSpec's Qwen3DSparkModel requires, and loads back the same."""
    target_dir, target = qwen3_target
    tensors = write_checkpoint(tmp_path / "d", target_dir, target, **CASES[case])
    drafter = DSparkDrafter.load(tmp_path / "d", target, dtype=torch.bfloat16)
    drafter.save(tmp_path / "again")
    written = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(written) == set(tensors)
    for name, value in written.items():
        assert value.dtype == torch.bfloat16, name
        assert torch.equal(value, tensors[name]), name
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    required = ("target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head", "markov_rank",
                "block_size")
    assert all(k in config for k in required)
    if config["markov_rank"] > 0:
        assert "markov_head_type" in config
    if config["enable_confidence_head"]:
        assert "confidence_head_with_markov" in config
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "qwen3"
    assert config["tie_word_embeddings"] is False and config["layer_types"] == ["full_attention"] * 2
    assert config["num_target_layers"] == 3
    original = json.loads((tmp_path / "d" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "vocab_size", "rope_parameters", "hidden_act", "attention_bias", "num_anchors"):
        assert config[key] == original[key], key
    again = DSparkDrafter.load(tmp_path / "again", target)
    assert again.config.to_dict() == drafter.config.to_dict()


def test_config_fields_deepspec_reads(tmp_path, qwen3_target):
    """num_target_layers must match the target; sliding-window drafter layers
    and unknown activations are refused; attention biases load."""
    target_dir, target = qwen3_target
    write_checkpoint(tmp_path / "d", target_dir, target)
    config = json.loads((tmp_path / "d" / "config.json").read_text())

    def write(name, **change):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(dict(config, **change)))
        (folder / "model.safetensors").symlink_to(tmp_path / "d" / "model.safetensors")
        return folder

    with pytest.raises(CheckpointError, match="num_target_layers"):
        DSparkDrafter.load(write("depth", num_target_layers=5), target)
    with pytest.raises(CheckpointError, match="sliding-window"):
        DSparkDrafter.load(write("sliding", layer_types=["sliding_attention", "full_attention"]), target)
    with pytest.raises(CheckpointError, match="activation"):
        DSparkDrafter.load(write("act", hidden_act="relu_squared"), target)
    with pytest.raises(CheckpointError, match="not layers of the target"):
        DSparkDrafter.load(write("ids", target_layer_ids=[-2, 1]), target)
    biased = tmp_path / "bias"
    tensors = write_checkpoint(biased, target_dir, target, markov_head_type="gated")
    config_b = json.loads((biased / "config.json").read_text())
    config_b["attention_bias"] = True
    from deepspec_fixture import drafter_tensors
    from safetensors.torch import save_file

    tensors = drafter_tensors(config_b, target)
    assert "layers.0.self_attn.q_proj.bias" in tensors
    save_file(tensors, str(biased / "model.safetensors"), metadata={"format": "pt"})
    (biased / "config.json").write_text(json.dumps(config_b))
    drafter = DSparkDrafter.load(biased, target)
    check_against_reference(target, drafter, tensors, biased, [3, 1, 4, 1, 5, 9, 2, 6], 5)


# ------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["vanilla", "gated", "rnn", "dflash", "embedding-feature"])
def test_deepspec_checkpoint_on_cuda(tmp_path, qwen3_target, case):
    """The same checkpoints on CUDA (float32): the draft as DeepSpec computes
    it (CUDA attention and Markov sampler against the dense reference), and
    greedy decoding equal to the CPU's plain decoding."""
    target_dir, target = qwen3_target
    tensors = write_checkpoint(tmp_path / "d", target_dir, target, **CASES[case])
    gpu = TargetModel.load(target_dir, device="cuda")
    drafter = DSparkDrafter.load(tmp_path / "d", gpu, device="cuda")
    check_against_reference(gpu, drafter, tensors, tmp_path / "d", [5, 9, 17, 3, 3, 80, 2, 44, 61, 7, 1], 12,
                            tol=2e-5)
    prompts = uneven_prompts(5, 128, seed=11, low=1, high=24)
    params = SamplingParams(temperature=0.0, max_new_tokens=14)
    base = SpeculativeEngine(target, max_model_len=64).generate(prompts, params)
    engine = SpeculativeEngine(gpu, drafter, max_concurrency=3, max_model_len=64)
    assert [r.tokens for r in engine.generate(prompts, params)] == [r.tokens for r in base]


@pytest.mark.cuda
def test_gemma4_deepspec_checkpoint_on_cuda(tmp_path):
    """A Gemma 4 drafter of Gemma 4's real head dims (global 512) on CUDA, in
    float32 against DeepSpec's computation and in bfloat16 decoding (the
    tensor-core attention at head dim 512)."""
    target_dir = tmp_path / "t"
    hf_gemma4_model(target_dir, hidden=128, heads=4, kv_heads=2, head_dim=256, global_head_dim=512,
                    global_kv_heads=1, window=6, shared=0, ple=0, double_wide=False)
    target = TargetModel.load(target_dir)
    tensors = write_checkpoint(tmp_path / "d", target_dir, target, form="gemma4", target_layer_ids=(-1, 2, 3),
                               markov_rank=16, markov_head_type="vanilla", scale=0.05)
    gpu = TargetModel.load(target_dir, device="cuda")
    drafter = DSparkDrafter.load(tmp_path / "d", gpu, device="cuda")
    check_against_reference(gpu, drafter, tensors, tmp_path / "d", [5, 9, 17, 3, 3, 80, 2, 44, 61, 7, 1], 12,
                            tol=1e-4)
    prompts = uneven_prompts(4, 128, seed=12, low=2, high=20)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    base = SpeculativeEngine(target, max_model_len=64).generate(prompts, params)
    engine = SpeculativeEngine(gpu, drafter, max_concurrency=4, max_model_len=64)
    assert [r.tokens for r in engine.generate(prompts, params)] == [r.tokens for r in base]
    gpu16 = TargetModel.load(target_dir, device="cuda", dtype=torch.bfloat16)
    drafter16 = DSparkDrafter.load(tmp_path / "d", gpu16, device="cuda", dtype=torch.bfloat16)
    plain16 = SpeculativeEngine(gpu16, max_model_len=64).generate(prompts, params)
    spec16 = SpeculativeEngine(gpu16, drafter16, max_model_len=64).generate(prompts, params)
    same = sum(a.tokens == b.tokens for a, b in zip(plain16, spec16))
    assert same >= 3 and all(len(r.tokens) == 12 for r in spec16)  # 16-bit: equal where the top logits are apart
