"""Who computes the encoder's LayerNorms and the MLP's tanh GELU (`elementwise_impl`).

"xla" runs flax's `nn.LayerNorm` and XLA's GELU; "fused" runs them as the custom calls of
vit/fused_layer_norm.py and vit/fused_gelu.py, one pass over memory per direction, on the CPU,
for float32 and bfloat16 models. The calls need the handler library of vit/blas_gemm.py (built
with g++ on first use) but no BLAS, so they run beside XLA's matmuls as well as MKL's.
`vit.create_model`'s default "auto" is resolved there, once, by `resolve_elementwise_impl`.
The parameters are the same under either, so a checkpoint loads into both.
"""

from __future__ import annotations

import logging
import platform as host
from typing import Any

import jax.numpy as jnp

from vit import blas_gemm
from vit.impl_choice import asked_choice, auto_choice

ELEMENTWISE_IMPLS = ("auto", "xla", "fused")  # what a user may ask for; a module holds the last two


def resolve_elementwise_impl(impl: str, platform: str, *, dtype: Any = jnp.float32) -> str:
    """The implementation ("xla" or "fused") that `impl` means for a model computing in `dtype`
    on `platform` ("cpu", "gpu", "tpu"). "auto" is "fused" on an x86-64 CPU (where the calls
    were measured) for float32 and bfloat16 where the handler builds, else "xla"; asking for
    "fused" where it cannot run is a ValueError naming the fix."""
    if impl not in ELEMENTWISE_IMPLS:
        raise ValueError(f"unknown elementwise_impl {impl!r}; use one of {ELEMENTWISE_IMPLS}")
    if impl == "xla":
        return impl
    computable = jnp.dtype(dtype) in blas_gemm.KERNEL_DTYPES
    if impl == "auto":
        if platform != "cpu" or not computable or host.machine() != "x86_64":
            return "xla"
        return auto_choice("elementwise_impl", "fused", blas_gemm.handler_unavailable_reason(),
                           logging.getLogger(__name__), "XLA's LayerNorm and GELU")
    unfit = None if computable else f"float32 or bfloat16, not dtype {jnp.dtype(dtype).name}"
    return asked_choice("elementwise_impl", "fused", platform, unfit,
                        blas_gemm.handler_unavailable_reason)


def elementwise_impl_here(impl: str, platform: str) -> str:
    """`impl` as a saved model runs on `platform`: "fused" runs "auto" where the handler cannot
    run (another platform, no g++ here), so that a checkpoint loads anywhere; else `impl`."""
    runnable = platform == "cpu" and blas_gemm.handler_unavailable_reason() is None
    return "auto" if impl == "fused" and not runnable else impl
