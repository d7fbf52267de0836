"""elementwise_impl (vit/elementwise.py): who computes the LayerNorms and the tanh GELU, what
"auto" picks, the errors, and the fused calls beside XLA's matmuls with no BLAS loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import vit
from vit import blas_gemm, elementwise, impl_choice
from vit.config_schema import model_config

TINY = dict(num_classes=10, image_size=8, width=32, depth=2, num_heads=2, mlp_dim=64,
            platform="cpu")


def test_auto_is_fused_on_a_cpu_for_float32_and_bfloat16(monkeypatch):
    resolve = elementwise.resolve_elementwise_impl
    monkeypatch.setattr(blas_gemm, "handler_unavailable_reason", lambda: None)
    monkeypatch.setattr(elementwise.host, "machine", lambda: "x86_64")  # whatever runs the test
    assert resolve("auto", "cpu") == "fused"
    assert resolve("auto", "cpu", dtype=jnp.bfloat16) == "fused"
    assert resolve("auto", "cpu", dtype=jnp.float16) == "xla"
    assert resolve("auto", "gpu") == "xla"
    assert resolve("auto", "tpu") == "xla"
    assert resolve("xla", "cpu") == "xla"
    assert resolve("fused", "cpu") == "fused"
    # measured on x86-64 only: another CPU runs the calls when asked
    monkeypatch.setattr(elementwise.host, "machine", lambda: "aarch64")
    assert resolve("auto", "cpu") == "xla"
    assert resolve("fused", "cpu") == "fused"


def test_auto_says_once_why_a_cpu_runs_xlas_norms(monkeypatch, caplog):
    monkeypatch.setattr(blas_gemm, "handler_unavailable_reason",
                        lambda: "g++ is not installed: x")
    impl_choice._note_once.cache_clear()
    with caplog.at_level("INFO", logger="vit.elementwise"):
        assert [elementwise.resolve_elementwise_impl("auto", "cpu") for _ in range(3)] == \
            ["xla"] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "elementwise_impl 'auto' runs XLA's LayerNorm and GELU here: g++ is not installed: x"]


def test_fused_where_it_cannot_run_is_a_one_line_error(monkeypatch):
    resolve = elementwise.resolve_elementwise_impl
    with pytest.raises(ValueError, match=r"^elementwise_impl 'fused' runs on the CPU, not on "
                                         r"'gpu': use 'auto' or 'xla'$"):
        resolve("fused", "gpu")
    with pytest.raises(ValueError, match=r"^elementwise_impl 'fused' computes float32 or "
                                         r"bfloat16, not dtype float16: use 'auto' or 'xla'$"):
        resolve("fused", "cpu", dtype=jnp.float16)
    monkeypatch.setattr(blas_gemm, "handler_unavailable_reason",
                        lambda: "g++ is not installed: x")
    with pytest.raises(ValueError, match=r"^elementwise_impl 'fused' cannot run here: g\+\+ is "
                                         r"not installed: x; or use 'auto' or 'xla'$"):
        resolve("fused", "cpu")
    with pytest.raises(ValueError, match=r"^unknown elementwise_impl 'onednn'; use one of "
                                         r"\('auto', 'xla', 'fused'\)$"):
        vit.create_model("Ti/4", elementwise_impl="onednn", **TINY)


def test_a_saved_fused_model_loads_where_the_handler_cannot_run(monkeypatch):
    saved = {"variant": "Ti/4", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
             "matmul_impl": "xla", "elementwise_impl": "fused"}
    model = vit.model.saved_model_from_config(saved, num_classes=10, image_size=8)
    assert model.elementwise_impl == "fused"
    monkeypatch.setattr(blas_gemm, "handler_unavailable_reason", lambda: "no g++")
    assert elementwise.elementwise_impl_here("fused", "cpu") == "auto"
    assert elementwise.elementwise_impl_here("xla", "cpu") == "xla"
    assert elementwise.elementwise_impl_here("fused", "gpu") == "auto"
    model = vit.model.saved_model_from_config(saved, num_classes=10, image_size=8)
    assert model.elementwise_impl == "xla"
    # a checkpoint written before the option existed: "auto"
    del saved["elementwise_impl"]
    assert vit.model.saved_model_from_config(saved, num_classes=10,
                                             image_size=8).elementwise_impl == "xla"


def test_the_run_config_has_the_key_with_auto_by_default():
    assert model_config().elementwise_impl == "auto"
    model = vit.model.model_from_config(
        {"variant": "Ti/4", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
         "elementwise_impl": "xla"}, num_classes=10, image_size=8, platform="cpu")
    assert model.elementwise_impl == "xla"


def _custom_calls(model, params, images):
    """Each custom-call target's count in the HLO of the model's loss gradient."""
    hlo = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images) ** 2))).lower(
        params).as_text()
    targets = (blas_gemm.LAYER_NORM_TARGET, blas_gemm.LAYER_NORM_GRAD_TARGET,
               blas_gemm.BIAS_GELU_TARGET, blas_gemm.BIAS_GELU_GRAD_TARGET, blas_gemm.TARGET)
    return {t: hlo.count(f"@{t}(") for t in targets}


def test_fused_runs_the_norms_and_gelu_beside_xlas_matmuls():
    fused = vit.create_model("Ti/4", matmul_impl="xla", elementwise_impl="fused", **TINY)
    xla = vit.create_model("Ti/4", matmul_impl="xla", elementwise_impl="xla", **TINY)
    params = vit.init_params(xla, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    # two norms per block and the encoder's last; one GELU per block; no BLAS GEMM
    assert _custom_calls(fused, params, images) == {
        blas_gemm.LAYER_NORM_TARGET: 5, blas_gemm.LAYER_NORM_GRAD_TARGET: 5,
        blas_gemm.BIAS_GELU_TARGET: 2, blas_gemm.BIAS_GELU_GRAD_TARGET: 2, blas_gemm.TARGET: 0}
    assert set(_custom_calls(xla, params, images).values()) == {0}


def test_blas_matmuls_with_xlas_norms_run_no_norm_call(plain_blas):
    model = vit.create_model("Ti/4", matmul_impl="blas", elementwise_impl="xla", **TINY)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    counts = _custom_calls(model, params, jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3)))
    assert counts.pop(blas_gemm.TARGET) > 0
    assert set(counts.values()) == {0}


# Run in a fresh process with no BLAS to load: the handler serves the norms and GELU without one.
NO_BLAS_SCRIPT = """
import json, jax, jax.numpy as jnp, numpy as np, vit
from vit import blas_gemm
options = dict(num_classes=10, image_size=8, width=32, depth=2, num_heads=2, mlp_dim=64,
               matmul_impl="auto", platform="cpu")
fused = vit.create_model("Ti/4", **options)
xla = vit.create_model("Ti/4", elementwise_impl="xla", **options)
params = vit.init_params(xla, jax.random.PRNGKey(0))
params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape)
images = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
grads = [jax.jit(jax.value_and_grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, images) ** 2)))(
    params) for m in (fused, xla)]
got, want = (jax.tree.leaves(g) for g in grads)
# against the largest value of all: the key bias's gradient is zero but for rounding
scale = max(float(jnp.abs(b).max()) for b in want)
print(json.dumps({"blas": blas_gemm.unavailable_reason(), "impls": [
    (m.matmul_impl, m.elementwise_impl) for m in (fused, xla)], "worst": max(
    float(jnp.abs(a - b).max()) / scale for a, b in zip(got, want))}))
"""


def test_fused_runs_with_no_blas_and_gives_xlas_values_and_gradients(tmp_path):
    env = {**os.environ, "VIT_BLAS_LIB": str(tmp_path / "no-blas.so"),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", NO_BLAS_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["blas"].startswith(f"BLAS library {tmp_path / 'no-blas.so'} does not exist")
    assert result["impls"] == [["xla", "fused"], ["xla", "xla"]]
    assert result["worst"] < 2e-5  # float32 rounding: the fused calls' sums are their own
    assert result["worst"] > 0  # ...and not XLA's: the calls ran
