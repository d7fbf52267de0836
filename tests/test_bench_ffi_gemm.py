"""bench/ffi_gemm.py without MKL: its handler, built here, over a plain C `cblas_sgemm`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ffi_gemm  # noqa: E402

import vit  # noqa: E402

# A reference cblas_sgemm, row-major only, with double sums: what the handler must call correctly.
PLAIN_SGEMM = r"""
void cblas_sgemm(int layout, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) {
      double s = 0;
      for (int p = 0; p < k; p++)
        s += (double)(ta == 112 ? a[p * lda + i] : a[i * lda + p]) *
             (tb == 112 ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = alpha * s + (beta == 0 ? 0 : beta * c[i * ldc + j]);
    }
}
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The handler built and registered over the plain sgemm, once for this file."""
    where = tmp_path_factory.mktemp("ffi_gemm")
    (where / "sgemm.c").write_text(PLAIN_SGEMM)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", str(where / "sgemm.c"), "-o",
                    str(where / "libplain.so")], check=True)
    ffi_gemm.load(str(where / "libplain.so"), ffi_gemm.build_handler(str(where)))


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
def test_the_custom_call_computes_each_transposed_form(loaded, trans_a, trans_b):
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3) if trans_a else (3, 5))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 5) if trans_b else (5, 4))
    want = (x.T if trans_a else x) @ (w.T if trans_b else w)
    got = jax.jit(ffi_gemm.gemm, static_argnums=(2, 3))(x, w, trans_a, trans_b)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_its_product_and_gradients_match_xla(loaded):
    assert ffi_gemm.check_against_xla() < 1e-6


def test_a_model_routed_to_it_gives_xlas_logits_and_gradients(loaded):
    model = vit.create_model("Ti/4", num_classes=10, image_size=8, width=32, depth=1,
                             num_heads=2, mlp_dim=64)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1),
                                                 params["head"]["kernel"].shape)
    images = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
    loss = lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)
    xla = jax.jit(jax.value_and_grad(loss))(params)
    with ffi_gemm.routed_to_ffi():
        routed = jax.jit(jax.value_and_grad(loss))
        hlo = routed.lower(params).as_text()
        ffi = routed(params)
    # q/k/v, out, the MLP's two and the head: each forward and both gradients
    assert hlo.count(ffi_gemm.TARGET) == 5 * 3
    for a, b in zip(jax.tree.leaves(ffi), jax.tree.leaves(xla), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_a_missing_blas_is_one_line(tmp_path):
    with pytest.raises(RuntimeError, match=r"^BLAS library .*nope.so does not exist: pass --blas"):
        ffi_gemm.load(str(tmp_path / "nope.so"), tmp_path / "handler.so")
    (tmp_path / "other.c").write_text("int other(void) { return 1; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", str(tmp_path / "other.c"), "-o",
                    str(tmp_path / "libother.so")], check=True)
    with pytest.raises(RuntimeError, match=r"^\S+libother\.so has no cblas_sgemm: pass a BLAS"):
        ffi_gemm.load(str(tmp_path / "libother.so"), tmp_path / "handler.so")
