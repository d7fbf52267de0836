"""The image-folder layout: which files each split of root/<split>/<class>/ holds.

Class names are the class folders' names over all splits, sorted; a split's files come in one
fixed stratified order (seed 0: `stratified_order`), so that every slice of it holds each class
in proportion. Hidden names (`is_hidden`: .ipynb_checkpoints, macOS's ._x.png
AppleDouble files, __MACOSX) are skipped at every level, images in subfolders of a class folder
are not read (one warning says so), and a scan is kept until a folder's modification time
changes. `vit/sources.py` reads the files as a `Source`.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent import futures

import numpy as np

from vit import preprocess as pp_ops
from vit.error_text import first_names
from vit.preprocess import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FOLDER_PREFIX = "folder:"


def absolute_dataset(name: str) -> str:
    """`name` with the path of a "folder:" dataset made absolute (~ expanded); others as is."""
    return FOLDER_PREFIX + folder_root(name) if name.startswith(FOLDER_PREFIX) else name


def is_hidden(name: str) -> bool:
    """Whether a folder listing skips `name`: a dot name (.ipynb_checkpoints, macOS ._x.png
    AppleDouble files) or macOS's __MACOSX folder."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    """Whether a listing reads `name` as an image: a visible .jpg / .jpeg / .png name (any
    case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(name)


def _visible_names(directory: str) -> list[str]:
    """The names in `directory`, sorted, hidden ones (`is_hidden`) left out."""
    return sorted(n for n in os.listdir(directory) if not is_hidden(n))


def _subfolders(directory: str) -> list[str]:
    """The names of the visible folders in `directory`, sorted."""
    return [n for n in _visible_names(directory) if os.path.isdir(os.path.join(directory, n))]


def _images_in(directory: str, skip_corrupt: bool) -> tuple[list[str], list[str]]:
    """(image files, subfolder names) of a class folder, sorted; an image name that is a link to
    nothing is a DataError naming it (skipped with a warning under skip_corrupt)."""
    found, subfolders = [], []
    for name in _visible_names(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            subfolders.append(name)
            continue
        if not is_image_name(name):
            continue
        if not os.path.isfile(path):
            if not skip_corrupt:
                raise DataError(f"image file {path!r} is a link to nothing; fix or remove the "
                                "link, or set skip_corrupt=True to skip it")
            log.warning("skipping %s: a link to nothing", path)
            continue
        found.append(path)
    return found, subfolders


def _images_below(directory: str) -> int:
    """How many visible image files `directory` and its visible subfolders hold, at any depth."""
    count = 0
    for _, folders, names in os.walk(directory):
        folders[:] = [f for f in folders if not is_hidden(f)]
        count += sum(map(is_image_name, names))
    return count


def _is_readable(path: str) -> bool:
    try:
        pp_ops.check_pipeline_decodes(path)
        return True
    except DataError:
        return False


def scan_folder(root: str, skip_corrupt: bool) -> tuple[tuple[str, ...], dict]:
    """Lists root/<split>/<class>/ images: (sorted class names, {split: [(path, label), ...]}).

    Each split's files come in one fixed order (seed 0), as TFDS stores a prepared split, but
    stratified (`stratified_order`): slices such as "train[98%:]" and the processes' parts hold
    every class in proportion to its share of the split. The scan
    is cached until a folder's modification time changes (a file or class added or removed).
    Hidden names (`is_hidden`) are skipped at every level.
    """
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"image folder {root!r} is a file, not a folder; use "
                        "dataset='folder:/path/root' with root/<split>/<class>/ image folders")
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist; use dataset='folder:/path/root'")
    return _scan_folder_once(root, skip_corrupt, folder_times(root))


def folder_times(root: str) -> tuple[int, ...]:
    """Modification times of root, its split folders and their class folders."""
    times = [os.stat(root).st_mtime_ns]
    for split in _subfolders(root):
        split_dir = os.path.join(root, split)
        times.append(os.stat(split_dir).st_mtime_ns)
        times += [os.stat(os.path.join(split_dir, c)).st_mtime_ns for c in _subfolders(split_dir)]
    return tuple(times)


def _no_class_folders(root: str, split: str) -> str:
    """The error for a split folder without class folders; when it holds images itself, `root`
    is likely a split folder (root/<class>/<image>, torchvision's ImageFolder layout)."""
    split_dir = os.path.join(root, split)
    if not any(is_image_name(n) and os.path.isfile(os.path.join(split_dir, n))
               for n in os.listdir(split_dir)):
        return (f"split folder {split_dir!r} has no class folders; lay it out as "
                "root/<split>/<class>/*.jpg")
    return (f"split folder {split_dir!r} has no class folders but holds images itself: the "
            f"subfolders of {root!r} hold images directly, as class folders do, not "
            f"<split>/<class>/<image>; use dataset='folder:{os.path.dirname(root)}' if {root!r} "
            f"is a split folder, or put its classes in {os.path.join(root, 'train')!r}")


def _split_files(root: str, split: str, classes: list[str], class_names: tuple[str, ...],
                 skip_corrupt: bool) -> list[tuple[str, int]]:
    """[(path, label), ...] of a split folder's class folders `classes`; one warning for the
    images in their subfolders, which are not read."""
    files, nested = [], []
    for c in classes:
        class_dir = os.path.join(root, split, c)
        images, subfolders = _images_in(class_dir, skip_corrupt)
        if not images:
            raise DataError(f"class folder {class_dir!r} holds no {'/'.join(IMAGE_EXTENSIONS)} "
                            "images; add some or remove it")
        files += [(p, class_names.index(c)) for p in images]
        nested += [(f"{c}/{s}", _images_below(os.path.join(class_dir, s))) for s in subfolders]
    nested = [(name, n) for name, n in nested if n]
    if nested:
        count = sum(n for _, n in nested)
        log.warning("folder:%s split %r: skipped %d %s in subfolders of class folders "
                        "(e.g. %s); only a class folder's own files are read", root, split, count,
                        "image" if count == 1 else "images", nested[0][0])
    return files


def _without_corrupt(split: str, files: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """`files` less those the input pipeline cannot decode; one warning names the first few."""
    with futures.ThreadPoolExecutor() as pool:
        ok = list(pool.map(_is_readable, [p for p, _ in files]))
    bad = [repr(p) for (p, _), good in zip(files, ok, strict=True) if not good]
    if bad:
        log.warning("skipping %d corrupt image files in %s: %s", len(bad), split,
                        first_names(bad, 3))
    return [f for f, good in zip(files, ok, strict=True) if good]


@functools.lru_cache(maxsize=8)
def _scan_folder_once(root: str, skip_corrupt: bool, _times: tuple) -> tuple[tuple[str, ...], dict]:
    splits = _subfolders(root)
    if not splits:
        raise DataError(
            f"image folder {root!r} has no split folders; lay it out as root/<split>/<class>/*.jpg"
        )
    class_dirs = {s: _subfolders(os.path.join(root, s)) for s in splits}
    unlabelled = [s for s in splits if not class_dirs[s]]  # e.g. Kaggle's test/ of bare images
    if len(unlabelled) == len(splits):
        raise DataError(_no_class_folders(root, splits[0]))
    for s in unlabelled:
        log.warning("folder:%s: split folder %r has no class folders (unlabelled images?), so "
                    "it is not a split here", root, os.path.join(root, s))
    splits = [s for s in splits if class_dirs[s]]
    class_names = tuple(sorted(set().union(*(class_dirs[s] for s in splits))))
    files = {}
    for s in splits:
        files[s] = _split_files(root, s, class_dirs[s], class_names, skip_corrupt)
    if skip_corrupt:
        files = {s: _without_corrupt(s, f) for s, f in files.items()}
    for s in splits:
        order = stratified_order(np.array([label for _, label in files[s]], np.int64))
        files[s] = [files[s][i] for i in order]
    return class_names, files


def stratified_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A permutation of `labels`' indices, classes interleaved at random and each spread evenly
    through it: any slice holds each class in proportion to within a couple of examples, where a
    plain shuffle's error grows with the square root of the slice."""
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        # member i of n sits at a random point of the i-th of n equal steps through the split
        keys[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def folder_root(dataset: str) -> str:
    """The absolute root folder of a "folder:/root" dataset; a DataError for an empty path."""
    path = dataset[len(FOLDER_PREFIX):]
    if not path.strip():
        raise DataError(f"dataset={dataset!r} names no folder; use dataset='folder:/path/root'")
    return os.path.abspath(os.path.expanduser(path))
