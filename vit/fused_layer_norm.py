"""LayerNorm in one call per pass (vit/blas_layer_norm.cc), where elementwise_impl="fused".

XLA:CPU takes several passes over memory for a LayerNorm, and in its gradient fuses each row's
two sums into the loop that broadcasts them, recomputing them for every element: on the Ti/4
training step measured here (Intel Xeon) the 25 LayerNorms cost 155-180 ms of a 1.5 s step. The
fused calls keep each row in the cache between its passes (README, *LayerNorm in one pass*).

`layer_norm(epsilon, dtype, impl, name)` is what the encoder builds: flax's `nn.LayerNorm` for
impl "xla", `FusedLayerNorm` for "fused" where the kernel takes the dtype (float32, bfloat16).
Both hold `scale` [C] and `bias` [C] in float32 under the same name, so checkpoints and public
weights load into either. The fused variance is two-pass (mean of (x - mean)^2); flax's is
E[x^2] - E[x]^2: the two agree to float32 rounding on normalised activations (tested).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit import blas_gemm

Array = jax.Array
Dtype = Any


def _norm(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
    """y like x, and each row's float32 mean and rstd, by the forward call."""
    rows = x.shape[:-1]
    call = jax.ffi.ffi_call(blas_gemm.LAYER_NORM_TARGET, (
        jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(rows, jnp.float32),
        jax.ShapeDtypeStruct(rows, jnp.float32)), vmap_method="sequential")
    return call(x, scale, bias, epsilon=np.float32(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_layer_norm(x: Array, scale: Array, bias: Array, epsilon: float) -> Array:
    """(x - mean) * (rstd * scale) + bias over x's last axis, in x's dtype (float32 or bfloat16)
    with float32 statistics, float32 `scale` and `bias` [C]; its gradient by one call too. The
    handler must be registered (`blas_gemm.handler_unavailable_reason()` is None)."""
    return _norm(x, scale, bias, epsilon)[0]


def _fused_layer_norm_fwd(x: Array, scale: Array, bias: Array,
                          epsilon: float) -> tuple[Array, tuple]:
    y, mean, rstd = _norm(x, scale, bias, epsilon)
    return y, (x, scale, mean, rstd)


def _fused_layer_norm_bwd(epsilon: float, res: tuple, dy: Array) -> tuple[Array, Array, Array]:
    x, scale, mean, rstd = res
    partial = blas_gemm.partial_sums(x)
    call = jax.ffi.ffi_call(blas_gemm.LAYER_NORM_GRAD_TARGET, (
        jax.ShapeDtypeStruct(x.shape, x.dtype), partial, partial), vmap_method="sequential")
    dx, d_scale, d_bias = call(x, scale, mean, rstd, dy.astype(x.dtype))
    return dx, d_scale.sum(0), d_bias.sum(0)


fused_layer_norm.defvjp(_fused_layer_norm_fwd, _fused_layer_norm_bwd)


class FusedLayerNorm(nn.Module):
    """nn.LayerNorm over the last axis (scale and bias, float32 parameters) by the fused calls;
    the output in `dtype`, computed in the wider of x's dtype and `dtype`."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        compute = jnp.promote_types(x.dtype, self.dtype)  # flax's order: compute, then cast
        return fused_layer_norm(x.astype(compute), scale, bias, self.epsilon).astype(self.dtype)


def layer_norm(epsilon: float, dtype: Dtype, impl: str, name: str) -> nn.Module:
    """The LayerNorm module `name` for a model whose `elementwise_impl` is `impl` ("xla" or
    "fused"): FusedLayerNorm under "fused" for float32 and bfloat16 models, else nn.LayerNorm."""
    if impl == "fused" and jnp.dtype(dtype) in blas_gemm.KERNEL_DTYPES:
        return FusedLayerNorm(epsilon, dtype, name=name)
    return nn.LayerNorm(epsilon, dtype, name=name)
