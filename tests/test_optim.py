"""Tests for vit.optim: schedules, weight-decay mask, clipping, layer decay, head-only, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vit
from vit import optim


def _flat(tree):
    return {"/".join(str(k.key) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def ti_params():
    model = vit.create_model("Ti/16", num_classes=10, image_size=32)
    return jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def small_params():
    model = vit.create_model("Ti/8", num_classes=3, image_size=16, width=32, depth=2, mlp_dim=64,
                             num_heads=2)
    return jax.jit(vit.init_params, static_argnums=0)(model, jax.random.PRNGKey(1))


def _config(**overrides):
    config = optim.default_config()
    config.update(dict(lr=1.0, warmup_steps=0, total_steps=100, schedule="constant",
                       weight_decay=0.0, grad_clip_norm=None))
    config.update(overrides)
    return config


def _one_step(config, params, grads):
    tx = optim.make_optimizer(config, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


@pytest.mark.parametrize("schedule, expected", [
    # steps 0, 5 (mid-warmup), 10 (warmup end), 60 (decay midpoint), 110 (end), 200 (past end)
    ("cosine", [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]),
    ("linear", [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("rsqrt", [0.0, 0.5, 1.0, np.sqrt(10 / 60), np.sqrt(10 / 110), np.sqrt(10 / 200)]),
])
def test_schedule_values_at_exact_steps(schedule, expected):
    floor = 0.1 if schedule in ("cosine", "linear") else 0.0  # the others have no floor
    config = _config(schedule=schedule, warmup_steps=10, total_steps=110, min_lr_ratio=floor)
    fn = optim.learning_rate_schedule(config)
    got = [float(fn(s)) for s in (0, 5, 10, 60, 110, 200)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert optim.current_lr(config, 60) == pytest.approx(expected[3], rel=1e-6)


def test_cosine_quarter_point_and_no_warmup():
    config = _config(schedule="cosine", lr=2.0, total_steps=100)
    fn = optim.learning_rate_schedule(config)
    assert float(fn(0)) == pytest.approx(2.0)
    assert float(fn(25)) == pytest.approx(1.0 + np.cos(np.pi / 4), rel=1e-6)
    assert float(fn(100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("overrides, words", [
    (dict(optimizer="adam"), ["'adam'", "adamw, sgd"]),
    (dict(schedule="step"), ["'step'", "cosine, linear, rsqrt, constant"]),
    (dict(warmup_steps=200, total_steps=100), ["warmup_steps=200", "total_steps=100"]),
    (dict(layer_decay=0.0), ["layer_decay", "(0, 1]"]),
    (dict(layer_decay=1.5), ["layer_decay", "1.5"]),
    (dict(trainable="body"), ["'body'", "all, head"]),
    (dict(ema_decay=1.0), ["ema_decay", "[0, 1)"]),
    (dict(schedule="rsqrt", min_lr_ratio=0.1), ["min_lr_ratio=0.1", "'rsqrt' has none"]),
    (dict(lr=float("inf")), ["lr must be a finite number > 0", "inf"]),
    (dict(weight_decay=float("nan")), ["weight_decay must be a finite number >= 0", "nan"]),
    (dict(grad_clip_norm=float("inf")), ["grad_clip_norm", "0 or None: no clipping", "inf"]),
    (dict(grad_clip_norm=-1.0), ["grad_clip_norm", "-1.0"]),
])
def test_bad_values_raise_one_line(overrides, words, small_params):
    with pytest.raises(optim.OptimizerConfigError) as info:
        optim.make_optimizer(_config(**overrides), small_params)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert isinstance(info.value, ValueError)


def test_weight_decay_mask_on_ti(ti_params):
    mask = _flat(optim.weight_decay_mask(ti_params))
    block = "MultiHeadDotProductAttention_1/{}/kernel"
    decayed = {"embedding/kernel", "head/kernel"}
    for i in range(12):
        prefix = f"Transformer/encoderblock_{i}/"
        decayed |= {prefix + "MlpBlock_3/Dense_0/kernel", prefix + "MlpBlock_3/Dense_1/kernel"}
        decayed |= {prefix + block.format(n) for n in ("query", "key", "value", "out")}
    assert {k for k, v in mask.items() if v} == decayed
    assert set(mask) == set(_flat(ti_params))
    for name in ("cls", "Transformer/posembed_input/pos_embedding", "embedding/bias",
                 "Transformer/encoder_norm/scale", "Transformer/encoderblock_3/LayerNorm_0/bias"):
        assert mask[name] is False


def test_weight_decay_mask_map_head():
    model = vit.create_model("Ti/8", num_classes=3, image_size=16, width=32, depth=1, mlp_dim=64,
                             num_heads=2, classifier="map", representation_size=16)
    mask = _flat(optim.weight_decay_mask(jax.eval_shape(lambda: vit.init_params(
        model, jax.random.PRNGKey(0)))))
    assert mask["MAPHead_0/probe"] is False
    assert mask["MAPHead_0/MlpBlock_0/Dense_0/kernel"] is True
    assert mask["pre_logits/kernel"] is True and mask["pre_logits/bias"] is False


@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("lr", [0.1, 1e-3])
def test_decoupled_weight_decay_exact_and_independent_of_lr(name, lr, small_params):
    # Decoupled: one step at the schedule's peak multiplies kernels by (1 - wd), whatever lr is.
    config = _config(optimizer=name, lr=lr, weight_decay=0.05)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, small_params)
    new = _flat(_one_step(config, small_params, zeros))
    old, mask = _flat(small_params), _flat(optim.weight_decay_mask(small_params))
    for key, value in old.items():
        expected = value - 0.05 * value if mask[key] else value
        np.testing.assert_allclose(new[key], expected, rtol=1e-6, err_msg=key)


def test_weight_decay_follows_the_schedule_shape(small_params):
    # Mid-warmup the schedule is at 30% of its peak, so the decay is 0.3 * wd * w.
    config = _config(optimizer="adamw", lr=2e-3, weight_decay=0.1, schedule="cosine",
                     warmup_steps=10, total_steps=100)
    tx = optim.make_optimizer(config, small_params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, small_params)
    state = tx.init(small_params)
    for _ in range(3):  # steps 0, 1, 2 -> lr multipliers 0, 0.1, 0.2; we check step 3 (0.3)
        _, state = tx.update(zeros, state, small_params)
    updates, _ = tx.update(zeros, state, small_params)
    new = _flat(optax.apply_updates(small_params, updates))
    old, mask = _flat(small_params), _flat(optim.weight_decay_mask(small_params))
    for key, value in old.items():
        expected = value - 0.3 * 0.1 * value if mask[key] else value
        np.testing.assert_allclose(new[key], expected, rtol=1e-5, err_msg=key)


def test_ema_warmup_values():
    got = [float(optim.ema_decay_at(t, 0.999)) for t in (0, 1, 10, 90, 10_000)]
    np.testing.assert_allclose(got, [0.1, 2 / 11, 11 / 20, 91 / 100, 0.999], rtol=1e-6)
    assert float(optim.ema_decay_at(0, 0.05)) == pytest.approx(0.05)


def test_ema_after_first_step_is_mostly_the_new_params():
    ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    out = optim.ema_update(ema, params, optim.ema_decay_at(0, 0.9999))
    np.testing.assert_allclose(out["w"], 0.9, rtol=1e-6)


def test_clipping_bounds_the_update(small_params):
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e3), small_params)
    unclipped = 1e3 * np.sqrt(sum(p.size for p in _flat(grads).values()))
    for clip, expected in ((0.5, 0.5), (None, unclipped), (0.0, unclipped)):
        config = _config(optimizer="sgd", momentum=0.0, grad_clip_norm=clip)
        tx = optim.make_optimizer(config, small_params)
        updates, _ = jax.jit(tx.update)(grads, tx.init(small_params), small_params)
        assert float(optax.global_norm(updates)) == pytest.approx(expected, rel=1e-5)


def test_layer_decay_multipliers_exact_per_block(ti_params):
    mult = _flat(optim.layer_decay_multipliers(ti_params, 0.5))
    for key, value in mult.items():
        parts = key.split("/")
        if parts[0] in ("embedding", "cls") or "posembed_input" in parts:
            assert value == 0.5 ** 13, key
        elif parts[1].startswith("encoderblock_"):
            assert value == 0.5 ** (12 - int(parts[1].split("_")[1])), key
        else:
            assert parts[0] == "head" or parts[1] == "encoder_norm"
            assert value == 1.0, key


def test_layer_decay_scales_sgd_updates(small_params):
    config = _config(optimizer="sgd", momentum=0.0, layer_decay=0.5)
    ones = jax.tree_util.tree_map(jnp.ones_like, small_params)
    new, old = _flat(_one_step(config, small_params, ones)), _flat(small_params)
    expected = {"cls": 0.125, "Transformer/encoderblock_0/LayerNorm_0/scale": 0.25,
                "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel": 0.5,
                "Transformer/encoder_norm/bias": 1.0, "head/kernel": 1.0}
    for key, step in expected.items():
        np.testing.assert_allclose(old[key] - new[key], step, rtol=1e-6, err_msg=key)


def test_head_only_freezes_everything_else(small_params):
    config = _config(trainable="head", weight_decay=0.1, grad_clip_norm=1.0)
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.3, small_params)
    tx = optim.make_optimizer(config, small_params)
    state = tx.init(small_params)
    new, old = _flat(_one_step(config, small_params, grads)), _flat(small_params)
    for key in old:
        if key.startswith("head/"):
            assert not np.allclose(new[key], old[key]), key
        else:
            np.testing.assert_array_equal(new[key], old[key], err_msg=key)
    head_size = small_params["head"]["kernel"].size + small_params["head"]["bias"].size
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    assert state_size == 2 * head_size  # Adam's mu and nu, for the head only
    # train/grad_norm is the norm clipped: the head's alone here
    all_size = sum(x.size for x in jax.tree_util.tree_leaves(small_params))
    np.testing.assert_allclose(optim.trained_grad_norm(grads, "head"), 0.3 * head_size ** 0.5,
                               rtol=1e-6)
    # a float32 sum of all_size squares, in an order that varies with the CPU's vector width
    np.testing.assert_allclose(optim.trained_grad_norm(grads, "all"), 0.3 * all_size ** 0.5,
                               rtol=2e-5)


def test_ema_update_math():
    ema = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(0.0)}
    params = {"a": jnp.array([3.0, 2.0]), "b": jnp.array(10.0)}
    out = optim.ema_update(ema, params, 0.9)
    np.testing.assert_allclose(out["a"], [1.2, 2.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], 1.0, rtol=1e-6)
    assert optim.ema_decay(_config(ema_decay=0.99)) == 0.99
    assert optim.ema_decay(_config()) is None


def test_layer_decay_puts_the_conv_stem_in_the_input_layer():
    model = vit.create_model("Ti/4", num_classes=3, image_size=16, width=32, depth=2, mlp_dim=64,
                             num_heads=2, stem="conv")
    params = jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))
    mult = _flat(optim.layer_decay_multipliers(params, 0.5))
    assert mult["stem/conv_0/kernel"] == mult["embedding/kernel"] == 0.5 ** 3
    assert _flat(optim.weight_decay_mask(params))["stem/conv_1/kernel"] is True


def test_layer_decay_puts_registers_with_the_class_token():
    model = vit.create_model("Ti/4", num_classes=3, image_size=16, width=32, depth=2, mlp_dim=64,
                             num_heads=2, num_registers=2)
    params = jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))
    mult = _flat(optim.layer_decay_multipliers(params, 0.5))
    assert mult["Transformer/registers"] == mult["cls"] == 0.5 ** 3


@pytest.mark.parametrize("key,value,expected", [
    ("b1", 1.0, "b1 must be in [0, 1), got 1.0 (at 1 Adam's bias correction divides by zero)"),
    ("b2", 1.0, "b2 must be in [0, 1), got 1.0"),
    ("b2", -0.1, "b2 must be in [0, 1), got -0.1"),
    ("momentum", -0.5, "momentum must be in [0, 1) (0 = none), got -0.5"),
])
def test_adam_betas_and_momentum_out_of_range_are_one_line(key, value, expected):
    with pytest.raises(optim.OptimizerConfigError) as err:
        optim.check_config(_config(**{key: value}))
    assert str(err.value).startswith(expected)


def test_ema_keeps_a_parameter_that_did_not_move_exactly():
    """decay * e + (1 - decay) * e is not e in floating point; e + (1 - decay) * (p - e) is."""
    values = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    for decay in (0.1, 0.9, 0.9999):
        np.testing.assert_array_equal(optim.ema_update(values, values, decay), values)
    moved = np.asarray(optim.ema_update(np.zeros(3, np.float32), np.ones(3, np.float32), 0.75))
    np.testing.assert_allclose(moved, 0.25, rtol=1e-7)
