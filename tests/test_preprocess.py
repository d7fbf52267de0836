"""Tests for vit.preprocess and vit.randaugment: geometry, flips, normalisation, decoding."""

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit import data, preprocess
from vit.preprocess import (
    NORMALIZATIONS,
    TRAIN_CROPS,
    DataError,
    decode,
    decode_image_file,
    decode_inception_crop,
    eval_image,
    flip,
    inception_crop,
    normalize,
    normalize_on_device,
    pad_crop,
)
from vit.randaugment import OPS, randaugment

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)


def _seed(i):
    return tf.constant([7, i], tf.int64)


def test_flip_really_mirrors_or_keeps():
    seen = set()
    for i in range(16):
        out = flip(tf.constant(IMAGE), _seed(i)).numpy()
        if np.array_equal(out, IMAGE[:, ::-1]):
            seen.add("mirrored")
        else:
            np.testing.assert_array_equal(out, IMAGE)
            seen.add("kept")
    assert seen == {"mirrored", "kept"}


def test_pad_crop_is_a_shifted_window_of_the_padded_image():
    padded = np.pad(IMAGE, [(4, 4), (4, 4), (0, 0)])
    for i in range(10):
        out = pad_crop(tf.constant(IMAGE), 4, _seed(i)).numpy()
        assert out.shape == IMAGE.shape
        hits = [
            (y, x)
            for y in range(9)
            for x in range(9)
            if np.array_equal(padded[y : y + 24, x : x + 40], out)
        ]
        assert hits, "crop is not a window of the padded image"


def test_inception_crop_stays_in_bounds_and_is_deterministic():
    ramp = np.broadcast_to(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (24, 40, 3))
    for i in range(10):
        out = inception_crop(tf.constant(ramp), 16, (0.08, 1.0), _seed(i)).numpy()
        again = inception_crop(tf.constant(ramp), 16, (0.08, 1.0), _seed(i)).numpy()
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, again)
        assert out.min() >= 0 and out.max() <= 39 * 6  # only pixels from inside the image


def test_jpeg_fast_path_matches_decode_then_crop(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(IMAGE).save(path, quality=95)
    encoded = tf.io.read_file(str(path))
    fast = decode_inception_crop(encoded, 16, (0.3, 1.0), _seed(3)).numpy()
    slow = inception_crop(decode(encoded), 16, (0.3, 1.0), _seed(3)).numpy()
    assert np.abs(fast.astype(int) - slow.astype(int)).max() <= 2  # JPEG IDCT rounding only


def test_normalize_ranges():
    x = tf.constant([[0, 255, 0]], tf.uint8)
    np.testing.assert_allclose(normalize(x, "minus_one_to_one").numpy(), [[-1, 1, -1]])
    np.testing.assert_allclose(normalize(x, "imagenet").numpy()[0, 0], -0.485 / 0.229, rtol=1e-6)
    with pytest.raises(DataError, match="pp.normalize='nope'"):
        normalize(x, "nope")


@pytest.mark.parametrize("kind", sorted(NORMALIZATIONS))
def test_normalize_on_device_is_the_host_normalize_bit_for_bit(kind):
    """Every uint8 value in every channel (so every batch): jitted on-device normalisation gives
    the float32 bits of the host's, also inside tf.data as the pipeline ran it."""
    pixels = np.stack([np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1),
                       np.repeat(np.arange(255, -1, -1, dtype=np.uint8)[:, None], 3, 1)])
    host = normalize(pixels, kind).numpy()
    in_tf_data = next(tf.data.Dataset.from_tensors(pixels).map(
        lambda x: normalize(x, kind)).as_numpy_iterator())
    device = np.asarray(jax.jit(normalize_on_device, static_argnums=1)(pixels, kind))
    assert device.dtype == np.float32 and device.shape == pixels.shape
    np.testing.assert_array_equal(device.view(np.uint32), host.view(np.uint32))
    np.testing.assert_array_equal(device.view(np.uint32), in_tf_data.view(np.uint32))


def test_normalize_on_device_passes_floats_and_refuses_other_integers():
    floats = np.zeros((2, 4, 4, 3), np.float32)
    assert normalize_on_device(floats, "imagenet") is floats
    with pytest.raises(DataError, match="needs uint8"):
        normalize_on_device(np.zeros((2, 4, 4, 3), np.int32), "imagenet")
    with pytest.raises(DataError, match="pp.normalize='nope'"):
        normalize_on_device(np.zeros((2, 4, 4, 3), np.uint8), "nope")


def test_eval_image_resize_and_centre_crop():
    c = data.default_config()
    c.image_size = 16
    out = eval_image(IMAGE, c).numpy()
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    c.pp.eval_resize = 20
    gradient = np.broadcast_to(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (24, 40, 3))
    cropped = eval_image(gradient, c).numpy()
    assert cropped.shape == (16, 16, 3)
    # Shorter side 24 -> 20 makes the width 33; the centre 16 columns keep the middle of the ramp.
    assert abs(cropped[:, 8].mean() - (119.0 / 127.5 - 1)) < 0.1


def test_eval_image_at_native_size_is_exact_normalisation():
    c = data.default_config()
    c.image_size = 24
    img = IMAGE[:, :24]
    np.testing.assert_allclose(eval_image(img, c).numpy(), img / 127.5 - 1.0, atol=1e-6)


def test_eval_image_rejects_wrong_dtype():
    with pytest.raises(DataError, match="uint8"):
        eval_image(IMAGE.astype(np.float32), data.default_config())


def _eval_config(image_size, eval_resize=None):
    c = data.default_config()
    c.image_size = image_size
    c.pp.eval_resize = eval_resize
    return c


@pytest.mark.parametrize("image_shape,image_size,resized,corner", [
    ((60, 80), (24, 40), (38, 50), (7, 5)),  # box 30 x 50: scale max(30/60, 50/80) = 0.625
    ((80, 60), (40, 24), (50, 38), (5, 7)),  # the same, transposed
    ((60, 80), (40, 24), (50, 67), (5, 21)),  # box 50 x 30: scale max(50/60, 30/80) = 5/6
])
def test_rectangular_eval_crop_is_the_centre_of_the_resize_covering_the_box(
        image_shape, image_size, resized, corner):
    """eval_resize=30 on (H, W): the image, aspect kept, covers a box of (H, W)'s shape with
    shorter side 30 (rounded half to even: 37.5 -> 38), then its central [H, W] window."""
    image = tf.constant(RNG.integers(0, 256, (*image_shape, 3), dtype=np.uint8))
    out = preprocess.eval_crop(image, _eval_config(image_size, 30)).numpy()
    (top, left), (height, width) = corner, image_size
    want = preprocess.resize(image, *resized).numpy()[top : top + height, left : left + width]
    assert out.shape == (height, width, 3)
    np.testing.assert_array_equal(out, want)


def test_rectangular_eval_crop_without_eval_resize_is_a_plain_resize():
    out = preprocess.eval_crop(tf.constant(IMAGE), _eval_config((40, 24))).numpy()
    np.testing.assert_array_equal(out, preprocess.resize(tf.constant(IMAGE), 40, 24).numpy())
    np.testing.assert_array_equal(eval_image(IMAGE, _eval_config([24, 40])).numpy(),  # untouched
                                  normalize(tf.constant(IMAGE), "minus_one_to_one").numpy())


def test_eval_resize_below_the_shorter_side_is_one_line():
    with pytest.raises(DataError) as info:
        eval_image(IMAGE, _eval_config((24, 40), 23))
    assert str(info.value) == (
        "config.pp.eval_resize=23 is smaller than image_size=(24, 40); the central crop needs "
        "eval_resize >= image_size (its shorter side: 24), or None to resize straight to "
        "image_size")
    assert eval_image(IMAGE, _eval_config((24, 40), 24)).shape == (24, 40, 3)


def _old_square_eval_crop(image: tf.Tensor, size: int, eval_resize: int) -> tf.Tensor:
    """eval_crop of an int image_size before rectangles: the shorter side resized to
    eval_resize, then the central [size, size] window."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = eval_resize / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    out = tf.image.resize(image, tf.maximum(new, eval_resize), method="bilinear", antialias=True)
    out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    top, left = (tf.shape(out)[0] - size) // 2, (tf.shape(out)[1] - size) // 2
    return out[top : top + size, left : left + size]


ODD_SHAPES = [(1, 7), (7, 1), (31, 33), (33, 31), (97, 211), (375, 500), (481, 640), (17, 1023)]


@pytest.mark.parametrize("size,eval_resize", [(32, 32), (32, 36), (7, 9), (224, 256)])
def test_square_eval_crop_is_the_old_shorter_side_resize_bit_for_bit(size, eval_resize):
    """Eagerly and inside tf.data (as the eval pipeline runs it), on odd shapes."""
    images = [RNG.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in ODD_SHAPES]
    config = _eval_config(size, eval_resize)

    def both(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return preprocess.eval_crop(image, config), _old_square_eval_crop(image, size, eval_resize)

    spec = tf.TensorSpec([None, None, 3], tf.uint8)
    in_tf_data = tf.data.Dataset.from_generator(lambda: images, output_signature=spec).map(both)
    eager = (both(tf.constant(image)) for image in images)
    for shape, pairs in zip(ODD_SHAPES, zip(eager, in_tf_data, strict=True), strict=True):
        for new, old in pairs:
            assert new.shape == (size, size, 3)
            np.testing.assert_array_equal(new.numpy(), old.numpy(), err_msg=str(shape))


@pytest.mark.parametrize("image_size", [(24, 40), (40, 24)])
@pytest.mark.parametrize("train_crop", TRAIN_CROPS)
def test_train_image_is_height_by_width_for_every_train_crop(train_crop, image_size):
    """From PNG and JPEG bytes of a 24 x 40 image; "resize" keeps an image of the right shape
    and resizes the other, "pad_crop" takes a window of that padded by 4."""
    c = data.default_config()
    c.image_size = image_size
    c.pp.update(dict(train_crop=train_crop, flip=False))
    height, width = image_size
    for encode in (tf.io.encode_png, tf.io.encode_jpeg):
        out = preprocess.train_image(encode(tf.constant(IMAGE)), _seed(1), c)
        assert out.shape == (height, width, 3) and out.numpy().shape == (height, width, 3)
    png = preprocess.train_image(tf.io.encode_png(tf.constant(IMAGE)), _seed(1), c).numpy()
    resized = preprocess.resize(tf.constant(IMAGE), height, width).numpy()
    if image_size == IMAGE.shape[:2]:
        resized = IMAGE
    if train_crop == "resize":
        np.testing.assert_array_equal(png, resized)
    elif train_crop == "pad_crop":
        padded = np.pad(resized, [(4, 4), (4, 4), (0, 0)])
        assert any(np.array_equal(padded[y : y + height, x : x + width], png)
                   for y in range(9) for x in range(9))
    c.pp.update(dict(flip=True, randaugment_num_ops=2))
    augmented = preprocess.train_image(tf.io.encode_png(tf.constant(IMAGE)), _seed(2), c)
    assert augmented.shape == (height, width, 3) and augmented.dtype == tf.uint8


def test_decode_image_file_roundtrip_and_errors(tmp_path):
    png = tmp_path / "x.png"
    Image.fromarray(IMAGE).save(png)
    np.testing.assert_array_equal(decode_image_file(str(png)), IMAGE)
    gray = tmp_path / "g.png"
    Image.fromarray(IMAGE[:, :, 0]).save(gray)
    assert decode_image_file(str(gray)).shape == (24, 40, 3)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg"):
        decode_image_file(str(bad))
    with pytest.raises(DataError, match="missing.png"):
        decode_image_file(str(tmp_path / "missing.png"))


def test_a_16_bit_png_decodes_as_the_training_pipeline_decodes_it(tmp_path):
    """PIL's convert("RGB") clips 16-bit grayscale to white; the high byte is kept instead,
    exactly what TensorFlow's decoder (the training pipeline's) gives."""
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 255, 256, 1000, 32768, 65535]], np.uint16)).save(path)
    decoded = decode_image_file(str(path))
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 0, 1, 3, 128, 255])
    np.testing.assert_array_equal(decoded, decode(tf.io.read_file(str(path))).numpy())


def test_a_jpeg_file_decodes_to_the_pixels_the_input_pipeline_sees(tmp_path):
    """PIL's accurate IDCT and TensorFlow's fast one differ by a few levels: predictions must
    see evaluation's pixels."""
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(path, quality=90)
    with Image.open(path) as im:
        by_pil = np.asarray(im.convert("RGB"))
    pipeline = preprocess.decode(tf.io.read_file(str(path))).numpy()
    assert (by_pil != pipeline).any()  # the two decoders disagree on this file
    np.testing.assert_array_equal(preprocess.decode_image_file(str(path)), pipeline)


def test_a_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(IMAGE).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24 x 40 is over twice this
    with pytest.raises(DataError) as info:
        decode_image_file(str(path))
    assert str(info.value).startswith(f"image file {str(path)!r} is too large to decode safely (")
    assert str(info.value).endswith("raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted")


@pytest.mark.parametrize("op", OPS, ids=lambda f: f.__name__)
def test_each_randaugment_op_keeps_shape_and_range(op):
    out = op(tf.constant(IMAGE, tf.float32), tf.constant(5.0))
    assert out.shape == IMAGE.shape
    assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 255


def test_randaugment_deterministic_and_changes_image():
    a = randaugment(tf.constant(IMAGE), 2, 9, _seed(1)).numpy()
    b = randaugment(tf.constant(IMAGE), 2, 9, _seed(1)).numpy()
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == IMAGE.shape
    changed = [
        not np.array_equal(randaugment(tf.constant(IMAGE), 2, 9, _seed(i)).numpy(), IMAGE)
        for i in range(8)
    ]
    assert sum(changed) >= 6
