"""Tests for vit.data: TFDS (mocked and the shipped CIFAR-10), image folders, sharding, errors."""

import json
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import sharded_tfds
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from vit import config_schema, data, image_folders, preprocess, sources, unreadable
from vit.data import DataError, DatasetInfo

CIFAR_DIR = "/work/shared/data/tfds"


def _config(**kw):
    c = data.default_config()
    c.update(kw)
    return c


def _cifar(**kw):
    base = dict(
        data_dir=CIFAR_DIR,
        train_split="train[:256]",
        eval_split="test[:100]",
        shuffle_buffer=256,
        batch_size=32,
        eval_batch_size=32,
    )
    return _config(**{**base, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/{train,test}/{cat,dog}/: image k is a flat 8x8 image of value k (train: 12, test: 5)."""
    root = tmp_path_factory.mktemp("imgs")
    k = 0
    for split, per_class in (("train", 6), ("test", (3, 2))):
        for c, cls in enumerate(("dog", "cat")):  # written unsorted on purpose
            n = per_class if isinstance(per_class, int) else per_class[c]
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                k += 1
                ext = "png" if i % 2 else "jpeg"
                Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(
                    root / split / cls / f"{i}.{ext}", quality=100
                )
    return root


def _folder_cfg(root, **kw):
    pp = dict(train_crop="resize", flip=False)
    base = dict(
        dataset=f"folder:{root}", image_size=8, batch_size=4, eval_batch_size=4, shuffle_buffer=100
    )
    c = _config(**{**base, **kw})
    c.pp.update(pp)
    return c


def _ids(images):
    """Recovers the per-image value k from flat uint8 images of value 10 k."""
    return np.round(images[..., 0, 0, 0].reshape(-1) / 10).astype(int)


# --------------------------------------------------------------- real CIFAR-10
def test_cifar_train_batches_shapes_dtypes():
    batch = next(data.train_iterator(_cifar(), num_devices=2))
    assert batch["image"].shape == (2, 16, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (2, 16) and batch["label"].dtype == np.int32
    assert batch["image"].max() > 200  # pixels, normalised later on the device
    assert set(np.unique(batch["label"])) <= set(range(10))


@pytest.mark.parametrize("kind", sorted(preprocess.NORMALIZATIONS))
def test_uint8_batches_normalised_on_device_are_the_old_host_batches(kind):
    """Train and eval batches cross as uint8; the steps' on-device normalisation (jit, pmap)
    gives bit for bit the float32 batches the pipeline yielded when it normalised in tf.data."""
    c = _cifar(batch_size=16, eval_batch_size=16)
    c.pp.update(dict(normalize=kind, randaugment_num_ops=1))
    step = jax.pmap(lambda x: preprocess.normalize_on_device(x, kind))
    for it in (data.train_iterator(c, num_devices=1), data.eval_iterator(c, num_devices=1)):
        images = next(it)["image"]
        assert images.dtype == np.uint8 and images.shape == (1, 16, 32, 32, 3)
        old = next(tf.data.Dataset.from_tensors(images).map(  # the old _to_device_batch
            lambda x: preprocess.normalize(x, kind)).as_numpy_iterator())
        new = np.asarray(step(images))
        assert new.dtype == np.float32
        np.testing.assert_array_equal(new.view(np.uint32), old.view(np.uint32))


def test_cifar_eval_matches_raw_tfds_pixels():
    c = _cifar()
    raw = tfds.load("cifar10", split="test[:100]", data_dir=CIFAR_DIR, download=False)
    raw = list(tfds.as_numpy(raw))
    batches = list(data.eval_iterator(c, num_devices=1))
    images = np.concatenate([b["image"][0] for b in batches])
    labels = np.concatenate([b["label"][0] for b in batches])
    mask = np.concatenate([b["mask"][0] for b in batches])
    assert mask.sum() == 100 and len(mask) == 128 and not mask[100:].any()
    assert images.dtype == np.uint8 and not images[100:].any()  # padding: zeros
    np.testing.assert_array_equal(images[:100], np.stack([r["image"] for r in raw]))
    np.testing.assert_array_equal(labels[:100], [r["label"] for r in raw])


def test_cifar_info_is_json_roundtrip():
    info = data.dataset_info(_cifar())
    assert info.num_classes == 10 and info.class_names[0] == "airplane"
    assert info.split_sizes["train"] == 50_000 and info.split_sizes["test[:100]"] == 100
    assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert data.split_size(_cifar(), "train[98%:]") == 1000


def test_same_seed_same_batches_and_exact_resume():
    c = _cifar(train_split="train[:64]", batch_size=24)  # 64 % 24 != 0: batches cross epochs
    c.pp.randaugment_num_ops = 1
    first = [next(it) for it in [data.train_iterator(c, num_devices=1)] for _ in range(6)]
    again = data.train_iterator(c, num_devices=1)
    np.testing.assert_array_equal(next(again)["image"], first[0]["image"])
    resumed = next(data.train_iterator(c, start_step=4, num_devices=1))
    np.testing.assert_array_equal(resumed["image"], first[4]["image"])
    np.testing.assert_array_equal(resumed["label"], first[4]["label"])
    c.seed = 1
    other = next(data.train_iterator(c, num_devices=1))
    assert not np.array_equal(other["image"], first[0]["image"])


# --------------------------------------------------------------- mocked TFDS
@pytest.mark.parametrize("devices", [1, 2, 4])
def test_mock_eval_counts_every_example_once(devices):
    c = _config(dataset="cifar100", eval_split="test", eval_batch_size=64, image_size=16)
    with tfds.testing.mock_data(num_examples=1001):
        assert data.num_eval_batches(c) == 16
        batches = list(data.eval_iterator(c, num_devices=devices))
        info = data.dataset_info(c)
    assert len(batches) == 16
    assert all(b["image"].shape == (devices, 64 // devices, 16, 16, 3) for b in batches)
    assert sum(int(b["mask"].sum()) for b in batches) == 1001
    assert info.num_classes == 100 and info.split_sizes["test"] == 1001


@pytest.mark.parametrize("devices,per_device", [(1, 7), (2, 4), (4, 2)])
def test_an_eval_batch_larger_than_the_split_is_cut_to_it(devices, per_device):
    """Not padded up to 100,000 images: the split, rounded up to the devices."""
    c = _config(dataset="cifar100", eval_split="test", eval_batch_size=100_000, image_size=8)
    with tfds.testing.mock_data(num_examples=7):
        batches = list(data.eval_iterator(c, num_devices=devices))
    assert [b["image"].shape for b in batches] == [(devices, per_device, 8, 8, 3)]
    assert int(batches[0]["mask"].sum()) == 7


def test_mock_train_inception_randaugment_shapes():
    c = _config(dataset="cifar100", batch_size=8, image_size=24, shuffle_buffer=16)
    c.pp.update(dict(train_crop="inception", randaugment_num_ops=2, normalize="imagenet"))
    with tfds.testing.mock_data(num_examples=20):
        batch = next(data.train_iterator(c, num_devices=2))
    assert batch["image"].shape == (2, 4, 24, 24, 3) and batch["label"].shape == (2, 4)


@pytest.mark.parametrize("train_crop", ["pad_crop", "inception"])
@pytest.mark.parametrize("image_size", [(24, 40), [40, 24]])
def test_mock_train_and_eval_batches_are_height_by_width(image_size, train_crop):
    """Mocked 32 x 32 images: train batches, eval batches (eval_resize and plain, padded with
    zeros) and dataset_info's image_shape are [H, W, 3]; eval images are eval_crop's."""
    c = _config(dataset="cifar100", batch_size=8, eval_batch_size=8, eval_split="test",
                image_size=image_size, shuffle_buffer=16)
    c.pp.update(dict(train_crop=train_crop, randaugment_num_ops=1))
    height, width = image_size
    with tfds.testing.mock_data(num_examples=11):
        train = next(data.train_iterator(c, num_devices=2))
        assert data.dataset_info(c).image_shape == (height, width, 3)
        raw = [r["image"] for r in tfds.as_numpy(tfds.load("cifar100", split="test"))]
        for eval_resize in (None, 36):
            c.pp.eval_resize = eval_resize
            batches = list(data.eval_iterator(c, num_devices=2))
            assert [b["image"].shape for b in batches] == [(2, 4, height, width, 3)] * 2
            images = np.concatenate([b["image"].reshape(-1, height, width, 3) for b in batches])
            mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
            assert mask.sum() == 11 and not images[~mask].any()
            want = [preprocess.eval_crop(tf.constant(image), c).numpy() for image in raw]
            np.testing.assert_array_equal(images[mask], np.stack(want))
    assert train["image"].shape == (2, 4, height, width, 3) and train["image"].dtype == np.uint8


# --------------------------------------------------------------- image folders
def test_folder_info_classes_sorted(folder):
    info = data.dataset_info(_folder_cfg(folder))
    assert info.class_names == ("cat", "dog")
    assert info.split_sizes == {"train": 12, "test": 5}


def test_folder_eval_labels_and_each_example_once(folder):
    c = _folder_cfg(folder)
    for devices in (1, 2, 4):
        batches = list(data.eval_iterator(c, num_devices=devices))
        mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
        ids = np.concatenate([_ids(b["image"]) for b in batches])[mask]
        labels = np.concatenate([b["label"].reshape(-1) for b in batches])[mask]
        # test/cat holds images 16, 17; test/dog holds 13, 14, 15 (class order is sorted).
        assert sorted(zip(ids, labels, strict=True)) == [
            (13, 1),
            (14, 1),
            (15, 1),
            (16, 0),
            (17, 0),
        ]


def test_folder_train_epoch_is_permutation_and_processes_disjoint(folder):
    c = _folder_cfg(folder)
    it = data.train_iterator(c, num_devices=2)
    epoch = np.concatenate([_ids(next(it)["image"]) for _ in range(3)])
    assert sorted(epoch) == list(range(1, 13))
    seen = []
    for p in range(2):
        it = data.train_iterator(c, num_devices=1, process_index=p, process_count=2)
        seen.append({int(i) for _ in range(3) for i in _ids(next(it)["image"])})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(1, 13))


def test_two_processes_eval_equal_batches_disjoint(folder):
    c = _folder_cfg(folder, eval_batch_size=4)
    ids = []
    for p in range(2):
        batches = list(data.eval_iterator(c, num_devices=1, process_index=p, process_count=2))
        assert len(batches) == data.num_eval_batches(c, process_count=2) == 2
        ids.append([i for b in batches for i in _ids(b["image"])[b["mask"].reshape(-1)]])
    assert sorted(ids[0] + ids[1]) == [13, 14, 15, 16, 17] and not set(ids[0]) & set(ids[1])


def test_folder_sliced_split(folder):
    assert data.split_size(_folder_cfg(folder), "train[:50%]") == 6


# --------------------------------------------------------------- epoch boundaries
def _permutation(n, buffer, seed):
    perm = tf.data.Dataset.range(n).shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
    return list(perm.as_numpy_iterator())


def _epochs_one_after_another(order, buffer, seed, start, count, read_in_order=False):
    """Positions start.. of the reference stream: epoch e is the records alone shuffled with
    seed + e, and epochs follow each other (what train_iterator did with a flat_map). With
    read_in_order, epoch e first reads the records fully shuffled with seed + e + 2**61."""
    n, first = len(order), start // len(order)
    out = []
    for e in range(first, first + count // n + 2):
        read = [order[i] for i in _permutation(n, n, seed + e + 2**61)] if read_in_order else order
        out += [read[i] for i in _permutation(n, buffer, seed + e)]
    return out[start % n : start % n + count]


@pytest.mark.parametrize("start_step", [0, 1, 3, 12])  # 12 x 5 = 60: epoch 5 starts exactly
def test_train_order_is_epochs_shuffled_one_after_another(folder, start_step):
    """Over 3+ epochs, from step 0, resumed mid-epoch or exactly at an epoch boundary, the train
    stream is each epoch's files read in an order of its own, shuffled alone with seed + epoch,
    epochs concatenated."""
    c = _folder_cfg(folder, seed=3, batch_size=5, shuffle_buffer=5, eval_split="train")
    batches = list(data.eval_iterator(c, num_devices=1))  # the records in source order
    mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
    ids = np.concatenate([_ids(b["image"]) for b in batches])[mask]
    labels = np.concatenate([b["label"].reshape(-1) for b in batches])[mask]
    order = [(int(i), int(y)) for i, y in zip(ids, labels, strict=True)]
    assert len(order) == 12
    it = data.train_iterator(c, start_step=start_step, num_devices=1)
    got = []
    for _ in range(8):  # 40 examples: more than 3 epochs of 12, batches crossing the boundaries
        b = next(it)
        pairs = zip(_ids(b["image"]), b["label"].reshape(-1), strict=True)
        got += [(int(i), int(y)) for i, y in pairs]
    seed = (3 * 1_000_003 + 0) * 1_000_003  # the (seed, process 0) shuffle seed; epoch e adds e
    assert got == _epochs_one_after_another(order, 5, seed, start_step * 5, 40, True)


def test_a_tfds_split_read_from_disk_takes_its_shards_in_an_order_of_each_epochs_own(tmp_path):
    """Not cached in memory, each epoch reads the split's shard files in an order drawn from
    (seed, process, epoch), as big_vision's shuffled files, so a shuffle buffer smaller than
    the split does not give every epoch the stored order; a resume stays exact."""
    shards = sharded_tfds.prepare(str(tmp_path), shards=4)  # 4 files of 16 examples
    config = _config(dataset="sharded_digits", data_dir=str(tmp_path), image_size=8,
                     shuffle_buffer=1, batch_size=16, seed=1)  # buffer 1: the order as read
    config.pp.train_crop, config.pp.flip = "resize", False  # pixel value = example id

    def ids(batch):
        return batch["image"][0, :, 0, 0, 0].tolist()

    it = data.train_iterator(config, num_devices=1)
    stream = [ids(next(it)) for _ in range(12)]  # 3 epochs of 4 batches
    epochs = [sum(stream[4 * e:4 * e + 4], []) for e in range(3)]
    stored = sum(shards, [])
    for epoch in epochs:  # whole shards, each in its stored order, in a shuffled order
        assert sorted(epoch) == sorted(stored)
        assert sorted(epoch[16 * k:16 * k + 16] for k in range(4)) == sorted(shards)
    # seed 1's orders of the shards: 2 0 3 1, 2 0 1 3, 3 1 0 2 (one order in 24 is the stored)
    assert len({tuple(e) for e in [*epochs, stored]}) == 4, "every epoch reads its own order"
    resumed = data.train_iterator(config, start_step=6, num_devices=1)
    assert [ids(next(resumed)) for _ in range(6)] == stream[6:]


def _range_epochs(n, buffer, start, count, dropped=()):
    """The reference stream over records 0..n-1 (less `dropped`), seed 0 + epoch."""
    kept = [i for i in range(n) if i not in dropped]
    return _epochs_one_after_another(kept, buffer, 0, start, count)


def test_shuffled_epochs_from_any_start_equal_the_reference():
    """Resumed at chunk edges, mid-chunk, at and just after epoch boundaries (n=200 records,
    chunks of data._CHUNK), the record stream is the epochs shuffled one after another."""
    n, buffer = 200, 50
    records = tf.data.Dataset.range(n)
    for start in (0, 1, 63, 64, 65, 199, 200, 201, 450):
        ds = data._shuffled_epochs(lambda e: records, n, buffer, seed=0, start=start).take(500)
        assert list(ds.as_numpy_iterator()) == _range_epochs(n, buffer, start, 500), start


def test_shuffled_epochs_keep_their_turns_when_records_are_dropped():
    """A record that fails to read and is skipped (skip_corrupt) leaves its epoch one short:
    the epochs still follow each other, each a shuffle of the readable records."""
    n, buffer = 193, 50  # 193 = 3 chunks of 64 + 1: without record 7, one chunk fewer

    def fail_on_7(x):
        with tf.control_dependencies([tf.debugging.assert_none_equal(x, tf.constant(7, tf.int64))]):
            return tf.identity(x)

    records = tf.data.Dataset.range(n).map(fail_on_7).ignore_errors()
    ds = data._shuffled_epochs(lambda e: records, n, buffer, seed=0, start=0).take(4 * (n - 1))
    assert list(ds.as_numpy_iterator()) == _range_epochs(n, buffer, 0, 4 * (n - 1), {7})


def test_next_epoch_fills_its_shuffle_buffer_while_this_one_is_read():
    """One record before an epoch boundary, the next epoch's shuffle buffer is already full:
    its records were read while this epoch was consumed (a flat_map of epochs reads none yet),
    and no more than two epochs' buffers and a chunk each were read ahead."""
    reads = []

    def read(x):
        reads.append(int(x))
        return x

    n, buffer = 200, 50
    records = tf.data.Dataset.range(n).map(
        lambda x: tf.ensure_shape(tf.py_function(read, [x], tf.int64), [])
    )
    options = tf.data.Options()  # no read-ahead by tf.data beyond the pipeline's own
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    ds = data._shuffled_epochs(lambda e: records, n, buffer, seed=0, start=0).with_options(options)
    it = ds.as_numpy_iterator()
    got = [next(it) for _ in range(n - 1)]
    deadline = time.monotonic() + 5
    while len(reads) < n + buffer and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert n + buffer <= len(reads) <= n + 2 * (buffer + data._CHUNK)
    got += [next(it) for _ in range(2 * n + 1)]
    assert got == _range_epochs(n, buffer, 0, 3 * n)


# --------------------------------------------------------------- one-line errors
def test_unknown_dataset_suggests_close_name():
    with pytest.raises(DataError, match="did you mean .*'cifar10' or"):
        data.dataset_info(_config(dataset="cifar11"))


def test_not_prepared_says_how(tmp_path):
    c = _config(dataset="cifar100", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="not prepared.*TFDS_DATA_DIR"):
        data.train_iterator(c, num_devices=1)


def test_bad_split_lists_the_fix():
    with pytest.raises(DataError, match="bad split 'trian'"):
        data.split_size(_cifar(), "trian")


@pytest.mark.parametrize("key,split", [("eval_split", "test[:0]"), ("train_split", "train[5:5]")])
def test_empty_split_is_found_at_start_up(key, split):
    c = _cifar()
    c[key] = split
    with pytest.raises(DataError) as info:
        data.dataset_info(c)
    assert str(info.value) == (f"split {split!r} of 'cifar10' holds no examples: set "
                               f"config.{key} to a split or slice with some, e.g. 'test' or "
                               "'train[:90%]'")


def test_batch_not_divisible_by_devices():
    with pytest.raises(DataError, match="batch_size=32 is not divisible.*multiple of 3"):
        data.train_iterator(_cifar(), num_devices=3)


def test_unknown_pp_option():
    c = _cifar()
    c.pp.flipp = True
    with pytest.raises(DataError, match="unknown pp option"):
        data.train_iterator(c, num_devices=1)


@pytest.mark.parametrize("image_size,message", [
    ((0, 32), "config.image_size must be positive, got (0, 32): use e.g. 32 or (32, 48)"),
    (0, "config.image_size must be positive, got 0: use e.g. 32 or (32, 48)"),
    ((32,), "config.image_size must be an int or a pair of ints (height, width), got (32,): "
     "use e.g. 32 or (32, 48)"),
    ("32", "config.image_size must be an int or a pair of ints (height, width), got '32': "),
    ((32.0, 32), "config.image_size must be an int or a pair of ints (height, width), got "
     "(32.0, 32): "),
    (True, "config.image_size must be an int or a pair of ints (height, width), got True: "),
])
def test_a_bad_image_size_is_one_line(image_size, message):
    with pytest.raises(DataError) as info:
        data.validate_data_keys(_config(image_size=image_size))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("image_size", [32, (32, 48), [48, 32], np.int64(32), (np.int64(8), 16)])
def test_image_size_is_an_int_or_a_height_width_pair(image_size):
    c = config_schema.default_config()
    c.image_size = image_size  # as a config file sets it
    config_schema.validate_config(c)


def test_eval_resize_is_checked_against_the_shorter_side():
    c = config_schema.default_config()
    c.image_size, c.pp.eval_resize = (40, 24), 23
    with pytest.raises(DataError, match=r"eval_resize=23 is smaller than image_size=\(40, 24\); "
                       r"the central crop needs eval_resize >= image_size \(its shorter side: 24"):
        config_schema.validate_config(c)
    c.pp.eval_resize = 24
    config_schema.validate_config(c)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.dataset_info(_folder_cfg(tmp_path / "nope"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        data.dataset_info(_folder_cfg(tmp_path))
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no"):
        data.dataset_info(_folder_cfg(tmp_path))


def test_folder_files_the_pipeline_cannot_decode_are_named_or_skipped(tmp_path):
    """A TIFF named .png (PIL reads it, TensorFlow's decoder does not) and random bytes: named
    in one line, or skipped with skip_corrupt, leaving exactly the good images."""
    for split, cls, value in (("train", "cat", 10), ("train", "dog", 20), ("test", "cat", 10)):
        (tmp_path / split / cls).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / split / cls / "c.png")
    tiff = tmp_path / "train" / "cat" / "a_tiff.png"
    Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(tiff, format="TIFF")
    (tmp_path / "train" / "dog" / "b_random.png").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError) as info:
        next(data.train_iterator(_folder_cfg(tmp_path, batch_size=2), num_devices=1))
    message = str(info.value)  # the first bad file in the split's (shuffled) order
    random_file = tmp_path / "train" / "dog" / "b_random.png"
    if str(random_file) in message:
        assert message.startswith(f"corrupt or unreadable image file {str(random_file)!r} ")
        assert message.endswith("); remove or replace it, or set skip_corrupt=True to skip such "
                                "files") and "\n" not in message
        random_file.unlink()
        batches = data.train_iterator(_folder_cfg(tmp_path, batch_size=2), num_devices=1)
        with pytest.raises(DataError) as info:
            for _ in range(3):  # an epoch of 3 files: the TIFF is in the first two batches
                next(batches)
        message = str(info.value)
        Path(random_file).write_bytes(bytes(range(256)) * 4)
    assert message.startswith(f"image file {str(tiff)!r} is TIFF, which the input pipeline "
                              "cannot decode (Unknown image file format. One of JPEG")
    assert message.endswith("): convert it or remove it, or set skip_corrupt=True to skip such "
                            "files") and "\n" not in message
    skipping = _folder_cfg(tmp_path, batch_size=2, skip_corrupt=True)
    assert data.dataset_info(skipping).split_sizes["train"] == 2
    batch = next(data.train_iterator(skipping, num_devices=1))
    assert sorted(_ids(batch["image"]).tolist()) == [1, 2]
    # test/ holds one image: of three processes, the two with no example pad alone
    three = _folder_cfg(tmp_path, eval_batch_size=3, skip_corrupt=True)
    masks = [np.concatenate([b["mask"].reshape(-1) for b in data.eval_iterator(
        three, "test", num_devices=1, process_index=i, process_count=3)]) for i in range(3)]
    assert [m.tolist() for m in masks] == [[True], [False], [False]]


# --------------------------------------------------------------- class subset
def test_cifar_class_subset_relabels_counts_and_evals_each_once():
    c = _cifar(classes=[9, 5, 0], eval_split="test[:200]", train_split="train[:300]")
    raw = tfds.load("cifar10", split="test[:200]", data_dir=CIFAR_DIR, download=False)
    raw = [(r["image"], int(r["label"])) for r in tfds.as_numpy(raw)]
    kept = [(im, [9, 5, 0].index(y)) for im, y in raw if y in (9, 5, 0)]
    info = data.dataset_info(c)
    assert info.num_classes == 3 and info.class_names == ("truck", "dog", "airplane")
    assert info.split_sizes["test[:200]"] == len(kept) == data.split_size(c, "test[:200]")
    batches = list(data.eval_iterator(c, num_devices=2))
    assert len(batches) == data.num_eval_batches(c) == -(-len(kept) // 32)
    mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
    labels = np.concatenate([b["label"].reshape(-1) for b in batches])[mask]
    images = np.concatenate([b["image"].reshape(-1, 32, 32, 3) for b in batches])[mask]
    np.testing.assert_array_equal(labels, [y for _, y in kept])
    np.testing.assert_array_equal(images, np.stack([im for im, _ in kept]))
    train = data.train_iterator(c, num_devices=1)
    seen = np.concatenate([next(train)["label"].reshape(-1) for _ in range(10)])
    assert set(seen) == {0, 1, 2}


def test_class_subset_processes_uneven_parts_still_exact():
    c = _cifar(classes=[1], eval_split="test[:100]", eval_batch_size=6)
    total = data.split_size(c, "test[:100]")
    counts = []
    for p in range(3):  # test[:100] has label 1 unevenly spread over the three parts
        batches = list(data.eval_iterator(c, num_devices=1, process_index=p, process_count=3))
        assert len(batches) == data.num_eval_batches(c, process_count=3)
        counts.append(sum(int(b["mask"].sum()) for b in batches))
        assert all((b["label"][b["mask"]] == 0).all() for b in batches)
    assert sum(counts) == total and len(set(counts)) > 1


def test_a_joined_split_over_three_processes_counts_every_example_once():
    """even_splits cuts each part of "a+b" on its own: the parts hold 51, 50 and 49 examples,
    more than ceil(150 / 3) on process 0, and none may be dropped."""
    c = _cifar(eval_batch_size=30)
    split = "train[:100]+test[:50]"
    assert [data.split_size(c, split)] == [150]
    seen = 0
    for p in range(3):
        batches = list(data.eval_iterator(c, split, num_devices=1, process_index=p,
                                          process_count=3))
        assert len(batches) == data.num_eval_batches(c, split, process_count=3) == 6
        seen += sum(int(b["mask"].sum()) for b in batches)
    assert seen == 150


def test_more_processes_than_examples_give_the_extra_ones_masked_batches():
    c = _cifar(eval_batch_size=8)
    counts = [sum(int(b["mask"].sum()) for b in data.eval_iterator(
        c, "test[:3]", num_devices=1, process_index=p, process_count=4)) for p in range(4)]
    assert counts == [1, 1, 1, 0]
    # training has no such padding: every process refuses alike, naming the empty part (one
    # raising alone would leave the others waiting in the first collective)
    train = _cifar(train_split="train[:3]", batch_size=4)
    for p in range(4):
        with pytest.raises(DataError, match=r"^split 'train\[:3\]' of 'cifar10' has no examples "
                                            r"for process 3 of 4; use a larger split$"):
            next(data.train_iterator(train, num_devices=1, process_index=p, process_count=4))


def test_stratified_order_spreads_every_class_evenly():
    """Over 200 random class sizes (2-11 classes of 1-79 examples), each class's count in every
    prefix stays within 2 of its share; the order is a permutation, fixed by its seed, and not
    sorted by class."""
    rng = np.random.default_rng(1)
    for seed in range(200):
        sizes = rng.integers(1, 80, rng.integers(2, 12))
        labels = np.repeat(np.arange(len(sizes)), sizes)
        order = image_folders.stratified_order(labels, seed)
        assert sorted(order.tolist()) == list(range(len(labels)))
        np.testing.assert_array_equal(order, image_folders.stratified_order(labels, seed))
        counts = (labels[order][:, None] == np.arange(len(sizes))).cumsum(0)
        shares = np.arange(1, len(labels) + 1)[:, None] * sizes / len(labels)
        assert np.abs(counts - shares).max() < 2, (seed, sizes)
    plain = np.repeat(np.arange(4), 25)
    assert not (np.diff(plain[image_folders.stratified_order(plain)]) >= 0).all()


def test_folder_splits_are_ordered_once_so_slices_and_parts_hold_every_class(tmp_path):
    for cls in ("a", "b", "c", "d"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / cls /
                                                               f"{i}.png")
    c = _folder_cfg(tmp_path)
    src = sources.open_source(c)
    head, tail = src.labels("train[:75%]"), src.labels("train[75%:]")
    assert len(head) == 30 and len(tail) == 10
    assert all(np.bincount(tail, minlength=4) >= 1) and all(np.bincount(head) >= 6)
    assert all(np.bincount(src.labels("train", p, 2), minlength=4).min() >= 4 for p in range(2))
    np.testing.assert_array_equal(src.labels("train"), sources.open_source(c).labels("train"))


def test_a_folder_scan_sees_files_and_classes_added_later(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / cls / "0.png")
    c = _folder_cfg(tmp_path, eval_split="train")
    assert data.dataset_info(c).split_sizes == {"train": 2}
    (tmp_path / "train" / "c").mkdir()
    for name in ("0.png", "1.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "c" / name)
    info = data.dataset_info(c)
    assert info.class_names == ("a", "b", "c") and info.split_sizes == {"train": 4}


def test_a_class_subset_of_a_folder_counts_files_added_later(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "test" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "test" / cls / "0.png")
    c = _folder_cfg(tmp_path, eval_split="test", eval_batch_size=4)
    c.classes = (1,)
    assert sum(int(b["mask"].sum()) for b in data.eval_iterator(c)) == 1
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "test" / "b" / "1.png")
    assert sum(int(b["mask"].sum()) for b in data.eval_iterator(c)) == 2


@pytest.mark.parametrize("name,message", [
    ("cifar10:9.9.9", "dataset 'cifar10:9.9.9' cannot be built: Dataset cifar10 cannot be loaded "
     "at version 9.9.9, only: 3.0.2; fix the name, config or version"),
    ("a b", "dataset 'a b' is neither a TFDS name (name[/config][:version], e.g. 'cifar10' or "
     "'cifar10:3.0.2') nor an image folder ('folder:/path/root')"),
])
def test_a_tfds_name_that_cannot_be_built_is_one_line(name, message):
    c = _config(dataset=name, data_dir=CIFAR_DIR)
    with pytest.raises(DataError) as err:
        data.dataset_info(c)
    assert str(err.value) == message


def test_a_folder_dataset_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "e.json").write_text("{}")
    c = _folder_cfg(tmp_path / "e.json")
    with pytest.raises(DataError, match="image folder '.*e.json' is a file, not a folder"):
        data.dataset_info(c)


def test_a_folder_dataset_without_a_path_is_one_line():
    c = data.default_config()
    c.dataset = "folder:"
    with pytest.raises(DataError, match="dataset='folder:' names no folder; use "
                                        "dataset='folder:/path/root'"):
        data.dataset_info(c)


def test_a_link_to_nothing_in_a_folder_is_named_or_skipped(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "a" / "0.png")
    (tmp_path / "train" / "a" / "1.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "train" / "a" / "dir.jpg").mkdir()  # a folder named like an image: not a file
    with pytest.raises(DataError, match=r"image file '.*1\.png' is a link to nothing; fix or "
                                        "remove the link, or set skip_corrupt=True to skip it"):
        data.dataset_info(_folder_cfg(tmp_path, eval_split="train"))
    skipping = _folder_cfg(tmp_path, skip_corrupt=True, eval_split="train")
    assert data.dataset_info(skipping).split_sizes == {"train": 1}


def test_a_file_removed_after_the_scan_is_one_line(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "a" / f"{i}.png")
    c = _folder_cfg(tmp_path)
    src = sources.open_source(c)
    (tmp_path / "train" / "a" / "2.png").unlink()
    ds = src.read("train").map(lambda r: r["label"])
    with pytest.raises(DataError, match=r"an image file of .* split 'train' could not be read "
                                        r"\(.*2\.png.*\); restore or remove it"):
        data._raise_for_bad_file(src, "train")
    del ds


def test_a_dataset_without_image_and_class_label_is_one_line():
    builder = types.SimpleNamespace(name="div2k", info=types.SimpleNamespace(
        supervised_keys=("lr", "hr"),
        features=tfds.features.FeaturesDict({"lr": tfds.features.Image(),
                                             "hr": tfds.features.Image()})))
    with pytest.raises(DataError, match=r"dataset 'div2k' is not an image-classification dataset "
                                        r"\(features: lr, hr; one image and one class label"):
        sources._classification_features(builder)
    captions = types.SimpleNamespace(name="celeb_a", info=types.SimpleNamespace(
        supervised_keys=None, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(), "landmarks": tfds.features.Tensor(
                shape=(2,), dtype=np.int64)})))
    with pytest.raises(DataError, match="'celeb_a' is not an image-classification dataset"):
        sources._classification_features(captions)
    cifar = tfds.builder("cifar10", data_dir=CIFAR_DIR)
    assert sources._classification_features(cifar)[:2] == ("image", "label")


def test_folder_class_subset(folder):
    c = _folder_cfg(folder, classes=[1])  # "dog": train images 1-6, test 13-15
    info = data.dataset_info(c)
    assert info.class_names == ("dog",) and info.split_sizes == {"train": 6, "test": 3}
    batches = list(data.eval_iterator(c, num_devices=1))
    ids = [i for b in batches for i in _ids(b["image"])[b["mask"].reshape(-1)]]
    assert sorted(ids) == [13, 14, 15] and all((b["label"] == 0).all() for b in batches)
    train = data.train_iterator(c, num_devices=1)
    two_epochs = np.concatenate([_ids(next(train)["image"]) for _ in range(3)])
    assert sorted(two_epochs) == sorted(list(range(1, 7)) * 2)


@pytest.mark.parametrize(
    "classes, match",
    [([10], "holds 10"), ([2, 2], "id 2 twice"), ([], "keeps no examples"), ([1.5], "holds 1.5")],
)
def test_bad_class_ids(classes, match):
    with pytest.raises(DataError, match=match):
        data.dataset_info(_cifar(classes=classes))


def _cifar_with_train_shard_cut(tmp_path, keep_bytes: int) -> str:
    """A copy of the shipped CIFAR-10 whose train shard keeps only its first `keep_bytes`."""
    source = Path(CIFAR_DIR) / "cifar10" / "3.0.2"
    copy = tmp_path / "cifar10" / "3.0.2"
    copy.mkdir(parents=True)
    for path in source.iterdir():
        if "train.tfrecord" in path.name:
            with path.open("rb") as whole:
                (copy / path.name).write_bytes(whole.read(keep_bytes))
        else:
            (copy / path.name).symlink_to(path)
    return str(tmp_path)


def test_a_damaged_shard_with_skip_corrupt_trains_on_what_reads_and_never_hangs(tmp_path):
    """A truncated TFRecord shard: TFDS's cardinality check would fail on every read after it,
    so skip_corrupt reads without it, trains on the records before the damage (here about 400
    of 50,000), across epoch boundaries, and when nothing reads says so in one line."""
    cut = _cifar_with_train_shard_cut(tmp_path / "cut", 1 << 20)
    config = _cifar(data_dir=cut, train_split="train", skip_corrupt=True, shuffle_buffer=512)
    it = data.train_iterator(config, num_devices=1)
    labels = np.concatenate([next(it)["label"].ravel() for _ in range(30)])  # > 2 epochs
    assert len(labels) == 960 and len(set(labels.tolist())) == 10

    empty = _cifar_with_train_shard_cut(tmp_path / "empty", 100)
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        next(data.train_iterator(_cifar(data_dir=empty, train_split="train", skip_corrupt=True),
                                 num_devices=1))
    assert str(info.value) == (
        "no readable example in split 'train' of 'cifar10' (process 0 of 1): skip_corrupt=True "
        "skips unreadable examples, but every one is; check or replace the data files")
    assert time.monotonic() - started < 60
    with pytest.raises(DataError, match="unreadable example in 'cifar10' split 'train' .*; set "
                                        "skip_corrupt=True to skip such examples"):
        next(data.train_iterator(_cifar(data_dir=empty, train_split="train"), num_devices=1))


def test_a_damaged_shard_with_skip_corrupt_resumes_exactly_across_epochs(tmp_path):
    """Records lost to a damaged shard are made up by repeating the ones that read, so each
    epoch keeps its 1,000 records: a run resumed at any step, before or after an epoch
    boundary, sees the batches the uninterrupted run saw (before, it resumed `step x batch`
    records into a stream whose epochs were shorter)."""
    cut = _cifar_with_train_shard_cut(tmp_path, 1 << 20)
    config = _cifar(data_dir=cut, train_split="train[:1000]", skip_corrupt=True)
    whole = data.train_iterator(config, num_devices=1)
    steps = [next(whole) for _ in range(70)]  # 2.2 epochs of 1,000 records
    plain = _cifar(data_dir=cut, train_split="train[:1000]", skip_corrupt=True)
    plain.pp.train_crop, plain.pp.flip = "resize", False  # an image identifies its record
    unaugmented = data.train_iterator(plain, num_devices=1)
    first_epoch = np.concatenate([next(unaugmented)["image"].reshape(32, -1) for _ in range(31)])
    assert 300 < len(np.unique(first_epoch, axis=0)) < 600  # about 400 read: repeated to fill
    for start in (1, 30, 31, 32, 62, 63):
        resumed = data.train_iterator(config, start_step=start, num_devices=1)
        for step in range(start, start + 5):
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], steps[step]["image"], err_msg=str(step))
            np.testing.assert_array_equal(got["label"], steps[step]["label"], err_msg=str(step))


def _png(value: int) -> bytes:
    return tf.io.encode_png(tf.fill([4, 4, 3], tf.constant(value, tf.uint8))).numpy()


def test_undecodable_records_go_before_the_shuffle_and_the_readable_fill_the_epoch():
    records = tf.data.Dataset.from_tensor_slices(
        {"encoded": [_png(0), b"not an image", _png(2), _png(3)], "label": [0, 1, 2, 3]})
    readable = unreadable.readable_records(records, check_decode=True)
    assert [r["label"] for r in readable.as_numpy_iterator()] == [0, 2, 3]
    epoch = unreadable.filled_epoch(readable, 7)
    assert [r["label"] for r in epoch.as_numpy_iterator()] == [0, 2, 3, 0, 2, 3, 0]
    assert [r["encoded"] for r in epoch.as_numpy_iterator()][3] == _png(0)
    unchecked = unreadable.readable_records(records, check_decode=False)
    assert [r["label"] for r in unchecked.as_numpy_iterator()] == [0, 1, 2, 3]
