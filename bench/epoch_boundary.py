"""Wait for a training batch at an epoch boundary vs the median wait: prints ONE JSON line.

    .venv/bin/python bench/epoch_boundary.py [--examples 20000] [--epochs 3] [--read_us 100]

Reads train_iterator as fast as it yields (no model: the input-bound worst case) over CIFAR-10
train[:examples] with a shuffle buffer of a fifth of that (ImageNet's recipe: 250,000 of 1.28M):
once as the records come (from memory after the first read), once with --read_us microseconds
added to reading each record, as when a large dataset streams from disk (ImageNet: ~110 KB a
record, so 100 us is ~1 GB/s). Each runs twice: "overlapped", vit.data as shipped (the next
epoch's shuffle buffer fills while this one is read), and "sequential", epochs read one after
the other by a flat_map as vit.data did before (patched in here only), so each epoch first
waits for its buffer to fill. Per run: the median wait for a batch, the longest wait for a
batch holding an epoch's first example, and the seconds to the first batch (when overlapped,
two buffers fill at the start).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
from machine import cpu_description
from tensorflow.python.data.experimental.ops import testing as tf_data_testing

from vit import data

CIFAR_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../shared/data/tfds"))
if not os.path.isdir(CIFAR_DIR):
    CIFAR_DIR = "/work/shared/data/tfds"


def _sequential_epochs(
    records_of: Callable[[tf.Tensor], tf.data.Dataset], n: int, buffer: int, seed: int, start: int
) -> tf.data.Dataset:
    """The record stream as vit.data built it before: a flat_map of epochs, one after another."""
    first_epoch, offset = divmod(start, n)

    @tf.autograph.experimental.do_not_convert
    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        shuffled = records_of(e).shuffle(buffer, seed=seed + e, reshuffle_each_iteration=False)
        return shuffled.skip(tf.where(e == first_epoch, tf.constant(offset, tf.int64), 0))

    return tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)


@contextlib.contextmanager
def patched(mode: str, read_us: int) -> Iterator[None]:
    """Within it, epochs are read "overlapped" (as shipped) or "sequential", each record late
    by read_us microseconds."""
    epochs, open_source = data._shuffled_epochs, data.open_source

    def slow_source(config):
        src = open_source(config)

        def read(*args, **order) -> tf.data.Dataset:
            return src.read(*args, **order).apply(tf_data_testing.sleep(read_us))

        return dataclasses.replace(src, read=read) if read_us else src

    data.open_source = slow_source
    if mode == "sequential":
        data._shuffled_epochs = _sequential_epochs
    try:
        yield
    finally:
        data._shuffled_epochs, data.open_source = epochs, open_source


def waits(config, n: int, epochs: int) -> dict[str, float]:
    """Median and epoch-boundary batch waits (ms) and seconds to the first batch."""
    it = data.train_iterator(config, num_devices=1)
    b = config.batch_size
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    all_waits, boundary = [], []
    for k in range(1, epochs * n // b):
        start = time.perf_counter()
        next(it)
        wait = 1000 * (time.perf_counter() - start)
        all_waits.append(wait)
        if (k * b - 1) // n != ((k + 1) * b - 1) // n:  # batch k holds an epoch's first example
            boundary.append(wait)
    return {
        "median_wait_ms": round(statistics.median(all_waits), 1),
        "boundary_max_wait_ms": round(max(boundary), 1),
        "first_batch_s": round(first, 2),
    }


def main() -> None:
    """Runs both read speeds in both modes and prints the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="CIFAR-10 train[:examples]")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--read_us", type=int, default=100, help="added to each record's read")
    args = parser.parse_args()
    config = data.default_config()
    config.update(dict(data_dir=CIFAR_DIR, batch_size=args.batch))
    config.update(dict(train_split=f"train[:{args.examples}]", shuffle_buffer=args.examples // 5))
    result = {**cpu_description(), "batch_size": args.batch, "epochs": args.epochs}
    result.update(examples=args.examples, shuffle_buffer=config.shuffle_buffer)
    for read_us in (0, args.read_us):
        for mode in ("sequential", "overlapped"):
            with patched(mode, read_us):
                for key, value in waits(config, args.examples, args.epochs).items():
                    result[f"read_{read_us}us_{mode}_{key}"] = value
    print(json.dumps(result))


if __name__ == "__main__":
    main()
