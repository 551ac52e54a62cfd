"""Corrupted model folders: tiny valid checkpoints and the ways to break them.

``tiny_target`` / ``tiny_drafter`` build small random models without
downloads; ``write_target`` / ``write_drafter`` save them (optionally sharded
with an index). Each entry of ``MUTATIONS`` damages a saved folder in place
and says what loading it must do:

    FAIL:   raise CheckpointError;
    EITHER: raise CheckpointError or load a working model.

Nothing else (another exception type, a crash, a hang, an allocation past the
files' size) is ever acceptable.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from dspark.calibration import STS
from dspark.models import DrafterConfig, DSparkDrafter, TargetConfig, TargetModel

FAIL, EITHER = "fail", "either"

TARGET_CONFIG = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=256)


def _init(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def tiny_target(seed: int = 0, **overrides) -> TargetModel:
    model = TargetModel(TargetConfig.from_dict(dict(TARGET_CONFIG, **overrides)))
    _init(model, seed)
    return model.eval()


def tiny_drafter(target: TargetModel, seed: int = 1, block_size: int = 3, rank: int = 8, head: str = "vanilla",
                 confidence: bool = True) -> DSparkDrafter:
    t = target.config
    config = DrafterConfig.from_dict(dict(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=1,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
        vocab_size=t.vocab_size, block_size=block_size, rope_theta=10000.0,
        target_layer_ids=[0, t.num_hidden_layers - 1], mask_token_id=t.vocab_size - 1, markov_rank=rank,
        markov_head_type=head, enable_confidence_head=confidence, confidence_head_with_markov=True))
    drafter = DSparkDrafter(config)
    _init(drafter, seed)
    if confidence:
        drafter.sts = STS([1.0 + 0.1 * k for k in range(block_size)])
    return drafter.eval()


def _shard(folder: Path) -> None:
    """Splits model.safetensors into two shards and an index."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_target(folder: Path, model: TargetModel, sharded: bool = False) -> Path:
    model.save(folder)
    if sharded:
        _shard(folder)
    return folder


def write_drafter(folder: Path, drafter: DSparkDrafter, sharded: bool = False,
                  target: Optional[TargetModel] = None, copies: Optional[bool] = None) -> Path:
    """The drafter in DeepSpec's layout (with copies of the target's embedding
    and LM head when a target is given)."""
    drafter.save(folder, target=target, copies=copies if target is not None else False)
    if sharded:
        _shard(folder)
    return folder


# ------------------------------------------------------------ file helpers


def weight_files(folder: Path) -> List[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_header(path: Path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(path: Path, header: dict, payload: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def replace_tensor(folder: Path, name: str, value: Optional[torch.Tensor], new_name: Optional[str] = None) -> None:
    """Rewrites the shard holding `name` with the tensor replaced, renamed or
    (value None and no new name) removed."""
    from safetensors.torch import load_file, save_file

    for path in weight_files(folder):
        tensors = load_file(str(path))
        if name in tensors:
            old = tensors.pop(name)
            if new_name is not None:
                tensors[new_name] = old if value is None else value
            elif value is not None:
                tensors[name] = value
            save_file(tensors, str(path), metadata={"format": "pt"})
            return
    raise KeyError(name)


def load_tensor(folder: Path, name: str) -> torch.Tensor:
    """The tensor `name`, from the shard that holds it."""
    from safetensors.torch import load_file

    for path in weight_files(folder):
        tensors = load_file(str(path))
        if name in tensors:
            return tensors[name]
    raise KeyError(name)


def all_tensor_names(folder: Path) -> List[str]:
    names = []
    for path in weight_files(folder):
        names += [k for k in read_header(path)[0] if k != "__metadata__"]
    return sorted(names)


def config_path(folder: Path) -> Path:
    return folder / "config.json"


def edit_config(folder: Path, edit: Callable[[dict], object]) -> None:
    path = config_path(folder)
    config = json.loads(path.read_text())
    result = edit(config)
    path.write_text(json.dumps(config if result is None else result))


# ------------------------------------------------------------ mutations


class Mutation(NamedTuple):
    name: str
    apply: Callable[[Path, random.Random], str]  # returns a description with its parameters
    expect: str  # FAIL or EITHER
    kinds: tuple = ("target", "drafter")  # folder kinds it applies to
    sharded: Optional[bool] = None  # needs a sharded folder (True), a single file (False), or either


def _truncate(folder, rng):
    path = rng.choice(weight_files(folder))
    size = path.stat().st_size
    keep = rng.randrange(0, size)
    with open(path, "r+b") as f:
        f.truncate(keep)
    return f"{path.name} truncated to {keep} of {size} bytes"


def _empty_weights(folder, rng):
    path = rng.choice(weight_files(folder))
    path.write_bytes(b"")
    return f"{path.name} emptied"


def _garbage_header(folder, rng):
    path = rng.choice(weight_files(folder))
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    n = max(0, min(n, len(data) - 8, 1 << 20))
    data[8:8 + n] = rng.randbytes(n)
    path.write_bytes(bytes(data))
    return f"{path.name}: header replaced by {n} random bytes"


def _header_length(folder, rng):
    path = rng.choice(weight_files(folder))
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    value = rng.choice([2**64 - 1, 2**63, 10**12, len(data), len(data) - 7, n + 1, n - 1, 0, 1, 100_000_001])
    data[:8] = struct.pack("<Q", value)
    path.write_bytes(bytes(data))
    return f"{path.name}: header length {n} -> {value}"


def _oversized_header(folder, rng):
    path = rng.choice(weight_files(folder))
    claimed = 150_000_000
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", claimed))
        f.truncate(8 + claimed + 16)  # sparse: the file really is that long
    return f"{path.name}: header of {claimed} bytes"


def _header_field(folder, rng):
    path = rng.choice(weight_files(folder))
    header, payload = read_header(path)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    key = rng.choice(["dtype", "shape", "data_offsets"])
    hostile = {
        "dtype": ["F31", "", 3, None, "I32", "U8", "BOOL", "F64", "BF16", "F8_E4M3", "U64"],
        "shape": [[-1], [2**62, 2**62], [1.5], ["2"], None, [], [0], [True], list(reversed(entry["shape"])),
                  entry["shape"] + [1], [10**30]],
        "data_offsets": [[0, 2**63], [-4, 0], [entry["data_offsets"][1], entry["data_offsets"][0]], [0], None,
                         [0, entry["data_offsets"][1] - entry["data_offsets"][0]], [1.0, 2.0],
                         [entry["data_offsets"][0], entry["data_offsets"][1] + 4]],
    }[key]
    value = rng.choice(hostile)
    entry[key] = value
    write_raw(path, header, payload)
    return f"{path.name}: tensor {name} {key} -> {value!r}"


def _flip_bytes(folder, rng):
    path = rng.choice(weight_files(folder))
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    where = rng.choice(["header", "data", "anywhere"])
    low, high = {"header": (8, 8 + n), "data": (8 + n, len(data)), "anywhere": (0, len(data))}[where]
    count = rng.randint(1, 8)
    spots = []
    for _ in range(count):
        i = rng.randrange(low, high)
        data[i] ^= 1 << rng.randrange(8)
        spots.append(i)
    path.write_bytes(bytes(data))
    return f"{path.name}: {count} bit flips in the {where} at {spots}"


def _nonfinite_weight(folder, rng):
    name = rng.choice(all_tensor_names(folder))
    t = load_tensor(folder, name).clone()
    flat = t.view(-1)
    flat[rng.randrange(flat.numel())] = rng.choice([math.nan, math.inf, -math.inf])
    replace_tensor(folder, name, t)
    return f"{name}: one weight made non-finite"


def _dtype_change(bad: bool):
    def apply(folder, rng):
        name = rng.choice(all_tensor_names(folder))
        t = load_tensor(folder, name)
        dtype = rng.choice([torch.int32, torch.int64, torch.uint8, torch.bool, torch.int8] if bad
                           else [torch.float64, torch.float16, torch.bfloat16])
        replace_tensor(folder, name, t.to(dtype))
        return f"{name} stored as {dtype}"
    return apply


def _is_drafter(folder: Path) -> bool:
    try:
        return "block_size" in json.loads(config_path(folder).read_text())
    except (OSError, ValueError):
        return False


def _drop_tensor(folder, rng):
    names = all_tensor_names(folder)
    if _is_drafter(folder):  # a drafter's copies of its target's embedding and LM head are optional
        names = [n for n in names if n not in ("embed_tokens.weight", "lm_head.weight")]
    name = rng.choice(names)
    replace_tensor(folder, name, None)
    return f"{name} removed"


def _extra_tensor(folder, rng):
    name = rng.choice(["model.layers.99.mlp.up_proj.weight", "extra", "layers.7.self_attn.q_proj.weight", ""])
    path = rng.choice(weight_files(folder))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors[name] = torch.zeros(rng.randint(0, 5))
    save_file(tensors, str(path), metadata={"format": "pt"})
    return f"{path.name}: extra tensor {name!r}"


def _rename_tensor(folder, rng):
    name = rng.choice(all_tensor_names(folder))
    replace_tensor(folder, name, None, new_name=name + ".renamed")
    return f"{name} renamed"


def _reshape_tensor(folder, rng):
    name = rng.choice(all_tensor_names(folder))
    t = load_tensor(folder, name)
    shape = rng.choice([(t.numel(),), (1, t.numel()), tuple(reversed(t.shape)), (t.numel() + 1,)])
    value = t.reshape(shape) if math.prod(shape) == t.numel() else torch.zeros(shape)
    replace_tensor(folder, name, value.contiguous())
    return f"{name}: shape {list(t.shape)} -> {list(shape)}"


TARGET_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                 "attention_bias", "model_type", "rope_scaling", "rope_parameters"]
DRAFTER_FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "block_size", "target_layer_ids",
                  "target_hidden_size", "mask_token_id", "markov_rank", "markov_head_type", "enable_confidence_head",
                  "confidence_head_with_markov", "rope_parameters", "dflash_config"]
HOSTILE_VALUES = ["abc", None, [64], {}, -1, 0, 1, 10**9, 10**6, 10**18, 2**64, 64.5, "32", True, False, 1e308,
                  -0.0, [], [-1], [0, 10**9], {"rope_type": "llama3", "factor": 0.0}, {"rope_type": "yarn"},
                  {"rope_type": "linear", "factor": "2"}, {"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 4.0, "high_freq_factor": 1.0},
                  {"rope_theta": 1e-300}, "vanilla", "lstm", "qwen3", "gpt2"]


def _config_field(folder, rng):
    config = json.loads(config_path(folder).read_text())
    fields = DRAFTER_FIELDS if "block_size" in config else TARGET_FIELDS
    field = rng.choice(fields)
    original = config.get(field)
    candidates = list(HOSTILE_VALUES)
    if isinstance(original, int) and not isinstance(original, bool):
        candidates += [original + 1, original * 2, max(original // 2, 1), -original, float(original),
                       str(original)]
    value = rng.choice(candidates)
    if rng.random() < 0.15:
        config.pop(field, None)
        description = f"config.json: {field} removed"
    else:
        config[field] = value
        description = f"config.json: {field} = {value!r}"
    config_path(folder).write_text(json.dumps(config))
    return description


def _config_not_object(folder, rng):
    value = rng.choice([[1, 2], 3, "config", None, True, [{"vocab_size": 96}]])
    config_path(folder).write_text(json.dumps(value))
    return f"config.json holds {value!r}"


def _config_bytes(folder, rng):
    kind = rng.choice(["empty", "not utf-8", "not json", "nan", "deep", "duplicate", "huge", "truncated"])
    path = config_path(folder)
    text = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "not utf-8":
        path.write_bytes(b"\xff\xfe" + text[2:])
    elif kind == "not json":
        path.write_bytes(b"{vocab_size: 96,")
    elif kind == "nan":
        config = json.loads(text)
        config["rms_norm_eps"] = math.nan
        path.write_text(json.dumps(config))  # writes the non-standard literal NaN
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "duplicate":
        path.write_text(text.decode().rstrip().rstrip("}") + ', "vocab_size": 95}')
    elif kind == "huge":
        with open(path, "r+b") as f:
            f.truncate(200 << 20)  # sparse
    else:
        path.write_bytes(text[: len(text) // 2])
    return f"config.json: {kind}"


def _special_file(folder, rng):
    """A config, shard or STS file replaced by a symlink loop, a directory, a
    FIFO, a dangling link or a device."""
    candidates = [config_path(folder)] + weight_files(folder)
    if (folder / "sts.json").exists():
        candidates.append(folder / "sts.json")
    path = rng.choice(candidates)
    # without sts.json a drafter simply has no STS temperatures
    kind = rng.choice(["loop", "directory", "fifo", "dangling", "device"]
                      + ([] if path.name == "sts.json" else ["missing"]))
    path.unlink()
    if kind == "loop":
        os.symlink(path.name, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        os.symlink("nowhere-" + path.name, path)
    elif kind == "device":
        os.symlink("/dev/zero", path)
    return f"{path.name}: {kind}"


def _index(folder, rng):
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    kind = rng.choice(["no weight_map", "weight_map list", "missing shard", "wrong shard", "path escape",
                       "not json", "empty map", "shard removed", "number file", "absolute path"])
    weight_map = index["weight_map"]
    key = rng.choice(sorted(weight_map))
    if kind == "no weight_map":
        del index["weight_map"]
    elif kind == "weight_map list":
        index["weight_map"] = list(weight_map.items())
    elif kind == "missing shard":
        weight_map[key] = "model-00003-of-00002.safetensors"
    elif kind == "wrong shard":
        files = sorted(set(weight_map.values()))
        weight_map[key] = files[0] if weight_map[key] != files[0] else files[-1]
    elif kind == "path escape":
        weight_map[key] = "../" + weight_map[key]
    elif kind == "not json":
        path.write_text("{")
        return "index: not json"
    elif kind == "empty map":
        index["weight_map"] = {}
    elif kind == "shard removed":
        (folder / rng.choice(sorted(set(weight_map.values())))).unlink()
    elif kind == "number file":
        weight_map[key] = 7
    else:
        weight_map[key] = "/etc/passwd"
    path.write_text(json.dumps(index))
    return f"index: {kind} ({key})"


def _duplicate_across_shards(folder, rng):
    from safetensors.torch import load_file, save_file

    a, b = weight_files(folder)[:2]
    ta, tb = load_file(str(a)), load_file(str(b))
    name = rng.choice(sorted(ta))
    tb[name] = ta[name]
    save_file(tb, str(b), metadata={"format": "pt"})
    return f"{name} in both shards"


def _sts(folder, rng):
    path = folder / "sts.json"
    value = rng.choice([[], [0.0, 1.0, 1.0], [-1.0, 1.0, 1.0], ["1", 1.0, 1.0], [1.0], None, 5, [True, 1.0, 1.0],
                        [1e39, 1.0, 1.0], [1.0, 1.0]])
    kind = rng.choice(["value", "not json", "nan", "not object"])
    if kind == "value":
        path.write_text(json.dumps({"temperatures": value}))
        return f"sts.json: temperatures = {value!r}"
    if kind == "not json":
        path.write_text("{")
    elif kind == "nan":
        path.write_text('{"temperatures": [NaN, 1.0, 1.0]}')
    else:
        path.write_text(json.dumps(value))
    return f"sts.json: {kind}"


MUTATIONS: List[Mutation] = [
    Mutation("truncate", _truncate, FAIL),
    Mutation("empty weights", _empty_weights, FAIL),
    Mutation("garbage header", _garbage_header, FAIL),
    Mutation("header length", _header_length, FAIL),
    Mutation("oversized header", _oversized_header, FAIL),
    Mutation("header field", _header_field, EITHER),
    Mutation("bit flips", _flip_bytes, EITHER),
    Mutation("non-finite weight", _nonfinite_weight, FAIL),
    Mutation("integer dtype", _dtype_change(bad=True), FAIL),
    Mutation("float dtype", _dtype_change(bad=False), EITHER),
    Mutation("drop tensor", _drop_tensor, FAIL),
    Mutation("extra tensor", _extra_tensor, FAIL),
    Mutation("rename tensor", _rename_tensor, FAIL),
    Mutation("reshape tensor", _reshape_tensor, EITHER),
    Mutation("config field", _config_field, EITHER),
    Mutation("config not an object", _config_not_object, FAIL),
    Mutation("config bytes", _config_bytes, FAIL),
    Mutation("special file", _special_file, FAIL),
    Mutation("index", _index, FAIL, sharded=True),
    Mutation("duplicate across shards", _duplicate_across_shards, FAIL, sharded=True),
    Mutation("sts", _sts, FAIL, kinds=("drafter",)),
]
BY_NAME: Dict[str, Mutation] = {m.name: m for m in MUTATIONS}
