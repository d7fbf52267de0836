"""Dense matmuls (vit/matmul.py): bfloat16 operands, flat weight gradients, the model option."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit
from vit import matmul


def _bf16_rounded(x):
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def test_forward_equals_float64_product_of_bfloat16_rounded_operands():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 64))
    w = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
    y = matmul.bf16_matmul(x, w)
    assert y.dtype == jnp.float32
    expected = _bf16_rounded(x).astype(np.float64) @ _bf16_rounded(w).astype(np.float64)
    # Float32 accumulation of exactly representable bfloat16 products.
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    # and genuinely different from the float32 product: the operands were rounded
    assert np.abs(np.asarray(y) - np.asarray(x @ w)).max() > 1e-3


def test_gradients_are_bfloat16_operand_products_of_the_cotangent():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 32))
    w = jax.random.normal(jax.random.PRNGKey(1), (32, 24))
    g = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 24))
    _, vjp = jax.vjp(matmul.bf16_matmul, x, w)
    dx, dw = vjp(g)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    gb, xb, wb = (_bf16_rounded(a).astype(np.float64) for a in (g, x, w))
    np.testing.assert_allclose(np.asarray(dx), gb @ wb.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), xb.reshape(-1, 32).T @ gb.reshape(-1, 24),
                               rtol=1e-5, atol=1e-4)


def test_gradients_keep_bfloat16_input_dtypes():
    x = jnp.ones((2, 8), jnp.bfloat16)
    w = jnp.ones((8, 4), jnp.float32)
    dx, dw = jax.grad(lambda x, w: matmul.bf16_matmul(x, w).sum(), argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dx, np.float32), 4.0)
    np.testing.assert_array_equal(np.asarray(dw), 2.0)


def test_float32_matmul_dtype_is_the_plain_product():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
    np.testing.assert_array_equal(np.asarray(matmul.matmul(x, w, "float32", jnp.float32)),
                                  np.asarray(x @ w))


@pytest.mark.parametrize("matmul_dtype", matmul.MATMUL_DTYPES)
def test_matmul_keeps_leading_dims_and_its_gradients_transpose_nothing(matmul_dtype):
    # x [batch, tokens, K]: run flat, the weight gradient is one dot over one contracting
    # dimension, which XLA:CPU computes without first transposing an operand in memory.
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
    y = matmul.matmul(x, w, matmul_dtype, jnp.float32)
    assert y.shape == (4, 5, 8)
    tol = 0 if matmul_dtype == "float32" else 5e-2
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.einsum("btk,kn->btn", x, w)),
                               rtol=tol, atol=tol)
    grads = jax.jit(jax.grad(lambda x, w: (matmul.matmul(x, w, matmul_dtype, jnp.float32)
                                           ** 2).sum(), argnums=(0, 1)))
    hlo = grads.lower(x, w).compile().as_text()
    assert " transpose(" not in hlo and " copy(" not in hlo


def test_dense_dot_general_is_the_flat_matmul():
    dense = nn.Dense(8, dot_general=matmul.dense_dot_general("float32"))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 16))
    params = dense.init(jax.random.PRNGKey(1), x)
    expected = x @ params["params"]["kernel"] + params["params"]["bias"]
    np.testing.assert_allclose(np.asarray(dense.apply(params, x)), np.asarray(expected),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown matmul_dtype"):
        matmul.dense_dot_general("float16")


TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, classifier="map")


def test_model_with_bfloat16_matmuls_keeps_float32_params_and_close_logits():
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    exact = vit.create_model("Ti/4", num_classes=10, image_size=16, **TINY)
    mixed = vit.create_model("Ti/4", num_classes=10, image_size=16, matmul_dtype="bfloat16",
                             **TINY)
    params = vit.init_params(exact, jax.random.PRNGKey(1))
    # a non-zero head, so logits depend on every matmul
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        vit.init_params(mixed, jax.random.PRNGKey(1)))
    a = np.asarray(exact.apply({"params": params}, images))
    b = np.asarray(mixed.apply({"params": params}, images))
    assert b.dtype == np.float32
    assert 0 < np.abs(a - b).max() < 0.05 * np.abs(a).max()

    def loss(p, model):
        return model.apply({"params": p}, images).sum()

    ga, gb = (jax.grad(loss)(params, m) for m in (exact, mixed))
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb), strict=True):
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0.1,
                                   atol=0.05 * float(np.abs(x).max()) + 1e-6)


def test_unknown_matmul_dtype_names_the_choices():
    with pytest.raises(ValueError, match="unknown matmul_dtype 'float16'.*bfloat16"):
        vit.create_model("Ti/4", num_classes=10, image_size=16, matmul_dtype="float16", **TINY)
