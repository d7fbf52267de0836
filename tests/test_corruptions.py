"""vit.corruptions: published parameters, identity at severity 0, monotone damage, determinism."""

import math
import os

import numpy as np
import pytest

from vit import corruptions, data
from vit.corruptions import CORRUPTIONS, CorruptionError, corrupt, corrupt_batch, psnr

DATA_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../shared/data/tfds"))

# Typed from make_cifar_c.py of github.com/hendrycks/robustness (the CIFAR-10-C generator),
# severities 1..5; frost's weights are the published ones, its frost layer is procedural.
PUBLISHED = {
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "brightness": [.05, .1, .15, .2, .3],
    "contrast": [.75, .5, .4, .3, 0.15],
    "elastic_transform": [(32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07),
                          (32 * 0.08, 32 * 0.06, 32 * 0.06), (32 * 0.1, 32 * 0.04, 32 * 0.05),
                          (32 * 0.1, 32 * 0.03, 32 * 0.03)],  # at IMSIZE = 32
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Twelve real CIFAR-10 test images, uint8 [12, 32, 32, 3]."""
    if not os.path.isdir(os.path.join(DATA_DIR, "cifar10")):
        pytest.skip(f"shipped CIFAR-10 not found at {DATA_DIR}")
    config = data.default_config()
    config.data_dir = DATA_DIR
    batch = next(data.eval_iterator(config, "test[:12]", batch_size=12, num_devices=1))
    assert batch["image"].dtype == np.uint8
    return batch["image"][0]


def test_the_fifteen_benchmark_corruptions_in_four_families():
    assert len(CORRUPTIONS) == 15 and set(corruptions.PARAMS) == set(CORRUPTIONS)
    assert sum(len(v) for v in corruptions.FAMILIES.values()) == 15


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_parameters_are_the_published_ones(name):
    ours = corruptions.PARAMS[name]
    assert len(ours) == 5
    for severity, published in enumerate(PUBLISHED[name]):
        mine = ours[severity]
        if name == "zoom_blur":
            mine = np.arange(*mine)
        elif name == "elastic_transform":
            mine = np.array(mine) * 32  # ours are shares of the image size
        np.testing.assert_allclose(np.atleast_1d(mine), np.atleast_1d(published),
                                   err_msg=f"{name} severity {severity + 1}")


def test_severity_zero_leaves_images_unchanged(images):
    for name in CORRUPTIONS:
        out = corrupt_batch(images, name, 0)
        np.testing.assert_array_equal(out, images, err_msg=name)


# The published parameters do not order every corruption by pixel damage (measured on 32 test
# images, PSNR in dB at severities 1..5):
# - frost dims the image as it adds frost (image weight 1 -> 0.75), so its PSNR is not monotone
#   (20.3 16.9 16.0 16.6 16.4) but its structural similarity (SSIM) falls at every severity;
# - glass blur blurs more at severities 2, 3 and 5, which smooths the shuffled pixels back toward
#   the original (21.1 21.2 22.0 18.0 18.6, with the published copy-not-swap shuffle); two
#   shuffle passes damage more than one;
# - elastic's affine jitter, the largest term, shrinks from severity 1 to 5 while the local
#   displacement grows (17.0 17.7 18.6 19.3 21.0): every severity changes the image.
NOT_BY_PSNR = {"frost", "glass_blur", "elastic_transform"}


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Gaussian window, sigma 1.5) of two uint8 batches."""
    from scipy import ndimage

    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: ndimage.gaussian_filter(x, (0, 1.5, 1.5, 0))
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    return float(np.mean((2 * ma * mb + c1) * (2 * cov + c2)
                         / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))))


def _decreasing(values: list[float]) -> bool:
    return all(a > b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n not in NOT_BY_PSNR])
def test_psnr_decreases_with_severity(images, name):
    values = [psnr(corrupt_batch(images, name, s), images) for s in range(6)]
    if name == "motion_blur":  # severities 3 and 4, (6, 2) and (8, 2), differ only in a kernel
        # radius beyond 3 sigma: equal to a few millionths of a dB, in either order by CPU
        assert values[3] == pytest.approx(values[4], abs=1e-3), values
        values = values[:4] + values[5:]
    assert values[0] == np.inf and _decreasing(values), values


def test_frost_ssim_decreases_with_severity(images):
    values = [_ssim(corrupt_batch(images, "frost", s), images) for s in range(6)]
    assert values[0] == pytest.approx(1.0) and _decreasing(values), values


def test_glass_blur_and_elastic_damage_as_their_published_parameters_say(images):
    glass = [psnr(corrupt_batch(images, "glass_blur", s), images) for s in range(6)]
    assert glass[2] > glass[4] and glass[3] > glass[5]  # same sigma, a second shuffle pass
    elastic = [psnr(corrupt_batch(images, "elastic_transform", s), images) for s in range(6)]
    assert elastic[0] == np.inf and max(glass[1:] + elastic[1:]) < 25


def _published_glass_shuffle(x: np.ndarray, shifts: np.ndarray, delta: int) -> np.ndarray:
    """The pixel loop of make_cifar_c.py's glass_blur, its "swap" statement verbatim."""
    for i in range(shifts.shape[0]):
        for a, h in enumerate(range(32 - delta, delta, -1)):
            for b, w in enumerate(range(32 - delta, delta, -1)):
                dx, dy = shifts[i, a, b]
                h_prime, w_prime = h + dy, w + dx
                # swap
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
    return x


@pytest.mark.parametrize("severity", [1, 5])
def test_glass_blur_copies_pixels_as_the_published_numpy_swap_does(images, severity):
    """The published "swap" on numpy views copies (h', w') onto (h, w): ours does the same."""
    sigma, delta, passes = corruptions.PARAMS["glass_blur"][severity - 1]
    shifts = np.random.default_rng(4).integers(-delta, delta, size=(passes, 30, 30, 2))
    assert set(np.unique(shifts)) == {-1, 0}  # np.random.randint(-1, 1): high is exclusive
    distinct = np.unique(images[0].reshape(-1, 3), axis=0).shape[0]
    published = _published_glass_shuffle(images[0].copy(), shifts, delta)
    ours = corruptions._glass_shuffle(images[0].copy(), shifts, delta)
    np.testing.assert_array_equal(ours, published)
    # a copy, not a permutation: some colours are lost, the first two rows and columns kept
    assert np.unique(published.reshape(-1, 3), axis=0).shape[0] < distinct
    np.testing.assert_array_equal(published[:2], images[0][:2])
    np.testing.assert_array_equal(published[:, :2], images[0][:, :2])
    # and the whole corruption: blur, the shuffle with the generator's draws, blur again
    blurred = (corruptions._blur(images[0] / 255.0, sigma) * 255).astype(np.uint8)
    expected = _published_glass_shuffle(blurred, np.random.default_rng(9).integers(
        -delta, delta, size=(passes, 30, 30, 2)), delta)
    expected = np.clip(corruptions._blur(expected / 255.0, sigma), 0, 1) * 255
    params = corruptions.PARAMS["glass_blur"][severity - 1]
    np.testing.assert_array_equal(
        corruptions._glass_blur(images[0], params, np.random.default_rng(9)), expected)


def test_the_same_seed_gives_the_same_images_in_any_batch(images):
    for name in CORRUPTIONS:
        first = corrupt_batch(images, name, 3, seed=7)
        np.testing.assert_array_equal(corrupt_batch(images, name, 3, seed=7), first)
        # an image's corruption does not depend on its batch or position in it
        np.testing.assert_array_equal(corrupt(images[5], name, 3, seed=7), first[5])
        np.testing.assert_array_equal(corrupt_batch(images[::-1], name, 3, seed=7), first[::-1])
        assert first.dtype == np.uint8 and first.shape == images.shape
    other = corrupt_batch(images, "gaussian_noise", 3, seed=8)
    assert not np.array_equal(other, corrupt_batch(images, "gaussian_noise", 3, seed=7))


RECTANGLES = {shape: np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
              for shape in ((24, 40), (40, 24))}


@pytest.mark.parametrize("shape", sorted(RECTANGLES))
def test_every_corruption_keeps_a_rectangular_image_shape(shape):
    image = RECTANGLES[shape]
    for name in CORRUPTIONS:
        for severity in corruptions.SEVERITIES:
            out = corrupt(image, name, severity, seed=1)
            assert out.dtype == np.uint8 and out.shape == image.shape, (name, severity)
            assert psnr(out, image) < math.inf, (name, severity)  # it did corrupt the image
        np.testing.assert_array_equal(corrupt(image, name, 5, seed=1), out, err_msg=name)


@pytest.mark.parametrize("name", ["defocus_blur", "zoom_blur", "pixelate"])
def test_a_corruption_without_randomness_of_a_transposed_image_is_the_transposed_one(name):
    """Height and width are never mixed up: off by at most one level (rounding order)."""
    image = RECTANGLES[(24, 40)]
    for severity in (1, 5):
        out = corrupt(image, name, severity).astype(int)
        of_transposed = corrupt(image.transpose(1, 0, 2), name, severity).astype(int)
        assert np.abs(of_transposed.transpose(1, 0, 2) - out).max() <= 1, (name, severity)


def test_the_plasma_map_of_a_rectangle_is_a_window_of_the_square_one():
    """fog's and frost's haze: a 24 x 40 image gets the top-left window of a 64 x 64 map, a
    32 x 32 image the 32 x 32 map itself."""
    for shape, side in (((24, 40), 64), ((40, 24), 64), ((32, 32), 32)):
        got = corruptions._plasma_like(np.zeros((*shape, 3)), 2.0, np.random.default_rng(5))
        square = corruptions._plasma(side, 2.0, np.random.default_rng(5))
        np.testing.assert_array_equal(got, square[: shape[0], : shape[1]])


def test_bad_names_severities_and_images_are_one_line_errors():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(CorruptionError, match="unknown corruption 'rain'; use one of"):
        corrupt(image, "rain", 1)
    with pytest.raises(CorruptionError, match="severity 6 of fog is out of range"):
        corrupt(image, "fog", 6)
    with pytest.raises(CorruptionError, match="uint8"):
        corrupt(image.astype(np.float32), "fog", 1)
