import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the tests' helper modules (stats, markov)

import dspark  # noqa: E402


def cuda_usable() -> bool:
    return dspark.backends()["cuda"]["usable"] and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_usable():
        return
    reason = dspark.backends()["cuda"]["reason"] or "torch sees no CUDA device"
    skip = pytest.mark.skip(reason=f"CUDA backend not usable here: {reason}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
