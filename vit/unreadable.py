"""What `skip_corrupt` does to a split's records, before the training shuffle.

Unreadable records (a damaged TFRecord shard, undecodable image bytes) are dropped before the
epochs are shuffled, and the records that read are repeated to fill each epoch to the split's
stated size. Every epoch then holds the same number of records as without damage, so the
training stream stays a pure function of (seed, step) and a resumed run is exact.
"""

from __future__ import annotations

import tensorflow as tf

from vit import preprocess as pp_ops
from vit.data_options import DataError
from vit.sources import Source


@tf.autograph.experimental.do_not_convert
def _decoded_shape(record: dict) -> tf.Tensor:
    return tf.shape(pp_ops.decode(record["encoded"]))


def require_a_readable_example(src: Source, split: str, process_index: int,
                               process_count: int) -> None:
    """A DataError unless this process's part of `split` holds an example that reads and
    decodes: skipping every one would otherwise wait for a batch forever."""
    readable = src.read(split, process_index, process_count).map(_decoded_shape)
    if not list(readable.ignore_errors().take(1).as_numpy_iterator()):
        raise DataError(
            f"no readable example in split {split!r} of {src.name!r} (process {process_index} of "
            f"{process_count}): skip_corrupt=True skips unreadable examples, but every one is; "
            "check or replace the data files")


def readable_records(records: tf.data.Dataset, check_decode: bool) -> tf.data.Dataset:
    """`records` less those that fail to read and, with check_decode, those whose "encoded"
    image does not decode; each dropped one is logged."""
    if not check_decode:
        return records.ignore_errors(log_warning=True)

    # The decoded shape leaves the first map as a value of its own, so that no graph
    # optimisation can drop the decode (a control dependency alone was pruned).
    @tf.autograph.experimental.do_not_convert
    def with_shape(record: dict) -> tuple[dict, tf.Tensor]:
        return record, _decoded_shape(record)

    @tf.autograph.experimental.do_not_convert
    def without_shape(record: dict, _shape: tf.Tensor) -> dict:
        return record

    checked = records.map(with_shape, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return checked.ignore_errors(log_warning=True).map(without_shape)


def filled_epoch(records: tf.data.Dataset, n: int) -> tf.data.Dataset:
    """Exactly n records: `records` (which holds at least one), then again from its start for
    as many as it is short of n."""
    return records.repeat().take(n)
