"""Drafter training on CUDA: the same data and loss as on the CPU, the loss
falls, and the trained drafter (saved, reloaded, STS-calibrated) decodes
losslessly on the CUDA backend. Models are built in memory (no transformers),
so this runs on a GPU image that has only PyTorch and pytest."""

from __future__ import annotations

import random

import pytest
import torch

from dspark import train
from dspark.engine import SamplingParams, SpeculativeEngine
from dspark.models import DSparkDrafter
from dspark.scheduler import Fixed
from test_engine_cuda import make_target
from training_data import training_data

pytestmark = pytest.mark.cuda

VOCAB = 64
LAYERS = 4


def frozen(target):
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def test_cuda_training_matches_cpu_lowers_the_loss_and_decodes_losslessly(tmp_path):
    cpu = frozen(make_target(VOCAB, layers=LAYERS))
    gpu = frozen(make_target(VOCAB, layers=LAYERS).cuda())  # same seed: the same weights
    config = train.TrainConfig(block_size=4, markov_rank=16, confidence=True, num_layers=1, steps=60,
                               sequences_per_step=4, blocks_per_sequence=4, lr=3e-3, warmup=5, eval_every=0, seed=1)
    layer_ids = train.default_layer_ids(LAYERS)
    data_cpu = training_data(cpu, layer_ids, VOCAB)
    # the same sequences, their features extracted on the GPU
    features, finals = train.extract(gpu, [t.tolist() for t in data_cpu.tokens], data_cpu.prompt_lens, layer_ids,
                                     progress=False)
    for a, b in zip(features, data_cpu.features):
        torch.testing.assert_close(a.cpu().float(), b.float(), rtol=2e-3, atol=2e-3)
    for a, b in zip(finals, data_cpu.final):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)
    data = train.Sequences(data_cpu.tokens, data_cpu.prompt_lens, data_cpu.domains, features, finals, layer_ids)

    # one loss, the same blocks and initial drafter on both devices
    everything = list(range(len(data)))
    probe_cpu = train.draw_blocks(data_cpu, everything, config, random.Random(9), config.mask_token_id)
    probe = train.draw_blocks(data, everything, config, random.Random(9), config.mask_token_id, torch.device("cuda"))
    with torch.no_grad():
        terms_cpu = train.loss_terms(train.new_drafter(cpu, config, config.seed), cpu, probe_cpu)
        terms = train.loss_terms(train.new_drafter(gpu, config, config.seed).cuda(), gpu, probe)
    for name in ("loss", "ce", "l1", "bce"):
        if name in terms_cpu:
            assert float(terms[name]) == pytest.approx(float(terms_cpu[name]), rel=2e-3), name
    loss_before = float(terms["loss"])

    drafter, history = train.train_drafter(gpu, data, config, progress=False, log=lambda s: None)
    assert all(p.is_cuda for p in drafter.parameters())
    with torch.no_grad():
        loss_after = float(train.loss_terms(drafter, gpu, probe)["loss"])
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)

    prompts = [t[:p].tolist() for t, p in zip(data.tokens[:3], data.prompt_lens[:3])]
    result = train.calibrate(gpu, drafter, prompts, 12, 0)
    assert len(result["temperatures"]) == config.block_size
    train.save_checkpoint(drafter, tmp_path / "d", config, history)
    loaded = DSparkDrafter.load(tmp_path / "d", gpu, device="cuda")
    assert loaded.sts is not None and loaded.sts.temperatures == pytest.approx(result["temperatures"])
    base = SpeculativeEngine(gpu).generate(prompts, SamplingParams(0.0, max_new_tokens=16))
    engine = SpeculativeEngine(gpu, loaded.float(), policy=Fixed())
    spec = engine.generate(prompts, SamplingParams(0.0, max_new_tokens=16))
    assert [r.tokens for r in spec] == [r.tokens for r in base]
    assert engine.metrics.tau > 1.0
