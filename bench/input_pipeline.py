"""Input-pipeline throughput: prints ONE JSON line of training images/s.

    .venv/bin/python bench/input_pipeline.py

Measures the shipped CIFAR-10 (../shared/data/tfds) at batch 128 with pad-crop + flip, and
with RandAugment(2, 9) added, and 224 px Inception crop + flip from a folder of 320x240 JPEGs
written to a temporary directory.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from vit import data

CIFAR_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../shared/data/tfds"))
if not os.path.isdir(CIFAR_DIR):
    CIFAR_DIR = "/work/shared/data/tfds"
BATCH = 128


def images_per_second(config, warmup: int = 5, steps: int = 40) -> float:
    """Training-pipeline throughput after `warmup` batches."""
    it = data.train_iterator(config, num_devices=1)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return round(steps * config.batch_size / (time.perf_counter() - start), 1)


def write_jpegs(root: str, n: int = 256) -> None:
    """n random 320x240 JPEGs in root/train/<class>/."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, "train", f"class{i % 4}")
        os.makedirs(d, exist_ok=True)
        pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(d, f"{i}.jpg"), quality=90)


def main() -> None:
    """Runs the three measurements and prints the JSON line."""
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help
    cifar = data.default_config()
    cifar.update(dict(data_dir=CIFAR_DIR, batch_size=BATCH))
    result = {"batch_size": BATCH, "cpu_count": os.cpu_count()}
    result["cifar10_crop_flip_images_per_s"] = images_per_second(cifar, steps=80)
    cifar.pp.update(dict(randaugment_num_ops=2, randaugment_magnitude=9))
    result["cifar10_crop_flip_randaugment_images_per_s"] = images_per_second(cifar)
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root)
        folder = data.default_config()
        folder.update(
            dict(dataset=f"folder:{root}", image_size=224, batch_size=BATCH, shuffle_buffer=256)
        )
        folder.pp.update(dict(train_crop="inception", normalize="imagenet"))
        result["folder_jpeg_inception224_images_per_s"] = images_per_second(folder, steps=10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
