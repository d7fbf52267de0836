"""vit.calibration: ECE of calibrated and over-confident toy predictors, bin sums, the diagram."""

import numpy as np
import pytest
from PIL import Image

from vit import calibration


def test_a_perfectly_calibrated_predictor_has_ece_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, size=200_000)
    correct = rng.random(confidence.size) < confidence  # right with probability = confidence
    assert calibration.ece(confidence, correct) < 0.005


def test_exactly_calibrated_bins_give_zero():
    # in each bin the share of hits equals the confidence: 0.6 -> 3 of 5, 0.8 -> 4 of 5
    confidence = np.array([0.6] * 5 + [0.8] * 5)
    correct = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 0], bool)
    assert calibration.ece(confidence, correct) == pytest.approx(0.0, abs=1e-12)


def test_an_over_confident_predictor_has_the_expected_ece():
    # always 90% sure, right 60% of the time: ECE = 0.9 - 0.6
    confidence = np.full(1000, 0.9)
    correct = np.arange(1000) % 5 < 3
    assert calibration.ece(confidence, correct) == pytest.approx(0.3, abs=1e-12)
    # two groups: 99% sure and right half the time (weight 1/4), 70% sure and always right
    confidence = np.array([0.99] * 100 + [0.7] * 300)
    correct = np.array([True, False] * 50 + [True] * 300)
    expected = 0.25 * (0.99 - 0.5) + 0.75 * (1.0 - 0.7)
    assert calibration.ece(confidence, correct) == pytest.approx(expected, abs=1e-12)


def test_bin_sums_add_up_over_parts():
    rng = np.random.default_rng(1)
    confidence, correct = rng.random(500), rng.random(500) < 0.5
    whole = calibration.bin_sums(confidence, correct)
    parts = calibration.bin_sums(confidence[:123], correct[:123]) + calibration.bin_sums(
        confidence[123:], correct[123:])
    np.testing.assert_allclose(parts, whole)
    assert whole[calibration.COUNT].sum() == 500
    edges = calibration.bin_sums(np.array([0.0, 0.05, 1.0]), np.ones(3, bool))
    assert edges[calibration.COUNT][[0, 14]].tolist() == [2, 1]  # 0 goes to the first bin
    assert np.isnan(calibration.expected_calibration_error(np.zeros((3, 15))))


def test_reliability_diagram_is_a_png(tmp_path):
    rng = np.random.default_rng(2)
    sums = calibration.bin_sums(rng.random(300), rng.random(300) < 0.7)
    path = calibration.reliability_diagram(sums, str(tmp_path / "r.png"), title="toy")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (500, 600)
