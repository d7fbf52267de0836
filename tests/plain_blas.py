"""A plain C `cblas_sgemm` and `cblas_gemm_bf16bf16f32` built here, for vit/blas_gemm.py's custom
call to call: the `plain_blas` fixture (conftest.py) tests `matmul_impl="blas"` on any CPU, with
or without MKL."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vit import blas_gemm

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

# The same for bfloat16 operands (their bits: the high half of a float32) into float32.
PLAIN_BF16_GEMM = r"""
#include <string.h>
static float widen(unsigned short bits) {
  unsigned int word = (unsigned int)bits << 16;
  float f;
  memcpy(&f, &word, 4);
  return f;
}
void cblas_gemm_bf16bf16f32(int layout, int ta, int tb, int m, int n, int k, float alpha,
                            const unsigned short *a, int lda, const unsigned short *b, int ldb,
                            float beta, float *c, int ldc) {
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) {
      double s = 0;
      for (int p = 0; p < k; p++)
        s += (double)widen(ta == 112 ? a[p * lda + i] : a[i * lda + p]) *
             widen(tb == 112 ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = alpha * s + (beta == 0 ? 0 : beta * c[i * ldc + j]);
    }
}
"""


def compile_library(where: Path, name: str, source: str) -> Path:
    """`source` (C) compiled with gcc into `where`/lib`name`.so."""
    (where / f"{name}.c").write_text(source)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", str(where / f"{name}.c"), "-o",
                    str(where / f"lib{name}.so")], check=True)
    return where / f"lib{name}.so"


def point_at_plain_blas(where: Path) -> bool:
    """Point the custom call at the plain GEMMs built in `where`; whether this process has a
    BLAS of its own to point it back at afterwards (`restore_own_blas`)."""
    own = blas_gemm.unavailable_reason() is None
    blas_gemm.load(compile_library(where, "plain", PLAIN_SGEMM + PLAIN_BF16_GEMM))
    return own


def restore_own_blas(own: bool) -> None:
    """Point the custom call back at this process's BLAS (MKL), if it has one."""
    if own:
        blas_gemm.load(blas_gemm.blas_library())
