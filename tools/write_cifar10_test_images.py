"""Write chosen CIFAR-10 test images as PNG files named <index>_<label>.png.

    python tools/write_cifar10_test_images.py DATA_DIR OUT_DIR INDEX [INDEX ...]

Indices follow the TFDS order of the shipped test split. Used by the figure scripts in tools/.
"""

import os
import sys

import tensorflow_datasets as tfds
from PIL import Image


def main() -> None:
    """Read the test split from DATA_DIR and save the images at the given indices."""
    data_dir, out, indices = sys.argv[1], sys.argv[2], {int(i) for i in sys.argv[3:]}
    os.makedirs(out)
    names = tfds.builder("cifar10", data_dir=data_dir).info.features["label"].names
    split = tfds.load("cifar10", split="test", data_dir=data_dir, download=False)
    for i, ex in enumerate(tfds.as_numpy(split.take(max(indices) + 1))):
        if i in indices:
            Image.fromarray(ex["image"]).save(f"{out}/{i:04d}_{names[ex['label']]}.png")


if __name__ == "__main__":
    main()
