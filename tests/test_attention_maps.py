"""Tests for vit.attention_maps: weights, rollout, per-layer maps, upsampling and the writer."""

import math
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

import vit
from vit import attention_maps as am

TINY = dict(num_classes=10, image_size=32, width=32, depth=2, num_heads=2, mlp_dim=64)


def _init(model, seed):
    """init_params under jit: compiling once is faster than running it op by op."""
    return jax.jit(lambda key: vit.init_params(model, key))(jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def token_model():
    model = vit.create_model("Ti/4", **TINY)
    return model, _init(model, 0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def token_weights(token_model, images):
    model, params = token_model
    return am.attention_weights(model, params, images)


def _stochastic(rng, n):
    """A random row-stochastic n x n matrix."""
    a = rng.random((n, n)) ** 3
    return a / a.sum(axis=1, keepdims=True)


def _stack(per_head, depth, batch=1):
    """Identical attention in every layer and example: [depth, batch, heads, T, T]."""
    heads = np.stack(per_head)
    return np.broadcast_to(heads, (depth, batch, *heads.shape)).copy()


def _closed_form(a, depth, num_prefix_tokens):
    a_hat = 0.5 * a + 0.5 * np.eye(len(a))
    a_hat /= a_hat.sum(axis=1, keepdims=True)
    r = np.linalg.matrix_power(a_hat, depth)
    row = r[0] if num_prefix_tokens else r.mean(axis=0)
    patches = row[num_prefix_tokens:]
    return patches / patches.sum()


def test_attention_weights_shape_and_rows_sum_to_one(token_weights):
    assert token_weights.shape == (2, 3, 2, 65, 65)
    assert token_weights.dtype == np.float32
    assert (token_weights >= 0).all()
    np.testing.assert_allclose(token_weights.sum(axis=-1), 1.0, atol=1e-5)


def test_attention_weights_batching_does_not_change_result(token_model, images, token_weights):
    model, params = token_model
    chunked = am.attention_weights(model, params, images, batch_size=2)
    np.testing.assert_allclose(chunked, token_weights, atol=1e-6)


def test_attention_weights_rejects_other_models_and_raw_images(token_model, images):
    dense = nn.Dense(3)
    with pytest.raises(ValueError, match="need a vit.VisionTransformer, got Dense"):
        am.attention_weights(dense, {}, images)
    model, params = token_model
    with pytest.raises(ValueError, match="preprocess them first"):
        am.attention_weights(model, params, np.zeros((1, 32, 32, 3), np.uint8))


def test_prefix_token_count_follows_classifier():
    assert am.prefix_token_count(vit.create_model("Ti/4", **TINY)) == 1
    for classifier in ("gap", "map"):
        assert am.prefix_token_count(vit.create_model("Ti/4", classifier=classifier, **TINY)) == 0


def test_rollout_of_model_has_grid_shape_and_sums_to_one(token_model, token_weights):
    model, _ = token_model
    maps = am.rollout(token_weights, num_prefix_tokens=1, class_token=True)
    assert maps.shape == (3, 64)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-5)
    assert am.to_grid(maps, model.grid).shape == (3, 8, 8)


def test_token_layout_names_the_query_so_registers_are_never_read_as_a_class_token():
    t = 5  # one register, then 4 patches; the register looks only at patch 2
    a = np.eye(t)
    a[0] = np.eye(t)[3]
    weights = _stack([a], depth=1)
    gap = vit.create_model("Ti/4", classifier="gap", num_registers=1, **TINY)
    assert am.token_layout(gap) == {"num_prefix_tokens": 1, "class_token": False}
    assert am.token_layout(vit.create_model("Ti/4", num_registers=2, **TINY)) == {
        "num_prefix_tokens": 3, "class_token": True}
    # the patches' mean row: patches 1..4 attend to themselves, renormalised over the patches
    np.testing.assert_allclose(am.rollout(weights, num_prefix_tokens=1, class_token=False)[0],
                               [0.25, 0.25, 0.25, 0.25], atol=1e-6)
    for maps in (am.rollout, am.layer_maps):
        with pytest.raises(ValueError, match="with 1 prefix tokens, say whether the first is a "
                                             "class token: class_token=True"):
            maps(weights, num_prefix_tokens=1)
    np.testing.assert_allclose(am.rollout(weights, num_prefix_tokens=0)[0],
                               [0.1, 0.2, 0.2, 0.3, 0.2], atol=1e-6)


def test_gap_model_has_no_class_token(images):
    model = vit.create_model("Ti/4", classifier="gap", **TINY)
    weights = am.attention_weights(model, _init(model, 1), images)
    assert weights.shape == (2, 3, 2, 64, 64)
    maps = am.rollout(weights, num_prefix_tokens=am.prefix_token_count(model))
    assert maps.shape == (3, 64)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("num_prefix_tokens", [1, 0])
def test_rollout_equals_closed_form_for_identical_layers(num_prefix_tokens):
    rng = np.random.default_rng(0)
    t, depth = 1 + 4, 3
    a1, a2 = _stochastic(rng, t), _stochastic(rng, t)
    weights = _stack([a1, a2], depth, batch=2)
    layout = dict(num_prefix_tokens=num_prefix_tokens, class_token=num_prefix_tokens == 1)
    got = am.rollout(weights, **layout)
    expected = _closed_form((a1 + a2) / 2, depth, num_prefix_tokens)
    np.testing.assert_allclose(got, np.stack([expected, expected]), atol=1e-6)
    one_head = am.rollout(weights, **layout, head=1)
    np.testing.assert_allclose(one_head[0], _closed_form(a2, depth, num_prefix_tokens), atol=1e-6)


def test_rollout_multiplies_later_layers_on_the_left():
    rng = np.random.default_rng(3)
    a1, a2 = _stochastic(rng, 5), _stochastic(rng, 5)
    weights = np.stack([a1, a2])[:, None, None]  # layer 0 = a1, layer 1 = a2
    hat = lambda a: (0.5 * a + 0.5 * np.eye(5)) / (0.5 * a + 0.5 * np.eye(5)).sum(1, keepdims=True)
    row = (hat(a2) @ hat(a1))[0, 1:]
    np.testing.assert_allclose(am.rollout(weights, num_prefix_tokens=1, class_token=True)[0],
                               row / row.sum(), atol=1e-6)


def test_rollout_token_and_gap_read_different_rows():
    t = 5
    a = np.eye(t)
    a[0] = np.eye(t)[3]  # the class token looks only at patch 2; every other token at itself
    weights = _stack([a], depth=1)
    np.testing.assert_allclose(am.rollout(weights, num_prefix_tokens=1, class_token=True)[0],
                               [0, 0, 1, 0])
    # Without a class token the same matrix averages all 5 rows over 5 "patches".
    gap = am.rollout(weights, num_prefix_tokens=0)[0]
    np.testing.assert_allclose(gap, [0.1, 0.2, 0.2, 0.3, 0.2], atol=1e-6)


def test_rollout_is_uniform_when_nothing_reaches_the_patches():
    weights = _stack([np.eye(5)], depth=2)
    np.testing.assert_allclose(am.rollout(weights, num_prefix_tokens=1, class_token=True)[0], 0.25)


def test_layer_maps_are_class_token_rows_of_each_layer():
    rng = np.random.default_rng(1)
    per_layer = [[_stochastic(rng, 5), _stochastic(rng, 5)] for _ in range(3)]
    weights = np.stack([np.stack(h) for h in per_layer])[:, None]  # [3, 1, 2, 5, 5]
    maps = am.layer_maps(weights, num_prefix_tokens=1, class_token=True)
    assert maps.shape == (3, 1, 4)
    for i, (h0, h1) in enumerate(per_layer):
        row = ((h0 + h1) / 2)[0, 1:]
        np.testing.assert_allclose(maps[i, 0], row / row.sum(), atol=1e-6)
    one = am.layer_maps(weights, num_prefix_tokens=1, class_token=True, layer=2, head=0)
    assert one.shape == (1, 1, 4)
    np.testing.assert_allclose(one[0, 0], per_layer[2][0][0, 1:] / per_layer[2][0][0, 1:].sum(),
                               atol=1e-6)
    gap = am.layer_maps(weights, num_prefix_tokens=0, layer=0)
    np.testing.assert_allclose(gap[0, 0], ((per_layer[0][0] + per_layer[0][1]) / 2).mean(0),
                               atol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(layer=3), "layer=3 is out of range; the model has 3 layers"),
    (dict(head=2), "head=2 is out of range; the model has 2 heads"),
    (dict(num_prefix_tokens=5), "num_prefix_tokens=5 does not fit 5 tokens"),
])
def test_layer_maps_reject_bad_indices(kwargs, message):
    weights = _stack([np.eye(5), np.eye(5)], depth=3)
    kwargs = {"num_prefix_tokens": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        am.layer_maps(weights, **kwargs)


def test_rollout_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"must be \[depth, B, heads, T, T\]"):
        am.rollout(np.ones((2, 5, 5)), num_prefix_tokens=1, class_token=True)


def test_to_grid_and_upsample():
    maps = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)
    grid = am.to_grid(maps, (3, 4))
    assert grid.shape == (2, 3, 4)
    np.testing.assert_array_equal(grid[1, 2], maps[1, 8:12])
    with pytest.raises(ValueError, match="grid 3x3 has 9"):
        am.to_grid(maps, (3, 3))
    assert am.upsample(grid, (12, 16)).shape == (2, 12, 16)
    nearest = am.upsample(grid, (12, 16), method="nearest")
    np.testing.assert_array_equal(nearest[0], np.kron(grid[0], np.ones((4, 4))))
    np.testing.assert_allclose(am.upsample(np.full((3, 4), 0.5), (30, 40)), 0.5, atol=1e-6)


def test_writer_writes_pngs_and_npy(tmp_path, token_model, token_weights):
    model, _ = token_model
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    paths = am.write_attention_outputs(image, token_weights[:, 0], str(tmp_path), "cat",
                                       grid=model.grid, num_prefix_tokens=1, class_token=True)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(f"cat_{s}" for s in ("image.png", "rollout.png", "layers.png",
                                                  "attention.npy", "rollout.npy", "layers.npy"))
    assert all(os.path.isfile(p) for p in paths)
    side = 32 * math.ceil(am.MIN_DISPLAY_SIDE / 32)
    shown = np.asarray(Image.open(tmp_path / "cat_image.png").convert("RGB"))
    np.testing.assert_array_equal(shown, np.kron(image, np.ones((7, 7, 1), np.uint8)))
    assert Image.open(tmp_path / "cat_rollout.png").size == (side, side)
    panel_w, panel_h = (round(i * am.LAYER_GRID_DPI) for i in am.PANEL_INCHES)
    assert Image.open(tmp_path / "cat_layers.png").size == (2 * panel_w, panel_h)
    np.testing.assert_array_equal(np.load(tmp_path / "cat_attention.npy"), token_weights[:, 0])
    roll = np.load(tmp_path / "cat_rollout.npy")
    assert roll.shape == (8, 8)
    np.testing.assert_allclose(roll.sum(), 1.0, atol=1e-5)
    assert np.load(tmp_path / "cat_layers.npy").shape == (2, 8, 8)


def test_writer_one_layer_and_head(tmp_path, token_model, token_weights):
    model, _ = token_model
    image = np.zeros((32, 32, 3), np.uint8)
    am.write_attention_outputs(image, token_weights[:, 1], str(tmp_path), "x", grid=model.grid,
                               num_prefix_tokens=1, class_token=True, layer=1, head=0, scale=2)
    assert Image.open(tmp_path / "x_image.png").size == (64, 64)
    assert Image.open(tmp_path / "x_layers.png").size == tuple(
        round(i * am.LAYER_GRID_DPI) for i in am.PANEL_INCHES)
    expected = am.layer_maps(token_weights[:, 1:2], num_prefix_tokens=1, class_token=True,
                             layer=1, head=0)
    np.testing.assert_allclose(np.load(tmp_path / "x_layers.npy"), am.to_grid(expected[:, 0],
                                                                              model.grid))
    with pytest.raises(ValueError, match="uint8 RGB image"):
        am.write_attention_outputs(image.astype(np.float32), token_weights[:, 0], str(tmp_path),
                                   "y", grid=model.grid, num_prefix_tokens=1, class_token=True)


def test_write_attention_batch(tmp_path, token_model, images):
    model, params = token_model
    shown = np.zeros((2, 32, 32, 3), np.uint8)
    paths = am.write_attention_batch(model, params, images[:2], shown, str(tmp_path), ["a", "b"])
    assert len(paths) == 12 and all(os.path.isfile(p) for p in paths)
    with pytest.raises(ValueError, match="pass one of each per image"):
        am.write_attention_batch(model, params, images[:2], shown, str(tmp_path), ["a"])


def test_depth_0_rolls_out_to_uniform_maps_and_draws_nothing(tmp_path, images):
    model = vit.create_model("Ti/4", **{**TINY, "depth": 0})
    params = _init(model, 0)
    weights = am.attention_weights(model, params, images)
    assert weights.shape == (0, 3, 2, 65, 65)
    # Zero layers: the rollout is the query's own row, which puts nothing on the patches.
    np.testing.assert_array_equal(am.rollout(weights, **am.token_layout(model)),
                                  np.full((3, 64), 1 / 64, np.float32))
    assert am.layer_maps(weights, **am.token_layout(model)).shape == (0, 3, 64)
    with pytest.raises(ValueError) as err:
        am.layer_maps(weights, layer=0, **am.token_layout(model))
    assert str(err.value) == ("layer=0 is out of range; the model has no layers (depth 0): "
                              "leave layer unset")
    shown = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError) as err:
        am.write_attention_batch(model, params, images, shown, str(tmp_path / "out"), "abc")
    assert str(err.value) == ("the model has no encoder blocks (depth 0), so no attention to "
                              "draw: use a checkpoint of a model with depth >= 1")
    assert not (tmp_path / "out").exists()
