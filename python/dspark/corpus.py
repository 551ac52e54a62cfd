"""Offline prompt corpora for drafter training and evaluation.

- ``code``: Python source of this interpreter's standard library (found with
  ``sysconfig``). Two kinds of prompt alternate: a chat request to write a
  function, built from a real function's signature and the first line of its
  docstring, and a raw continuation of the code around a ``def``.
- ``text``: English sayings, jokes and quotations from Debian's ``fortunes``
  package (``apt-get install fortunes``; ``/usr/share/games/fortunes``),
  wrapped in a chat turn with one of a few instructions.

Items are split into train and held-out sets by a hash of their source, so the
split does not depend on the seed or on how many prompts are drawn.

Besides prompts (which the target continues itself), :func:`offline_texts`
gives finished texts of the same sources for teacher forcing: a prompt and an
answer written by someone else (a documented standard-library function in a
Python code block, a fortune as the reply to a request for one), on which one
target forward yields the target's distribution at every answer position.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# the general-audience files of the package
FORTUNE_FILES = ("computers", "education", "food", "fortunes", "humorists", "kids", "literature", "love",
                 "magic", "medicine", "miscellaneous", "people", "pets", "platitudes", "riddles", "science",
                 "songs-poems", "sports", "wisdom", "work")
TEXT_INSTRUCTIONS = (
    "Explain what this means in simple words.",
    "Write a short story inspired by this.",
    "What do you think about this? Answer in a few sentences.",
    "Continue this text in the same style.",
    "Summarize this in one sentence, then give an example.",
    "Write a friendly reply to someone who just told you this.",
)
HELD_OUT_PERCENT = 10


@dataclass
class Prompt:
    text: str
    chat: bool  # wrap in the model's chat template
    domain: str  # "code" or "text"
    source: str  # where it came from (for the split)


def held_out(source: str) -> bool:
    return int(hashlib.sha1(source.encode()).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _public_functions(root: Path) -> Iterator[Tuple[str, List[str], ast.FunctionDef]]:
    """(file relative to root, its lines, function node) for every public
    function of the Python sources under root (tests, site-packages and idlelib
    left out), in a fixed order."""
    files = sorted(p for p in root.rglob("*.py") if not any("test" in part for part in p.parts[len(root.parts):])
                   and "site-packages" not in p.parts and "idlelib" not in p.parts)
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        rel = str(path.relative_to(root))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith(("_", "test")):
                yield rel, lines, node


def _code_items(root: Path) -> Iterator[Prompt]:
    for rel, lines, node in _public_functions(root):
        doc = ast.get_docstring(node)
        key = f"{rel}:{node.lineno}"
        if doc and len(doc.split("\n")[0]) > 20:
            args = ", ".join(a.arg for a in node.args.args)
            summary = doc.split("\n")[0].strip()
            yield Prompt(f"Write a Python function `{node.name}({args})`. {summary}", True, "code", key)
        else:
            start = max(0, node.lineno - 4)
            body = lines[start:node.lineno + 3]
            if len("\n".join(body)) > 60:
                yield Prompt("\n".join(body) + "\n", False, "code", key)


def _fortune_entries(folder: Path, files: Sequence[str]) -> Iterator[Prompt]:
    for name in files:
        path = folder / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, entry in enumerate(re.split(r"\n%\n", text)):
            entry = entry.strip()
            if 40 <= len(entry) <= 500 and entry.isascii():
                yield Prompt(entry, True, "text", f"{name}:{i}")


def code_prompts(split: str = "train", root: Optional[Path] = None) -> List[Prompt]:
    return [p for p in _code_items(root or stdlib_dir()) if held_out(p.source) == (split == "held-out")]


def text_prompts(split: str = "train", folder: Optional[Path] = None) -> List[Prompt]:
    folder = folder or FORTUNES_DIR
    items = [p for p in _fortune_entries(folder, FORTUNE_FILES) if held_out(p.source) == (split == "held-out")]
    if not items:
        raise FileNotFoundError(f"no English text corpus in {folder}: install Debian's fortunes package "
                                "(apt-get install fortunes) or pass another folder of fortune files")
    out = []
    for p in items:
        instruction = TEXT_INSTRUCTIONS[int(hashlib.sha1(p.source.encode()).hexdigest()[:4], 16)
                                        % len(TEXT_INSTRUCTIONS)]
        out.append(Prompt(f"{p.text}\n\n{instruction}", True, "text", p.source))
    return out


@dataclass
class OfflineText:
    """A prompt and an answer the target did not write (teacher forcing)."""

    prompt: str
    chat: bool  # the prompt is a user turn of the model's chat template, the answer the assistant's
    answer: str
    domain: str
    source: str


# requests a fortune answers (the answer is the fortune itself)
FORTUNE_REQUESTS = (
    "Tell me a saying I can think about today.",
    "Share a short quotation you like.",
    "Tell me something witty.",
    "Give me a piece of advice in a few lines.",
    "Say something that would make me smile.",
    "Tell me a short joke or an observation about life.",
)
OFFLINE_CODE_LINES = 40  # a function is cut after this many lines


def _code_texts(root: Path) -> Iterator[OfflineText]:
    for rel, lines, node in _public_functions(root):
        end = getattr(node, "end_lineno", None) or node.lineno
        body = textwrap.dedent("\n".join(lines[node.lineno - 1:min(end, node.lineno - 1 + OFFLINE_CODE_LINES)]))
        if len(body) < 60 or not body.isascii():
            continue
        doc = ast.get_docstring(node)
        key = f"{rel}:{node.lineno}"
        if doc and len(doc.split("\n")[0]) > 20:
            args = ", ".join(a.arg for a in node.args.args)
            summary = doc.split("\n")[0].strip()
            yield OfflineText(f"Write a Python function `{node.name}({args})`. {summary}", True,
                              f"```python\n{body}\n```", "code", key)
        else:
            head, tail = body.split("\n", 1) if "\n" in body else (body, "")
            if tail:
                yield OfflineText(head + "\n", False, tail, "code", key)


def offline_texts(domain: str, split: str = "train", root: Optional[Path] = None) -> List[OfflineText]:
    """Finished texts of a domain (``root``: the code or fortune folder), split as
    the prompts are (by the hash of their source)."""
    if domain == "code":
        items = list(_code_texts(root or stdlib_dir()))
    elif domain == "text":
        folder = root or FORTUNES_DIR
        items = []
        for p in _fortune_entries(folder, FORTUNE_FILES):
            request = FORTUNE_REQUESTS[int(hashlib.sha1(p.source.encode()).hexdigest()[:4], 16)
                                       % len(FORTUNE_REQUESTS)]
            items.append(OfflineText(request, True, p.text, "text", p.source))
        if not items:
            raise FileNotFoundError(f"no English text corpus in {folder}: install Debian's fortunes package "
                                    "(apt-get install fortunes) or pass another folder of fortune files")
    else:
        raise ValueError(f"unknown domain {domain!r} (code or text)")
    return [t for t in items if held_out(t.source) == (split == "held-out")]


def sample(prompts: Sequence[Prompt], count: int, seed: int) -> List[Prompt]:
    """`count` prompts drawn without replacement (all of them if fewer), in a seeded order."""
    rng = random.Random(seed)
    chosen = list(prompts)
    rng.shuffle(chosen)
    return chosen[:count]


# Hand-written prompts for the demo (not drawn from the corpora): 16 per domain, so
# that it can run batches of 1, 4 and 16 different requests.
DEMO_PROMPTS = {
    "code": [
        "Write a Python function `is_prime(n)` that returns True when n is a prime number.",
        "Write a Python function `word_counts(text)` that returns a dictionary mapping each word to its count.",
        "Write a Python class `Stack` with push, pop and peek methods.",
        "Write a Python function `flatten(items)` that flattens a nested list.",
        "Write a Python function `fibonacci(n)` that returns the first n Fibonacci numbers as a list.",
        "Write a Python function `reverse_words(sentence)` that reverses the order of the words in a sentence.",
        "Write a Python function `is_palindrome(s)` that ignores case and spaces.",
        "Write a Python function `merge_sorted(a, b)` that merges two sorted lists into one sorted list.",
        "Write a Python function `binary_search(items, target)` that returns the index of target or -1.",
        "Write a Python function `count_vowels(text)` that returns the number of vowels in a string.",
        "Write a Python function `read_csv(path)` that returns the rows of a CSV file as dictionaries.",
        "Write a Python class `Counter` with increment, decrement and reset methods.",
        "Write a Python function `factorial(n)` that computes n! recursively.",
        "Write a Python function `remove_duplicates(items)` that keeps the first occurrence of each item.",
        "Write a Python function `celsius_to_fahrenheit(c)` and its inverse.",
        "Write a Python function `chunks(items, size)` that splits a list into chunks of the given size.",
    ],
    "text": [
        "Why is the sky blue? Explain it to a ten-year-old.",
        "Write a short story about a cat who learns to play the piano.",
        "Give me three tips for staying focused while studying.",
        "What are the benefits of drinking water every day?",
        "Explain how a rainbow forms.",
        "Write a short poem about the ocean.",
        "What should I pack for a weekend camping trip?",
        "Describe your ideal morning routine.",
        "Why do leaves change color in the autumn?",
        "Give me some advice for my first day at a new job.",
        "Write a friendly email inviting a neighbour to a garden party.",
        "What is the difference between weather and climate?",
        "Tell me a short story about a robot who wants to be a gardener.",
        "How can I get better at cooking at home?",
        "Explain why exercise is good for your health.",
        "What are some good habits for saving money?",
    ],
}
