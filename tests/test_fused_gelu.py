"""The MLP's bias and tanh GELU by the fused calls (vit/blas_gelu.cc, vit/fused_gelu.py): XLA's
values and gradients, the MlpBlock that uses them, and where they are used; over the plain C
GEMMs of tests/plain_blas.py (the handler library must be loaded) so that it runs on any CPU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit import blas_gemm
from vit.encoder import MlpBlock
from vit.fused_gelu import bias_gelu, fuses


def _normal(seed, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(dtype)


def _xla_bias_gelu(h, bias):
    return nn.gelu(h + bias.astype(h.dtype), approximate=True)


def _value_and_grads(f, h, bias, da):
    y, vjp = jax.vjp(f, h, bias)
    return (y, *vjp(da))


# 37 features: not a whole number of lanes; 3 x 67 = 201 rows: two chunks of the bias's partial
# sums, the second short
@pytest.mark.parametrize("shape", [(3, 67, 37), (4, 64)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_it_gives_xlas_bias_and_tanh_gelu_and_their_gradients(plain_blas, shape, dtype, tol):
    h, da = _normal(0, shape, dtype, scale=3.0), _normal(1, shape, dtype)
    bias = _normal(2, shape[-1:], scale=0.5)
    got = jax.jit(lambda h, b: _value_and_grads(bias_gelu, h, b, da))(h, bias)
    want = jax.jit(lambda h, b: _value_and_grads(_xla_bias_gelu, h, b, da))(h, bias)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        # the bias's gradient sums 201 rows: XLA's bfloat16 sum rounds it to 8 bits
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def test_large_inputs_saturate_and_nan_stays_nan(plain_blas):
    h = jnp.array([[-100.0, -10.0, 0.0, 10.0, 100.0, jnp.nan]])
    y, vjp = jax.vjp(bias_gelu, h, jnp.zeros(6))
    dh, _ = vjp(jnp.ones_like(h))
    np.testing.assert_allclose(np.asarray(y)[0, :5], [0.0, 0.0, 0.0, 10.0, 100.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(dh)[0, :5], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert np.isnan(np.asarray(y)[0, 5]) and np.isnan(np.asarray(dh)[0, 5])


def test_it_is_used_for_tanh_gelu_fused_mlps_in_float32_and_bfloat16_only():
    assert fuses("gelu_tanh", jnp.float32, "fused", "none")
    assert fuses("gelu_tanh", jnp.bfloat16, "fused", "none")
    assert not fuses("gelu_tanh", jnp.float32, "xla", "none")
    assert not fuses("gelu", jnp.float32, "fused", "none")
    assert not fuses("swiglu", jnp.float32, "fused", "none")
    assert not fuses("gelu_tanh", jnp.float32, "fused", "int8")
    assert not fuses("gelu_tanh", jnp.float16, "fused", "none")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_a_fused_blas_mlp_block_is_xlas_with_the_same_parameters(plain_blas, dtype, tol):
    x = _normal(0, (2, 9, 16), dtype)
    blas = MlpBlock(24, dtype=dtype, matmul_impl="blas", elementwise_impl="fused")
    xla = MlpBlock(24, dtype=dtype)
    params = xla.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, blas.init(jax.random.PRNGKey(0), x)) == \
        jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda p: p + _normal(1, p.shape, scale=0.3), params)
    loss = lambda module: jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32) ** 2)))
    hlo = loss(blas).lower(params).as_text()
    assert hlo.count(f"@{blas_gemm.BIAS_GELU_TARGET}(") == 1
    assert hlo.count(f"@{blas_gemm.BIAS_GELU_GRAD_TARGET}(") == 1
    got, want = loss(blas)(params), loss(xla)(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def test_arrays_that_do_not_fit_are_a_one_line_error(plain_blas):
    with pytest.raises(Exception, match=r"vit bias_gelu takes float32 or bfloat16 h \[..., C\]"):
        jax.jit(bias_gelu)(jnp.zeros((4, 8)), jnp.zeros(7)).block_until_ready()
