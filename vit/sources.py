"""Where examples come from: TFDS builders or image folders, per-process parts, class subsets.

`open_source(config)` gives a `Source`: encoded records {"encoded": string, "label": int64} of any
(sliced) split, read by process i of n as its own near-equal disjoint part. An image folder
(`dataset="folder:/root"`) is laid out root/<split>/<class>/*.jpg|jpeg|png (vit/image_folders.py
lists its files); `classes=[5, 6, 7]` keeps only those labels, renumbered 0..k-1 in the given
order.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import types
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit.error_text import first_names
from vit.image_folders import (
    FOLDER_PREFIX,
    IMAGE_EXTENSIONS,
    absolute_dataset,
    folder_root,
    folder_times,
    is_hidden,
    scan_folder,
)
from vit.model_options import is_int
from vit.preprocess import DataError

log = logging.getLogger(__name__)

__all__ = ["FOLDER_PREFIX", "IMAGE_EXTENSIONS", "Source", "absolute_dataset", "is_hidden",
           "open_source"]

_CACHE_BYTES = 2 << 30  # TFDS datasets smaller than this fit in memory (training caches them)

# Functions given to tf.data here are plain TF ops, so they skip AutoGraph (do_not_convert): it
# would re-read their source and warn "could not transform" when the file changed since import.


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset as encoded records {"encoded": string, "label": int64}, any split, any slice."""

    name: str
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]  # the named splits
    # (split, process_index=0, process_count=1, *, order_seed=None); order_seed (an int64
    # tensor) reads the part in an order drawn from it, as an epoch does (`_shards_in_order`)
    read: Callable[..., tf.data.Dataset]
    size: Callable[[str], int]
    is_folder: bool
    labels: Callable[..., np.ndarray]  # like read, but only the labels, images not decoded
    part_size: Callable[[str, int, int], int]  # examples read by process i of n from a split
    # Small enough to keep its encoded records in memory: training caches them over its epochs.
    fits_in_memory: bool = False


def open_source(config: ml_collections.ConfigDict) -> Source:
    """The Source of config.dataset (TFDS name or "folder:/root"), reduced to config.classes."""
    if not config.dataset:
        raise DataError("this run names no dataset (weights converted from a file have none): "
                        "pass --dataset NAME (vit eval, robustness, fewshot, prune), or set "
                        "config.dataset")
    if config.dataset.startswith(FOLDER_PREFIX):
        src = _folder_source(config)
    else:
        src = _tfds_source(config)
    classes = config.get("classes")
    if classes is not None:
        data_dir = config.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
        key = (config.dataset, data_dir, bool(config.get("skip_corrupt")))
        if src.is_folder:  # its counts change with its files, as the scan does
            key += (folder_times(folder_root(config.dataset)),)
        src = _class_subset(src, _check_classes(classes, src), key)
    return _warning_of_unseen_classes(src) if src.is_folder else src


# ----------------------------------------------------------------------------- TFDS
def _cardinality(read: Callable[..., tf.data.Dataset]) -> Callable[[str, int, int], int]:
    return lambda split, index, count: int(read(split, index, count).cardinality())


@tf.autograph.experimental.do_not_convert
def _label(record: dict) -> tf.Tensor:
    return record["label"]


def _classification_features(builder: tfds.core.DatasetBuilder) -> tuple[str, str, tuple]:
    """(image key, label key, class names) of an image-classification dataset; a DataError
    naming the dataset's features for any other kind (detection, captions, super-resolution)."""
    features = builder.info.features
    keys = builder.info.supervised_keys or ("image", "label")
    if (len(keys) == 2 and all(isinstance(k, str) and k in features for k in keys)
            and isinstance(features[keys[0]], tfds.features.Image)
            and isinstance(features[keys[1]], tfds.features.ClassLabel)):
        return keys[0], keys[1], tuple(features[keys[1]].names)
    raise DataError(
        f"dataset {builder.name!r} is not an image-classification dataset (features: "
        f"{', '.join(features.keys())}; one image and one class label are needed); use another "
        "TFDS dataset or an image folder (dataset='folder:/path/root')")


def _builder_error(name: str, err: Exception) -> str:
    """One line for what tfds.builder says of a dataset string it cannot build."""
    text = str(err)
    if text.startswith("Parsing builder name string"):
        return (f"dataset {name!r} is neither a TFDS name (name[/config][:version], e.g. "
                "'cifar10' or 'cifar10:3.0.2') nor an image folder ('folder:/path/root')")
    detail = text.split('": ', 1)[-1].split(" Here are ", 1)[0].splitlines()[0].rstrip(". ")
    return f"dataset {name!r} cannot be built: {detail}; fix the name, config or version"


def _tfds_source(config: ml_collections.ConfigDict) -> Source:
    data_dir = config.get("data_dir") or os.environ.get("TFDS_DATA_DIR") or None
    name = config.dataset
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(), n=3)
        hint = " or ".join(repr(c) for c in close)
        hint = f"did you mean {hint}?" if close else "see tfds.list_builders() for names"
        raise DataError(f"unknown dataset {name!r}; {hint}") from None
    except (AssertionError, ValueError) as err:  # a bad version, config or name string
        raise DataError(_builder_error(name, err)) from None
    if config.get("download") and not builder.is_prepared():
        manual = config.get("manual_dir")
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual)
            )
        except Exception as e:  # noqa: BLE001 - any failure becomes one line for the user
            raise DataError(f"could not prepare {name!r}: {str(e).splitlines()[0]}") from None
    image_key, label_key, class_names = _classification_features(builder)
    decoders = {image_key: tfds.decode.SkipDecoding()}
    small = (builder.info.dataset_size or 0) < _CACHE_BYTES

    @tf.autograph.experimental.do_not_convert
    def to_record(example: dict) -> dict:
        return {"encoded": example[image_key], "label": tf.cast(example[label_key], tf.int64)}

    @tf.autograph.experimental.do_not_convert
    def deserialize(serialized: tf.Tensor) -> dict:
        return builder.info.features.deserialize_example(serialized, decoders=decoders)

    # With skip_corrupt, no cardinality assertion: after a damaged shard it fails on every
    # later read, so ignore_errors would skip forever. Sizes come from the asserted reader.
    skip_corrupt = bool(config.get("skip_corrupt"))

    def read(split, process_index: int = 0, process_count: int = 1, *,
             asserted: bool = not skip_corrupt, order_seed: tf.Tensor | None = None,
             ) -> tf.data.Dataset:
        stored = read_stored(split, process_index, process_count, asserted)  # bad split: a line
        if order_seed is None or builder.info.file_format != tfds.core.FileFormat.TFRECORD:
            return stored
        sub = tfds.even_splits(split, n=process_count)[process_index]
        try:
            instructions = builder.info.splits[sub].file_instructions
        except (KeyError, ValueError):  # an empty part; no metadata (mocked data)
            return stored
        if not instructions or not tf.io.gfile.exists(instructions[0].filename):
            return stored  # mocked data: no files (a missing shard of real data fails its read)
        shards = _shards_in_order(instructions, order_seed)
        return shards.map(deserialize, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True).map(to_record)

    def read_stored(split, process_index: int, process_count: int,
                    asserted: bool) -> tf.data.Dataset:
        """The part in its stored order."""
        sub = tfds.even_splits(split, n=process_count)[process_index]
        # No autocache: TFDS would cache every small read, and warn when one is read in part.
        read_config = tfds.ReadConfig(assert_cardinality=asserted, try_autocache=False)
        try:
            ds = builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders,
                                    read_config=read_config)
        except AssertionError as e:
            if builder.is_prepared():  # TFDS asserts on a reversed or empty slice too
                reason = str(e) or "an empty or reversed slice"
                raise DataError(f"bad split {split!r} for {name!r}: {reason}; use a slice such "
                                "as test[:1000]") from None
            raise DataError(
                f"dataset {name!r} is not prepared in {builder.data_dir_root}; point data_dir "
                f"(vit: --data-dir, train.py: --config.data_dir) or TFDS_DATA_DIR at it, or run "
                f"`tfds build {name} --data_dir=DIR` (imagenet2012: put its tar files in "
                "manual_dir), or let train.py prepare it with --config.download=True"
            ) from None
        except ValueError as e:
            reason = str(e).splitlines()[-1]
            if process_index > 0 and "corresponds to no data" in reason:
                # fewer examples than processes: this process's part is empty, not the split
                return read_stored(split, 0, process_count, asserted).take(0)
            raise DataError(f"bad split {split!r} for {name!r}: {reason}") from None
        return ds.map(to_record)

    def size(split: str) -> int:
        try:
            n = builder.info.splits[split].num_examples
        except (KeyError, ValueError):
            return int(read(split, asserted=True).cardinality())  # no metadata (mocked data)
        if n < 0:
            raise DataError(f"bad split {split!r} for {name!r}: the slice ends before it starts; "
                            "use a slice such as test[:1000]")
        return n

    def labels(split, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        batches = read(split, process_index, process_count).map(_label).batch(8192)
        return np.concatenate([np.zeros([0], np.int64), *batches.as_numpy_iterator()])

    sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
    return Source(
        name,
        class_names,
        sizes,
        read,
        size,
        is_folder=False,
        labels=labels,
        part_size=_cardinality(functools.partial(read, asserted=True)),
        fits_in_memory=small,
    )


_INTERLEAVE = 16  # shards read at a time, 16 records each in turn (as TFDS reads shuffled files)


def _shards_in_order(instructions: list, order_seed: tf.Tensor) -> tf.data.Dataset:
    """The serialized records of TFDS file instructions (shard file, skip, take), the shards in
    an order drawn from order_seed and read _INTERLEAVE at a time, interleaved."""
    files = tf.constant([i.filename for i in instructions], tf.string)
    skips = tf.constant([i.skip for i in instructions], tf.int64)
    takes = tf.constant([i.take for i in instructions], tf.int64)

    @tf.autograph.experimental.do_not_convert
    def shard(filename: tf.Tensor, skip: tf.Tensor, take: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(filename).skip(skip).take(take)

    order = tf.data.Dataset.from_tensor_slices((files, skips, takes))
    order = order.shuffle(len(instructions), seed=order_seed, reshuffle_each_iteration=False)
    return order.interleave(shard, cycle_length=min(_INTERLEAVE, len(instructions)),
                            block_length=_INTERLEAVE, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)


# ----------------------------------------------------------------------------- image folders
@tf.autograph.experimental.do_not_convert
def _read_file(path: tf.Tensor, label: tf.Tensor) -> dict:
    return {"encoded": tf.io.read_file(path), "label": label, "path": path}


def _folder_source(config: ml_collections.ConfigDict) -> Source:
    root = folder_root(config.dataset)
    class_names, files = scan_folder(root, bool(config.get("skip_corrupt")))
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

    def read(split, process_index: int = 0, process_count: int = 1, *,
             order_seed: tf.Tensor | None = None) -> tf.data.Dataset:
        chosen = part(split, process_index, process_count)
        # Bytes, as the OS names them: a name that is not UTF-8 (a Latin-1 archive's) reads too.
        paths = tf.constant([os.fsencode(p) for p, _ in chosen], tf.string, shape=[len(chosen)])
        ds = tf.data.Dataset.from_tensor_slices(
            (paths, labels(split, process_index, process_count))
        )
        if order_seed is not None:  # the files in a random order: names are cheap to shuffle
            ds = ds.shuffle(max(1, len(chosen)), seed=order_seed, reshuffle_each_iteration=False)
        return ds.map(_read_file)

    def labels(split, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        chosen = part(split, process_index, process_count)
        return np.array([label for _, label in chosen], np.int64)

    size = lambda s: len(select(s))
    return Source(config.dataset, class_names, sizes, read, size, True, labels, _cardinality(read))


_WARNED_UNSEEN: set[tuple] = set()  # (dataset, split, class names) warned of in this process


def _warn_of_unseen_classes(src: Source, split: str) -> None:
    """Logs, once per split and process, the classes that have no images in a split."""
    key = (src.name, split, src.class_names)
    if key in _WARNED_UNSEEN:
        return
    seen = set(src.labels(split).tolist())
    _WARNED_UNSEEN.add(key)
    unseen = [name for i, name in enumerate(src.class_names) if i not in seen]
    if unseen:
        log.warning("%s split %r has no images of %d class(es): %s; their head units are "
                        "never trained in it", src.name, split, len(unseen),
                        first_names(unseen, 10))


def _warning_of_unseen_classes(src: Source) -> Source:
    """`src` whose read warns of the classes a split has no images of (`_warn_of_unseen_classes`;
    cheap for a folder, whose labels are known without reading its images)."""

    def read(split, process_index: int = 0, process_count: int = 1, **order) -> tf.data.Dataset:
        _warn_of_unseen_classes(src, split)
        return src.read(split, process_index, process_count, **order)

    return dataclasses.replace(src, read=read)


def _even_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """[lo, hi) of part `index` of `count` near-equal parts of n items (larger parts first)."""
    base, extra = divmod(n, count)
    lo = index * base + min(index, extra)
    return lo, lo + base + (index < extra)


# ----------------------------------------------------------------------------- class subset
_SUBSET_SIZES: dict[tuple, int] = {}  # (source key, split, classes, process) -> kept examples


def _check_classes(classes, src: Source) -> tuple[int, ...]:
    """The label ids of config.classes as a tuple; a DataError names the first bad one."""
    n = len(src.class_names)
    fix = f"use distinct label ids in [0, {n - 1}], e.g. classes=[0, 1]"
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise DataError(f"classes={classes!r} is not a list of label ids; {fix}")
    ids = list(classes)
    if not ids:
        raise DataError(f"classes=[] keeps no examples of {src.name!r}; {fix} or None for all")
    for c in ids:
        if not is_int(c) or not 0 <= c < n:
            raise DataError(f"classes holds {c!r}, not a label id of {src.name!r}; {fix}")
    if len(set(ids)) < len(ids):
        dup = next(c for c in ids if ids.count(c) > 1)
        raise DataError(f"classes lists label id {dup} twice; {fix}")
    return tuple(int(c) for c in ids)


def _class_subset(src: Source, classes: tuple[int, ...], key: tuple) -> Source:
    """`src` reduced to the examples of `classes`, relabelled 0..k-1 in that order."""
    new_label = np.full([len(src.class_names)], -1, np.int64)
    new_label[list(classes)] = np.arange(len(classes))

    def read(split, process_index: int = 0, process_count: int = 1, **order) -> tf.data.Dataset:
        table = tf.constant(new_label)

        @tf.autograph.experimental.do_not_convert
        def kept(record: dict) -> tf.Tensor:
            return tf.gather(table, record["label"]) >= 0

        @tf.autograph.experimental.do_not_convert
        def relabel(record: dict) -> dict:
            return {**record, "label": tf.gather(table, record["label"])}

        return src.read(split, process_index, process_count, **order).filter(kept).map(relabel)

    def labels(split, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        kept = new_label[src.labels(split, process_index, process_count)]
        return kept[kept >= 0]

    def part_size(split: str, process_index: int, process_count: int) -> int:
        cache_key = (key, split, classes, process_index, process_count)
        if cache_key not in _SUBSET_SIZES:
            _SUBSET_SIZES[cache_key] = len(labels(split, process_index, process_count))
        return _SUBSET_SIZES[cache_key]

    return Source(
        name=src.name,
        class_names=tuple(src.class_names[c] for c in classes),
        split_sizes={},  # counting every named split would read all of them: see dataset_info
        read=read,
        size=lambda split: part_size(split, 0, 1),
        is_folder=src.is_folder,
        labels=labels,
        part_size=part_size,
        fits_in_memory=src.fits_in_memory,
    )
