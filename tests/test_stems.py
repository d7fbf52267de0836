"""The conv stem (vit/stems.py) and PatchDropout token dropping (vit/model.py)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit
from vit import encoder, stems

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)


def _model(**kw):
    return vit.create_model("Ti/4", num_classes=10, image_size=16, **{**TINY, **kw})


def _images(batch=2, size=16, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))


def _shapes(model):
    shapes = jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))
    return {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(shapes).items()}


def test_conv_stem_parameters_and_xiao_channels():
    shapes = _shapes(_model(stem="conv"))
    # patch 4 = two stride-2 convs; Xiao et al.'s channels double up to the width: 16, 32.
    assert shapes["stem/conv_0/kernel"] == (3, 3, 3, 16)
    assert shapes["stem/conv_1/kernel"] == (3, 3, 16, 32)
    assert shapes["stem/norm_1/scale"] == (32,)
    assert shapes["embedding/kernel"] == (1, 1, 32, 32)
    assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 1 + 16, 32)
    assert stems.default_stem_channels(384, (16, 16)) == (48, 96, 192, 384)


def test_conv_stem_extra_stride_one_convs_keep_the_token_grid():
    model = _model(stem="conv", stem_channels=(8, 16, 32), classifier="gap")
    shapes = _shapes(model)
    assert shapes["stem/conv_0/kernel"] == (3, 3, 3, 8)
    assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 16, 32)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    _, maps = model.apply({"params": params}, _images(), return_attention=True)
    assert maps.shape == (2, 2, 2, 16, 16)  # depth, batch, heads, tokens, tokens


@pytest.mark.parametrize("norm", ["layernorm", "groupnorm"])
def test_conv_stem_trains_every_parameter(norm):
    model = _model(stem="conv", stem_norm=norm)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.01, params)  # head starts at zero

    def loss(p):
        return jnp.sum(model.apply({"params": p}, _images()) ** 2)

    grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params))
    for name, g in grads.items():
        assert float(jnp.abs(g).max()) > 0, "/".join(name)


def test_conv_stem_convolutions_are_exact():
    """The stem's first conv equals a hand-written 3x3 stride-2 convolution."""
    model = stems.ConvStem(8, (2, 2), channels=(4,), norm="layernorm")
    x = np.asarray(_images(1, 6))
    params = model.init(jax.random.PRNGKey(0), x)
    kernel = np.asarray(params["params"]["conv_0"]["kernel"])
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros((1, 3, 3, 4))
    for i in range(3):
        for j in range(3):
            conv[0, i, j] = np.einsum("hwc,hwco->o", padded[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3],
                                      kernel)
    mean, var = conv.mean(-1, keepdims=True), conv.var(-1, keepdims=True)
    expected = np.maximum((conv - mean) / np.sqrt(var + 1e-6), 0)
    np.testing.assert_allclose(model.apply(params, x), expected, atol=1e-4)


@pytest.mark.parametrize("patch", [3, 6])
def test_conv_stem_needs_a_power_of_two_patch(patch):
    with pytest.raises(ValueError, match="power-of-two patch"):
        vit.create_model(f"Ti/{patch}", num_classes=10, image_size=24, stem="conv")


def test_bad_stem_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown stem 'resnet'"):
        _model(stem="resnet")
    with pytest.raises(ValueError, match="unknown stem_norm"):
        _model(stem="conv", stem_norm="batchnorm")
    with pytest.raises(ValueError, match="token_keep_ratio must be in"):
        _model(token_keep_ratio=0.0)
    with pytest.raises(ValueError, match="needs at least 2"):
        _model(stem="conv", stem_channels=(8,))
    with pytest.raises(ValueError, match="multiplying to the patch size 4"):
        _model(stem="conv", stem_channels=(8, 16, 32), stem_strides=(2, 2, 2))


def test_conv_stem_strides_place_the_downsampling():
    model = _model(stem="conv", stem_channels=(8, 16, 32), stem_strides=(2, 1, 2),
                   classifier="gap")
    params = vit.init_params(model, jax.random.PRNGKey(0))
    stem = vit.stems.ConvStem(32, (4, 4), (8, 16, 32), (2, 1, 2))
    feats = stem.apply({"params": params["stem"]}, _images())
    assert feats.shape == (2, 4, 4, 32)
    assert model.apply({"params": params}, _images()).shape == (2, 10)


def test_keep_random_tokens_keeps_prefix_and_order():
    x = jnp.arange(2 * 9 * 1, dtype=jnp.float32).reshape(2, 9, 1)  # 1 prefix + 8 patches
    out = encoder.keep_random_tokens(x, 1, 0.5, jax.random.PRNGKey(3))
    assert out.shape == (2, 5, 1)
    np.testing.assert_array_equal(out[:, 0, 0], x[:, 0, 0])
    for b in range(2):
        kept = np.asarray(out[b, 1:, 0])
        assert np.all(np.diff(kept) > 0)  # original order
        assert set(kept) <= set(np.asarray(x[b, 1:, 0]))
    # each image draws its own subset
    assert not np.array_equal(out[0, 1:, 0] - x[0, 1, 0], out[1, 1:, 0] - x[1, 1, 0])


def test_token_dropping_only_in_training():
    model = _model(token_keep_ratio=0.5, classifier="token")
    full = _model(classifier="token")
    params = vit.init_params(model, jax.random.PRNGKey(0))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
    params = jax.tree_util.tree_unflatten(  # a random head, so logits depend on the tokens
        tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)])
    x = _images()
    # evaluation sees every token: identical to the same weights without dropping
    np.testing.assert_array_equal(model.apply({"params": params}, x),
                                  full.apply({"params": params}, x))
    rngs = lambda s: {"dropout": jax.random.PRNGKey(s)}
    train = lambda s: model.apply({"params": params}, x, train=True, rngs=rngs(s),
                                  return_attention=True)
    logits_a, maps = train(0)
    assert maps.shape[-1] == 1 + 8  # class token + half of the 16 patches
    np.testing.assert_array_equal(logits_a, train(0)[0])  # same rng, same tokens
    assert not np.allclose(logits_a, train(1)[0])
