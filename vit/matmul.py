"""Dense matmuls with a chosen operand dtype (`matmul_dtype`): bfloat16 operands, float32 sums.

`matmul_dtype="bfloat16"` casts both operands of every dense and attention-projection matmul
to bfloat16 and accumulates in float32 (`preferred_element_type`), forward and in both
backward matmuls, while activations, parameters and optimizer state stay in `dtype`: automatic
mixed precision as PyTorch's autocast does it. Asking XLA for a float32 result matters: on
CPUs with AMX (Intel Sapphire Rapids and later) a bfloat16 x bfloat16 -> float32 dot runs on
the AMX tiles, about 4x a float32 dot (1,100 vs 250 GFLOP/s at [4096, 128] x [128, 384] on the
2-core Xeon measured here), while a bfloat16 -> bfloat16 dot is slower than float32.

Every dense matmul, in either dtype, runs on its input flattened to [tokens, K]: the weight
gradient is then one [tokens, K]^T [tokens, N] dot over a single contracting dimension. Left at
[batch, tokens, K], autodiff contracts two dimensions at once and XLA:CPU transposes an
operand in memory first: the float32 Ti/4 training step ran 1.13-1.17x faster without it
(README, *Speed on CPU: flat matmuls*).

`matmul_impl` picks who computes a dense matmul: "xla" (XLA's dot) or "blas" (MKL's
`cblas_sgemm`, or for bfloat16 operands its `cblas_gemm_bf16bf16f32`, through a custom call,
vit/blas_gemm.py). `vit.create_model`'s default "auto" is resolved there, once, by
`resolve_matmul_impl`.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from vit import blas_gemm
from vit.impl_choice import asked_choice, auto_choice

MATMUL_DTYPES = ("float32", "bfloat16")
MATMUL_IMPLS = ("auto", "xla", "blas")  # what a user may ask for; a module holds "xla" or "blas"
BLAS_OUTPUT = "blas_matmul"  # the name remat's "dots" policy keeps a BLAS product by

Array = jax.Array


def check_matmul_dtype(name: str) -> str:
    """`name` if it is a supported matmul operand dtype; ValueError naming the choices."""
    if name not in MATMUL_DTYPES:
        raise ValueError(f"unknown matmul_dtype {name!r}; use one of {MATMUL_DTYPES}")
    return name


def blas_operand_dtype(matmul_dtype: str, dtype: Any) -> Any:
    """The dtype "blas" multiplies `matmul_dtype` operands of a `dtype` computation in: bfloat16
    if either is bfloat16, float32 if both are float32; None otherwise (XLA's dot then)."""
    operand = jnp.dtype(jnp.bfloat16 if matmul_dtype == "bfloat16" else dtype)
    return operand if operand in (jnp.float32, jnp.bfloat16) else None


def resolve_matmul_impl(impl: str, platform: str, *, dtype: Any = jnp.float32,
                        matmul_dtype: str = "float32", quant: str = "none") -> str:
    """The implementation ("xla" or "blas") that `impl` means for a model computing in `dtype`
    with `matmul_dtype` operands and `quant` kernels on `platform` ("cpu", "gpu", "tpu").

    "auto" is "blas" where it measured faster: on an Intel CPU with the BLAS loadable
    (`vit.blas_gemm.unavailable_reason()` is None), for float32 operands, and for bfloat16 ones
    (`matmul_dtype` or `dtype` bfloat16) where the CPU has AMX or AVX512_BF16; else "xla". Asking
    for "blas" where it cannot run is a ValueError naming the fix.
    """
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"unknown matmul_impl {impl!r}; use one of {MATMUL_IMPLS}")
    if impl == "xla":
        return impl
    bf16 = blas_operand_dtype(matmul_dtype, dtype) == jnp.bfloat16
    computable = quant == "none" and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16)
    if impl == "auto":
        measured = not bf16 or blas_gemm.cpu_flags() & {"amx_bf16", "avx512_bf16"}
        if not (platform == "cpu" and computable and measured
                and blas_gemm.cpu_vendor() == "GenuineIntel"):
            return "xla"
        return auto_choice("matmul_impl", "blas", blas_gemm.unavailable_reason_for(bf16),
                           logging.getLogger(__name__), "XLA's matmuls")
    unfit = None if computable else (f"float32 or bfloat16 matmuls, not dtype "
                                     f"{jnp.dtype(dtype).name} / quant {quant}")
    return asked_choice("matmul_impl", "blas", platform, unfit,
                        lambda: blas_gemm.unavailable_reason_for(bf16))


def matmul_impl_here(impl: str, platform: str, *, bf16: bool = False) -> str:
    """`impl` as a saved model runs on `platform`: "blas" runs "auto" where the BLAS cannot run
    (another platform, no MKL here, for `bf16` operands no bfloat16 GEMM), so that a checkpoint
    loads anywhere; else `impl`."""
    runnable = platform == "cpu" and blas_gemm.unavailable_reason_for(bf16) is None
    return "auto" if impl == "blas" and not runnable else impl


def _dot_last(x: Array, w: Array) -> Array:
    """x [..., K] @ w [K, N] -> [..., N] in float32."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_matmul(x: Array, w: Array) -> Array:
    """x [..., K] @ w [K, N] with bfloat16 operands and a float32 result (and gradients)."""
    return _dot_last(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def _bf16_matmul_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, ...]]:
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    # Empty arrays carry the inputs' dtypes: residuals must be arrays.
    return _dot_last(xb, wb), (xb, wb, jnp.zeros(0, x.dtype), jnp.zeros(0, w.dtype))


def _bf16_matmul_bwd(res: tuple[Array, ...], g: Array) -> tuple[Array, Array]:
    xb, wb, x_like, w_like = res
    gb = g.astype(jnp.bfloat16)
    dx = lax.dot_general(gb, wb, (((g.ndim - 1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32)
    dw = lax.dot_general(xb.reshape(-1, xb.shape[-1]), gb.reshape(-1, g.shape[-1]),
                         (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def matmul(x: Array, w: Array, matmul_dtype: str, out_dtype: Any, impl: str = "xla") -> Array:
    """x [..., K] @ w [K, N] in `out_dtype`, with operands in `matmul_dtype`, on x as [-1, K],
    computed by `impl` ("xla" or "blas"; "blas" multiplies bfloat16 operands where
    `matmul_dtype` or `out_dtype` is bfloat16, float32 ones where both are float32)."""
    flat = x.reshape(-1, x.shape[-1])
    blas_dtype = blas_operand_dtype(matmul_dtype, out_dtype)
    if impl == "blas" and blas_dtype is not None:
        y = checkpoint_name(blas_gemm.blas_matmul(flat, w, blas_dtype),
                            BLAS_OUTPUT).astype(out_dtype)
    elif matmul_dtype == "bfloat16":
        y = bf16_matmul(flat, w).astype(out_dtype)
    else:
        y = flat.astype(out_dtype) @ w.astype(out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def dense_dot_general(matmul_dtype: str, impl: str = "xla") -> Any:
    """A `dot_general` for `flax.linen.Dense`: `matmul`, with `matmul_dtype` operands, by
    `impl`."""
    check_matmul_dtype(matmul_dtype)

    def dot_general(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                    preferred_element_type: Any = None, **_: Any) -> Array:
        (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
        if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or lhs_batch:
            raise NotImplementedError(f"matmul_dtype={matmul_dtype!r} supports x @ kernel only, "
                                      f"got dimension numbers {dimension_numbers}")
        return matmul(lhs, rhs, matmul_dtype, lhs.dtype, impl)

    return dot_general
