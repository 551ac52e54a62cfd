"""Text in and out for the command line: the target folder's tokenizer, read
with the ``tokenizers`` library (``tokenizer.json``) or, failing that, with
``transformers``' AutoTokenizer; stop tokens from the folder's configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Sequence, Union

PathLike = Union[str, Path]


class Tokenizer:
    def __init__(self, folder: PathLike) -> None:
        folder = Path(folder)
        self.folder = folder
        self._fast: Any = None
        self._hf: Any = None
        path = folder / "tokenizer.json"
        if path.is_file():
            try:
                from tokenizers import Tokenizer as FastTokenizer

                self._fast = FastTokenizer.from_file(str(path))
            except ImportError:
                pass
        if self._fast is None:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise RuntimeError(f"{folder}: reading its tokenizer needs the 'tokenizers' package "
                                   "(pip install tokenizers) or 'transformers'") from None
            try:
                self._hf = AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError) as error:
                raise RuntimeError(f"{folder}: no usable tokenizer ({error})") from None

    def encode(self, text: str) -> List[int]:
        if self._fast is not None:
            return list(self._fast.encode(text).ids)
        return list(self._hf.encode(text))

    def decode(self, tokens: Sequence[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(list(tokens), skip_special_tokens=True)
        return self._hf.decode(list(tokens), skip_special_tokens=True)

    def _chat(self, text: str, tokenize: bool):
        """``text`` as a single user turn of the folder's chat template, with the
        assistant's turn opened (transformers' tokenizer, loaded once: about a second)."""
        from transformers import AutoTokenizer

        if self._hf is None:
            self._hf = AutoTokenizer.from_pretrained(str(self.folder))
        return self._hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=tokenize)

    def apply_chat_template(self, text: str) -> List[int]:
        """The prompt as a single user turn of the folder's chat template (needs transformers)."""
        ids = self._chat(text, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def chat_user_prefix(self) -> List[int]:
        """The folder's chat template up to where a user turn's content begins (a
        default system turn included): what a chat model has seen before a
        request, so that continuing it samples a request (needs transformers)."""
        marker = "\x01"
        text = self._chat(marker, tokenize=False)
        if marker not in text:
            raise RuntimeError(f"{self.folder}: the chat template does not show a user turn's content")
        return self.encode(text.split(marker)[0])


def stop_tokens(folder: PathLike) -> List[int]:
    """The end-of-sequence ids of a model folder (generation_config.json, then config.json)."""
    found: List[int] = []
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos is None:
            continue
        for t in eos if isinstance(eos, list) else [eos]:
            if int(t) not in found:
                found.append(int(t))
    return found
