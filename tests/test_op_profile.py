"""bench/op_profile.py: HLO instructions sorted into categories, and a real traced profile."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import op_profile  # noqa: E402
from model_throughput import make_train_step  # noqa: E402

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
    for expected in ("forward dense matmul", "backward dense matmul",
                     "forward attention matmul", "backward attention matmul",
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
