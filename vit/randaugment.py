"""RandAugment (Cubuk et al., 2020) on one uint8 image, with stateless TensorFlow randomness.

`num_ops` operations are drawn uniformly from the 14 below and applied in turn, each at the
same `magnitude` (0..10); geometric and signed ops pick a random sign. Geometric ops fill with
grey (128), as in the reference TPU implementation.
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

MAX_MAGNITUDE = 10.0
FILL = 128.0


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _gray(image: tf.Tensor) -> tf.Tensor:
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def _affine(image: tf.Tensor, transform: list) -> tf.Tensor:
    """Applies the projective transform [a0, a1, a2, b0, b1, b2, 0, 0] (output -> input map)."""
    shape = tf.shape(image)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=tf.cast(tf.stack(transform)[None], tf.float32),
        output_shape=shape[:2],
        fill_value=FILL,
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )
    return out[0]


def _rotate(image, level):
    angle = level / MAX_MAGNITUDE * 30.0 * math.pi / 180.0
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    return _affine(image, [cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0])


def _shear_x(image, level):
    return _affine(image, [1.0, level / MAX_MAGNITUDE * 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def _shear_y(image, level):
    return _affine(image, [1.0, 0.0, 0.0, level / MAX_MAGNITUDE * 0.3, 1.0, 0.0, 0.0, 0.0])


def _translate_x(image, level):
    dx = level / MAX_MAGNITUDE * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, [1.0, 0.0, -dx, 0.0, 1.0, 0.0, 0.0, 0.0])


def _translate_y(image, level):
    dy = level / MAX_MAGNITUDE * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, -dy, 0.0, 0.0])


def _enhance_factor(level):
    return 1.0 + tf.abs(level) / MAX_MAGNITUDE * 0.9 * tf.sign(level)


def _color(image, level):
    return _blend(_gray(image), image, _enhance_factor(level))


def _contrast(image, level):
    return _blend(tf.reduce_mean(_gray(image)), image, _enhance_factor(level))


def _brightness(image, level):
    return _blend(tf.zeros_like(image), image, _enhance_factor(level))


def _sharpness(image, level):
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    border = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.round(smooth) * border + image * (1.0 - border)
    return _blend(degenerate, image, _enhance_factor(level))


def _solarize(image, level):
    threshold = 256.0 - tf.abs(level) / MAX_MAGNITUDE * 256.0
    return tf.where(image < threshold, image, 255.0 - image)


def _posterize(image, level):
    shift = tf.cast(tf.abs(level) / MAX_MAGNITUDE * 4.0, tf.uint8)
    pixels = tf.cast(image, tf.uint8)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift), tf.float32)


def _autocontrast(image, level):
    del level
    lo = tf.reduce_min(image, axis=[0, 1])
    hi = tf.reduce_max(image, axis=[0, 1])
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    return tf.where(hi > lo, (image - lo) * scale, image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL's histogram equalisation of one [H, W] float channel holding 0..255 integers."""
    pixels = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(tf.reshape(pixels, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(hist) - hist + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.where(step > 0, tf.cast(tf.gather(lut, pixels), tf.float32), channel)


def _equalize(image, level):
    del level
    return tf.stack([_equalize_channel(image[:, :, c]) for c in range(3)], axis=-1)


def _identity(image, level):
    del level
    return image


OPS = (
    _identity, _autocontrast, _equalize, _rotate, _solarize, _color, _posterize,
    _contrast, _brightness, _sharpness, _shear_x, _shear_y, _translate_x, _translate_y,
)  # fmt: skip


def randaugment(image: tf.Tensor, num_ops: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
    """Applies `num_ops` random ops at `magnitude` (0..10) to a uint8 [H, W, 3] image."""
    out = tf.cast(image, tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, num=2 * num_ops)
    for i in range(num_ops):
        op = tf.random.stateless_uniform([], seeds[2 * i], 0, len(OPS), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], seeds[2 * i + 1]) < 0.5, -1.0, 1.0)
        level = sign * float(magnitude)
        branches = [functools.partial(f, out, level) for f in OPS]
        out = tf.switch_case(op, branches)
        out.set_shape(image.shape)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
