"""Timing and the worker command line shared by the benchmarks (standard library only, so the
peer torch + timm environment of bench/timm_worker.py imports it as well as ours)."""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable


def timed_calls(fn: Callable[[], object], repeats: int) -> list[tuple[float, int]]:
    """(wall seconds, minor page faults) of each of `repeats` calls of `fn()`, which must block
    until done."""
    calls = []
    for _ in range(repeats):
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        fn()
        calls.append((time.perf_counter() - start,
                      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
    return calls


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` (which must block until done) over `repeats` calls."""
    return statistics.median(seconds for seconds, _ in timed_calls(fn, repeats))


def worker_arguments(description: str | None) -> argparse.Namespace:
    """The command line of a vs_timm worker: WORKLOAD DTYPE [--batch --size --steps --warmup]."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("workload", choices=("train", "infer", "matmul"))
    parser.add_argument("dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="image side, or matmul n")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    return parser.parse_args()
