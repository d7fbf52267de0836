"""A tiny TFDS dataset written in several shard files: reading orders are seen in it."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


class ShardedDigits(tfds.core.GeneratorBasedBuilder):
    """Example i: an 8x8 image of value i, label i % 2."""

    VERSION = tfds.core.Version("1.0.0")
    SIZE = 64

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(num_classes=2)}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self.SIZE)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((8, 8, 3), i, np.uint8), "label": i % 2}


def prepare(data_dir: str, shards: int) -> list[list[int]]:
    """Writes the dataset into data_dir in `shards` files; the example ids of each, in order."""
    builder = ShardedDigits(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=shards))
    examples = builder.as_dataset(split="train").as_numpy_iterator()
    stored = [int(x["image"][0, 0, 0]) for x in examples]
    sizes = [i.take for i in builder.info.splits["train"].file_instructions]
    bounds = np.cumsum([0, *sizes])
    return [stored[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
