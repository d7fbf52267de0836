"""int8 matrix products for post-training quantised models (`quant="int8"`, vit/quantize.py).

Weights: symmetric int8 per output channel, w ~= w_int8 * scale (scale = max|w| / 127 over the
input axes). Activations: symmetric int8 per token, computed on the fly (dynamic quantisation:
no calibration set, nothing to go stale). The product is `lax.dot_general` of the two int8
operands with int32 accumulation, rescaled once to float32:

    y = (x_int8 @ w_int8) * x_scale[token] * w_scale[channel] + bias

Why `lax.dot_general` rather than a quantisation library (qwix): two dozen lines do exactly
the arithmetic above, the stored params stay plain arrays in the usual checkpoint (int8 kernel
plus a float32 `scale` beside it), and nothing new is pinned; qwix intercepts whole models and
would have to see through the fused q/k/v matmul of vit/attention.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

QUANT_MODES = ("none", "int8")
_QMAX = 127.0

Array = jax.Array


def quantize_weight(w: np.ndarray, in_axes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, float32 scale over the other axes): symmetric, per output channel."""
    w = np.asarray(w, np.float32)
    amax = np.max(np.abs(w), axis=tuple(in_axes), keepdims=True)
    scale = np.where(amax > 0, amax / _QMAX, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -_QMAX, _QMAX).astype(np.int8)
    return q, np.squeeze(scale, axis=tuple(in_axes))


def quantize_activations(x: Array) -> tuple[Array, Array]:
    """(int8 x, float32 scale [..., 1]): symmetric per row of the last axis."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / _QMAX, 1.0)
    return jnp.clip(jnp.round(x / scale), -_QMAX, _QMAX).astype(jnp.int8), scale


def int8_matmul(x: Array, kernel: Array, scale: Array) -> Array:
    """x [..., K] (float) times an int8 kernel [K, N] with per-column `scale` [N]: float32."""
    xq, x_scale = quantize_activations(x)
    acc = lax.dot_general(xq, kernel.astype(jnp.int8), (((x.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * x_scale * scale.astype(jnp.float32)


def _zeros_int8(key: Array, shape: tuple[int, ...], dtype: Any = jnp.int8) -> Array:
    return jnp.zeros(shape, jnp.int8)


class Int8Dense(nn.Module):
    """nn.Dense with an int8 kernel: params kernel (int8 [in, features]), scale, bias."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _zeros_int8, (x.shape[-1], self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return (int8_matmul(x, kernel, scale) + bias).astype(self.dtype)


def int8_param(module: nn.Module, shape: tuple[int, ...]) -> Array:
    """Declare an int8 `kernel` param of `shape` on `module` (inside its compact call)."""
    return module.param("kernel", _zeros_int8, shape)
