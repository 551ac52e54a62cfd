"""Gemma 4 (dense, text) targets against transformers: logits and hidden
states on ragged two-step batches in float32 and bfloat16, the checkpoint
forms (Gemma4ForCausalLM, Gemma4ForConditionalGeneration, both ways of
writing the global layers' shapes), and greedy engine output equal to
transformers' generate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dspark.engine import SamplingParams, SpeculativeEngine
from dspark.models import CheckpointError, TargetModel
from test_models import SEQUENCES, SPLIT, run_ragged
from tiny_models import hf_gemma4_model, hf_greedy, random_drafter, uneven_prompts

transformers = pytest.importorskip("transformers")

# Every dense feature on (the default), then the other side of each switch.
CONFIGS = {
    "all-features": {},
    "plain": dict(ple=0, shared=0, k_eq_v=False, double_wide=False, tie=False, attention_bias=True, softcap=None),
    "shared-kv-no-ple": dict(ple=0, shared=3, window=3),
}
HIDDEN = (-1, 0, 2, 3)  # the embedding output, a sliding layer, a global layer, a layer after it


def compare(model: TargetModel, hf, rtol=1e-4, atol=1e-4):
    logits, hidden = run_ragged(model, SEQUENCES, SPLIT, hidden_layers=HIDDEN)
    for r, seq in enumerate(SEQUENCES):
        with torch.no_grad():
            ref = hf(torch.tensor([seq]), output_hidden_states=True)
        torch.testing.assert_close(logits[r], ref.logits[0], rtol=rtol, atol=atol)
        # hidden_states[0] is the (scaled) embedding, hidden_states[i + 1] decoder layer i's raw output
        for j, layer in enumerate(HIDDEN):
            torch.testing.assert_close(hidden[r][:, j], ref.hidden_states[layer + 1][0], rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gemma4_matches_transformers_fp32(tmp_path, name):
    hf = hf_gemma4_model(tmp_path, **CONFIGS[name])
    model = TargetModel.load(tmp_path)
    g = model.config.gemma4
    assert g.head_dims == [16, 16, 32, 16, 16, 32] and g.sliding_window == CONFIGS[name].get("window", 4)
    compare(model, hf)


def test_gemma4_multimodal_checkpoint(tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint (text model under
    model.language_model.): the text model loads and matches."""
    hf = hf_gemma4_model(tmp_path, multimodal=True)
    assert any(k.startswith("model.language_model.") for k in load_file(str(tmp_path / "model.safetensors")))
    model = TargetModel.load(tmp_path)
    assert model.config.gemma4.multimodal
    compare(model, hf)


def test_gemma4_window_and_softcap_are_exercised(tmp_path):
    """Negative controls: the same weights without the sliding window, or
    without soft-capping, give other logits (the tests above would notice)."""
    hf_gemma4_model(tmp_path)
    model = TargetModel.load(tmp_path)
    logits, _ = run_ragged(model, SEQUENCES, SPLIT)
    model.config.gemma4.sliding_window = 10 ** 6
    for layer in model.model.layers:
        if layer.self_attn.window:
            layer.self_attn.window = 10 ** 6
    no_window, _ = run_ragged(model, SEQUENCES, SPLIT)
    assert (logits[0] - no_window[0]).abs().max() > 1e-3
    model.config.gemma4.final_logit_softcapping = None
    uncapped, _ = run_ragged(model, SEQUENCES, SPLIT)
    assert (no_window[0] - uncapped[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["all-features", "plain"])
def test_gemma4_matches_transformers_bf16(tmp_path, name):
    """bf16: dspark's error against transformers' bf16 model is of the size of
    transformers' own bf16 rounding error (both measured against float32)."""
    hf = hf_gemma4_model(tmp_path, **CONFIGS[name])
    model = TargetModel.load(tmp_path, dtype=torch.bfloat16)
    hf16 = hf_gemma4_model(tmp_path / "copy", **CONFIGS[name]).to(torch.bfloat16)
    logits, hidden = run_ragged(model, SEQUENCES, SPLIT, hidden_layers=(2,))
    for r, seq in enumerate(SEQUENCES):
        with torch.no_grad():
            exact = hf(torch.tensor([seq]), output_hidden_states=True)
            ref = hf16(torch.tensor([seq]), output_hidden_states=True)
        hf_error = (ref.logits[0].float() - exact.logits[0]).abs().max().item()
        ours_error = (logits[r] - exact.logits[0]).abs().max().item()
        assert ours_error <= 2.0 * hf_error + 1e-3, (ours_error, hf_error)
        hf_hidden_error = (ref.hidden_states[3][0].float() - exact.hidden_states[3][0]).abs().max().item()
        ours_hidden_error = (hidden[r][:, 0].float() - exact.hidden_states[3][0]).abs().max().item()
        assert ours_hidden_error <= 2.0 * hf_hidden_error + 1e-3, (ours_hidden_error, hf_hidden_error)
        assert logits[r].dtype == torch.float32


def test_gemma4_global_layer_fields_in_either_form(tmp_path):
    """transformers >= 5.2x writes per_layer_config; the released checkpoints
    (and DeepSpec's pinned transformers) write global_head_dim and
    num_global_key_value_heads: both give the same model."""
    hf = hf_gemma4_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "per_layer_config" in config
    older = {k: v for k, v in config.items() if k != "per_layer_config"}
    older.update(global_head_dim=32, num_global_key_value_heads=1)
    (tmp_path / "config.json").write_text(json.dumps(older))
    model = TargetModel.load(tmp_path)
    assert model.config.gemma4.head_dims == [16, 16, 32, 16, 16, 32]
    assert model.config.gemma4.kv_heads == [2, 2, 1, 2, 2, 1]
    compare(model, hf)


@pytest.mark.parametrize("multimodal", [False, True])
def test_gemma4_round_trip(tmp_path, multimodal):
    """Saved as the text model (Gemma4ForCausalLM); transformers reads it."""
    hf_gemma4_model(tmp_path / "a", multimodal=multimodal)
    model = TargetModel.load(tmp_path / "a")
    model.save(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model_type"] == "gemma4_text"
    again = TargetModel.load(tmp_path / "b")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "b")).eval()
    compare(again, hf)


def test_gemma4_refusals(tmp_path):
    hf_gemma4_model(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    def load(**change):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(dict(config, **change)))
        (folder / "model.safetensors").symlink_to(tmp_path / "ok" / "model.safetensors")
        return TargetModel.load(folder)

    with pytest.raises(CheckpointError, match="mixture-of-experts"):
        load(enable_moe_block=True)
    with pytest.raises(CheckpointError, match="bidirectional"):
        load(use_bidirectional_attention="all")
    with pytest.raises(CheckpointError, match="layer_types"):
        load(layer_types=["sliding_attention"] * 3)
    with pytest.raises(CheckpointError, match="activation"):
        load(hidden_activation="relu_squared")
    with pytest.raises(CheckpointError, match="rope type"):
        load(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1.0},
                              "full_attention": {"rope_type": "default", "rope_theta": 1.0}})


# ----------------------------------------------------------------- engine


@pytest.mark.parametrize("name", ["all-features", "plain"])
def test_gemma4_engine_greedy_equals_generate(tmp_path, name):
    """Target only and speculative (a random dspark drafter): the engine's
    greedy tokens equal transformers' generate, prompts longer than the window,
    batch of 6 with uneven lengths."""
    hf = hf_gemma4_model(tmp_path, **CONFIGS[name])
    target = TargetModel.load(tmp_path)
    prompts = uneven_prompts(6, 128, seed=3, low=1, high=20)
    want = [hf_greedy(hf, p, 10) for p in prompts]
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    plain = SpeculativeEngine(target, max_concurrency=4, max_model_len=64).generate(prompts, params)
    assert [r.tokens for r in plain] == want
    drafter = random_drafter(target, scale=0.3, layer_ids=(0, 2, 3))
    engine = SpeculativeEngine(target, drafter, max_concurrency=4, max_model_len=64)
    assert [r.tokens for r in engine.generate(prompts, params)] == want
    assert engine.metrics.verified_drafts > 0


# ------------------------------------------------------------------- CUDA


def big_heads_target(tmp_path, **config):
    """Gemma 4's real head dims (256 sliding, 512 global), small otherwise: the
    tensor-core attention kernel's new shapes in 16-bit."""
    return hf_gemma4_model(tmp_path, hidden=128, heads=4, kv_heads=2, head_dim=256, global_head_dim=512,
                           global_kv_heads=1, window=6, **config)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["all-features", "plain"])
def test_gemma4_cuda_matches_cpu(tmp_path, dtype, name):
    """The target on CUDA against the same target on the CPU (the CPU is
    checked against transformers above): logits and hidden states on ragged
    two-step batches, head dims 256 / 512, sliding window 6."""
    hf = big_heads_target(tmp_path, **CONFIGS[name])
    cpu = TargetModel.load(tmp_path, dtype=dtype)
    gpu = TargetModel.load(tmp_path, dtype=dtype, device="cuda")
    want, want_hidden = run_ragged(cpu, SEQUENCES, SPLIT, hidden_layers=HIDDEN)
    got, got_hidden = run_ragged(gpu, SEQUENCES, SPLIT, hidden_layers=HIDDEN)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for r in range(len(SEQUENCES)):
        torch.testing.assert_close(got[r], want[r], **tol)
        torch.testing.assert_close(got_hidden[r].float(), want_hidden[r].float(), **tol)
    if dtype == torch.float32:  # and transformers, for good measure (scores of 512 dims at scale 1: sharper)
        with torch.no_grad():
            ref = hf(torch.tensor([SEQUENCES[0]])).logits[0]
        torch.testing.assert_close(got[0], ref, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
def test_gemma4_cuda_engine_greedy_equals_generate(tmp_path):
    hf = big_heads_target(tmp_path)
    target = TargetModel.load(tmp_path, device="cuda")
    prompts = uneven_prompts(6, 128, seed=3, low=1, high=20)
    want = [hf_greedy(hf, p, 10) for p in prompts]
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    plain = SpeculativeEngine(target, max_concurrency=4, max_model_len=64).generate(prompts, params)
    assert [r.tokens for r in plain] == want
    drafter = random_drafter(TargetModel.load(tmp_path), scale=0.3, layer_ids=(0, 2, 3)).to("cuda")
    engine = SpeculativeEngine(target, drafter, max_concurrency=4, max_model_len=64)
    assert [r.tokens for r in engine.generate(prompts, params)] == want
