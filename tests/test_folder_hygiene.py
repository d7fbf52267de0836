"""Tests for image folders as users' disks hold them: hidden entries (Jupyter, macOS), images in
subfolders of class folders, classes missing from a split, relative paths, folder-layout errors."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from vit import data, sources
from vit.data import DataError

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X"  # the start of a macOS ._ file


def _image(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def _layout(root, files):
    """Writes root/<relative path> images (a value each) and returns root."""
    for i, rel in enumerate(files):
        _image(root / rel, i)
    return root


def _cfg(root, **kw):
    c = data.default_config()
    base = dict(dataset=f"folder:{root}", image_size=4, batch_size=2, eval_batch_size=2,
                shuffle_buffer=10, train_split="train", eval_split="train")
    c.update({**base, **kw})
    c.pp.update(dict(train_crop="resize", flip=False))
    return c


def _read(src, split):
    """(path relative to the split folder, label) of every record of a split, in order."""
    root = src.name[len(sources.FOLDER_PREFIX):]
    records = src.read(split).as_numpy_iterator()
    return [(os.path.relpath(r["path"].decode(), os.path.join(root, split)), int(r["label"]))
            for r in records]


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


REAL = [f"train/{c}/{i}.png" for c in ("cat", "dog") for i in range(3)] + ["test/cat/0.png",
                                                                           "test/dog/0.png"]


def test_hidden_entries_are_skipped_at_every_level_and_the_order_is_unchanged(tmp_path):
    clean = _layout(tmp_path / "clean", REAL)
    messy = _layout(tmp_path / "messy", REAL + [
        ".ipynb_checkpoints/train/cat/0.png",  # a hidden folder at the root: not a split
        "__MACOSX/train/cat/0.png",
        "train/.ipynb_checkpoints/0.png",  # a hidden folder in a split: not a class
        "train/__MACOSX/cat/0.png",
        "train/cat/.hidden.png",  # a hidden image in a class folder: not read
    ])
    for name in ("train/cat/._0.png", "train/dog/._2.png", "test/cat/._0.png", "__MACOSX/._x"):
        (messy / name).write_bytes(APPLEDOUBLE)
    (messy / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    src = sources.open_source(_cfg(messy))
    assert src.class_names == ("cat", "dog") and src.split_sizes == {"train": 6, "test": 2}
    want = sources.open_source(_cfg(clean))
    assert _read(src, "train") == _read(want, "train") and _read(src, "test") == _read(want,
                                                                                       "test")
    assert sorted(_read(src, "train")) == [(f"{c}/{i}.png", y) for y, c in enumerate(("cat",
                                                                                      "dog"))
                                           for i in range(3)]
    batches = data.train_iterator(_cfg(messy), num_devices=1)
    assert all(next(batches)["image"].shape == (1, 2, 4, 4, 3) for _ in range(6))  # 2 epochs


def test_a_root_with_only_hidden_folders_has_no_split_folders(tmp_path):
    _layout(tmp_path, [".ipynb_checkpoints/cat/0.png", "__MACOSX/train/cat/0.png"])
    with pytest.raises(DataError) as info:
        sources.open_source(_cfg(tmp_path))
    assert str(info.value) == (f"image folder {str(tmp_path)!r} has no split folders; lay it out "
                               "as root/<split>/<class>/*.jpg")


def test_a_class_folder_of_hidden_files_only_holds_no_images(tmp_path):
    _layout(tmp_path, ["train/cat/0.png", "train/dog/.0.png"])
    (tmp_path / "train" / "dog" / "._0.png").write_bytes(APPLEDOUBLE)
    with pytest.raises(DataError) as info:
        sources.open_source(_cfg(tmp_path))
    assert str(info.value) == (f"class folder {str(tmp_path / 'train' / 'dog')!r} holds no "
                               ".jpg/.jpeg/.png images; add some or remove it")


def test_images_in_subfolders_of_class_folders_are_not_read_and_warned_of_once(tmp_path,
                                                                               caplog):
    _layout(tmp_path, REAL + ["train/dog/nested/deep.jpg", "train/dog/nested/deeper/x.png",
                              "train/cat/b/1.png", "train/cat/a/notes/.hidden.png",
                              "train/cat/.ipynb_checkpoints/0.png", "test/dog/zz/0.png"])
    (tmp_path / "train" / "cat" / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        src = sources.open_source(_cfg(tmp_path))
        sources.open_source(_cfg(tmp_path))  # the scan is cached: no second warning
    assert src.split_sizes == {"train": 6, "test": 2}
    assert _warnings(caplog) == [
        f"folder:{tmp_path} split 'test': skipped 1 image in subfolders of class folders "
        "(e.g. dog/zz); only a class folder's own files are read",
        f"folder:{tmp_path} split 'train': skipped 3 images in subfolders of class folders "
        "(e.g. cat/b); only a class folder's own files are read",
    ]


def test_classes_without_images_in_a_split_are_warned_of_once_per_split(tmp_path, caplog):
    _layout(tmp_path, REAL + ["test/bird/0.png"])
    c = _cfg(tmp_path, eval_split="test")
    with caplog.at_level(logging.WARNING):
        assert data.dataset_info(c).class_names == ("bird", "cat", "dog")
        assert _warnings(caplog) == []  # nothing is read yet
        batches = data.train_iterator(c, num_devices=1)
        for _ in range(7):  # over two epochs of 3 batches
            next(batches)
        for _ in range(2):
            list(data.eval_iterator(c, num_devices=1))
        data.train_iterator(c, num_devices=1)
    assert _warnings(caplog) == [f"folder:{tmp_path} split 'train' has no images of 1 class(es): "
                                 "bird; their head units are never trained in it"]


def test_unseen_classes_are_those_of_the_class_subset_and_slice_read(tmp_path, caplog):
    _layout(tmp_path, ["train/a/0.png", "train/b/0.png", "test/c/0.png", "test/d/0.png"])
    with caplog.at_level(logging.WARNING):
        sources.open_source(_cfg(tmp_path, classes=(1, 0))).read("train")  # b, a: both in it
        sources.open_source(_cfg(tmp_path, classes=(3, 0, 2))).read("train")
        sources.open_source(_cfg(tmp_path)).read("train[:1]+test")
    first = sources.open_source(_cfg(tmp_path)).labels("train[:1]")[0]  # a or b: the fixed order
    assert _warnings(caplog) == [
        f"folder:{tmp_path} split 'train' has no images of 2 class(es): d, c; their head units "
        "are never trained in it",
        f"folder:{tmp_path} split 'train[:1]+test' has no images of 1 class(es): {'ba'[first]}; "
        "their head units are never trained in it",
    ]


def test_absolute_dataset_makes_a_folder_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sources.absolute_dataset("folder:data/pets") == f"folder:{tmp_path}/data/pets"
    assert sources.absolute_dataset("folder:./a/../b/") == f"folder:{tmp_path}/b"
    assert sources.absolute_dataset("folder:~/pets") == f"folder:{tmp_path}/home/pets"
    assert sources.absolute_dataset("folder:/data/pets") == "folder:/data/pets"
    for name in ("cifar10", "imagenet2012:5.1.0", "oxford_iiit_pet/3.2.0"):
        assert sources.absolute_dataset(name) == name
    with pytest.raises(DataError, match="dataset='folder: ' names no folder"):
        sources.absolute_dataset("folder: ")


def test_the_skip_corrupt_warning_names_the_first_three_files(tmp_path, caplog):
    _layout(tmp_path, ["train/a/0.png", "train/b/0.png"])
    bad = ["train/a/1.png", "train/a/2.jpg", "train/b/1.png", "train/b/2.png"]
    for name in bad:
        (tmp_path / name).write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        src = sources.open_source(_cfg(tmp_path, skip_corrupt=True))
    assert src.split_sizes == {"train": 2}
    first = ", ".join(repr(str(tmp_path / name)) for name in bad[:3])
    assert _warnings(caplog) == [f"skipping 4 corrupt image files in train: {first}, ..."]


def test_a_split_folder_named_as_the_root_says_to_name_the_folder_above(tmp_path):
    _layout(tmp_path, ["train/cat/0.png", "train/dog/0.png"])  # torchvision's ImageFolder layout
    root = tmp_path / "train"
    with pytest.raises(DataError) as info:
        sources.open_source(_cfg(root))
    assert str(info.value) == (
        f"split folder {str(root / 'cat')!r} has no class folders but holds images itself: the "
        f"subfolders of {str(root)!r} hold images directly, as class folders do, not "
        f"<split>/<class>/<image>; use dataset='folder:{tmp_path}' if {str(root)!r} is a split "
        f"folder, or put its classes in {str(root / 'train')!r}")


def test_a_split_folder_with_only_hidden_images_has_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "._0.png").write_bytes(APPLEDOUBLE)
    _image(tmp_path / "train" / ".1.png")
    with pytest.raises(DataError) as info:
        sources.open_source(_cfg(tmp_path))
    assert str(info.value) == (f"split folder {str(tmp_path / 'train')!r} has no class folders; "
                               "lay it out as root/<split>/<class>/*.jpg")


def test_an_unlabelled_split_beside_labelled_ones_is_skipped_with_a_warning(tmp_path, caplog):
    """Kaggle's layout: train/<class>/ beside a test/ of bare images, which has no labels."""
    _layout(tmp_path, ["train/cat/0.png", "train/dog/0.png", "test/0.png", "test/1.png"])
    with caplog.at_level(logging.WARNING):
        src = sources.open_source(_cfg(tmp_path))
    assert src.split_sizes == {"train": 2} and src.class_names == ("cat", "dog")
    assert _warnings(caplog) == [
        f"folder:{tmp_path}: split folder {str(tmp_path / 'test')!r} has no class folders "
        "(unlabelled images?), so it is not a split here"]
    with pytest.raises(DataError, match=r"bad split 'test' for folder .* \(splits: \['train'\]\)"):
        sources.open_source(_cfg(tmp_path)).size("test")


def test_a_file_name_that_is_not_utf8_reads_like_any_other(tmp_path):
    """A Latin-1 archive's name: the OS hands Python surrogate escapes, TensorFlow takes bytes."""
    _layout(tmp_path, ["train/cat/0.png", "train/dog/0.png"])
    latin1 = os.path.join(os.fsencode(tmp_path), b"train", b"dog", b"caf\xe9.png")
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(os.fsdecode(latin1), format="PNG")
    config = _cfg(tmp_path, batch_size=3, shuffle_buffer=3)
    assert data.dataset_info(config).split_sizes == {"train": 3}
    batch = next(data.train_iterator(config, num_devices=1))
    assert sorted(batch["image"][0, :, 0, 0, 0].tolist())[-1] == 200
