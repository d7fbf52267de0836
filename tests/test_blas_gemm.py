"""matmul_impl="blas" (vit/blas_gemm.py): the custom call over plain C `cblas_sgemm` and
`cblas_gemm_bf16bf16f32` built here, so that it runs on any CPU; the choice "auto" makes; the
one-line errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from plain_blas import PLAIN_BF16_GEMM, PLAIN_SGEMM, compile_library

import vit
from vit import attention, blas_gemm, impl_choice, matmul


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)


# Sizes below the handler's split (whole on one thread) and above it, split by rows (m >= n)
# and by columns, none a multiple of the 16-row slab edge.
@pytest.mark.parametrize("m,k,n", [(3, 5, 4), (301, 67, 97), (97, 67, 301)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_custom_call_computes_each_transposed_form(plain_blas, m, k, n, trans_a, trans_b,
                                                       dtype):
    x = _normal(0, (k, m) if trans_a else (m, k), dtype)
    w = _normal(1, (n, k) if trans_b else (k, n), dtype)
    got = jax.jit(blas_gemm.gemm, static_argnums=(2, 3))(x, w, trans_a, trans_b)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)  # bfloat16 widens exactly
    want = (x64.T if trans_a else x64) @ (w64.T if trans_b else w64)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch,m,k,n", [(5, 3, 5, 4), (64, 41, 30, 50)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_batched_call_computes_each_transposed_form(plain_blas, batch, m, k, n, trans_a,
                                                        trans_b, dtype):
    x = _normal(0, (batch, k, m) if trans_a else (batch, m, k), dtype)
    w = _normal(1, (batch, n, k) if trans_b else (batch, k, n), dtype)
    got = jax.jit(blas_gemm.batched_gemm, static_argnums=(2, 3))(x, w, trans_a, trans_b)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    want = np.matmul(x64.swapaxes(1, 2) if trans_a else x64, w64.swapaxes(1, 2) if trans_b else w64)
    assert got.shape == (batch, m, n)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_the_batched_call_reads_and_writes_heads_in_the_middle(plain_blas):
    q, k = _normal(0, (2, 17, 3, 8)), _normal(1, (2, 13, 3, 8))  # [B, T, heads, dim]
    logits = jax.jit(lambda q, k: blas_gemm.batched_gemm(q, k, trans_b=True))(q, k)
    want = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
    np.testing.assert_allclose(np.asarray(logits), want.reshape(6, 17, 13), rtol=1e-5, atol=1e-5)
    out = jax.jit(lambda p, k: blas_gemm.batched_gemm(p, k, heads_out=True))(logits, k)
    want = np.einsum("bhqk,bkhd->bqhd", want, np.asarray(k, np.float64))
    assert out.shape == (2, 17, 3, 8)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_blas_attention_gives_xlas_output_and_gradients(plain_blas, dtype, tol):
    # "xla" takes heads-first [B, heads, T, dim], "blas" [B, T, heads, dim] as projected
    q, k, v, dy = (_normal(i, (2, 3, 17, 8), dtype) for i in range(4))
    mask = jnp.arange(17) < 13  # the last four keys masked
    tokens_major = lambda x: jnp.swapaxes(x, 1, 2)
    outputs = {}
    for impl, layout in (("xla", lambda x: x), ("blas", tokens_major)):
        y, vjp = jax.vjp(lambda q, k, v, impl=impl: attention._attend(q, k, v, mask, impl),
                         *map(layout, (q, k, v)))
        outputs[impl] = [layout(a) for a in (y, *vjp(layout(dy)))]
    loss = lambda q, k, v: attention._attend(q, k, v, mask, "blas").sum()
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
        *map(tokens_major, (q, k, v))).as_text()
    assert hlo.count(f"@{blas_gemm.BATCHED_TARGET}(") == 6  # two forward, four backward
    for a, b in zip(outputs["blas"], outputs["xla"], strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


def test_its_gradients_are_xlas(plain_blas):
    x, w, g = _normal(0, (37, 19)), _normal(1, (19, 23)), _normal(2, (37, 23))
    _, vjp = jax.vjp(blas_gemm.blas_matmul, x, w)
    dx, dw = vjp(g)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(g @ w.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(x.T @ g), rtol=1e-5, atol=1e-5)


def test_bfloat16_operands_round_the_inputs_and_keep_float32_gradients(plain_blas):
    x, w, g = _normal(0, (37, 19)), _normal(1, (19, 23)), _normal(2, (37, 23))
    y, vjp = jax.vjp(lambda x, w: blas_gemm.blas_matmul(x, w, jnp.bfloat16), x, w)
    dx, dw = vjp(g)
    # The same as XLA's bfloat16 x bfloat16 -> float32 matmul with its custom gradient
    want_y, want_vjp = jax.vjp(matmul.bf16_matmul, x, w)
    want_dx, want_dw = want_vjp(g)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32,) * 3
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # ...which is not the float32 product: the operands were rounded to bfloat16
    assert float(jnp.abs(y - x @ w).max()) > 1e-3


def test_it_maps_over_a_leading_batch_axis(plain_blas):
    x, w = _normal(0, (3, 6, 5)), _normal(1, (5, 4))
    got = jax.vmap(blas_gemm.blas_matmul, in_axes=(0, None))(x, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ w), rtol=1e-5, atol=1e-5)


# bfloat16 operands differ from XLA's in summation order and where the cotangent is rounded;
# bfloat16 activations (dtype) in their rounding too
@pytest.mark.parametrize("matmul_dtype,dtype,rtol,atol", [
    ("float32", jnp.float32, 2e-4, 2e-5), ("bfloat16", jnp.float32, 2e-3, 2e-4),
    ("float32", jnp.bfloat16, 3e-2, 3e-2)])
def test_a_blas_model_gives_xlas_logits_and_gradients(plain_blas, matmul_dtype, dtype, rtol,
                                                      atol):
    options = dict(num_classes=10, image_size=8, width=32, depth=1, num_heads=2, mlp_dim=64,
                   platform="cpu", matmul_dtype=matmul_dtype, dtype=dtype)
    blas = vit.create_model("Ti/4", matmul_impl="blas", **options)
    xla = vit.create_model("Ti/4", matmul_impl="xla", **options)
    assert (blas.matmul_impl, xla.matmul_impl) == ("blas", "xla")
    params = vit.init_params(xla, jax.random.PRNGKey(0))
    params["head"]["kernel"] = _normal(1, params["head"]["kernel"].shape)
    images = _normal(2, (2, 8, 8, 3))
    value_and_grad = lambda model: jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)))
    hlo = value_and_grad(blas).lower(params).as_text()
    # q/k/v, out, the MLP's two and the head: each forward and both gradients
    assert hlo.count(f'@{blas_gemm.TARGET}(') == 5 * 3
    # attention in `dtype`: its forward and its gradient, one call each
    assert hlo.count(f'@{blas_gemm.ATTENTION_TARGET}(') == 1
    assert hlo.count(f'@{blas_gemm.ATTENTION_GRAD_TARGET}(') == 1
    assert blas_gemm.BATCHED_TARGET not in hlo
    assert "vit_blas" not in value_and_grad(xla).lower(params).as_text()
    got, want = (jax.tree_util.tree_flatten_with_path(value_and_grad(model)(params))[0]
                 for model in (blas, xla))
    largest = max(float(jnp.abs(b).max()) for _, b in want)
    for (path, a), (_, b) in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if dtype == jnp.bfloat16 and jax.tree_util.keystr(path).endswith("['key']['bias']"):
            # zero in exact arithmetic (softmax ignores a bias shared by all keys): in bfloat16
            # activations, rounding noise in both, small against the gradients' scale
            assert np.abs(a).max() < 1e-3 * largest and np.abs(b).max() < 1e-3 * largest
            continue
        # bfloat16 activations: each gradient within rounding of its own largest value
        scale = np.abs(b).max() if dtype == jnp.bfloat16 else 1.0
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("matmul_dtype,out_dtype", [("bfloat16", jnp.float32),
                                                     ("float32", jnp.bfloat16)])
def test_blas_multiplies_bfloat16_operands_in_bfloat16(plain_blas, matmul_dtype, out_dtype):
    x, w = _normal(0, (2, 3, 16)), _normal(1, (16, 8))
    call = jax.jit(lambda x, w: matmul.matmul(x, w, matmul_dtype, out_dtype, "blas"))
    hlo = call.lower(x, w).as_text()
    assert hlo.count(f"@{blas_gemm.TARGET}(") == 1 and "tensor<6x16xbf16>" in hlo
    want = matmul.bf16_matmul(x, w).astype(out_dtype)
    got = call(x, w)
    assert got.shape == (2, 3, 8) and got.dtype == out_dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-5, atol=1e-5)


def test_auto_is_blas_on_an_intel_cpu_for_float32_and_bfloat16_matmuls(plain_blas,
                                                                        monkeypatch):
    resolve = matmul.resolve_matmul_impl
    monkeypatch.setattr(blas_gemm, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(blas_gemm, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    monkeypatch.setattr(blas_gemm, "unavailable_reason", lambda: None)
    assert resolve("auto", "cpu") == "blas"
    assert resolve("auto", "gpu") == "xla"
    assert resolve("auto", "cpu", dtype=jnp.bfloat16) == "blas"
    assert resolve("auto", "cpu", matmul_dtype="bfloat16") == "blas"
    assert resolve("auto", "cpu", dtype=jnp.float16) == "xla"
    assert resolve("auto", "cpu", quant="int8") == "xla"
    assert resolve("xla", "cpu") == "xla"
    # bfloat16 where the CPU has no bfloat16 instructions: not measured, so XLA's
    monkeypatch.setattr(blas_gemm, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert resolve("auto", "cpu", matmul_dtype="bfloat16") == "xla"
    assert resolve("auto", "cpu") == "blas"
    monkeypatch.setattr(blas_gemm, "cpu_vendor", lambda: "AuthenticAMD")
    assert resolve("auto", "cpu") == "xla"
    assert resolve("blas", "cpu") == "blas"  # asked for: an AMD CPU runs it too


def test_auto_says_once_why_an_intel_cpu_runs_xla(monkeypatch, caplog):
    monkeypatch.setattr(blas_gemm, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(blas_gemm, "unavailable_reason", lambda: "g++ is not installed: x")
    impl_choice._note_once.cache_clear()
    with caplog.at_level("INFO", logger="vit.matmul"):
        assert [matmul.resolve_matmul_impl("auto", "cpu") for _ in range(3)] == ["xla"] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "matmul_impl 'auto' runs XLA's matmuls here: g++ is not installed: x"]


def test_blas_where_it_cannot_run_is_a_one_line_error(monkeypatch):
    resolve = matmul.resolve_matmul_impl
    with pytest.raises(ValueError, match=r"^matmul_impl 'blas' runs on the CPU, not on 'gpu'"):
        resolve("blas", "gpu")
    with pytest.raises(ValueError, match=r"^matmul_impl 'blas' computes float32 or bfloat16 "
                                         r"matmuls, not dtype float16 / quant none: use 'auto' "
                                         r"or 'xla'$"):
        resolve("blas", "cpu", dtype=jnp.float16)
    with pytest.raises(ValueError, match=r"not dtype float32 / quant int8"):
        resolve("blas", "cpu", quant="int8")
    monkeypatch.setattr(blas_gemm, "unavailable_reason", lambda: "no BLAS found: pip install x")
    with pytest.raises(ValueError, match=r"^matmul_impl 'blas' cannot run here: no BLAS found: "
                                         r"pip install x; or use 'auto' or 'xla'$"):
        resolve("blas", "cpu")
    with pytest.raises(ValueError, match=r"^unknown matmul_impl 'mkl'; use one of"):
        vit.create_model("Ti/4", num_classes=10, image_size=8, matmul_impl="mkl")


def test_a_saved_blas_model_loads_where_blas_cannot_run(monkeypatch):
    monkeypatch.setattr(blas_gemm, "unavailable_reason", lambda: "no BLAS found")
    assert matmul.matmul_impl_here("blas", "cpu") == "auto"
    assert matmul.matmul_impl_here("xla", "cpu") == "xla"
    model = vit.model.saved_model_from_config(
        {"variant": "Ti/4", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
         "matmul_impl": "blas"}, num_classes=10, image_size=8)
    assert model.matmul_impl == "xla"


def test_a_saved_bfloat16_blas_model_loads_where_the_blas_has_no_bfloat16_gemm(monkeypatch):
    monkeypatch.setattr(blas_gemm, "unavailable_reason", lambda: None)
    monkeypatch.setattr(blas_gemm, "bf16_unavailable_reason", lambda: "no bfloat16 GEMM")
    assert matmul.matmul_impl_here("blas", "cpu") == "blas"
    assert matmul.matmul_impl_here("blas", "cpu", bf16=True) == "auto"
    for key, value in (("matmul_dtype", "bfloat16"), ("dtype", "bfloat16")):
        model = vit.model.saved_model_from_config(
            {"variant": "Ti/4", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
             "matmul_impl": "blas", key: value}, num_classes=10, image_size=8)
        assert model.matmul_impl == "xla"


def test_the_reasons_it_cannot_load_name_the_fix(tmp_path, monkeypatch):
    reason = blas_gemm.unavailable_reason.__wrapped__  # uncached: the environment varies here
    monkeypatch.setenv("VIT_BLAS_LIB", str(tmp_path / "nope.so"))
    assert reason() == (f"BLAS library {tmp_path / 'nope.so'} does not exist: set VIT_BLAS_LIB "
                        "to a library with cblas_sgemm, or pip install 'vit[mkl]'")
    other = compile_library(tmp_path, "other", "int other(void) { return 1; }\n")
    monkeypatch.setenv("VIT_BLAS_LIB", str(other))
    assert reason() == (f"{tmp_path / 'libother.so'} has no cblas_sgemm: set VIT_BLAS_LIB to a "
                        "BLAS such as MKL's libmkl_rt")
    (tmp_path / "junk.so").write_bytes(b"not an ELF file")
    monkeypatch.setenv("VIT_BLAS_LIB", str(tmp_path / "junk.so"))
    assert reason().startswith(f"cannot load BLAS library {tmp_path / 'junk.so'} (")
    monkeypatch.delenv("VIT_BLAS_LIB")
    monkeypatch.setattr(blas_gemm.sys, "prefix", str(tmp_path))
    assert reason().startswith("no BLAS found: pip install 'vit[mkl]'")


def test_the_handler_is_built_once_per_source_and_jaxlib(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "blas_gemm-0123456789abcdef.so").write_bytes(b"an older build")
    (tmp_path / "cache" / "notes.txt").write_text("not ours")
    built = blas_gemm.build_handler()
    assert built.parent == tmp_path / "cache" and built.name.startswith("blas_gemm-")
    stamp = built.stat().st_mtime_ns
    assert blas_gemm.build_handler() == built and built.stat().st_mtime_ns == stamp
    # the older build replaced, no partial file left, nothing else touched
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [built.name, "notes.txt"]


def test_an_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(RuntimeError, match=r"^cannot write the custom-call handler "
                                           r"\(vit/blas_gemm.py\) to \S+/file/cache \(Not a "
                                           r"directory\): set VIT_CACHE_DIR to a writable "
                                           r"directory$"):
        blas_gemm.build_handler()


def test_no_compiler_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ on it
    with pytest.raises(RuntimeError, match=r"^g\+\+ is not installed: install it"):
        blas_gemm.build_handler()
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_source_that_does_not_compile_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.cc"
    broken.write_text("int broken( { return 0; }\n")
    monkeypatch.setattr(blas_gemm, "SOURCES", (*blas_gemm.SOURCES, broken))
    with pytest.raises(RuntimeError) as caught:
        blas_gemm.build_handler()
    message = str(caught.value)
    assert message.startswith("g++ failed to build blas_gemm.cc, ") and "\n" not in message
    assert "broken.cc" in message and "error" in message
    assert list((tmp_path / "cache").iterdir()) == []  # no object, partial or library left


def test_a_blas_without_a_bfloat16_gemm_runs_float32_only(plain_blas, tmp_path):
    try:
        blas_gemm.load(compile_library(tmp_path, "sgemm_only", PLAIN_SGEMM))
        assert blas_gemm.bf16_unavailable_reason() == (
            "the BLAS loaded has none of cblas_gemm_bf16bf16f32, cblas_sbgemm: use MKL "
            "(pip install 'vit[mkl]')")
        with pytest.raises(ValueError, match=r"^matmul_impl 'blas' cannot run here: the BLAS "
                                             r"loaded has none of"):
            matmul.resolve_matmul_impl("blas", "cpu", matmul_dtype="bfloat16")
        x = _normal(0, (4, 3), jnp.bfloat16)
        with pytest.raises(Exception, match="the BLAS handed over has no cblas_gemm_bf16bf16f32"):
            jax.jit(blas_gemm.gemm)(x, x.T).block_until_ready()
        x = _normal(0, (4, 3))
        np.testing.assert_allclose(np.asarray(jax.jit(blas_gemm.gemm)(x, x.T)),
                                   np.asarray(x @ x.T), rtol=1e-5, atol=1e-5)
    finally:  # back to the whole plain BLAS, as the fixture set it
        blas_gemm.load(compile_library(tmp_path, "plain", PLAIN_SGEMM + PLAIN_BF16_GEMM))
