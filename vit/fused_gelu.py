"""The MLP's bias and tanh GELU in one call per direction (vit/blas_gelu.cc), where
elementwise_impl="fused".

On XLA's ops the first layer's [tokens, mlp_dim] output took five passes over memory between the
two products (the tanh written out and read back, the gradient reading both, the bias's
gradient another pass): 106 ms of the 1.36 s Ti/4 training step measured here (Intel Xeon). The
fused calls read the product once each way (README, *The MLP's GELU in one pass*).
`bias_gelu(h, bias)` is gelu_tanh(h + bias) with the sum rounded to h's dtype as XLA's add
rounds it, computed as x * sigmoid(2u), 0.5 x (1 + tanh(u)) without the cancellation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vit import blas_gemm

Array = jax.Array


def fuses(activation: str, dtype: Any, elementwise_impl: str, quant: str) -> bool:
    """Whether an MlpBlock with these options runs its bias and activation by `bias_gelu`: tanh
    GELU, float32 or bfloat16, elementwise_impl "fused", no int8."""
    return (elementwise_impl == "fused" and activation == "gelu_tanh" and quant == "none"
            and jnp.dtype(dtype) in blas_gemm.KERNEL_DTYPES)


@jax.custom_vjp
def bias_gelu(h: Array, bias: Array) -> Array:
    """gelu_tanh(h + bias) over h [..., C] and bias [C] (cast to h's dtype, float32 or bfloat16);
    its gradient by one call too. The handler must be registered."""
    call = jax.ffi.ffi_call(blas_gemm.BIAS_GELU_TARGET, jax.ShapeDtypeStruct(h.shape, h.dtype),
                            vmap_method="sequential")
    return call(h, bias.astype(h.dtype))


def _bias_gelu_fwd(h: Array, bias: Array) -> tuple[Array, tuple[Array, Array]]:
    return bias_gelu(h, bias), (h, bias)


def _bias_gelu_bwd(res: tuple[Array, Array], da: Array) -> tuple[Array, Array]:
    h, bias = res
    call = jax.ffi.ffi_call(blas_gemm.BIAS_GELU_GRAD_TARGET, (
        jax.ShapeDtypeStruct(h.shape, h.dtype), blas_gemm.partial_sums(h)),
        vmap_method="sequential")
    dh, d_bias = call(h, bias.astype(h.dtype), da.astype(h.dtype))
    return dh, d_bias.sum(0).astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)
