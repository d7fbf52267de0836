"""bench/op_profile.py: HLO instructions sorted into categories, and a real traced profile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import op_profile  # noqa: E402
from model_throughput import add_step_arguments, make_train_step, step_inputs  # noqa: E402

import vit  # noqa: E402

TINY = dict(width=32, depth=1, num_heads=2, mlp_dim=64)


def _compiled_tiny_step():
    model = vit.create_model("Ti/4", num_classes=10, image_size=16, **TINY)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-3)
    state = [params, tx.init(params)]
    batch = (jnp.ones((4, 16, 16, 3)), jnp.arange(4) % 10, jax.random.PRNGKey(1))
    return make_train_step(model, tx).lower(*state, *batch).compile(), state, batch


def test_categories_name_each_pass_and_kind():
    compiled, _, _ = _compiled_tiny_step()
    kinds = op_profile.categories(compiled.as_text())
    found = {category for category, _ in kinds.values()}
    # XLA's attention is batched matmuls; the BLAS's one call each way (vit/blas_attention.cc)
    blas = vit.create_model("Ti/4", num_classes=10, image_size=16, **TINY).matmul_impl == "blas"
    attention = "attention kernel" if blas else "attention matmul"
    for expected in ("forward dense matmul", "backward dense matmul",
                     f"forward {attention}", f"backward {attention}",
                     "forward elementwise", "backward elementwise"):
        assert expected in found, (expected, sorted(found))
    # the op a dense matmul comes from, with the layer index starred
    sources = {source for category, source in kinds.values() if category.endswith("dense matmul")}
    assert any("encoderblock_*/MlpBlock_3/Dense_0" in s for s in sources), sorted(sources)


def test_profile_records_the_steps_thunks():
    compiled, state, batch = _compiled_tiny_step()
    kinds = op_profile.categories(compiled.as_text())
    events, wall = op_profile.profile(compiled, state, batch, steps=2)
    matched = [(name, ns) for name, ns in events if name in kinds]
    assert wall > 0 and matched
    assert all(ns >= 0 for _, ns in matched)
    assert {kinds[name][0] for name, _ in matched} & {"forward dense matmul",
                                                      "backward dense matmul"}


# Four instructions as XLA:GPU prints them: a cuBLAS matmul, a batched one, cuDNN's fused
# attention and a cuDNN convolution (abridged: only the fields the categories read).
_GPU_HLO = (Path(__file__).parent / "fixtures" / "gpu_step_excerpt.hlo").read_text()


def test_gpu_library_calls_are_sorted_by_their_target_and_dimensions():
    kinds = op_profile.categories(_GPU_HLO)
    assert kinds["custom-call.1"] == ("forward dense matmul",
                                      "VisionTransformer/Transformer/encoderblock_*/MlpBlock_3/"
                                      "Dense_0/dot_general")
    assert kinds["custom-call.2"][0] == "backward attention matmul"
    assert kinds["custom-call.3"][0] == "forward attention kernel"
    assert kinds["custom-call.4"] == ("forward convolution",
                                      "VisionTransformer/embedding/conv_general_dilated")


def _event(name, ns, **stats):
    return SimpleNamespace(name=name, duration_ns=ns, stats=list(stats.items()))


def _plane(name, **lines):
    return SimpleNamespace(name=name, lines=[SimpleNamespace(name=line, events=events)
                                             for line, events in lines.items()])


def test_a_gpu_trace_counts_the_kernels_on_its_streams_once_by_their_hlo_op():
    host = _plane("/host:CPU", launcher=[_event("launch", 5, hlo_op="custom-call.1")])
    gpu = _plane("/device:GPU:0", **{
        "Stream #13(Compute)": [_event("sm90_xmma_gemm_bf16", 700, hlo_op="custom-call.1"),
                                _event("loop_add_fusion", 30)],
        "XLA Ops": [_event("custom-call.1", 700)]})
    events = op_profile.op_events(SimpleNamespace(planes=[host, gpu]))
    assert events == [("custom-call.1", 700), ("loop_add_fusion", 30)]
    summary = op_profile.summary(events, op_profile.categories(_GPU_HLO), steps=2, wall_s=0.001)
    assert summary["share_by_category"] == {"forward dense matmul": 1.0}
    assert summary["op_ms_per_step"] == 0.0 and summary["unmatched_ms_per_step"] == 0.0
    assert summary["top_unmatched_ms"] == {}


def test_a_cpu_trace_counts_the_host_thunks_by_their_hlo_op():
    host = _plane("/host:CPU", python=[_event("PjitFunction(step)", 900)],
                  worker=[_event("ynn_fusion", 400, hlo_op="fusion.2", hlo_module="jit_step"),
                          _event("end: ynn_fusion", 1)])
    events = op_profile.op_events(SimpleNamespace(planes=[host]))
    assert events == [("fusion.2", 400)]


def test_step_flags_take_a_rectangle():
    parser = argparse.ArgumentParser()
    add_step_arguments(parser, steps=1)
    args = parser.parse_args(["--variant", "Ti/8", "--image-size", "16,24", "--batch", "2"])
    assert args.image_size == [16, 24]
    model, *_, images, labels, _ = step_inputs(args)
    assert model.image_size == (16, 24) and images.shape == (2, 16, 24, 3)
    assert parser.parse_args(["--image-size", "32"]).image_size == 32
    for bad in ("32,x", "1,2,3"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--image-size", bad])
