"""RandAugment (Cubuk et al., 2020) on one uint8 image, with stateless TensorFlow randomness.

Matches big_vision's `pp/autoaugment.py` (`distort_image_with_randaugment`, forked from
tensorflow/tpu): each of `num_ops` layers picks one of the 16 ops below uniformly and always
applies it at the fixed `magnitude` M (0..10); no identity op. Level -> argument, f = M / 10:
Rotate 30f degrees, ShearX/Y 0.3f, TranslateX/Y 100f px (these five with a random sign);
Color/Contrast/Brightness/Sharpness factor 1.8f + 0.1 (no sign: 0.1..1.9); Posterize keeps
int(4f) bits; Solarize inverts pixels >= int(256f) (M=10 leaves the image unchanged);
SolarizeAdd adds int(110f) to pixels < 128; Cutout greys a 2*int(40f) px square at a uniform
centre. Geometric ops use nearest sampling; empty pixels and cutout are filled with grey 128.

Deliberate differences:
- Translate and Cutout sizes are given for 224 px images; they scale with the image side
  (x side / 224: TranslateX's width, TranslateY's height, Cutout's shorter side; translate
  rounded to whole pixels), so they are identical at 224 px and keep the same relative
  strength at e.g. 32 px or 24 x 40 px.
- Contrast blends towards the true mean grey level (PIL's ImageEnhance.Contrast). big_vision's
  port uses sum(histogram) / 256 = pixel count / 256 as the "mean" (196 at 224 px, 4 at 32 px).
- Grey levels use PIL's integer luma, (19595 R + 38470 G + 7471 B + 2**15) >> 16, and the
  Sharpness smoothing rounds like PIL; big_vision's TF versions can be 1 level off.
Posterize below M=2.5 asks for 0 bits: big_vision's uint8 shift by 8 is clamped to 7 by TF
(1 bit kept), and so is ours (PIL would give a black image).
"""

from __future__ import annotations

import functools
import math

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = 128.0
REFERENCE_SIZE = 224.0  # big_vision's constants below are in pixels of a 224 px image
TRANSLATE_CONST = 100.0
CUTOUT_CONST = 40.0


def _fraction(level, dtype=tf.float32) -> tf.Tensor:
    """|level| / MAX_LEVEL; float64 makes int(f * k) agree with big_vision's Python floats."""
    return tf.abs(tf.cast(level, dtype)) / MAX_LEVEL


def _int_arg(level, scale: float) -> tf.Tensor:
    """int((|level| / 10) * scale) as a float32 tensor, as big_vision's level_to_arg."""
    return tf.cast(tf.floor(_fraction(level, tf.float64) * scale), tf.float32)


def _signed(level, scale) -> tf.Tensor:
    """(level / 10) * scale, keeping the level's sign (the random sign of geometric ops)."""
    return tf.cast(level, tf.float32) / MAX_LEVEL * scale


def luma(image: tf.Tensor) -> tf.Tensor:
    """PIL's RGB -> L conversion, [H, W, 1] float32 with integer values."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471 + 32768
    return tf.cast(tf.bitwise.right_shift(weighted, 16), tf.float32)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's Image.blend (ImageEnhance) / big_vision's blend: truncated to integers."""
    return tf.floor(tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0))


def enhance_color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance.Color (saturation) of a float32 [H, W, 3] image of integers."""
    return blend(tf.tile(luma(image), [1, 1, 3]), image, factor)


def enhance_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance.Contrast: towards the image's mean grey level, rounded."""
    mean = tf.floor(tf.reduce_mean(tf.cast(luma(image), tf.float64)) + 0.5)
    return blend(tf.cast(mean, tf.float32), image, factor)


def enhance_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance.Brightness: towards black."""
    return blend(tf.zeros_like(image), image, factor)


def _factor(level) -> tf.Tensor:
    """RandAugment's enhance factor 1.8 f + 0.1 (0.1..1.9)."""
    return tf.cast(_fraction(level, tf.float64) * 1.8 + 0.1, tf.float32)  # as PIL's float


def _transform(image: tf.Tensor, transform) -> tf.Tensor:
    """Projective transform [a0, a1, a2, b0, b1, b2] mapping output (x, y) to input pixels."""
    matrix = tf.concat([tf.cast(tf.stack(transform), tf.float32), tf.zeros([2])], 0)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=matrix[None],
        output_shape=tf.shape(image)[:2],
        fill_value=FILL,
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )
    return out[0]


def _hw(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    shape = tf.cast(tf.shape(image), tf.float32)
    return shape[0], shape[1]


def _autocontrast(image, level, seed=None):
    del level, seed
    lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
    hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)  # PIL's LUT, int(ix * scale - lo * scale)
    stretched = tf.floor(tf.clip_by_value(tf.cast(image, tf.float64) * scale - lo * scale, 0, 255))
    return tf.where(hi > lo, tf.cast(stretched, tf.float32), image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL's histogram equalisation of one [H, W] float channel holding 0..255 integers."""
    pixels = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(tf.reshape(pixels, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.where(step > 0, tf.cast(tf.gather(lut, pixels), tf.float32), channel)


def _equalize(image, level, seed=None):
    del level, seed
    return tf.stack([_equalize_channel(image[:, :, c]) for c in range(3)], axis=-1)


def _invert(image, level, seed=None):
    del level, seed
    return 255.0 - image


def _rotate(image, level, seed=None):
    del seed
    angle = _signed(level, 30.0) * math.pi / 180.0  # positive: counter-clockwise, as PIL
    h, w = _hw(image)
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    return _transform(image, [cos, -sin, x_off, sin, cos, y_off])


def _posterize(image, level, seed=None):
    del seed
    bits = tf.maximum(_int_arg(level, 4.0), 1.0)  # 0 bits: TF clamps the shift of 8 to 7
    step = tf.pow(2.0, 8.0 - bits)
    return tf.floor(image / step) * step


def _solarize(image, level, seed=None):
    del seed
    return tf.where(image < _int_arg(level, 256.0), image, 255.0 - image)


def _solarize_add(image, level, seed=None):
    del seed
    return tf.where(image < 128.0, tf.minimum(image + _int_arg(level, 110.0), 255.0), image)


def _color(image, level, seed=None):
    del seed
    return enhance_color(image, _factor(level))


def _contrast(image, level, seed=None):
    del seed
    return enhance_contrast(image, _factor(level))


def _brightness(image, level, seed=None):
    del seed
    return enhance_brightness(image, _factor(level))


def _sharpness(image, level, seed=None):
    del seed
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.pad(tf.round(smooth), [[1, 1], [1, 1], [0, 0]])
    inside = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
    degenerate = smooth * inside + image * (1.0 - inside)  # the border keeps its pixels
    return blend(degenerate, image, _factor(level))


def _shear_x(image, level, seed=None):
    del seed
    return _transform(image, [1.0, _signed(level, 0.3), 0.0, 0.0, 1.0, 0.0])


def _shear_y(image, level, seed=None):
    del seed
    return _transform(image, [1.0, 0.0, 0.0, _signed(level, 0.3), 1.0, 0.0])


def _translate_x(image, level, seed=None):
    del seed
    pixels = tf.round(_signed(level, TRANSLATE_CONST) * _hw(image)[1] / REFERENCE_SIZE)
    return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])  # content moves left


def _translate_y(image, level, seed=None):
    del seed
    pixels = tf.round(_signed(level, TRANSLATE_CONST) * _hw(image)[0] / REFERENCE_SIZE)
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])  # content moves up


def _cutout(image, level, seed=None):
    """Greys rows cy - pad .. cy + pad - 1 x the same columns around cx; seed None: centred."""
    h, w = _hw(image)
    side = tf.minimum(h, w) / REFERENCE_SIZE
    pad = tf.floor(tf.cast(_fraction(level, tf.float64) * CUTOUT_CONST, tf.float32) * side)
    if seed is None:
        cy, cx = tf.floor(h / 2.0), tf.floor(w / 2.0)
    else:
        hw = tf.stack([h, w])  # uniform integer centre in [0, H) x [0, W)
        centre = tf.minimum(tf.floor(tf.random.stateless_uniform([2], seed) * hw), hw - 1)
        cy, cx = tf.unstack(centre)
    ys = tf.range(h)[:, None, None]
    xs = tf.range(w)[None, :, None]
    inside = (ys >= cy - pad) & (ys < cy + pad) & (xs >= cx - pad) & (xs < cx + pad)
    return tf.where(inside, FILL, image)


OPS = (
    _autocontrast, _equalize, _invert, _rotate, _posterize, _solarize, _color, _contrast,
    _brightness, _sharpness, _shear_x, _shear_y, _translate_x, _translate_y, _cutout,
    _solarize_add,
)  # fmt: skip
# big_vision's RandAugment op list, in its order. Each op is f(image, level, seed=None) on a
# float32 [H, W, 3] image of integers 0..255; `level` in [-10, 10], its sign used only by the
# geometric ops; `seed` only by Cutout.


def randaugment(image: tf.Tensor, num_ops: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
    """Applies `num_ops` random ops at `magnitude` (0..10) to a uint8 [H, W, 3] image.

    `seed` is a [2] stateless seed: the same seed gives the same output.
    """
    out = tf.cast(image, tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, num=3 * num_ops)
    for i in range(num_ops):
        op_seed, sign_seed, op_rng = seeds[3 * i], seeds[3 * i + 1], seeds[3 * i + 2]
        op = tf.random.stateless_uniform([], op_seed, 0, len(OPS), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
        level = sign * float(magnitude)
        out = tf.switch_case(op, [functools.partial(f, out, level, op_rng) for f in OPS])
        out.set_shape(image.shape)
    return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)
