"""Training data for the drafter-training tests: random prompts continued by
the target itself, then their context features (no transformers needed)."""

from __future__ import annotations

from typing import Sequence

import torch

from dspark import train
from dspark.models import TargetModel


def training_data(target: TargetModel, layer_ids: Sequence[int], vocab: int, count: int = 6,
                  new_tokens: int = 24) -> train.Sequences:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 12, (count,), generator=g)]
    tokens, lens, domains = train.generate_sequences(target, prompts, ["code"] * count, [], new_tokens, 4, 0,
                                                     progress=False)
    features, finals = train.extract(target, tokens, lens, layer_ids, progress=False)
    return train.Sequences([torch.tensor(t) for t in tokens], lens, domains, features, finals, list(layer_ids))
