"""3-Augment (Touvron et al., DeiT III, 2022) on one uint8 image, with stateless randomness.

Each training image gets one of three ops, chosen uniformly:
- grayscale: PIL's luma (`randaugment.luma`) in all three channels (torchvision's
  `Grayscale(num_output_channels=3)` on a PIL image);
- solarize: pixels >= 128 inverted (PIL's `ImageOps.solarize`);
- Gaussian blur of sigma ~ U(0.1, 2.0) pixels, edges clamped, rounded to integers (DeiT III
  calls PIL's `GaussianBlur(radius=sigma)`, which approximates the Gaussian with box filters:
  a few grey levels apart, see tests/test_three_augment.py);
then colour jitter: brightness, contrast and saturation factors each ~ U(1 - j, 1 + j) with
j = `pp.three_augment_jitter` (DeiT III: 0.3; 0 skips it), applied in a random order, each as
PIL's ImageEnhance, which is what torchvision's `ColorJitter` does to a PIL image.
"""

from __future__ import annotations

import itertools
import math

import tensorflow as tf

from vit.randaugment import enhance_brightness, enhance_color, enhance_contrast, luma

SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128.0
_RADIUS = math.ceil(3 * SIGMA[1])  # taps on each side of the blur kernel


def grayscale(image: tf.Tensor) -> tf.Tensor:
    """Float32 [H, W, 3] of integers -> its PIL luma in all three channels."""
    return tf.tile(luma(image), [1, 1, 3])


def solarize(image: tf.Tensor) -> tf.Tensor:
    """Pixels >= 128 inverted (255 - x), as PIL's ImageOps.solarize(threshold=128)."""
    return tf.where(image < SOLARIZE_THRESHOLD, image, 255.0 - image)


def _blur_matrix(size: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """[size, size]: row i holds the normalised Gaussian weights of pixel i's neighbours, the
    taps beyond an edge given to the edge pixel."""
    offsets = tf.range(-_RADIUS, _RADIUS + 1, dtype=tf.float32)
    weights = tf.exp(-0.5 * tf.square(offsets / sigma))
    weights /= tf.reduce_sum(weights)
    rows = tf.range(size)[:, None] + tf.range(-_RADIUS, _RADIUS + 1)[None, :]
    taps = tf.one_hot(tf.clip_by_value(rows, 0, size - 1), size)  # [size, taps, size]
    return tf.einsum("t,itj->ij", weights, taps)


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    """Float32 [H, W, 3] of integers blurred by a separable Gaussian of `sigma` px, rounded."""
    shape = tf.shape(image)
    down = _blur_matrix(shape[0], sigma)
    across = _blur_matrix(shape[1], sigma)
    blurred = tf.einsum("ij,jkc,lk->ilc", down, image, across)
    return tf.clip_by_value(tf.round(blurred), 0.0, 255.0)


def _jitter(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
    """Brightness, contrast and saturation by factors ~ U(1 - s, 1 + s), in a random order."""
    factor_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    factors = tf.random.stateless_uniform([3], factor_seed, 1.0 - strength, 1.0 + strength)
    ops = (enhance_brightness, enhance_contrast, enhance_color)
    orders = list(itertools.permutations(range(3)))

    def in_order(order: tuple[int, ...]) -> tf.Tensor:
        out = image
        for i in order:
            out = ops[i](out, factors[i])
        return out

    pick = tf.random.stateless_uniform([], order_seed, 0, len(orders), dtype=tf.int32)
    return tf.switch_case(pick, [lambda order=order: in_order(order) for order in orders])


def three_augment(image: tf.Tensor, jitter: float, seed: tf.Tensor) -> tf.Tensor:
    """One of grayscale, solarize or blur, then colour jitter of strength `jitter`, on a uint8
    [H, W, 3] image; `seed` is a [2] stateless seed (the same seed, the same output)."""
    op_seed, sigma_seed, jitter_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    out = tf.cast(image, tf.float32)
    sigma = tf.random.stateless_uniform([], sigma_seed, *SIGMA)
    pick = tf.random.stateless_uniform([], op_seed, 0, 3, dtype=tf.int32)
    out = tf.switch_case(pick, [lambda: grayscale(out), lambda: solarize(out),
                                lambda: gaussian_blur(out, sigma)])
    if jitter > 0:
        out = _jitter(out, float(jitter), jitter_seed)
    out.set_shape(image.shape)
    return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)
