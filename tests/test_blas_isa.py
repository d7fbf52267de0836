"""The handler compiled for each ISA this CPU runs (vit/blas_gemm.py's `handler_isa`;
vit/blas_lanes.h holds 16 lanes in 1, 2 or 4 vector registers): the same LayerNorm, GELU and
attention, forward and backward, from each build; VIT_BLAS_ISA's one-line errors; g++'s error
output read to its end however long."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from plain_blas import PLAIN_BF16_GEMM, PLAIN_SGEMM, compile_library

from vit import blas_gemm
from vit.fused_gelu import bias_gelu
from vit.fused_layer_norm import fused_layer_norm

HEADS, HEAD_DIM = 2, 8


def _normal(seed: int, shape: tuple[int, ...], dtype) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)


def _attention(qkv: jax.Array, bias: jax.Array) -> jax.Array:
    width = HEADS * HEAD_DIM
    return blas_gemm.attention(qkv, qkv, qkv, heads=HEADS, head_dim=HEAD_DIM, scale=0.3,
                               columns=(0, width, 2 * width), bias=bias, with_weights=True)


def kernel_outputs() -> dict[str, np.ndarray]:
    """Every element-wise call's outputs on inputs whose rows end in a partial group of 16
    lanes, in float32 and bfloat16: LayerNorm and GELU with their gradients, attention with
    its weights and gradient. The handler must be loaded."""
    found = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        name = jnp.dtype(dtype).name
        x, scale, shift = _normal(0, (37, 45), dtype), _normal(1, (45,), jnp.float32), \
            _normal(2, (45,), jnp.float32)
        norm = lambda x, s, b: fused_layer_norm(x, s, b, 1e-6)
        y, pull = jax.vjp(norm, x, scale, shift)
        found.update({f"norm_{name}": y, **{f"norm_grad{i}_{name}": g for i, g in
                                             enumerate(pull(_normal(3, y.shape, dtype)))}})
        h, bias = _normal(4, (29, 50), dtype), _normal(5, (50,), dtype)
        a, pull = jax.vjp(bias_gelu, h, bias)
        found.update({f"gelu_{name}": a, **{f"gelu_grad{i}_{name}": g for i, g in
                                             enumerate(pull(_normal(6, a.shape, dtype)))}})
        qkv = _normal(7, (2, 19, 3 * HEADS * HEAD_DIM), dtype)
        qkv_bias = _normal(8, (3 * HEADS * HEAD_DIM,), dtype)
        out, weights = _attention(qkv, qkv_bias)
        found.update({f"attention_{name}": out, f"weights_{name}": weights,
                      f"attention_grad_{name}": blas_gemm.attention_grad(
                          qkv, qkv_bias, _normal(9, out.shape, dtype), weights, heads=HEADS,
                          head_dim=HEAD_DIM, scale=0.3)})
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in found.items()}


def _outputs_built_for(isa: str, where: Path, blas: Path) -> dict[str, np.ndarray]:
    """kernel_outputs() from a process whose handler is built for `isa`."""
    out = where / f"{isa}.npz"
    env = {**os.environ, "VIT_BLAS_ISA": isa, "VIT_BLAS_LIB": str(blas),
           "VIT_CACHE_DIR": str(where / f"cache-{isa}")}
    code = ("import sys, numpy as np, test_blas_isa as t; "
            "from vit import blas_gemm; "
            "assert blas_gemm.unavailable_reason() is None, blas_gemm.unavailable_reason(); "
            "np.savez(sys.argv[1], **t.kernel_outputs())")
    subprocess.run([sys.executable, "-c", code, str(out)], env=env, check=True,
                   cwd=Path(__file__).parent, timeout=300)
    return dict(np.load(out))


def test_each_isas_build_computes_what_the_widest_does(plain_blas, tmp_path):
    widest = kernel_outputs()  # this process: the plain BLAS, the handler for this CPU
    narrower = [isa for isa, needs in blas_gemm.ISA_NEEDS.items()
                if needs <= blas_gemm.cpu_flags() and isa != blas_gemm.handler_isa()]
    assert "baseline" in narrower
    blas = compile_library(tmp_path, "plain", PLAIN_SGEMM + PLAIN_BF16_GEMM)
    for isa in narrower:
        got = _outputs_built_for(isa, tmp_path, blas)
        assert sorted(got) == sorted(widest)
        for key, want in widest.items():
            # fused multiply-adds where one ISA has FMA and the other not: the last bits
            tol = 1e-2 if "bfloat16" in key else 2e-6
            np.testing.assert_allclose(got[key], want, rtol=tol, atol=tol, err_msg=f"{isa} {key}")


def test_the_widest_isa_this_cpu_has_is_the_default(monkeypatch):
    monkeypatch.delenv("VIT_BLAS_ISA", raising=False)
    for flags, isa in ((set(), "baseline"), ({"avx2"}, "baseline"), ({"avx2", "fma"}, "avx2"),
                       ({"avx2", "fma", "avx512f"}, "avx512")):
        monkeypatch.setattr(blas_gemm, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert blas_gemm.handler_isa() == isa
    monkeypatch.setenv("VIT_BLAS_ISA", "baseline")
    assert blas_gemm.handler_isa() == "baseline"


def test_a_vit_blas_isa_it_cannot_use_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(blas_gemm, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setenv("VIT_BLAS_ISA", "avx-512")
    with pytest.raises(RuntimeError, match=r"^VIT_BLAS_ISA='avx-512' is not one of avx512, "
                                           r"avx2, baseline: set one of them, or unset it"):
        blas_gemm.build_handler()
    monkeypatch.setenv("VIT_BLAS_ISA", "avx512")
    with pytest.raises(RuntimeError, match=r"^VIT_BLAS_ISA=avx512 needs avx512f, which this CPU "
                                           r"lacks: set a narrower one, or unset it$"):
        blas_gemm.build_handler()
    assert list(tmp_path.iterdir()) == []


def test_a_compiler_error_longer_than_a_pipe_holds_is_read_to_its_end():
    noisy = [sys.executable, "-c", "import sys; sys.stderr.write('error: x\\n' * 50000); "
             "sys.exit(1)"]
    start = time.monotonic()
    error = blas_gemm._gxx([noisy, [sys.executable, "-c", "pass"]])
    assert error.startswith("error: x\n") and len(error) == 450000
    assert time.monotonic() - start < 60
