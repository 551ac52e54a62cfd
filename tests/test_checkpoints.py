"""Loading damaged model folders: every failure is a CheckpointError naming the
file and the field, raised before anything is allocated from the files' claims.

The cases are the ones a fuzzing pass found (each raised something else, hung,
allocated 128 GB or loaded a wrong model), then every mutation of the fuzz
corpus (tests/fuzz/corpus.py) on a few fixed seeds."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
from contextlib import contextmanager

import pytest
import torch

from dspark.calibration import STS
from dspark.models import CheckpointError, DSparkDrafter, TargetModel
from fuzz.corpus import (EITHER, FAIL, MUTATIONS, edit_config, read_header, tiny_drafter, tiny_target, write_drafter,
                         write_raw, write_target)


@contextmanager
def deadline(seconds: int):
    """Turns a hang into a test failure (SIGALRM, main thread)."""
    def expire(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def models():
    target = tiny_target()
    return target, tiny_drafter(target)


@pytest.fixture
def built(monkeypatch):
    """Counts the models constructed off the meta device: a checkpoint that is
    refused must be refused before its model is built (that is where memory is
    allocated)."""
    count = {"target": 0, "drafter": 0}
    target_init, drafter_init = TargetModel.__init__, DSparkDrafter.__init__

    def allocating() -> bool:  # a build on the meta device allocates nothing
        return torch.get_default_device().type != "meta"

    def counting_target(self, *args, **kwargs):
        count["target"] += allocating()
        target_init(self, *args, **kwargs)

    def counting_drafter(self, *args, **kwargs):
        count["drafter"] += allocating()
        drafter_init(self, *args, **kwargs)

    monkeypatch.setattr(TargetModel, "__init__", counting_target)
    monkeypatch.setattr(DSparkDrafter, "__init__", counting_drafter)
    return count


def target_folder(tmp_path, models, name="t", sharded=False):
    return write_target(tmp_path / name, models[0], sharded=sharded)


def refused(load, *words, seconds: int = 20):
    with deadline(seconds), pytest.raises(CheckpointError) as info:
        load()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ------------------------------------------------------ files that are not safetensors


def test_truncated_empty_and_garbage_weights(tmp_path, models, built):
    folder = target_folder(tmp_path, models)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5])
    refused(lambda: TargetModel.load(folder), "model.safetensors", "outside")
    path.write_bytes(b"")
    refused(lambda: TargetModel.load(folder), "model.safetensors", "at least 8 bytes")
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"\x00garbage" * (n // 8) + b"\x00" * (n % 8) + data[8 + n:])
    refused(lambda: TargetModel.load(folder), "model.safetensors", "header")
    path.write_bytes(struct.pack("<Q", 2**63) + data[8:])
    refused(lambda: TargetModel.load(folder), "model.safetensors", "header claims")
    path.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
    refused(lambda: TargetModel.load(folder), "not UTF-8")
    assert built["target"] == 0


def test_header_that_claims_more_than_the_file(tmp_path, models, built):
    folder = target_folder(tmp_path, models)
    path = folder / "model.safetensors"
    header, payload = read_header(path)
    header["model.norm.weight"]["data_offsets"] = [0, 2**40]
    header["model.norm.weight"]["shape"] = [2**38]
    write_raw(path, header, payload)
    refused(lambda: TargetModel.load(folder), "model.norm.weight", "outside")
    header, payload = read_header(write_target(tmp_path / "b", models[0]) / "model.safetensors")
    header["model.norm.weight"]["shape"] = [-3]
    write_raw(tmp_path / "b" / "model.safetensors", header, payload)
    refused(lambda: TargetModel.load(tmp_path / "b"), "model.norm.weight", "non-negative")
    assert built["target"] == 0


def test_oversized_header_is_refused_before_it_is_read(tmp_path, models):
    folder = target_folder(tmp_path, models)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(150_000_100)  # sparse
    refused(lambda: TargetModel.load(folder), "at most 100000000")


# ------------------------------------------------------------------ config.json


@pytest.mark.parametrize("text, words", [
    ("", ["config.json", "not valid JSON"]),
    ("{", ["config.json", "not valid JSON"]),
    (b"\xff\xfe{}", ["config.json", "not UTF-8"]),
    ("[1, 2]", ["config.json", "must be a JSON object"]),
    ('{"vocab_size": NaN}', ["config.json", "NaN"]),
    ("[" * 100000 + "]" * 100000, ["config.json", "not valid JSON"]),
])
def test_config_that_is_not_a_json_object(tmp_path, models, built, text, words):
    folder = target_folder(tmp_path, models)
    path = folder / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(lambda: TargetModel.load(folder), *words)
    assert built["target"] == 0


@pytest.mark.parametrize("field, value, words", [
    ("vocab_size", "abc", ["field 'vocab_size' must be an int", "'abc'"]),
    ("vocab_size", None, ["lacks 'vocab_size'"]),
    ("vocab_size", [64], ["field 'vocab_size' must be an int"]),
    ("vocab_size", 64.5, ["field 'vocab_size' must be an int", "64.5"]),
    ("vocab_size", 96.0, ["field 'vocab_size' must be an int"]),
    ("hidden_size", "32", ["field 'hidden_size' must be an int", "'32'"]),
    ("hidden_size", True, ["field 'hidden_size' must be an int"]),
    ("intermediate_size", -48, ["field 'intermediate_size' must be an int >= 1"]),
    ("num_attention_heads", 0, ["field 'num_attention_heads' must be an int >= 1"]),
    ("num_key_value_heads", 3, ["num_attention_heads (4) must be a multiple of num_key_value_heads (3)"]),
    ("head_dim", 7, ["head_dim must be even"]),
    ("rms_norm_eps", -1.0, ["field 'rms_norm_eps' must be a number > 0"]),
    ("rms_norm_eps", "1e-6", ["field 'rms_norm_eps' must be a number"]),
    ("rope_theta", 0, ["field 'rope_theta' must be a number > 0"]),
    ("rope_theta", 1e-300, ["rope_theta or factor out of range"]),
    ("tie_word_embeddings", "yes", ["field 'tie_word_embeddings' must be true or false"]),
    ("rope_scaling", [2.0], ["field 'rope_scaling' must be a JSON object"]),
    ("rope_scaling", {"rope_type": "linear"}, ["lacks 'factor'"]),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     ["'high_freq_factor' (1) must be greater than 'low_freq_factor' (4)"]),
    ("model_type", ["llama"], ["unsupported model_type"]),
])
def test_config_fields_are_checked_by_type_and_range(tmp_path, models, built, field, value, words):
    folder = target_folder(tmp_path, models)
    edit_config(folder, lambda c: c.update({field: value}) if value is not None else c.pop(field) and None)
    message = refused(lambda: TargetModel.load(folder), *words)
    assert "config.json" in message
    if "rope_theta or factor" not in message:  # the rotary check needs the (checked) shapes first
        assert built["target"] == 0


@pytest.mark.parametrize("field, value, words", [
    ("vocab_size", 10**9, ["config.json", "vocab_size = 1000000000", "larger than 96"]),
    ("vocab_size", 97, ["vocab_size = 97"]),
    ("hidden_size", 2**31 - 1, ["hidden_size = 2147483647"]),
    ("intermediate_size", 10**8, ["intermediate_size = 100000000"]),
    ("head_dim", 2**20, ["head_dim = 1048576"]),
    ("num_hidden_layers", 10**6, ["num_hidden_layers = 1000000", "hold only"]),
    ("num_hidden_layers", 5, ["missing keys"]),
    ("num_hidden_layers", 1, ["unexpected keys"]),
    ("tie_word_embeddings", True, ["unexpected keys []"]),
])
def test_a_config_that_does_not_match_the_files_is_refused_before_allocating(tmp_path, models, built, field, value,
                                                                             words):
    """vocab_size = 10**9 used to build the model first (128 GB); 10**6 layers hung."""
    folder = target_folder(tmp_path, models)
    edit_config(folder, lambda c: c.update({field: value}))
    if field == "tie_word_embeddings":  # a tied model whose files lack nothing loads (lm_head is ignored)
        with deadline(20):
            TargetModel.load(folder)
        return
    refused(lambda: TargetModel.load(folder), *words, seconds=10)
    assert built["target"] == 0


# ------------------------------------------------------------------ tensors


def test_weights_of_the_wrong_dtype_or_not_finite(tmp_path, models, built):
    from safetensors.torch import load_file, save_file

    folder = target_folder(tmp_path, models)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file(dict(tensors, **{"model.norm.weight": tensors["model.norm.weight"].to(torch.int32)}), str(path))
    refused(lambda: TargetModel.load(folder), "model.norm.weight", "dtype int32")
    assert built["target"] == 0
    bad = tensors["model.layers.1.mlp.up_proj.weight"].clone()
    bad[3, 4] = float("nan")
    save_file(dict(tensors, **{"model.layers.1.mlp.up_proj.weight": bad}), str(path))
    refused(lambda: TargetModel.load(folder), "model.layers.1.mlp.up_proj.weight", "NaN")
    model = TargetModel.load(folder, check_finite=False)  # on request, loaded as is
    assert torch.isnan(model.model.layers[1].mlp.up_proj.weight).any()
    save_file(dict(tensors, **{"model.norm.weight": tensors["model.norm.weight"].double()}), str(path))
    loaded = TargetModel.load(folder)  # another float dtype converts
    assert torch.equal(loaded.model.norm.weight, tensors["model.norm.weight"])


# ------------------------------------------------------------------ shards


def test_index_problems(tmp_path, models, built):
    folder = target_folder(tmp_path, models, sharded=True)
    assert TargetModel.load(folder).config.vocab_size == 96  # the sharded folder itself loads
    index = folder / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    index.write_text(json.dumps({"metadata": {}}))
    refused(lambda: TargetModel.load(folder), "model.safetensors.index.json", "weight_map")
    broken = json.loads(json.dumps(good))
    key = sorted(broken["weight_map"])[0]
    broken["weight_map"][key] = "model-00009-of-00002.safetensors"
    index.write_text(json.dumps(broken))
    refused(lambda: TargetModel.load(folder), "model-00009-of-00002.safetensors", "does not exist")
    broken["weight_map"][key] = "../escape.safetensors"
    index.write_text(json.dumps(broken))
    refused(lambda: TargetModel.load(folder), "not a file name inside the folder")
    index.write_text(json.dumps(good))
    shard = folder / good["weight_map"][key]
    shard.unlink()
    os.symlink(shard.name, shard)  # a symlink loop
    refused(lambda: TargetModel.load(folder), shard.name, "cannot be read")
    shard.unlink()
    os.mkfifo(shard)  # reading a FIFO would block forever
    refused(lambda: TargetModel.load(folder), shard.name, "not a regular file")
    assert built["target"] == 0  # (a target is built on the meta device, then given its memory)


def test_config_fifo_and_directory(tmp_path, models):
    folder = target_folder(tmp_path, models)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    refused(lambda: TargetModel.load(folder), "config.json", "not a regular file")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    refused(lambda: TargetModel.load(folder), "config.json", "not a regular file")


# ------------------------------------------------------------------ drafters and STS


@pytest.mark.parametrize("field, value, words", [
    ("block_size", 0, ["field 'block_size' must be an int >= 1"]),
    ("block_size", 10**6, ["field 'block_size' must be an int <= 255"]),
    ("block_size", 2.5, ["field 'block_size' must be an int"]),
    ("target_layer_ids", [], ["field 'target_layer_ids' must be a non-empty list of ints"]),
    ("target_layer_ids", ["0"], ["field 'target_layer_ids' must be a non-empty list of ints"]),
    ("target_layer_ids", [-2, 1], ["not layers of the target"]),
    ("mask_token_id", 96, ["field 'mask_token_id' must be in [0, vocab_size = 96)"]),
    ("markov_rank", -8, ["field 'markov_rank' must be an int >= 0"]),
    ("markov_head_type", "lstm", ["field 'markov_head_type' must be one of"]),
    ("enable_confidence_head", 1, ["field 'enable_confidence_head' must be true or false"]),
    ("dflash_config", [1], ["field 'dflash_config' must be a JSON object"]),
    ("vocab_size", 10**9, ["vocab_size = 1000000000"]),
    ("num_hidden_layers", 10**6, ["num_hidden_layers = 1000000"]),
])
def test_drafter_config_fields(tmp_path, models, built, field, value, words):
    folder = write_drafter(tmp_path / "d", models[1], target=models[0])
    edit_config(folder, lambda c: c.update({field: value}))
    message = refused(lambda: DSparkDrafter.load(folder, models[0]), *words, seconds=10)
    assert "config.json" in message or "drafter" in message
    assert built["drafter"] == 0


@pytest.mark.parametrize("text, words", [
    ('{"temperatures": [0.0, 1.0, 1.0]}', ["sts.json", "positive finite"]),
    ('{"temperatures": ["1", 1.0, 1.0]}', ["sts.json", "positive finite"]),
    ('{"temperatures": [NaN, 1.0, 1.0]}', ["sts.json", "NaN"]),
    ('{"temperatures": [1.0]}', ["sts.json", "block_size is 3"]),
    ('{"t": [1.0]}', ["sts.json", "'temperatures'"]),
    ("[1.0]", ["sts.json", "JSON object"]),
    ("{", ["sts.json", "not valid JSON"]),
])
def test_bad_sts_files(tmp_path, models, built, text, words):
    folder = write_drafter(tmp_path / "d", models[1], target=models[0])
    (folder / "sts.json").write_text(text)
    refused(lambda: DSparkDrafter.load(folder, models[0]), *words)
    with pytest.raises(CheckpointError):
        if "block_size" not in words[-1]:
            STS.load(folder)
        else:
            raise CheckpointError("short STS is a drafter-level error")
    assert built["drafter"] == 0


def test_valid_folders_still_load(tmp_path, models):
    target, drafter = models
    for sharded in (False, True):
        t = TargetModel.load(write_target(tmp_path / f"t{sharded}", target, sharded=sharded))
        d = DSparkDrafter.load(write_drafter(tmp_path / f"d{sharded}", drafter, sharded=sharded, target=target), t)
        for a, b in ((target, t), (drafter, d)):
            for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
                assert torch.equal(x, y), name
        assert d.sts.temperatures == drafter.sts.temperatures


# ------------------------------------------------------------------ the corpus


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_corpus_mutations(tmp_path, models, mutation):
    """Every corpus mutation on fixed seeds: a CheckpointError where the
    mutation must fail, a CheckpointError or a working model otherwise."""
    target, drafter = models
    for kind in mutation.kinds:
        for seed in range(3):
            sharded = mutation.sharded if mutation.sharded is not None else bool(seed % 2)
            folder = tmp_path / f"{kind}-{seed}"
            if kind == "target":
                write_target(folder, target, sharded=sharded)
            else:
                write_drafter(folder, drafter, sharded=sharded, target=target)
            description = mutation.apply(folder, random.Random(seed))
            load = (lambda: TargetModel.load(folder)) if kind == "target" else (
                lambda: DSparkDrafter.load(folder, target))
            try:
                with deadline(20):
                    model = load()
            except CheckpointError:
                continue
            assert mutation.expect == EITHER, f"{kind} {description}: loaded, but must fail"
            assert mutation.expect in (EITHER, FAIL)
            assert model is not None
