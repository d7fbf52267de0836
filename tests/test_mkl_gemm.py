"""matmul_impl="blas" on this process's own BLAS (MKL from `vit[mkl]`), where it is installed:
float32 and bfloat16 operands (AMX or AVX512_BF16 kernels on the CPUs that have them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit import blas_gemm


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_mkl_computes_each_transposed_form(dtype, trans_a, trans_b):
    if blas_gemm.blas_library() is None:
        pytest.skip("no BLAS installed here (pip install 'vit[mkl]')")
    reason = (blas_gemm.bf16_unavailable_reason if dtype == jnp.bfloat16
              else blas_gemm.unavailable_reason)()
    if reason is not None:
        pytest.skip(reason)
    m, k, n = 300, 200, 260  # split into slabs, by rows
    keys = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(keys[0], (k, m) if trans_a else (m, k)).astype(dtype)
    w = jax.random.normal(keys[1], (n, k) if trans_b else (k, n)).astype(dtype)
    got = jax.jit(blas_gemm.gemm, static_argnums=(2, 3))(x, w, trans_a, trans_b)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    want = (x64.T if trans_a else x64) @ (w64.T if trans_b else w64)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
