import math

import pytest
import torch

from neaudit.metrics import above_chance, psnr, score_ratio, suppression_ratio, wilson_interval


def test_wilson_interval_matches_published_values():
    # Reference values: Newcombe (1998), Table I, e.g. 0/10 → [0, 0.2775], 5/10 → [0.2366, 0.7634]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(29, 30)
    assert low < 29 / 30 < high <= 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_ratios():
    assert score_ratio(0.45, 0.9) == pytest.approx(0.5)
    assert above_chance(0.1, 0.9, 0.1) == pytest.approx(0.0)
    assert above_chance(0.9, 0.9, 0.1) == pytest.approx(1.0)
    assert math.isnan(score_ratio(0.3, 0.0))
    assert suppression_ratio(0.72, [0.016, 0.01]) == pytest.approx(45.0)


def test_psnr_on_known_error():
    clean = torch.zeros(2, 3, 8, 8)
    assert psnr(clean + 0.1, clean) == pytest.approx(torch.tensor([20.0, 20.0]), abs=1e-4)
