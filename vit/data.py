"""Datasets -> deterministic tf.data pipelines -> numpy batches [devices, per_device, H, W, C].

Sources: any TFDS image-classification dataset (`dataset="cifar10"`) or an image folder
(`dataset="folder:/root"`, laid out root/<split>/<class>/*.jpg|jpeg|png). Each JAX process reads
its own disjoint part of a split. Training is infinite and a pure function of (seed, step), so
`train_iterator(config, start_step=N)` resumes exactly. Evaluation pads the last batch and adds a
mask, so every example counts exactly once on any number of devices and processes.
`classes=[5, 6, 7]` keeps only those labels, renumbered 0..k-1 in the given order.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import os
import types
from collections.abc import Callable, Iterator
from concurrent import futures

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit import preprocess as pp_ops
from vit.preprocess import DataError

__all__ = [
    "DataError", "DatasetInfo", "dataset_info", "default_config", "eval_iterator",
    "num_eval_batches", "split_size", "train_iterator",
]  # fmt: skip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FOLDER_PREFIX = "folder:"
_CACHE_BYTES = 2 << 30  # TFDS datasets smaller than this keep their encoded records in memory


def default_config() -> ml_collections.ConfigDict:
    """The data keys of a run config with their defaults (a config starts from this)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = "cifar10"  # TFDS name, or "folder:/path/root"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: $TFDS_DATA_DIR
    c.manual_dir = ml_collections.FieldReference(None, field_type=str)  # e.g. ImageNet tars
    c.download = False
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 32
    c.batch_size = 128  # global, across all processes and devices
    c.eval_batch_size = 256  # global
    c.shuffle_buffer = 50_000
    c.skip_corrupt = False
    # Class subset: label ids to keep (list or tuple), relabelled 0..k-1 in this order; None = all.
    c.classes = ml_collections.FieldReference(None, field_type=tuple)
    c.pp = pp_ops.default_options()  # documented in vit/preprocess.py
    return c


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model, checkpoint and CLIs need to know about a dataset.

    image_shape is the shape of the images the pipeline yields: (image_size, image_size, 3).
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


# ----------------------------------------------------------------------------- sources
@dataclasses.dataclass(frozen=True)
class _Source:
    """A dataset as encoded records {"encoded": string, "label": int64}, any split, any slice."""

    name: str
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]  # the named splits
    read: Callable[..., tf.data.Dataset]  # (split, process_index=0, process_count=1)
    size: Callable[[str], int]
    is_folder: bool
    labels: Callable[..., np.ndarray]  # like read, but only the labels, images not decoded
    part_size: Callable[[str, int, int], int]  # examples read by process i of n from a split


def _cardinality(read: Callable[..., tf.data.Dataset]) -> Callable[[str, int, int], int]:
    return lambda split, index, count: int(read(split, index, count).cardinality())


def _tfds_source(config) -> _Source:
    data_dir = config.get("data_dir") or os.environ.get("TFDS_DATA_DIR") or None
    name = config.dataset
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(), n=3)
        hint = " or ".join(repr(c) for c in close)
        hint = f"did you mean {hint}?" if close else "see tfds.list_builders() for names"
        raise DataError(f"unknown dataset {name!r}; {hint}") from None
    if config.get("download") and not builder.is_prepared():
        manual = config.get("manual_dir")
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual)
            )
        except Exception as e:  # noqa: BLE001 - any failure becomes one line for the user
            raise DataError(f"could not prepare {name!r}: {str(e).splitlines()[0]}") from None
    features = builder.info.features
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    class_names = tuple(features[label_key].names)
    decoders = {image_key: tfds.decode.SkipDecoding()}
    small = (builder.info.dataset_size or 0) < _CACHE_BYTES

    def read(split, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        sub = tfds.even_splits(split, n=process_count)[process_index]
        try:
            ds = builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders)
        except AssertionError:
            raise DataError(
                f"dataset {name!r} is not prepared in {builder.data_dir_root}; set data_dir or "
                f"TFDS_DATA_DIR to where it is, or run `tfds build {name} --data_dir=DIR` "
                "(imagenet2012: put its tar files in manual_dir) or set download=True"
            ) from None
        except ValueError as e:
            reason = str(e).splitlines()[-1]
            raise DataError(f"bad split {split!r} for {name!r}: {reason}") from None
        ds = ds.map(lambda x: {"encoded": x[image_key], "label": tf.cast(x[label_key], tf.int64)})
        return ds.cache() if small else ds

    def size(split: str) -> int:
        try:
            return builder.info.splits[split].num_examples
        except (KeyError, ValueError):
            return int(read(split).cardinality())  # no metadata (e.g. mocked data): count

    def labels(split, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        batches = read(split, process_index, process_count).map(lambda r: r["label"]).batch(8192)
        return np.concatenate([np.zeros([0], np.int64), *batches.as_numpy_iterator()])

    sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
    return _Source(
        name,
        class_names,
        sizes,
        read,
        size,
        is_folder=False,
        labels=labels,
        part_size=_cardinality(read),
    )


def _images_in(directory: str) -> list[str]:
    return sorted(
        os.path.join(directory, f) for f in os.listdir(directory)
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )  # fmt: skip


def _is_readable(path: str) -> bool:
    try:
        pp_ops.decode_image_file(path)
        return True
    except DataError:
        return False


@functools.lru_cache(maxsize=8)
def _scan_folder(root: str, skip_corrupt: bool) -> tuple[tuple[str, ...], dict]:
    """Lists root/<split>/<class>/ images: (sorted class names, {split: [(path, label), ...]})."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist; use dataset='folder:/path/root'")
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not splits:
        raise DataError(
            f"image folder {root!r} has no split folders; lay it out as root/<split>/<class>/*.jpg"
        )
    class_dirs = {
        s: sorted(
            c for c in os.listdir(os.path.join(root, s)) if os.path.isdir(os.path.join(root, s, c))
        )
        for s in splits
    }
    class_names = tuple(sorted(set().union(*class_dirs.values())))
    files = {}
    for s in splits:
        if not class_dirs[s]:
            raise DataError(
                f"split folder {os.path.join(root, s)!r} has no class folders; "
                "lay it out as root/<split>/<class>/*.jpg"
            )
        files[s] = []
        for c in class_dirs[s]:
            images = _images_in(os.path.join(root, s, c))
            if not images:
                raise DataError(
                    f"class folder {os.path.join(root, s, c)!r} holds no "
                    f"{'/'.join(IMAGE_EXTENSIONS)} images; add some or remove it"
                )
            files[s] += [(p, class_names.index(c)) for p in images]
    if skip_corrupt:
        for s in splits:
            with futures.ThreadPoolExecutor() as pool:
                ok = list(pool.map(_is_readable, [p for p, _ in files[s]]))
            if not all(ok):
                logging.warning("skipping %d corrupt image files in %s", ok.count(False), s)
            files[s] = [f for f, good in zip(files[s], ok, strict=True) if good]
    return class_names, files


def _folder_source(config) -> _Source:
    root = os.path.abspath(os.path.expanduser(config.dataset[len(FOLDER_PREFIX) :]))
    class_names, files = _scan_folder(root, bool(config.get("skip_corrupt")))
    sizes = {s: len(f) for s, f in files.items()}

    def select(split: str) -> list:
        try:
            ri = tfds.core.ReadInstruction.from_spec(split)
            parts = ri.to_absolute(
                {s: types.SimpleNamespace(num_examples=n) for s, n in sizes.items()}
            )
        except (ValueError, KeyError) as e:
            raise DataError(
                f"bad split {split!r} for folder {root!r} (splits: "
                f"{sorted(sizes)}): {str(e).splitlines()[-1]}"
            ) from None
        return [f for p in parts for f in files[p.splitname][p.from_ : p.to]]

    def part(split: str, process_index: int, process_count: int) -> list:
        chosen = select(split)
        lo, hi = _even_bounds(len(chosen), process_index, process_count)
        return chosen[lo:hi]

    def read(split, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        chosen = part(split, process_index, process_count)
        paths = tf.constant([p for p, _ in chosen], tf.string, shape=[len(chosen)])
        ds = tf.data.Dataset.from_tensor_slices(
            (paths, labels(split, process_index, process_count))
        )
        return ds.map(lambda p, y: {"encoded": tf.io.read_file(p), "label": y, "path": p})

    def labels(split, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        chosen = part(split, process_index, process_count)
        return np.array([label for _, label in chosen], np.int64)

    size = lambda s: len(select(s))
    return _Source(config.dataset, class_names, sizes, read, size, True, labels, _cardinality(read))


def _even_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """[lo, hi) of part `index` of `count` near-equal parts of n items (larger parts first)."""
    base, extra = divmod(n, count)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


def _source(config) -> _Source:
    if config.dataset.startswith(FOLDER_PREFIX):
        src = _folder_source(config)
    else:
        src = _tfds_source(config)
    classes = config.get("classes")
    if classes is None:
        return src
    data_dir = config.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
    key = (config.dataset, data_dir, bool(config.get("skip_corrupt")))
    return _class_subset(src, _check_classes(classes, src), key)


# ----------------------------------------------------------------------------- class subset
_SUBSET_SIZES: dict[tuple, int] = {}  # (source key, split, classes, process) -> kept examples


def _check_classes(classes, src: _Source) -> tuple[int, ...]:
    """The label ids of config.classes as a tuple; a DataError names the first bad one."""
    n = len(src.class_names)
    fix = f"use distinct label ids in [0, {n - 1}], e.g. classes=[0, 1]"
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise DataError(f"classes={classes!r} is not a list of label ids; {fix}")
    ids = list(classes)
    if not ids:
        raise DataError(f"classes=[] keeps no examples of {src.name!r}; {fix} or None for all")
    for c in ids:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < n:
            raise DataError(f"classes holds {c!r}, not a label id of {src.name!r}; {fix}")
    if len(set(ids)) < len(ids):
        dup = next(c for c in ids if ids.count(c) > 1)
        raise DataError(f"classes lists label id {dup} twice; {fix}")
    return tuple(int(c) for c in ids)


def _class_subset(src: _Source, classes: tuple[int, ...], key: tuple) -> _Source:
    """`src` reduced to the examples of `classes`, relabelled 0..k-1 in that order."""
    new_label = np.full([len(src.class_names)], -1, np.int64)
    new_label[list(classes)] = np.arange(len(classes))

    def read(split, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        table = tf.constant(new_label)
        ds = src.read(split, process_index, process_count)
        ds = ds.filter(lambda r: tf.gather(table, r["label"]) >= 0)
        return ds.map(lambda r: {**r, "label": tf.gather(table, r["label"])})

    def labels(split, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        kept = new_label[src.labels(split, process_index, process_count)]
        return kept[kept >= 0]

    def part_size(split: str, process_index: int, process_count: int) -> int:
        cache_key = (key, split, classes, process_index, process_count)
        if cache_key not in _SUBSET_SIZES:
            _SUBSET_SIZES[cache_key] = len(labels(split, process_index, process_count))
        return _SUBSET_SIZES[cache_key]

    return _Source(
        name=src.name,
        class_names=tuple(src.class_names[c] for c in classes),
        split_sizes={},  # counting every named split would read all of them: see dataset_info
        read=read,
        size=lambda split: part_size(split, 0, 1),
        is_folder=src.is_folder,
        labels=labels,
        part_size=part_size,
    )


# ----------------------------------------------------------------------------- metadata
def dataset_info(config) -> DatasetInfo:
    """Class names, number of classes, yielded image shape and split sizes of config.dataset.

    With config.classes set, split_sizes holds only the run's train and eval splits (counted).
    """
    src = _source(config)
    sizes = dict(src.split_sizes)
    for split in (config.train_split, config.eval_split):
        sizes.setdefault(split, src.size(split))
    size = config.image_size
    return DatasetInfo(src.name, len(src.class_names), src.class_names, (size, size, 3), sizes)


def split_size(config, split: str) -> int:
    """Number of examples in a (possibly sliced) split string such as "train[:98%]"."""
    return _source(config).size(split)


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


def _to_device_batch(batch: dict, num_devices: int, normalize: str) -> dict:
    """Normalises the whole batch and splits it into [num_devices, per_device, ...]."""
    batch = dict(batch, image=pp_ops.normalize(batch["image"], normalize))
    return {k: tf.reshape(v, [num_devices, -1, *v.shape[1:]]) for k, v in batch.items()}


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    opts.experimental_optimization.map_parallelization = True
    return opts


def _numpy(ds: tf.data.Dataset, src: _Source, split: str) -> Iterator[dict[str, np.ndarray]]:
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
                f"({e.message.splitlines()[0]}); set skip_corrupt=True to skip such examples"
            ) from None
        yield batch


def _raise_for_bad_file(src: _Source, split: str) -> None:
    """Decodes every file of a folder split with PIL: a DataError names the first bad one."""
    for path in src.read(split).map(lambda r: r["path"]).as_numpy_iterator():
        pp_ops.decode_image_file(path.decode())


def train_iterator(
    config,
    *,
    start_step: int = 0,
    num_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite augmented batches: "image" f32 [dev, per_dev, H, W, 3], "label" i32 [dev, per_dev].

    A pure function of (config.seed, step): start_step=N yields what an uninterrupted run
    yields from step N. Each epoch is shuffled with a seed of (seed, process, epoch).
    """
    pp_ops.validate_options(config.pp)
    num_devices, process_index, process_count = _topology(num_devices, process_index, process_count)
    batch = _local_batch(config.batch_size, num_devices, process_count, "batch_size")
    src = _source(config)
    records = src.read(config.train_split, process_index, process_count)
    n = src.part_size(config.train_split, process_index, process_count)
    if n <= 0:
        raise DataError(
            f"split {config.train_split!r} of {src.name!r} has no examples for "
            f"process {process_index} of {process_count}; use a larger split"
        )
    start = start_step * batch
    first_epoch, offset = divmod(start, n)
    buffer = max(1, min(config.shuffle_buffer, n))
    seed = (config.seed * 1_000_003 + process_index) * 1_000_003

    def epoch(e):
        shuffled = records.shuffle(buffer, seed=seed + e, reshuffle_each_iteration=False)
        return shuffled.skip(tf.where(e == first_epoch, tf.constant(offset, tf.int64), 0))

    ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.enumerate(start=start + process_index * (1 << 48))  # stream position: aug seed
    seed_of = lambda pos: tf.stack([tf.constant(config.seed, tf.int64), pos])
    ds = ds.map(
        lambda pos, r: {
            "image": pp_ops.train_image(r["encoded"], seed_of(pos), config),
            "label": tf.cast(r["label"], tf.int32),
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if config.get("skip_corrupt"):
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.map(lambda b: _to_device_batch(b, num_devices, config.pp.normalize))
    return _numpy(ds, src, config.train_split)


def num_eval_batches(
    config,
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
    src = _source(config)
    if config.get("classes") is None:
        largest_part = math.ceil(src.size(split) / process_count)
    else:  # filtering after the even split leaves the parts uneven: count each one
        largest_part = max(src.part_size(split, i, process_count) for i in range(process_count))
    return math.ceil(largest_part / batch)


def eval_iterator(
    config,
    split: str | None = None,
    *,
    batch_size: int | None = None,
    num_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a split: {"image", "label", "mask": bool [dev, per_dev]}; padding masked out.

    Split defaults to config.eval_split, batch_size to config.eval_batch_size (global).
    """
    pp_ops.validate_options(config.pp)
    split = split or config.eval_split
    batch_size = batch_size or config.eval_batch_size
    num_devices, process_index, process_count = _topology(num_devices, process_index, process_count)
    batch = _local_batch(batch_size, num_devices, process_count, "eval_batch_size")
    src = _source(config)
    total = batch * num_eval_batches(
        config, split, batch_size=batch_size, process_count=process_count
    )
    ds = src.read(split, process_index, process_count).map(
        lambda r: {
            "image": pp_ops.eval_crop(pp_ops.decode(r["encoded"]), config),
            "label": tf.cast(r["label"], tf.int32),
            "mask": tf.constant(True),
        },
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if config.get("skip_corrupt"):
        ds = ds.ignore_errors(log_warning=True)
    size = config.image_size
    padding = {
        "image": tf.zeros([size, size, 3], tf.uint8),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat()).take(total)
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.map(lambda b: _to_device_batch(b, num_devices, config.pp.normalize))
    return _numpy(ds, src, split)
