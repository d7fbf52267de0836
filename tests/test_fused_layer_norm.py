"""LayerNorm by the fused calls (vit/blas_layer_norm.cc, vit/fused_layer_norm.py): flax's
nn.LayerNorm's values and gradients, its parameters, and the models that use it; over the plain
C GEMMs of tests/plain_blas.py (the handler library must be loaded) so that it runs on any CPU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit
from vit import blas_gemm
from vit.fused_layer_norm import FusedLayerNorm, fused_layer_norm, layer_norm


def _normal(seed, shape, dtype=jnp.float32, scale=1.0, shift=0.0):
    return (shift + scale * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(dtype)


def _value_and_grads(module, params, x, dy):
    y, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
    return (y, *vjp(dy))


# 37 features: not a whole number of lanes; 3 x 67 = 201 rows: two chunks of partial sums, the
# second short
@pytest.mark.parametrize("shape", [(3, 67, 37), (5, 192)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_it_gives_flaxs_layer_norm_and_its_gradients(plain_blas, shape, dtype, tol):
    x = _normal(0, shape, dtype, scale=2.0, shift=0.5)
    dy = _normal(1, shape, dtype)
    flax_norm, fused = nn.LayerNorm(1e-6, dtype), FusedLayerNorm(1e-6, dtype)
    params = flax_norm.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, fused.init(
        jax.random.PRNGKey(0), x))
    params = {"params": {"scale": _normal(2, shape[-1:], shift=1.0),
                         "bias": _normal(3, shape[-1:])}}
    got = jax.jit(lambda p, x: _value_and_grads(fused, p, x, dy))(params, x)
    want = jax.jit(lambda p, x: _value_and_grads(flax_norm, p, x, dy))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def test_the_variance_is_two_pass_and_keeps_a_large_mean(plain_blas):
    # rows of 3000 + N(0, 1): E[x^2] - E[x]^2 in float32 loses most of the variance
    x = _normal(0, (4, 64), shift=3000.0)
    ones, zeros = jnp.ones(64), jnp.zeros(64)
    y = np.asarray(jax.jit(fused_layer_norm, static_argnums=3)(x, ones, zeros, 1e-6))
    x64 = np.asarray(x, np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    want = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, want, atol=2e-3)


def test_a_float32_input_to_a_bfloat16_norm_is_normalised_then_rounded(plain_blas):
    x = _normal(0, (6, 40), scale=3.0)
    norm = FusedLayerNorm(1e-6, jnp.bfloat16)
    params = norm.init(jax.random.PRNGKey(0), x)
    y = norm.apply(params, x)
    assert y.dtype == jnp.bfloat16
    want = FusedLayerNorm(1e-6, jnp.float32).apply(params, x).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))


def test_the_factory_fuses_only_fused_models_in_float32_or_bfloat16():
    assert isinstance(layer_norm(1e-6, jnp.float32, "fused", "n"), FusedLayerNorm)
    assert isinstance(layer_norm(1e-6, jnp.bfloat16, "fused", "n"), FusedLayerNorm)
    for dtype, impl in ((jnp.float32, "xla"), (jnp.float16, "fused")):
        module = layer_norm(1e-5, dtype, impl, "n")
        assert type(module) is nn.LayerNorm and module.epsilon == 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_fused_model_runs_every_encoder_norm_fused_with_the_same_parameters(plain_blas, dtype):
    options = dict(num_classes=10, image_size=8, width=32, depth=2, num_heads=2, mlp_dim=64,
                   platform="cpu", dtype=dtype, matmul_impl="blas")
    blas = vit.create_model("Ti/4", elementwise_impl="fused", **options)
    xla = vit.create_model("Ti/4", elementwise_impl="xla", **options)
    params = vit.init_params(xla, jax.random.PRNGKey(0))
    # the same names and the same initial values from the same seed, whichever computes them
    for a, b in zip(jax.tree_util.tree_flatten_with_path(vit.init_params(
            blas, jax.random.PRNGKey(0)))[0], jax.tree_util.tree_flatten_with_path(params)[0],
            strict=True):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    images = _normal(2, (2, 8, 8, 3))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(blas.apply({"params": p}, images) ** 2)))
    hlo = grad.lower(params).as_text()
    # two per block and the encoder's final one, each forward and backward
    assert hlo.count(f"@{blas_gemm.LAYER_NORM_TARGET}(") == 5
    assert hlo.count(f"@{blas_gemm.LAYER_NORM_GRAD_TARGET}(") == 5


def test_arrays_that_do_not_fit_are_a_one_line_error(plain_blas):
    with pytest.raises(Exception, match=r"vit layer_norm takes float32 or bfloat16 x \[..., C\]"):
        jax.jit(fused_layer_norm, static_argnums=3)(
            jnp.zeros((4, 8)), jnp.ones(7), jnp.zeros(8), 1e-6).block_until_ready()
