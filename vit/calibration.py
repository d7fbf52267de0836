"""Calibration: expected calibration error (ECE) and reliability diagrams.

Predictions are grouped by confidence (the top class's probability) into NUM_BINS equal-width
bins (i/n, (i+1)/n]. Per bin we keep three sums - count, summed confidence, summed correctness -
which add up over batches, devices and processes, so the ECE of a split is exact however it was
split up: ECE = sum over bins of |correct_sum - confidence_sum| / total (Guo et al. 2017).
"""

from __future__ import annotations

import os

import numpy as np

from vit.output_paths import make_parent

NUM_BINS = 15
COUNT, CONFIDENCE, CORRECT = 0, 1, 2  # rows of the bin sums


def bin_sums(confidence: np.ndarray, correct: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """float64 [3, num_bins]: per confidence bin, the count, summed confidence, summed hits."""
    confidence = np.asarray(confidence, np.float64).ravel()
    correct = np.asarray(correct, np.float64).ravel()
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence has {confidence.size} values but correct has "
                         f"{correct.size}; pass one of each per prediction")
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    sums = np.zeros((3, num_bins), np.float64)
    np.add.at(sums[COUNT], index, 1.0)
    np.add.at(sums[CONFIDENCE], index, confidence)
    np.add.at(sums[CORRECT], index, correct)
    return sums


def expected_calibration_error(sums: np.ndarray) -> float:
    """ECE of bin sums from `bin_sums` (NaN when they hold no predictions)."""
    sums = np.asarray(sums, np.float64)
    total = sums[COUNT].sum()
    if total == 0:
        return float("nan")
    return float(np.abs(sums[CORRECT] - sums[CONFIDENCE]).sum() / total)


def ece(confidence: np.ndarray, correct: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """Expected calibration error of predictions with these confidences and hits."""
    return expected_calibration_error(bin_sums(confidence, correct, num_bins))


def reliability_diagram(sums: np.ndarray, path: str, title: str = "") -> str:
    """Draw accuracy vs confidence per bin (with the diagonal and the ECE) to a PNG; its path
    (".png" added when `path` has no extension)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sums = np.asarray(sums, np.float64)
    n = sums.shape[1]
    edges = np.linspace(0.0, 1.0, n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = sums[CORRECT] / sums[COUNT]
        confidence = sums[CONFIDENCE] / sums[COUNT]
    filled = sums[COUNT] > 0
    fig = Figure(figsize=(5, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.bar(edges[:-1][filled], accuracy[filled], width=1.0 / n, align="edge",
            edgecolor="black", color="tab:blue", label="accuracy")
    top.bar(edges[:-1][filled], (confidence - accuracy)[filled], bottom=accuracy[filled],
            width=1.0 / n, align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    heading = f"ECE {expected_calibration_error(sums):.4f}"
    top.set_title(f"{title}  {heading}" if title else heading)
    bottom.bar(edges[:-1], sums[COUNT] / max(sums[COUNT].sum(), 1), width=1.0 / n,
               align="edge", edgecolor="black", color="grey")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    if not os.path.splitext(path)[1]:
        path += ".png"  # what savefig writes for a name without an extension
    fig.savefig(make_parent(path))
    return path
