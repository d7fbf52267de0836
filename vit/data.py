"""Datasets -> deterministic tf.data pipelines -> numpy batches [devices, per_device, H, W, C].

Examples come from vit/sources.py: any TFDS image-classification dataset (`dataset="cifar10"`)
or an image folder (`dataset="folder:/root"`, laid out root/<split>/<class>/*.jpg|jpeg|png). Each
JAX process reads its own disjoint part of a split. Training is infinite and a pure function of
(seed, step), so `train_iterator(config, start_step=N)` resumes exactly. Evaluation pads the last
batch and adds a mask, so every example counts exactly once on any number of devices and
processes. `classes=[5, 6, 7]` keeps only those labels, renumbered 0..k-1 in the given order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from vit import preprocess as pp_ops
from vit.data_options import DataError, default_config, validate_data_keys  # noqa: F401
from vit.error_text import first_names, tensorflow_message
from vit.image_folders import FOLDER_PREFIX, IMAGE_EXTENSIONS
from vit.model_options import pair
from vit.sources import Source, open_source
from vit.unreadable import filled_epoch, readable_records, require_a_readable_example

__all__ = [
    "FOLDER_PREFIX", "IMAGE_EXTENSIONS", "DataError", "DatasetInfo", "dataset_info",
    "default_config", "eval_iterator", "num_eval_batches", "split_size", "train_iterator",
]  # fmt: skip

# Functions given to tf.data here are plain TF ops, so they skip AutoGraph (do_not_convert): it
# would re-read their source and warn "could not transform" when the file changed since import.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model, checkpoint and CLIs need to know about a dataset.

    image_shape is the shape of the images the pipeline yields: (H, W, 3) of config.image_size.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    split_sizes: dict[str, int]

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "split_sizes": dict(self.split_sizes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        """Inverse of to_dict."""
        return cls(
            name=d["name"],
            num_classes=int(d["num_classes"]),
            class_names=tuple(d["class_names"]),
            image_shape=tuple(int(x) for x in d["image_shape"]),
            split_sizes={k: int(v) for k, v in d["split_sizes"].items()},
        )


# ----------------------------------------------------------------------------- metadata
def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Class names, number of classes, yielded image shape and split sizes of config.dataset.

    With config.classes set, split_sizes holds only the run's train and eval splits (counted).
    """
    src = open_source(config)
    sizes = dict(src.split_sizes)
    for key in ("train_split", "eval_split"):
        split = config[key]
        sizes.setdefault(split, src.size(split))
        if sizes[split] == 0:  # found at start-up, not at the first evaluation
            raise DataError(f"split {split!r} of {src.name!r} holds no examples: set "
                            f"config.{key} to a split or slice with some, e.g. 'test' or "
                            "'train[:90%]'")
    shape = (*pair(config.image_size), 3)
    return DatasetInfo(src.name, len(src.class_names), src.class_names, shape, sizes)


def class_change(before: Sequence[str], now: Sequence[str]) -> str | None:
    """How a dataset's class names changed since `before` ("new: a; gone: b", or "the same
    names in another order"); None when they did not."""
    if list(before) == list(now):
        return None
    added = [name for name in now if name not in before]
    gone = [name for name in before if name not in now]
    detail = "; ".join(part for part in (added and f"new: {first_names(added)}",
                                         gone and f"gone: {first_names(gone)}") if part)
    return detail or "the same names in another order"


def split_size(config: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples in a (possibly sliced) split string such as "train[:98%]"."""
    return open_source(config).size(split)


# ----------------------------------------------------------------------------- pipelines
def _topology(num_devices, process_index, process_count) -> tuple[int, int, int]:
    return (
        jax.local_device_count() if num_devices is None else num_devices,
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
    )


def _local_batch(batch_size: int, num_devices: int, process_count: int, key: str) -> int:
    if batch_size <= 0 or batch_size % (num_devices * process_count):
        raise DataError(
            f"{key}={batch_size} is not divisible by {process_count} processes x {num_devices} "
            f"devices; use a multiple of {num_devices * process_count}"
        )
    return batch_size // process_count


def _to_device_batch(batch: dict, num_devices: int) -> dict:
    """Splits the batch per device. Images stay uint8: 4x less to copy to the devices, where
    the train and eval steps normalise them (preprocess.normalize_on_device)."""
    return {k: tf.reshape(v, [num_devices, -1, *v.shape[1:]]) for k, v in batch.items()}


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    opts.experimental_optimization.map_parallelization = True
    return opts


def _numpy(ds: tf.data.Dataset, src: Source, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Yields numpy batches; a failure inside TensorFlow becomes one DataError line."""
    it = iter(ds.with_options(_options()).prefetch(tf.data.AUTOTUNE).as_numpy_iterator())
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            if src.is_folder:
                _raise_for_bad_file(src, split)
            raise DataError(
                f"unreadable example in {src.name!r} split {split!r} "
                f"({tensorflow_message(e.message)}); set skip_corrupt=True to skip such examples"
            ) from None
        yield batch


@tf.autograph.experimental.do_not_convert
def _path(record: dict) -> tf.Tensor:
    return record["path"]


def _raise_for_bad_file(src: Source, split: str) -> None:
    """Decodes every file of a folder split as the pipeline does: a DataError names the first
    bad one."""
    paths = src.read(split).map(_path).as_numpy_iterator()
    while True:
        try:
            path = next(paths)
        except StopIteration:
            return
        except tf.errors.OpError as e:  # the file went away after the folder was scanned
            raise DataError(f"an image file of {src.name!r} split {split!r} could not be read "
                            f"({tensorflow_message(e.message)}); restore or remove it") from None
        try:
            pp_ops.check_pipeline_decodes(os.fsdecode(path))
        except DataError as err:
            raise DataError(f"{err}, or set skip_corrupt=True to skip such files") from None


_CHUNK = 64  # records an epoch stream hands on at a time: one hand-over between threads each


def _empty_chunk(spec: tf.TensorSpec) -> tf.Tensor:
    """A chunk of no records that fits spec (a batch of records): shape [0, ...]."""
    shape = [0] if spec.shape.rank is None else [0, *(d or 0 for d in spec.shape[1:])]
    return tf.zeros(shape, spec.dtype)


def _shuffled_epochs(
    records_of: Callable[[tf.Tensor], tf.data.Dataset], n: int, buffer: int, seed: int, start: int
) -> tf.data.Dataset:
    """Epoch after epoch of n records, epoch e the records `records_of(e)` (e an int64 tensor)
    shuffled with seed + e, from stream position start.

    The order is that of shuffling one epoch after the other, but no boundary waits for a shuffle
    buffer to fill: even and odd epochs are two flat_map streams, each behind a prefetch, so when
    an epoch ends its stream's thread at once fills the buffer of the epoch after next, with a
    whole epoch's time to do it, while the other stream is read. Cost: two shuffle buffers are
    alive at a time. The streams hand on chunks of _CHUNK records (one hand-over between threads
    per chunk, not per record), a fixed number per epoch (padded with empty chunks if records were
    dropped), taken in turn by that count. The odd stream starts with an empty chunk so that its
    thread, which starts on a first read, fills its first epoch at once, not at the first
    boundary. (A parallel interleave of epochs with block_length=n buffers whole epochs ahead.)
    """
    first_epoch, offset = divmod(start, n)
    end = np.iinfo(np.int64).max
    spec = records_of(tf.constant(first_epoch, tf.int64)).batch(_CHUNK).element_spec
    empty = tf.nest.map_structure(_empty_chunk, spec)
    empty = tf.data.Dataset.from_tensors(empty)

    def chunks_in(e: tf.Tensor) -> tf.Tensor:
        size = tf.where(e == first_epoch, tf.constant(n - offset, tf.int64), n)
        return (size + _CHUNK - 1) // _CHUNK

    @tf.autograph.experimental.do_not_convert
    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        shuffled = records_of(e).shuffle(buffer, seed=seed + e, reshuffle_each_iteration=False)
        shuffled = shuffled.skip(tf.where(e == first_epoch, tf.constant(offset, tf.int64), 0))
        return shuffled.batch(_CHUNK).concatenate(empty.repeat()).take(chunks_in(e))

    @tf.autograph.experimental.do_not_convert
    def turns(e: tf.Tensor) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensors((e - first_epoch) % 2).repeat(chunks_in(e))

    even, odd = (tf.data.Dataset.range(first_epoch + p, end, 2).flat_map(epoch) for p in (0, 1))
    streams = [even.prefetch(1), empty.concatenate(odd).prefetch(1)]
    choice = tf.data.Dataset.range(first_epoch, end).flat_map(turns)
    choice = tf.data.Dataset.from_tensors(tf.constant(1, tf.int64)).concatenate(choice)
    return tf.data.Dataset.choose_from_datasets(streams, choice).unbatch()


def _stream_seed(seed: int, process_index: int) -> int:
    """The shuffle seed of a process's training stream (epoch e: + e, an int64)."""
    return (seed * 1_000_003 + process_index) * 1_000_003 % 2**62


def read_order_seed(seed: int, process_index: int, epoch: int | tf.Tensor) -> int | tf.Tensor:
    """The order_seed (Source.read) with which epoch `epoch` of a process's training stream
    reads a split not cached in memory; not the epoch's shuffle seed."""
    return _stream_seed(seed, process_index) + epoch + (1 << 61)


def train_iterator(
    config: ml_collections.ConfigDict,
    *,
    start_step: int = 0,
    num_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite augmented batches: "image" uint8 [dev, per_dev, H, W, 3], "label" i32 [dev,
    per_dev].

    A pure function of (config.seed, step): start_step=N yields what an uninterrupted run
    yields from step N. Each epoch is shuffled with a seed of (seed, process, epoch); the next
    epoch's shuffle buffer fills while this one is read, so epoch boundaries do not stall. A
    split not cached in memory is read in an order of the epoch's own first: a folder's files
    all shuffled, a TFDS split's shards shuffled and read 16 at a time, interleaved.
    """
    validate_data_keys(config)
    num_devices, process_index, process_count = _topology(num_devices, process_index, process_count)
    batch = _local_batch(config.batch_size, num_devices, process_count, "batch_size")
    src = open_source(config)
    split = config.train_split
    n = src.part_size(split, process_index, process_count)
    # Every process raises alike (the parts are known to all): one raising alone would leave
    # the others waiting in the first collective.
    empty = [i for i in range(process_count) if src.part_size(split, i, process_count) <= 0]
    if empty:
        raise DataError(
            f"split {split!r} of {src.name!r} has no examples for "
            f"process {empty[0]} of {process_count}; use a larger split"
        )
    seed = _stream_seed(config.seed, process_index)
    skip_corrupt = bool(config.get("skip_corrupt"))
    if skip_corrupt:
        require_a_readable_example(src, split, process_index, process_count)

    def readable(records: tf.data.Dataset) -> tf.data.Dataset:
        """Unreadable records go before the shuffle (a folder's scan decoded its own)."""
        if not skip_corrupt:
            return records
        return readable_records(records, check_decode=not src.is_folder)

    cached = None  # read once, then every later epoch from memory
    if src.fits_in_memory and int(config.get("total_steps", 0)) * batch > n:
        cached = readable(src.read(split, process_index, process_count)).cache()

    def epoch_records(e: tf.Tensor) -> tf.data.Dataset:
        """Epoch e's records: from memory when cached, else the files (a folder) or shards
        (TFDS) read in an order of the epoch's own."""
        records = cached if cached is not None else readable(src.read(
            split, process_index, process_count,
            order_seed=read_order_seed(config.seed, process_index, e)))
        return filled_epoch(records, n) if skip_corrupt else records

    start = start_step * batch
    buffer = max(1, min(config.shuffle_buffer, n))

    @tf.autograph.experimental.do_not_convert
    def augment(pos: tf.Tensor, record: dict) -> dict:
        aug_seed = tf.stack([tf.constant(config.seed, tf.int64), pos])
        return {
            "image": pp_ops.train_image(record["encoded"], aug_seed, config),
            "label": tf.cast(record["label"], tf.int32),
        }

    @tf.autograph.experimental.do_not_convert
    def to_device(b: dict) -> dict:
        return _to_device_batch(b, num_devices)

    ds = _shuffled_epochs(epoch_records, n, buffer, seed, start)
    ds = ds.enumerate(start=start + process_index * (1 << 48))  # stream position: aug seed
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if skip_corrupt:  # only a file damaged after its folder was scanned fails here
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch, drop_remainder=True).map(to_device)
    return _numpy(ds, src, split)


def num_eval_batches(
    config: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    batch_size: int | None = None,
    process_count: int | None = None,
) -> int:
    """Eval batches per process; equal on every process (short ones get fully masked batches)."""
    process_count = jax.process_count() if process_count is None else process_count
    batch = (batch_size or config.eval_batch_size) // process_count
    if batch <= 0:
        raise DataError(
            f"eval batch size {batch_size or config.eval_batch_size} is smaller "
            f"than the {process_count} processes; increase it"
        )
    split = split or config.eval_split
    return math.ceil(_largest_part(open_source(config), split, process_count) / batch)


def _largest_part(src: Source, split: str, process_count: int) -> int:
    """Examples in the largest process's part of `split`."""
    if process_count == 1:
        return src.size(split)
    # parts of a "+"-joined split, or of a class subset, differ by more than one: count them
    return max(src.part_size(split, i, process_count) for i in range(process_count))


def eval_iterator(
    config: ml_collections.ConfigDict,
    split: str | None = None,
    *,
    batch_size: int | None = None,
    num_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    before_crop: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a split: {"image", "label", "mask": bool [dev, per_dev]}; padding masked out.

    Split defaults to config.eval_split, batch_size to config.eval_batch_size (global).
    "image" is the uint8 evaluation crop [dev, per_dev, H, W, 3] (padding: zeros); the eval
    step normalises it on the device with config.pp.normalize (preprocess.normalize_on_device).
    `before_crop` maps each decoded uint8 [h, w, 3] image at its own size before the crop
    (robustness corrupts images there).
    """
    validate_data_keys(config)
    split = split or config.eval_split
    batch_size = batch_size or config.eval_batch_size
    num_devices, process_index, process_count = _topology(num_devices, process_index, process_count)
    batch = _local_batch(batch_size, num_devices, process_count, "eval_batch_size")
    src = open_source(config)
    largest = _largest_part(src, split, process_count)
    batches = math.ceil(largest / batch)  # what num_eval_batches counts
    # A batch larger than the split is cut to the split (rounded up to the devices), not padded.
    batch = min(batch, max(1, math.ceil(largest / num_devices)) * num_devices)
    total = batch * batches

    @tf.autograph.experimental.do_not_convert
    def crop(record: dict) -> dict:
        image = pp_ops.decode(record["encoded"])
        return {
            "image": pp_ops.eval_crop(before_crop(image) if before_crop else image, config),
            "label": tf.cast(record["label"], tf.int32),
            "mask": tf.constant(True),
        }

    @tf.autograph.experimental.do_not_convert
    def to_device(b: dict) -> dict:
        return _to_device_batch(b, num_devices)

    ds = src.read(split, process_index, process_count)
    ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if config.get("skip_corrupt"):
        if src.part_size(split, process_index, process_count):  # an empty part pads alone
            require_a_readable_example(src, split, process_index, process_count)
        ds = ds.ignore_errors(log_warning=True)
    padding = {
        "image": tf.zeros([*pair(config.image_size), 3], tf.uint8),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat()).take(total)
    ds = ds.batch(batch, drop_remainder=True).map(to_device)
    return _numpy(ds, src, split)
