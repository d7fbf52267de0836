"""Tests for vit.data: TFDS (mocked and the shipped CIFAR-10), image folders, sharding, errors."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vit import data
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
    """Recovers the per-image value k from flat images normalised to [-1, 1]."""
    return np.round((images[..., 0, 0, 0].reshape(-1) + 1) * 127.5 / 10).astype(int)


# --------------------------------------------------------------- real CIFAR-10
def test_cifar_train_batches_shapes_dtypes():
    batch = next(data.train_iterator(_cifar(), num_devices=2))
    assert batch["image"].shape == (2, 16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 16) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert set(np.unique(batch["label"])) <= set(range(10))


def test_cifar_eval_matches_raw_tfds_pixels():
    c = _cifar()
    raw = tfds.load("cifar10", split="test[:100]", data_dir=CIFAR_DIR, download=False)
    raw = list(tfds.as_numpy(raw))
    batches = list(data.eval_iterator(c, num_devices=1))
    images = np.concatenate([b["image"][0] for b in batches])
    labels = np.concatenate([b["label"][0] for b in batches])
    mask = np.concatenate([b["mask"][0] for b in batches])
    assert mask.sum() == 100 and len(mask) == 128 and not mask[100:].any()
    np.testing.assert_allclose(
        images[:100], np.stack([r["image"] for r in raw]) / 127.5 - 1, atol=1e-6
    )
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


def test_mock_train_inception_randaugment_shapes():
    c = _config(dataset="cifar100", batch_size=8, image_size=24, shuffle_buffer=16)
    c.pp.update(dict(train_crop="inception", randaugment_num_ops=2, normalize="imagenet"))
    with tfds.testing.mock_data(num_examples=20):
        batch = next(data.train_iterator(c, num_devices=2))
    assert batch["image"].shape == (2, 4, 24, 24, 3) and batch["label"].shape == (2, 4)


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


def test_corrupt_image_named_or_skipped(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            path = tmp_path / "train" / cls / f"{i}.png"
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    (tmp_path / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    c = _folder_cfg(tmp_path, eval_split="train", eval_batch_size=8)
    with pytest.raises(DataError, match="broken.jpg"):
        list(data.eval_iterator(c, num_devices=1))
    c.skip_corrupt = True
    batches = list(data.eval_iterator(c, num_devices=1))
    assert sum(int(b["mask"].sum()) for b in batches) == 6


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


def test_batch_not_divisible_by_devices():
    with pytest.raises(DataError, match="batch_size=32 is not divisible.*multiple of 3"):
        data.train_iterator(_cifar(), num_devices=3)


def test_unknown_pp_option():
    c = _cifar()
    c.pp.flipp = True
    with pytest.raises(DataError, match="unknown pp option"):
        data.train_iterator(c, num_devices=1)


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
    np.testing.assert_allclose(images, np.stack([im for im, _ in kept]) / 127.5 - 1, atol=1e-6)
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
