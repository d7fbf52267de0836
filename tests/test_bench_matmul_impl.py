"""bench/matmul_impl.py on tiny workloads, over the plain C `cblas_sgemm` (the plain_blas
fixture, tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import matmul_impl  # noqa: E402


def test_the_two_implementations_agree(plain_blas):
    assert matmul_impl.largest_difference(size=8) < 1e-5


def test_it_times_both_sides_of_each_workload_in_turn(plain_blas):
    results = matmul_impl.measure({"infer": ("Ti/4", 8, 2), "train": ("Ti/4", 8, 4)}, rounds=2,
                                  calls=1)
    assert set(results) == {"infer", "train"}
    for name, batch in (("infer", 2), ("train", 4)):
        result = results[name]
        assert result["batch"] == batch and set(result["runs"]) == {"xla", "blas"}
        assert all(len(r) == 2 and min(r) > 0 for r in result["runs"].values())
        medians = {side: sorted(r)[0] / 2 + sorted(r)[1] / 2 for side, r in result["runs"].items()}
        assert abs(result["blas_over_xla"] - medians["blas"] / medians["xla"]) < 0.01
