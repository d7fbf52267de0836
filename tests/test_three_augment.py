"""vit/three_augment.py against PIL on real CIFAR-10 images: grayscale and solarize exactly,
the colour jitter exactly (PIL's ImageEnhance in the drawn order with the drawn factors), the
blur against a NumPy Gaussian and near PIL's; the op choice; `pp.three_augment` in the
pipeline and its check."""

import itertools
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from vit import data, three_augment
from vit.data_options import DataError, default_config

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tfds")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    if not os.path.isdir(os.path.join(DATA_DIR, "cifar10")):
        pytest.skip(f"shipped CIFAR-10 not found at {DATA_DIR}")
    return [e["image"] for e in tfds.as_numpy(tfds.load("cifar10", split="test[:6]",
                                                        data_dir=DATA_DIR))]


def _float(image: np.ndarray) -> tf.Tensor:
    return tf.constant(image, tf.float32)


def test_grayscale_and_solarize_are_pils(images):
    for im in images:
        gray = np.asarray(Image.fromarray(im).convert("L").convert("RGB"))
        np.testing.assert_array_equal(three_augment.grayscale(_float(im)).numpy(), gray)
        solar = np.asarray(ImageOps.solarize(Image.fromarray(im), 128))
        np.testing.assert_array_equal(three_augment.solarize(_float(im)).numpy(), solar)


def _numpy_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """The 13 x 13 Gaussian of `sigma` over edge-padded pixels (clamped edges), rounded."""
    w = np.exp(-0.5 * (np.arange(-6, 7) / sigma) ** 2)
    kernel = np.outer(w, w) / w.sum() ** 2
    padded = np.pad(image.astype(np.float64), ((6, 6), (6, 6), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (13, 13), axis=(0, 1))
    return np.clip(np.round(np.tensordot(windows, kernel, axes=([3, 4], [0, 1]))), 0, 255)


def test_blur_is_a_gaussian_close_to_pils(images):
    for sigma in (0.1, 0.7, 2.0):
        diffs = []
        for im in images:
            ours = three_augment.gaussian_blur(_float(im), tf.constant(sigma)).numpy()
            assert np.abs(ours - _numpy_blur(im, sigma)).max() <= 1  # float32 rounding ties
            pil = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(sigma)))
            diffs.append(np.abs(ours - pil))
        assert np.mean(diffs) < 1.0  # PIL approximates the Gaussian with box blurs
    flat = np.full((12, 20, 3), 77.0, np.float32)
    np.testing.assert_array_equal(three_augment.gaussian_blur(flat, tf.constant(2.0)), flat)


def _drawn(seed: tf.Tensor) -> tuple[int, float, np.ndarray, int]:
    """(op, sigma, jitter factors, jitter order index) that three_augment draws from `seed`."""
    op_seed, sigma_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    factor_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(jitter_seed, 2))
    op = int(tf.random.stateless_uniform([], op_seed, 0, 3, dtype=tf.int32))
    sigma = float(tf.random.stateless_uniform([], sigma_seed, *three_augment.SIGMA))
    factors = tf.random.stateless_uniform([3], factor_seed, 0.7, 1.3).numpy()
    order = int(tf.random.stateless_uniform([], order_seed, 0, 6, dtype=tf.int32))
    return op, sigma, factors, order


def test_the_op_then_the_jitter_are_pils_in_the_drawn_order(images):
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    orders = list(itertools.permutations(range(3)))
    ops_seen = set()
    for i in range(24):
        im, seed = images[i % len(images)], tf.constant([i, 7], tf.int64)
        op, sigma, factors, order = _drawn(seed)
        ops_seen.add(op)
        first = (three_augment.grayscale, three_augment.solarize,
                 lambda x, s=sigma: three_augment.gaussian_blur(x, tf.constant(s)))[op]
        pil = Image.fromarray(first(_float(im)).numpy().astype(np.uint8))
        for k in orders[order]:
            pil = enhancers[k](pil).enhance(float(factors[k]))
        got = three_augment.three_augment(tf.constant(im), 0.3, seed).numpy()
        np.testing.assert_array_equal(got, np.asarray(pil))
        no_jitter = three_augment.three_augment(tf.constant(im), 0.0, seed).numpy()
        np.testing.assert_array_equal(no_jitter, first(_float(im)).numpy().astype(np.uint8))
    assert ops_seen == {0, 1, 2}


def test_the_pipeline_applies_it_and_checks_its_jitter(images):
    config = default_config()
    config.update(dataset="cifar10", data_dir=DATA_DIR, train_split="train[:64]",
                  batch_size=16, shuffle_buffer=64)
    config.pp.update(train_crop="resize", flip=False)
    plain = next(data.train_iterator(config, num_devices=1))["image"]
    config.pp.three_augment = True
    augmented = next(data.train_iterator(config, num_devices=1))["image"]
    assert augmented.dtype == np.uint8 and augmented.shape == plain.shape
    assert (augmented != plain).reshape(16, -1).any(axis=1).all()  # every image changed
    config.pp.three_augment_jitter = 1.5
    with pytest.raises(DataError, match=r"pp.three_augment_jitter=1.5 is out of range; use "
                                        r"\[0, 1\)"):
        data.train_iterator(config, num_devices=1)
