"""Image ops for the input pipeline: decode, resize, crop, inception crop, flip, normalise.

Per-example ops work on one uint8 HWC image and take a stateless seed (a [2] int tensor), so a
pipeline is a deterministic function of its seeds. Normalisation runs on whole batches: on the
host (`normalize`, TF) or on the device (`normalize_on_device`, JAX, the same floats bit for bit;
vit/normalization.py). The `pp` options and their check live in vit/data_options.py.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from vit.data_options import (  # noqa: F401  (the pp options are part of this module's API)
    NORMALIZATIONS,
    TRAIN_CROPS,
    DataError,
    check_eval_resize,
    default_options,
    validate_options,
)
from vit.error_text import tensorflow_message
from vit.model_options import pair
from vit.normalization import normalization_table, normalize_on_device  # noqa: F401
from vit.randaugment import randaugment
from vit.three_augment import three_augment

# TensorFlow must never take accelerator memory from JAX; it only feeds the input pipeline.
with contextlib.suppress(RuntimeError):  # raised only once TF has initialised its devices
    tf.config.set_visible_devices([], "GPU")

INCEPTION_ASPECT = (3.0 / 4.0, 4.0 / 3.0)


_TF_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # what PIL calls the formats TensorFlow decodes


def decode_image_file(path: str) -> np.ndarray:
    """Reads an image file into a uint8 [H, W, 3] RGB array; DataError naming a bad file.

    The pixels are the input pipeline's (`decode`: TensorFlow's decoder, whose JPEG IDCT differs
    from PIL's by a few levels), so a file predicted on is what evaluation would see; formats
    only PIL reads (TIFF, WebP, ...) are decoded by PIL.
    """
    try:
        with Image.open(path) as im:  # checks the file and its size before decoding anything
            kind = im.format
            im.load()  # a truncated or corrupt file fails here, not noisily in TensorFlow
    except FileNotFoundError:
        raise DataError(f"image file {path!r} does not exist; check the path") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"image file {path!r} is too large to decode safely ({e}); resize it, or "
                        "raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"corrupt or unreadable image file {path!r} ({e}); remove or replace it"
        ) from None
    if kind not in _TF_FORMATS:
        return _decode_with_pil(path)
    try:
        return decode(tf.io.read_file(path)).numpy()
    except tf.errors.OpError:
        return _decode_with_pil(path)


def _decode_with_pil(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or im.mode == "I":
                # 16-bit grayscale: PIL's convert("RGB") clips it (all but the darkest white);
                # keep the high byte, as TensorFlow's decoder does.
                gray = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"corrupt or unreadable image file {path!r} ({e}); remove or replace it"
        ) from None


def check_pipeline_decodes(path: str) -> None:
    """A DataError naming `path` unless the input pipeline's decoder (`decode`) reads it; the
    reason from PIL when PIL cannot read it either."""
    try:
        decode(tf.io.read_file(os.fsencode(path)))
    except tf.errors.OpError as err:
        decode_image_file(path)  # raises with PIL's reason when PIL fails too
        with Image.open(path) as im:
            kind = im.format
        raise DataError(f"image file {path!r} is {kind}, which the input pipeline cannot decode "
                        f"({tensorflow_message(err.message)}): convert it or remove it") from None


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes into uint8 [H, W, 3]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Bilinear (antialiased) resize of one image to [height, width], keeping uint8."""
    out = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def resize_to_cover(image: tf.Tensor, box: tuple[int, int]) -> tf.Tensor:
    """Resizes, keeping the aspect ratio, to the smallest size covering a [box_h, box_w] box.

    For a square box of side s, this resizes the shorter side to s.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.reduce_max(tf.constant(box, tf.float32) / shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    out = tf.image.resize(image, tf.maximum(new, box), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def eval_box(height: int, width: int, eval_resize: int) -> tuple[int, int]:
    """The box of (height, width)'s aspect ratio whose shorter side is `eval_resize`."""
    shorter = min(height, width)
    return round(height * eval_resize / shorter), round(width * eval_resize / shorter)


def central_crop(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Crops the central [height, width] window."""
    shape = tf.shape(image)
    top, left = (shape[0] - height) // 2, (shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def pad_crop(image: tf.Tensor, padding: int, seed: tf.Tensor) -> tf.Tensor:
    """CIFAR-style: zero-pad by `padding` pixels, then take a random crop of the old size."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(padded, [shape[0], shape[1], 3], seed=seed)


def inception_window(
    image_shape: tf.Tensor, area: tuple[float, float], seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Samples an Inception-style crop window: (offset [y, x], size [h, w]) inside the image."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed,
        area_range=area,
        aspect_ratio_range=INCEPTION_ASPECT,
        min_object_covered=0.0,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[:2], size[:2]


def inception_crop(
    image: tf.Tensor, size: int | tuple[int, int], area: tuple[float, float], seed
) -> tf.Tensor:
    """Random-resized (Inception) crop of a decoded image, resized to `size`: [H, W] or a side."""
    begin, extent = inception_window(tf.shape(image), area, seed)
    crop = tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([extent, [3]], 0))
    return resize(crop, *pair(size, "size"))


def decode_inception_crop(
    encoded: tf.Tensor, size: int | tuple[int, int], area: tuple[float, float], seed
) -> tf.Tensor:
    """Inception crop straight from encoded bytes; JPEGs decode only the cropped window."""

    def jpeg() -> tf.Tensor:
        begin, extent = inception_window(tf.image.extract_jpeg_shape(encoded), area, seed)
        window = tf.concat([begin, extent], 0)
        crop = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        return resize(crop, *pair(size, "size"))

    return tf.cond(
        tf.io.is_jpeg(encoded), jpeg, lambda: inception_crop(decode(encoded), size, area, seed)
    )


def flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Mirrors the image left-right with probability 1/2."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def normalize(images: tf.Tensor, kind: str) -> tf.Tensor:
    """uint8 images (any leading dims) -> float32: [-1, 1] or per-channel mean/std."""
    if kind not in NORMALIZATIONS:
        raise DataError(f"pp.normalize={kind!r} is unknown; use one of {sorted(NORMALIZATIONS)}")
    mean, std = (tf.constant(v, tf.float32) for v in NORMALIZATIONS[kind])
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def eval_crop(image: tf.Tensor, config) -> tf.Tensor:
    """Evaluation geometry, uint8 -> uint8 [H, W, 3] for config.image_size (H, W).

    config.pp.eval_resize None: resize straight to [H, W]. An int r: resize, keeping the aspect
    ratio, to cover `eval_box(H, W, r)` (the shorter side to r for a square), then centre-crop
    [H, W].
    """
    height, width = pair(config.image_size)
    resize_to = config.pp.get("eval_resize")
    if resize_to is None:
        out = resize(image, height, width)
    else:
        check_eval_resize(config)
        covering = resize_to_cover(image, eval_box(height, width, resize_to))
        out = central_crop(covering, height, width)
    out.set_shape([height, width, 3])
    return out


def eval_image(image: np.ndarray | tf.Tensor, config) -> tf.Tensor:
    """One uint8 HWC image of any size -> float32 [H, W, 3] of config.image_size, as in
    evaluation."""
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8 or image.shape.rank != 3 or image.shape[-1] != 3:
        raise DataError(
            f"eval_image needs a uint8 [H, W, 3] image, got {image.dtype.name} {image.shape}; "
            "decode it with decode_image_file"
        )
    return normalize(eval_crop(image, config), config.pp.normalize)


def train_image(encoded: tf.Tensor, seed: tf.Tensor, config) -> tf.Tensor:
    """Encoded bytes -> augmented uint8 [H, W, 3] of config.image_size, as config.pp says.

    Crop (config.pp.train_crop), flip, then RandAugment and 3-Augment (vit/three_augment.py);
    `seed` is a [2] stateless seed.
    """
    pp, (height, width) = config.pp, pair(config.image_size)
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    if pp.train_crop == "inception":
        area = (pp.inception_area_min, pp.inception_area_max)
        image = decode_inception_crop(encoded, (height, width), area, seeds[0])
    else:
        image = decode(encoded)
        native = tf.reduce_all(tf.shape(image)[:2] == (height, width))
        image = tf.cond(native, lambda: image, lambda: resize(image, height, width))
        if pp.train_crop == "pad_crop":
            image = pad_crop(image, pp.crop_padding, seeds[0])
    if pp.flip:
        image = flip(image, seeds[1])
    if pp.randaugment_num_ops:
        image = randaugment(image, pp.randaugment_num_ops, pp.randaugment_magnitude, seeds[2])
    if pp.get("three_augment"):  # its own seed: runs without it draw what they always drew
        image = three_augment(image, pp.three_augment_jitter,
                              tf.random.experimental.stateless_fold_in(seed, 3))
    image.set_shape([height, width, 3])
    return image
