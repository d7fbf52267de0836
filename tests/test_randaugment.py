"""vit.randaugment against PIL references on real CIFAR-10 images, plus big_vision semantics.

Each op runs on 4 CIFAR-10 test images and on one of them upsampled to 64 and 224 px (so the
geometric ops move whole pixels and the 224 px constants of big_vision apply unscaled).
"""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance, ImageOps

from vit import randaugment as ra

DATA_DIR = os.environ.get("TFDS_DATA_DIR") or "/work/shared/data/tfds"
GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def images():
    try:
        ds = tfds.load("cifar10", split="test[:4]", data_dir=DATA_DIR, download=False)
    except Exception as e:  # any failure means the data is not there
        pytest.skip(f"CIFAR-10 is not prepared under {DATA_DIR}: {e}")
    out = [example["image"] for example in tfds.as_numpy(ds)]
    for size in (64, 224):
        out.append(np.asarray(Image.fromarray(out[0]).resize((size, size), Image.BICUBIC)))
    return out


def _run(op, image, level, seed=None):
    out = op(tf.constant(image, tf.float32), tf.constant(float(level)), seed).numpy()
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(out, np.round(out))  # integer-valued between ops
    return out.astype(np.uint8)


def _factor(m):
    return m / 10 * 1.8 + 0.1  # big_vision's _enhance_level_to_arg: no random sign


def _affine(coeffs):
    return lambda im, m: im.transform(
        im.size, Image.AFFINE, coeffs(im, m), Image.NEAREST, fillcolor=GREY
    )


def _shift(m, side):
    return round(m / 10 * ra.TRANSLATE_CONST * side / ra.REFERENCE_SIZE)


# (op, PIL reference(image, magnitude), magnitudes); all must match PIL bit for bit.
EXACT = {
    "autocontrast": (ra._autocontrast, lambda im, m: ImageOps.autocontrast(im), [10]),
    "equalize": (ra._equalize, lambda im, m: ImageOps.equalize(im), [10]),
    "invert": (ra._invert, lambda im, m: ImageOps.invert(im), [10]),
    # big_vision keeps int(4 m / 10) bits; 0 bits is a uint8 shift by 8, which TF clamps to 7.
    "posterize": (
        ra._posterize,
        lambda im, m: ImageOps.posterize(im, max(int(m * 0.4), 1)),
        [0, 3, 9, 10],
    ),
    "solarize": (
        ra._solarize,
        lambda im, m: ImageOps.solarize(im, int(m / 10 * 256)),
        [0, 3, 9, 10],
    ),
    "solarize_add": (
        ra._solarize_add,
        lambda im, m: im.point(lambda v: min(v + int(m / 10 * 110), 255) if v < 128 else v),
        [3, 9, 10],
    ),
    "color": (
        ra._color,
        lambda im, m: ImageEnhance.Color(im).enhance(_factor(m)),
        [0, 2, 5, 9, 10],
    ),
    "contrast": (
        ra._contrast,
        lambda im, m: ImageEnhance.Contrast(im).enhance(_factor(m)),
        [0, 2, 9, 10],
    ),
    "brightness": (
        ra._brightness,
        lambda im, m: ImageEnhance.Brightness(im).enhance(_factor(m)),
        [0, 2, 9, 10],
    ),
    "sharpness": (
        ra._sharpness,
        lambda im, m: ImageEnhance.Sharpness(im).enhance(_factor(m)),
        [0, 2, 9, 10],
    ),
    "translate_x": (
        ra._translate_x,
        _affine(lambda im, m: (1, 0, _shift(m, im.size[0]), 0, 1, 0)),
        [-9, 4, 10],
    ),
    "translate_y": (
        ra._translate_y,
        _affine(lambda im, m: (1, 0, 0, 0, 1, _shift(m, im.size[1]))),
        [-9, 4, 10],
    ),
}


def _check_exact(name, images):
    op, reference, magnitudes = EXACT[name]
    for m in magnitudes:
        for image in images:
            want = np.asarray(reference(Image.fromarray(image), m))
            np.testing.assert_array_equal(_run(op, image, m), want, err_msg=f"{name} M={m}")


@pytest.mark.parametrize("name", sorted(EXACT))
def test_op_matches_pil_exactly(images, name):
    _check_exact(name, images)


def _differing_pixels(a, b):
    return np.any(a != b, axis=-1)


def _check_rotate(images):
    # Same centre ((W - 1) / 2, (H - 1) / 2 in pixel indices), direction and nearest sampling;
    # TF computes the sample positions in float32 and PIL in float64, so the rare position
    # within ~1e-5 of a pixel boundary can round to the neighbour: none at 32 and 64 px,
    # about 30 of 50176 pixels at 224 px.
    for m in (-9, 3, 10):
        for image in images:
            want = np.asarray(Image.fromarray(image).rotate(m * 3, Image.NEAREST, fillcolor=GREY))
            differ = _differing_pixels(_run(ra._rotate, image, m), want)
            assert differ.mean() <= (0 if image.shape[0] <= 64 else 1e-3), (m, image.shape)


def test_rotate_matches_pil(images):
    _check_rotate(images)


def _check_shear(axis, images):
    # TF maps output pixel indices to input indices; PIL maps pixel centres (index + 0.5), so
    # PIL's equivalent of big_vision's shear s has offset -s/2. Nearest sampling then agrees
    # except on the rows (ShearX) or columns (ShearY) t where s * t is exactly k + 0.5: TF
    # rounds those half away from zero, PIL's floor(v + 0.5) sees float noise either way.
    op = ra._shear_x if axis == "x" else ra._shear_y
    for m in (-9, 3, 10):
        s = m / 10 * 0.3
        coeffs = (1, s, -s / 2, 0, 1, 0) if axis == "x" else (1, 0, 0, s, 1, -s / 2)
        for image in images:
            want = np.asarray(_affine(lambda im, m, c=coeffs: c)(Image.fromarray(image), m))
            differ = _differing_pixels(_run(op, image, m), want)
            lines = np.flatnonzero(differ.any(axis=1 if axis == "x" else 0))
            ties = np.abs(np.abs(s * lines) % 1 - 0.5) < 1e-6
            assert ties.all(), (axis, m, image.shape, lines[~ties])


@pytest.mark.parametrize("axis", ["x", "y"])
def test_shear_matches_pil(images, axis):
    _check_shear(axis, images)


def _check_cutout(images):
    """A grey square, 2 * 40 M / 10 px at 224 px scaled by the shorter side, at the centre."""
    for image in images:
        h, w = image.shape[:2]
        for m in (0, 5, 10):
            pad = int(m / 10 * ra.CUTOUT_CONST * min(h, w) / ra.REFERENCE_SIZE)
            want = image.copy()
            cy, cx = h // 2, w // 2  # seed=None: centred
            want[max(cy - pad, 0) : cy + pad, max(cx - pad, 0) : cx + pad] = 128
            np.testing.assert_array_equal(_run(ra._cutout, image, m), want)


def test_cutout_square_and_size(images):
    _check_cutout(images)
    big = images[-1]  # 224 px: big_vision's 2 * 40 = 80 px square at M=10, fully inside
    assert np.all(_run(ra._cutout, big, 10)[72:152, 72:152] == 128)
    seeded = [_run(ra._cutout, big, 10, tf.constant([3, i])) for i in range(4)]
    assert all(np.sum(np.all(out == 128, axis=-1)) > 0 for out in seeded)
    assert len({out.tobytes() for out in seeded}) == 4  # the centre follows the seed


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_geometric_ops_match_pil_on_rectangular_images(shape):
    """Rotation about the centre, shears, translations scaled by their own side (X by the width,
    Y by the height) and cutout sized by the shorter side, on noise of that shape."""
    images = [np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)]
    for name in ("translate_x", "translate_y"):
        _check_exact(name, images)
    _check_rotate(images)
    for axis in ("x", "y"):
        _check_shear(axis, images)
    _check_cutout(images)


def test_solarize_magnitude_10_is_identity_and_0_inverts(images):
    for image in images:
        np.testing.assert_array_equal(_run(ra._solarize, image, 10), image)
        np.testing.assert_array_equal(_run(ra._solarize, image, 0), 255 - image)


def test_only_geometric_ops_use_the_sign(images):
    image = images[1]
    signed = {ra._rotate, ra._shear_x, ra._shear_y, ra._translate_x, ra._translate_y}
    for op in ra.OPS:
        same = np.array_equal(_run(op, image, 9), _run(op, image, -9))
        assert same != (op in signed), op.__name__


def test_enhance_factor_is_0_1_to_1_9():
    grey = np.full((8, 8, 3), 100, np.uint8)
    for m, want in ((0, 10), (5, 100), (9, 172), (10, 190)):  # brightness: floor(100 f)
        for level in (m, -m):
            assert np.all(_run(ra._brightness, grey, level) == want), (m, level)


def test_op_list_is_big_vision_randaugment():
    names = [op.__name__.strip("_") for op in ra.OPS]
    assert names == [
        "autocontrast",
        "equalize",
        "invert",
        "rotate",
        "posterize",
        "solarize",
        "color",
        "contrast",
        "brightness",
        "sharpness",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
        "cutout",
        "solarize_add",
    ]


def test_randaugment_always_applies_one_listed_op(images):
    image = images[0]
    candidates = {}
    for op in ra.OPS[:-2] + ra.OPS[-1:]:  # all but Cutout, whose square depends on the seed
        for level in (9, -9):
            candidates[_run(op, image, level).tobytes()] = op.__name__
    seen = set()
    for i in range(40):
        out = ra.randaugment(tf.constant(image), 1, 9, tf.constant([5, i])).numpy()
        changed = np.any(out != image, axis=-1)
        if out.tobytes() in candidates:
            seen.add(candidates[out.tobytes()])
        else:  # Cutout: a grey square at M=9, 32 px: int(36 * 32 / 224) = 5, so up to 10x10
            assert changed.any() and np.all(out[changed] == 128), i
            assert changed.sum() <= 100, i
            seen.add("_cutout")
    assert len(seen) >= 14, seen  # 40 seeds select all 16 ops; allow for equal outputs


def test_randaugment_deterministic_seeded_uint8(images):
    image = tf.constant(images[3])
    run = tf.function(ra.randaugment, reduce_retracing=True)
    a = run(image, 2, 10, tf.constant([1, 2])).numpy()
    b = ra.randaugment(image, 2, 10, tf.constant([1, 2])).numpy()
    np.testing.assert_array_equal(a, b)  # graph and eager agree, same seed -> same image
    assert a.dtype == np.uint8 and a.shape == images[3].shape
    outs = {ra.randaugment(image, 2, 10, tf.constant([1, i])).numpy().tobytes() for i in range(8)}
    assert len(outs) >= 6
