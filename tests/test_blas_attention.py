"""The fused attention calls (vit/blas_attention.cc): the forward pass (`blas_gemm.attention`) and
self-attention's gradient (`blas_gemm.attention_grad`), what a model with matmul_impl="blas"
runs, over the plain C GEMMs of tests/plain_blas.py so that they run on any CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit
from vit import attention, blas_gemm


def _normal(seed, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(dtype)


def _softmax_attention(q, k, v):
    """Float64 reference of q, k, v [B, T, heads, dim] -> [B, Tq, heads, dim]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


def _fused(q, k, v):
    return jax.jit(lambda q, k, v: attention._attend(q, k, v, None, "blas"))(q, k, v)


def _unfused(q, k, v):
    return jax.jit(lambda q, k, v: attention._attend_fwd(q, k, v, None, "blas")[0])(q, k, v)


# Keys not a multiple of the 16 lanes; queries other than keys (cross-attention); 640 x 600
# logits span two blocks of queries (1 MiB of float32 logits each).
@pytest.mark.parametrize("batch,tq,tk,heads,dim", [(2, 17, 17, 3, 8), (1, 5, 37, 2, 16),
                                                   (1, 640, 600, 1, 4)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_it_is_softmax_attention_and_the_unfused_kernels(plain_blas, batch, tq, tk, heads, dim,
                                                          dtype, tol):
    q = _normal(0, (batch, tq, heads, dim), dtype, scale=3.0)
    k, v = _normal(1, (batch, tk, heads, dim), dtype), _normal(2, (batch, tk, heads, dim), dtype)
    hlo = jax.jit(lambda q, k, v: attention._attend(q, k, v, None, "blas")).lower(
        q, k, v).as_text()
    assert f"@{blas_gemm.ATTENTION_TARGET}(" in hlo and blas_gemm.BATCHED_TARGET not in hlo
    fused = _fused(q, k, v)
    assert fused.shape == (batch, tq, heads, dim) and fused.dtype == dtype
    np.testing.assert_allclose(np.asarray(fused, np.float64), _softmax_attention(q, k, v),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(_unfused(q, k, v),
                                                                         np.float32),
                               rtol=tol, atol=tol)


def test_large_logits_keep_rows_that_sum_to_one(plain_blas):
    # logits up to about +-700: exp(logit - row max) underflows for most keys, never overflows
    q, k = _normal(0, (1, 9, 1, 4), scale=30.0), _normal(1, (1, 23, 1, 4), scale=10.0)
    ones = jnp.ones((1, 23, 1, 4))
    np.testing.assert_allclose(np.asarray(_fused(q, k, ones)), 1.0, rtol=1e-6)
    v = _normal(2, (1, 23, 1, 4))
    np.testing.assert_allclose(np.asarray(_fused(q, k, v)), _softmax_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)


def test_a_nan_query_gives_nan_for_that_query_only(plain_blas):
    q, k, v = (_normal(i, (1, 6, 2, 8)) for i in range(3))
    out = np.asarray(_fused(q.at[0, 4, 1, 3].set(jnp.nan), k, v))
    assert np.isnan(out[0, 4, 1]).all()
    assert np.isfinite(np.delete(out.reshape(6 * 2, 8), 4 * 2 + 1, axis=0)).all()


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_self_attention_reads_the_fused_projection_in_place_with_its_bias(plain_blas, dtype,
                                                                          tol):
    heads, width = 3, 24
    product, bias = _normal(0, (2, 11, 3 * width), dtype), _normal(1, (3 * width,), dtype)
    split = lambda product, bias: attention._split_heads(product + bias, heads)
    want = _unfused(*split(product, bias))
    got = jax.jit(attention._self_attend, static_argnums=2)(product, bias, heads)
    assert got.shape == (2, 11, heads, width // heads) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
    # its gradients: the unfused kernel's, through the split and the bias's broadcast
    dy = _normal(2, got.shape, dtype)
    _, vjp = jax.vjp(lambda p, b: attention._self_attend(p, b, heads), product, bias)
    _, want_vjp = jax.vjp(lambda p, b: attention._attend(*split(p, b), None, "blas"), product,
                          bias)
    for a, b in zip(vjp(dy), want_vjp(dy), strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


def _self_attention_grad(product, bias, dy, heads):
    """Float64 reference: the gradient of sum(y * dy) for y = self-attention of q, k, v = the
    split of product [B, T, 3 * width] + bias, with respect to product (and so to bias, summed)."""
    x = np.asarray(product, np.float64) + np.asarray(bias, np.float64)
    q, k, v = (a.reshape(*a.shape[:2], heads, -1) for a in np.split(x, 3, axis=-1))
    dy = np.asarray(dy, np.float64)
    scale = 1 / np.sqrt(q.shape[-1])
    logits = np.einsum("bqhd,bkhd->bhqk", q * scale, k)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    d_w = np.einsum("bqhd,bkhd->bhqk", dy, v)
    d_logits = w * (d_w - (d_w * w).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", d_logits, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", d_logits, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", w, dy)
    return np.concatenate([g.reshape(*g.shape[:2], -1) for g in (dq, dk, dv)], axis=-1)


# 600 tokens: two blocks of queries, whose dk and dv the call sums
@pytest.mark.parametrize("batch,tokens,heads,dim", [(2, 17, 3, 8), (1, 600, 1, 4)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)])
def test_self_attentions_gradient_is_one_call_that_gives_softmax_attentions(
        plain_blas, batch, tokens, heads, dim, dtype, tol):
    product = _normal(0, (batch, tokens, 3 * heads * dim), dtype)
    bias, dy = _normal(1, (3 * heads * dim,), dtype), _normal(2, (batch, tokens, heads, dim), dtype)
    grads = jax.jit(lambda p, b, dy: jax.vjp(
        lambda p, b: attention._self_attend(p, b, heads), p, b)[1](dy))
    hlo = grads.lower(product, bias, dy).as_text()
    assert hlo.count(f"@{blas_gemm.ATTENTION_TARGET}(") == 1
    assert hlo.count(f"@{blas_gemm.ATTENTION_GRAD_TARGET}(") == 1
    assert blas_gemm.BATCHED_TARGET not in hlo
    d_product, d_bias = grads(product, bias, dy)
    assert (d_product.dtype, d_bias.dtype) == (dtype, dtype)
    want = _self_attention_grad(product, bias, dy, heads)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(d_product, np.float64), want, rtol=tol,
                               atol=tol * scale)
    np.testing.assert_allclose(np.asarray(d_bias, np.float64), want.sum((0, 1)), rtol=tol,
                               atol=tol * scale * tokens)


def test_the_forward_keeps_the_weights_only_when_asked(plain_blas):
    product, bias = _normal(0, (2, 9, 3 * 8)), _normal(1, (3 * 8,))
    kw = dict(heads=2, head_dim=4, scale=0.5, columns=(0, 8, 16), bias=bias)
    y, weights = blas_gemm.attention(product, product, product, with_weights=True, **kw)
    assert weights.shape == (2, 2, 9, 9) and weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    q, k, _ = attention._split_heads(product + bias, 2)
    np.testing.assert_allclose(np.asarray(weights), np.asarray(attention.attention_weights(q, k)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(
        blas_gemm.attention(product, product, product, **kw)))


@pytest.mark.parametrize("matmul_dtype,dtype,tol", [
    ("float32", jnp.float32, 2e-5), ("bfloat16", jnp.float32, 2e-5),
    ("float32", jnp.bfloat16, 0.07)])
def test_a_blas_model_runs_one_fused_call_per_block_in_inference(plain_blas, matmul_dtype, dtype,
                                                                 tol):
    options = dict(num_classes=10, image_size=16, width=32, depth=2, num_heads=2, mlp_dim=64,
                   platform="cpu", matmul_dtype=matmul_dtype, dtype=dtype)
    blas = vit.create_model("Ti/4", matmul_impl="blas", **options)
    xla = vit.create_model("Ti/4", matmul_impl="xla", **options)
    params = vit.init_params(xla, jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)  # every bias and the head away from zero
    params = jax.tree.unflatten(tree, [x + _normal(i, x.shape, x.dtype, 0.2)
                                       for i, x in enumerate(leaves)])
    images = _normal(2, (3, 16, 16, 3))
    infer = lambda model: jax.jit(lambda p: model.apply({"params": p}, images))
    hlo = infer(blas).lower(params).as_text()
    assert hlo.count(f"@{blas_gemm.ATTENTION_TARGET}(") == 2
    assert blas_gemm.BATCHED_TARGET not in hlo
    got, want = infer(blas)(params), infer(xla)(params)
    assert got.dtype == want.dtype
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * scale)


def test_operands_that_do_not_agree_are_an_error_naming_them(plain_blas):
    q, k = jnp.zeros((2, 5, 8)), jnp.zeros((3, 5, 8))
    with pytest.raises(Exception, match="q, k, v and the output do not agree in batch"):
        jax.jit(lambda q, k: blas_gemm.attention(q, k, k, heads=2, head_dim=4, scale=0.5))(
            q, k).block_until_ready()
    qkv, bias, dy = jnp.zeros((2, 5, 24)), jnp.zeros(24), jnp.zeros((2, 5, 2, 4))
    grad = lambda dy, weights: blas_gemm.attention_grad(qkv, bias, dy, weights, heads=2,
                                                        head_dim=4, scale=0.5)
    with pytest.raises(Exception, match=r"takes q, k, v \[B, T, 3 \* heads \* head_dim\]"):
        jax.jit(grad)(jnp.zeros((2, 5, 3, 4)), jnp.zeros((2, 2, 5, 5))).block_until_ready()
    with pytest.raises(Exception, match="the forward's float32 weights"):
        jax.jit(grad)(dy, jnp.zeros((2, 2, 5, 4))).block_until_ready()
