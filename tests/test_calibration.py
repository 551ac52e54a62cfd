"""dspark.calibration: metrics, Sequential Temperature Scaling and the recorder."""

import math

import pytest
import torch

from dspark import calibration
from dspark.calibration import STS, CalibrationRecorder, auc, brier, ece, fit_sts


def test_metrics_on_known_values():
    assert ece(torch.tensor([0.2, 0.2, 0.8, 0.8]), torch.tensor([0, 1, 1, 1])) == pytest.approx(
        (abs(0.4 - 1) + abs(1.6 - 2)) / 4)
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 1, 0, 1])) == 0.5
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    assert brier(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([1, 1, 0])) == pytest.approx((0 + 1 + 0.25) / 3)


def _synthetic_rounds(n, planted, seed):
    """Rounds whose true conditional acceptance probabilities q_k are known;
    the raw logits are logit(q_k) * T_k (over-confident for T_k > 1)."""
    torch.manual_seed(seed)  # Beta.sample draws from the global generator
    g = torch.Generator().manual_seed(seed)
    gamma = len(planted)
    q = torch.distributions.Beta(2.0, 1.2).sample((n, gamma)).clamp(1e-4, 1 - 1e-4)
    accepted_step = torch.rand(n, gamma, generator=g) < q
    accepted = torch.cumprod(accepted_step.long(), dim=1).bool()
    logits = (torch.log(q) - torch.log1p(-q)) * torch.tensor(planted)
    return logits, accepted, q


def test_sts_recovers_planted_temperatures_and_lowers_ece():
    planted = [1.5, 2.0, 2.6, 1.2, 3.0]
    logits, accepted, q = _synthetic_rounds(200000, planted, seed=1)
    sts, report = fit_sts(logits, accepted)
    for t, want in zip(sts.temperatures, planted):
        assert t == pytest.approx(want, rel=0.08)
    for before, after in zip(report["before"], report["after"]):
        assert after["ece"] < before["ece"]
        assert after["ece"] < 0.01
    # position 1's survival is c_1 itself: scaling preserves its order, hence its AUC
    assert report["after"][0]["auc"] == pytest.approx(report["before"][0]["auc"], abs=1e-6)
    assert report["before"][0]["ece"] > 0.03


def test_sts_is_order_preserving():
    logits = torch.randn(1000, 4) * 3
    sts = STS([0.7, 1.3, 2.0, 5.0])
    calibrated = sts.apply(logits)
    for k in range(4):
        assert torch.equal(torch.argsort(logits[:, k], stable=True), torch.argsort(calibrated[:, k], stable=True))
    assert torch.all(sts.survival(logits)[:, 1:] <= sts.survival(logits)[:, :-1])


def test_sts_save_and_load_with_a_drafter_folder(tmp_path):
    sts = STS([1.25, 2.5])
    path = sts.save(tmp_path)
    assert path.name == calibration.STS_FILENAME
    assert STS.load(tmp_path).temperatures == [1.25, 2.5]
    with pytest.raises(ValueError):
        STS([1.0, 0.0])


def test_recorder_masks_unverified_positions_and_fits():
    planted = [2.0, 2.0, 2.0]
    logits, accepted, _ = _synthetic_rounds(240000, planted, seed=2)
    lengths = torch.randint(0, 4, (logits.shape[0],), generator=torch.Generator().manual_seed(3))
    lengths[lengths == 0] = 3  # positions 1, 2, 3 observed in all, 2/3 and 1/2 of the rounds
    num_accepted = torch.minimum(accepted.long().sum(1), lengths)
    recorder = CalibrationRecorder()
    for start in range(0, logits.shape[0], 1000):
        sl = slice(start, start + 1000)
        recorder.record(logits[sl], lengths[sl], num_accepted[sl])
    got_logits, got_accepted, observed = recorder.data()
    assert torch.equal(got_logits, logits)
    assert torch.equal(observed, torch.arange(1, 4).unsqueeze(0) <= lengths.unsqueeze(1))
    assert torch.equal(got_accepted[observed], accepted[observed])
    sts, _ = recorder.fit()
    for t in sts.temperatures:  # fewer rounds observe later positions: a looser bound
        assert t == pytest.approx(2.0, rel=0.12)
    with pytest.raises(ValueError):
        recorder.record(logits[:2], lengths[:3], num_accepted[:2])


def test_sts_position_with_too_few_trials_takes_its_neighbours_temperature():
    """Position 4 is verified in only 6 rounds, all rejected: fitted alone, its
    ECE is minimised at the edge of the grid (the shipped drafter's position 6
    went to 20). With the fallback it takes position 3's temperature, and the
    report names it; with min_trials lowered below 6 it is fitted again (the
    edge of the grid), which shows the test would notice a missing fallback."""
    planted = [1.5, 2.0, 2.6, 1.2]
    logits, accepted, _ = _synthetic_rounds(60000, planted, seed=4)
    observed = torch.ones_like(accepted)
    observed[6:, 3] = False  # position 4: six rounds
    accepted[:6, 3] = False
    sts, report = fit_sts(logits, accepted, observed)
    assert report["fallback"] == [4]
    assert sts.temperatures[3] == sts.temperatures[2]
    assert sts.temperatures[2] == pytest.approx(2.6, rel=0.1)
    alone, report_alone = fit_sts(logits, accepted, observed, min_trials=5)
    assert report_alone["fallback"] == []
    edge = (float(calibration.DEFAULT_GRID[0]), float(calibration.DEFAULT_GRID[-1]))
    assert min(abs(alone.temperatures[3] - e) / e for e in edge) < 0.05
    # the first position has no neighbour on its left: 1
    observed[:, :] = False
    observed[:10, :] = True
    few, report_few = fit_sts(logits, accepted, observed)
    assert few.temperatures == [1.0] * 4 and report_few["fallback"] == [1, 2, 3, 4]
