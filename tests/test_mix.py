"""Tests for vit.mix: label smoothing, mixup and cutmix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit.mix import mixup_cutmix, smooth_labels
from vit.model_options import pair


def _batch(b=8, size=8, classes=5):
    """b flat images, image i of value i, of `size` (a side or (H, W)); one-hot targets."""
    images = jnp.stack([jnp.full((*pair(size), 3), float(i)) for i in range(b)])
    targets = smooth_labels(jnp.arange(b) % classes, classes, 0.0)
    return images, targets


def test_smooth_labels_exact_values():
    t = smooth_labels(jnp.array([2, 0]), 4, 0.1)
    np.testing.assert_allclose(t[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
    np.testing.assert_allclose(t.sum(-1), [1.0, 1.0], rtol=1e-6)


def test_identity_when_both_alphas_zero():
    images, targets = _batch()
    out_i, out_t = mixup_cutmix(jax.random.key(0), images, targets, mixup_alpha=0, cutmix_alpha=0)
    assert out_i is images and out_t is targets


def test_mixup_pairs_with_reversed_batch():
    images, targets = _batch()
    out_i, out_t = mixup_cutmix(
        jax.random.key(1), images, targets, mixup_alpha=0.8, cutmix_alpha=0.0
    )
    # Lambda from the key, as mixup_cutmix draws it (its second subkey), not from the output.
    lam = float(jax.random.beta(jax.random.split(jax.random.key(1), 4)[1], 0.8, 0.8))
    assert 0.0 < lam < 1.0 and abs(lam - 0.5) > 1e-3  # a real mix, and not symmetric
    np.testing.assert_allclose(out_i[0], lam * images[0] + (1 - lam) * images[7], rtol=1e-5)
    np.testing.assert_allclose(out_t, lam * targets + (1 - lam) * targets[::-1], rtol=1e-5)
    np.testing.assert_allclose(out_t.sum(-1), np.ones(8), rtol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_lambda_is_pasted_area(seed):
    images, targets = _batch(size=16)
    out_i, out_t = mixup_cutmix(
        jax.random.key(seed), images, targets, mixup_alpha=0.0, cutmix_alpha=1.0
    )
    pasted = float((out_i[0, :, :, 0] == 7.0).mean())  # image 0 receives pixels of image 7
    assert set(np.unique(out_i[0])) <= {0.0, 7.0}
    np.testing.assert_allclose(out_t[0], (1 - pasted) * targets[0] + pasted * targets[7], atol=1e-6)
    np.testing.assert_allclose(out_t.sum(-1), np.ones(8), rtol=1e-5)


@pytest.mark.parametrize("size", [(24, 40), (40, 24)])
@pytest.mark.parametrize("seed", range(4))
def test_cutmix_on_rectangles_pastes_a_box_of_the_image_shape_weighted_by_its_area(seed, size):
    """The box is rows x columns, each side sqrt(1 - lambda) of the image's (less where the
    image border cuts it), and the targets mix by the pasted share of the pixels."""
    images, targets = _batch(size=size)
    key = jax.random.key(seed)
    out_i, out_t = mixup_cutmix(key, images, targets, mixup_alpha=0.0, cutmix_alpha=1.0)
    assert out_i.shape == images.shape
    pasted = np.asarray(out_i[0, :, :, 0] == 7.0)
    rows, cols = np.flatnonzero(pasted.any(1)), np.flatnonzero(pasted.any(0))
    assert rows.size and cols.size  # these seeds paste something
    np.testing.assert_array_equal(pasted, np.outer(pasted.any(1), pasted.any(0)))  # one box
    assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
    cut = np.sqrt(1 - float(jax.random.beta(jax.random.split(key, 4)[2], 1.0, 1.0)))
    for found, whole in ((rows, size[0]), (cols, size[1])):
        inside = found[0] > 0 and found[-1] < whole - 1
        assert len(found) == round(cut * whole) if inside else len(found) <= round(cut * whole)
    share = pasted.mean()
    np.testing.assert_allclose(out_t[0], (1 - share) * targets[0] + share * targets[7], atol=1e-6)


def test_switch_chooses_both_and_is_jittable():
    images, targets = _batch(size=16)
    fn = jax.jit(lambda k: mixup_cutmix(k, images, targets, mixup_alpha=0.8, cutmix_alpha=1.0))
    kinds = set()
    for seed in range(12):
        out_i, out_t = fn(jax.random.key(seed))
        values = np.unique(out_i[0])
        kinds.add("cutmix" if set(values) <= {0.0, 7.0} else "mixup")
        np.testing.assert_allclose(out_t.sum(-1), np.ones(8), rtol=1e-5)
    assert kinds == {"cutmix", "mixup"}


def test_negative_alpha_is_one_line_error():
    images, targets = _batch()
    with pytest.raises(ValueError, match="alphas >= 0"):
        mixup_cutmix(jax.random.key(0), images, targets, mixup_alpha=-1, cutmix_alpha=0)
