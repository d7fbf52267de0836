"""Attention masks on both kernels, and register tokens (model, attention maps, fine-tuning)."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit
from vit import attention, attention_maps, pretrained
from vit.attention import (
    MultiHeadDotProductAttention,
    attention_impl_here,
    attention_weights,
    resolve_attention_impl,
)
from vit.checkpoint import load_checkpoint
from vit.evaluate import load_inference_model

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)


def _model(**kw):
    return vit.create_model("Ti/4", num_classes=10, image_size=16, **{**TINY, **kw})


def _random_params(model, seed=0):
    """Initial params plus noise, so that the (zero-initialised) head sees every token."""
    params = vit.init_params(model, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)])


def _images(batch=2, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, 16, 16, 3))


def test_masked_keys_get_exactly_zero_weight():
    q, k = (jax.random.normal(jax.random.PRNGKey(i), (2, 5, 3, 4)) for i in range(2))
    mask = jnp.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], bool)[:, None, None]
    w = np.asarray(attention_weights(q, k, mask))
    assert np.all(w[0, ..., [2, 4]] == 0.0) and np.all(w[1, ..., 1:] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(w[1, ..., 0], 1.0)


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_module_mask_matches_attention_over_kept_keys_only(impl):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8))
    keep = jnp.array([[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
    layer = MultiHeadDotProductAttention(num_heads=2, impl=impl)
    params = layer.init(jax.random.PRNGKey(1), x)
    masked, _ = layer.apply(params, x, mask=keep[:, None, None])
    # Image 0 with its masked tokens removed from the keys gives the same outputs.
    kept = x[0][np.asarray(keep[0])][None]
    alone, _ = layer.apply(params, x[:1], kept)
    np.testing.assert_allclose(masked[0], alone[0], atol=1e-5)
    full, _ = layer.apply(params, x)
    np.testing.assert_allclose(masked[1], full[1], atol=1e-6)


def _reference_attention(params, x, mask):
    """The layer by hand: vit_jax projections around jax.nn.dot_product_attention itself."""
    p = params["params"]
    q, k, v = (jnp.einsum("btw,whd->bthd", x, p[n]["kernel"]) + p[n]["bias"]
               for n in ("query", "key", "value"))
    y = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return jnp.einsum("bthd,hdw->btw", y, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("impl", ["explicit", "fused"])
@pytest.mark.parametrize("masked", [False, True])
def test_both_kernels_match_jax_dot_product_attention_called_directly(impl, masked):
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 7, 8))
    mask = None
    if masked:  # every query keeps key 0, so no row is fully masked
        mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.5, (3, 2, 7, 7)).at[..., 0].set(True)
    layer = MultiHeadDotProductAttention(num_heads=2, impl=impl)
    params = layer.init(jax.random.PRNGKey(6), x)
    got, _ = layer.apply(params, x, mask=mask)
    np.testing.assert_allclose(got, _reference_attention(params, x, mask), atol=1e-5)


def test_explicit_and_fused_agree_with_a_mask():
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 7, 8))
    mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.6, (3, 1, 7, 7)).at[..., 0].set(True)
    outs = []
    for impl in ("explicit", "fused"):
        layer = MultiHeadDotProductAttention(num_heads=2, impl=impl)
        params = layer.init(jax.random.PRNGKey(1), x)
        outs.append(layer.apply(params, x, mask=mask)[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("impl", ["explicit", "fused"])
@pytest.mark.parametrize("classifier", ["token", "gap", "map"])
def test_masked_patches_cannot_change_the_output(impl, classifier):
    model = _model(classifier=classifier, attention_impl=impl)
    params = _random_params(model)
    images = _images()
    mask = jnp.ones((2, 16), bool).at[:, 5].set(False).at[0, 10].set(False)
    # patch 5 is rows 4-7, cols 4-7; patch 10 is rows 8-11, cols 8-11
    changed = images.at[:, 4:8, 4:8].set(9.0).at[0, 8:12, 8:12].set(-9.0)
    a = model.apply({"params": params}, images, token_mask=mask)
    b = model.apply({"params": params}, changed, token_mask=mask)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a, model.apply({"params": params}, changed), atol=1e-3)


@pytest.mark.parametrize("stem", [
    dict(stem="conv"), dict(stem="conv", stem_norm="groupnorm"),
    dict(stem="conv", stem_channels=(8, 16, 16), stem_strides=(1, 2, 2)),
    dict(resnet_layers=(), resnet_width=32)])
def test_masked_patches_cannot_change_the_output_through_a_conv_stem(stem):
    """Conv windows and GroupNorm statistics cross patch borders: the masked pixels are zeroed."""
    model = _model(classifier="gap", **stem)
    params = _random_params(model)
    images = _images()
    mask = jnp.ones((2, 16), bool).at[:, 15].set(False)  # the bottom-right patch: rows, cols 12-15
    changed = images.at[:, 12:, 12:].set(9.0)
    a = model.apply({"params": params}, images, token_mask=mask)
    np.testing.assert_allclose(a, model.apply({"params": params}, changed, token_mask=mask),
                               atol=1e-5)
    assert not np.allclose(a, model.apply({"params": params}, changed), atol=1e-3)


def test_zero_masked_patches_zeroes_exactly_the_masked_tiles():
    images = jnp.arange(2 * 4 * 6 * 1, dtype=jnp.float32).reshape(2, 4, 6, 1) + 1
    mask = jnp.array([[True, False, True, True, True, False], [False] + [True] * 5])
    out = np.asarray(vit.model.zero_masked_patches(images, mask, (2, 3)))  # 2x2-pixel tiles
    expected = np.asarray(images).copy()
    expected[0, 0:2, 2:4] = 0
    expected[0, 2:4, 4:6] = 0
    expected[1, 0:2, 0:2] = 0
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("platform,dtype,head_dim,expected", [
    ("cpu", jnp.bfloat16, 64, "explicit"), ("gpu", jnp.bfloat16, 64, "cudnn"),
    ("GPU", "float16", 128, "cudnn"), ("gpu", jnp.float32, 64, "explicit"),
    ("gpu", jnp.bfloat16, 12, "explicit"), ("gpu", jnp.bfloat16, 160, "explicit"),
    ("tpu", jnp.bfloat16, 64, "fused"), ("tpu", jnp.float32, 64, "fused")])
def test_auto_resolves_from_platform_dtype_and_head_size_without_that_device(
        platform, dtype, head_dim, expected):
    assert resolve_attention_impl("auto", platform, dtype=dtype, head_dim=head_dim) == expected
    for concrete in ("explicit", "fused"):  # a concrete choice is kept on every platform
        kept = resolve_attention_impl(concrete, platform, dtype=dtype, head_dim=head_dim)
        assert kept == concrete
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        resolve_attention_impl("flash", platform)


def test_cudnn_is_refused_where_it_cannot_run_with_the_fix_named():
    assert resolve_attention_impl("cudnn", "gpu", dtype=jnp.bfloat16, head_dim=64) == "cudnn"
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs, not on 'cpu': use 'auto'"):
        resolve_attention_impl("cudnn", "cpu", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="not float32 with heads of 64: set model.dtype=bfloat16"):
        resolve_attention_impl("cudnn", "gpu", dtype=jnp.float32, head_dim=64)
    with pytest.raises(ValueError, match="not bfloat16 with heads of 12"):
        resolve_attention_impl("cudnn", "gpu", dtype=jnp.bfloat16, head_dim=12)


def test_auto_on_this_machine_follows_jax_default_backend():
    expected = "explicit" if jax.default_backend() == "cpu" else "fused"
    assert resolve_attention_impl("auto") == expected


def test_modules_run_the_kernel_they_are_given_and_never_look_at_the_backend(monkeypatch):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    explicit = MultiHeadDotProductAttention(num_heads=2, impl="explicit")
    fused = MultiHeadDotProductAttention(num_heads=2, impl="fused")
    params = explicit.init(jax.random.PRNGKey(1), x)
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(jax, "default_backend", lambda: pytest.fail("a module sniffed the backend"))
    explicit.apply(params, x)
    assert not calls  # explicit stays explicit, whatever the backend
    fused.apply(params, x)
    assert len(calls) == 1
    _, weights = fused.apply(params, x, return_weights=True)  # the weights force explicit
    assert len(calls) == 1 and weights.shape == (2, 2, 5, 5)


def test_the_cudnn_kernel_asks_jax_for_cudnn_and_fused_for_xla(monkeypatch):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    params = MultiHeadDotProductAttention(num_heads=2).init(jax.random.PRNGKey(1), x)
    asked = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        asked.append(implementation)  # cuDNN's kernel cannot run here: XLA's computes the same
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    outputs = {impl: MultiHeadDotProductAttention(num_heads=2, impl=impl).apply(params, x)[0]
               for impl in ("fused", "cudnn", "explicit")}
    assert asked == [None, "cudnn"]
    np.testing.assert_allclose(outputs["cudnn"], outputs["explicit"], atol=1e-5)


def test_unresolved_auto_in_a_module_names_the_fix():
    x = jnp.ones((1, 3, 8))
    layer = MultiHeadDotProductAttention(num_heads=2, impl="auto")
    with pytest.raises(ValueError, match="resolve it where the model is built"):
        layer.init(jax.random.PRNGKey(0), x)


def test_returned_attention_is_zero_on_masked_keys():
    model = _model(classifier="token", num_registers=2)
    params = _random_params(model)
    mask = jnp.ones((2, 16), bool).at[:, 3].set(False)
    _, maps = model.apply({"params": params}, _images(), token_mask=mask,
                          return_attention=True)
    assert maps.shape == (2, 2, 2, 1 + 2 + 16, 1 + 2 + 16)
    assert np.all(np.asarray(maps)[..., 1 + 2 + 3] == 0.0)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)


def test_bad_token_mask_and_options_fail_clearly():
    model = _model()
    params = vit.init_params(model, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"token_mask must be \[batch, patches\] = \[2, 16\]"):
        model.apply({"params": params}, _images(), token_mask=jnp.ones((2, 15), bool))
    with pytest.raises(ValueError, match="unknown attention_impl"):
        _model(attention_impl="flash")
    with pytest.raises(ValueError, match="num_registers must be >= 0"):
        _model(num_registers=-1)


def test_registers_are_parameters_after_the_prefix_and_leave_the_head():
    model = _model(classifier="gap", num_registers=4)
    shapes = jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))
    flat = flax.traverse_util.flatten_dict(shapes, sep="/")
    assert flat["Transformer/registers"].shape == (1, 4, 32)
    assert flat["Transformer/posembed_input/pos_embedding"].shape == (1, 16, 32)  # none for them
    params = _random_params(model)
    # With no encoder blocks, registers could reach the logits only through the GAP head.
    shallow = _model(classifier="gap", num_registers=4, depth=0)
    p0 = _random_params(shallow)
    other = jax.tree_util.tree_map(lambda x: x, p0)
    other["Transformer"]["registers"] = p0["Transformer"]["registers"] + 5.0
    x = _images()
    np.testing.assert_allclose(shallow.apply({"params": p0}, x),
                               shallow.apply({"params": other}, x), atol=1e-6)
    logits, maps = model.apply({"params": params}, x, return_attention=True)
    assert logits.shape == (2, 10) and maps.shape[-1] == 4 + 16


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_attention_maps_and_rollout_leave_registers_out(classifier):
    model = _model(classifier=classifier, num_registers=3)
    params = _random_params(model)
    weights = attention_maps.attention_weights(model, params, np.asarray(_images()))
    k = attention_maps.prefix_token_count(model)
    assert k == (1 if classifier == "token" else 0) + 3
    cls = classifier == "token"
    roll = attention_maps.rollout(weights, num_prefix_tokens=k, class_token=cls)
    layers = attention_maps.layer_maps(weights, num_prefix_tokens=k, class_token=cls)
    assert roll.shape == (2, 16) and layers.shape == (2, 2, 16)
    np.testing.assert_allclose(roll.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(layers.sum(-1), 1.0, rtol=1e-5)
    if not cls:  # the query is the mean over patch tokens: registers' rows do not count
        attn = weights.mean(2)[-1]  # last layer, mean of heads: [B, T, T]
        expected = attn[:, k:, k:].mean(1)
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(layers[-1], expected, rtol=1e-5)


def test_checkpoint_without_registers_fine_tunes_into_a_model_with_them():
    plain = _model(classifier="token")
    with_regs = _model(classifier="token", num_registers=4)
    source = vit.init_params(plain, jax.random.PRNGKey(0))
    target = vit.init_params(with_regs, jax.random.PRNGKey(1))
    params, notes = pretrained.adapt_params(source, target, with_regs)
    assert "register tokens initialised (none in the weights)" in notes
    flat_p = flax.traverse_util.flatten_dict(params, sep="/")
    flat_s = flax.traverse_util.flatten_dict(source, sep="/")
    flat_t = flax.traverse_util.flatten_dict(target, sep="/")
    np.testing.assert_array_equal(flat_p["Transformer/registers"], flat_t["Transformer/registers"])
    for name, value in flat_s.items():
        np.testing.assert_array_equal(flat_p[name], value, err_msg=name)
    # and back: a model without registers drops them
    _, back_notes = pretrained.adapt_params(params, source, plain)
    assert "Transformer/registers dropped (not in the model)" in back_notes


def _batched_dots(jaxpr) -> list:
    """The dimension numbers of every batched dot_general in a jaxpr and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"][1][0]:
            found.append(eqn.params["dimension_numbers"])
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _batched_dots(sub)
    return found


@pytest.mark.parametrize("grad", [False, True])
def test_explicit_attention_batches_its_matmuls_over_leading_batch_and_head_dims(grad):
    # Heads in the middle ([B, T, heads, dim]) made XLA:CPU's batched matmuls 2-3x slower.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    module = MultiHeadDotProductAttention(num_heads=2, impl="explicit")
    params = module.init(jax.random.PRNGKey(1), x)
    f = lambda p: module.apply(p, x)[0].sum()
    dots = _batched_dots(jax.make_jaxpr(jax.grad(f) if grad else f)(params).jaxpr)
    assert len(dots) == (6 if grad else 2)
    for _contract, (lhs_batch, rhs_batch) in dots:
        assert tuple(lhs_batch) == (0, 1) and tuple(rhs_batch) == (0, 1)


def _plain_attention(q, k, v, mask):
    """Softmax attention of heads-first q, k, v written plainly (jax.nn.softmax, weights before
    the second matmul), as autodiff differentiates it; masked keys and keyless queries get 0."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / np.sqrt(q.shape[-1])
    if mask is None:
        weights = jax.nn.softmax(logits, axis=-1)
    else:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    return jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_explicit_attentions_own_gradient_equals_autodiffs(dtype, tol):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(keys[0], (2, 3, 5, 8), dtype)  # 5 queries attend to 7 keys
    k, v = (jax.random.normal(key, (2, 3, 7, 8), dtype) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], (2, 3, 5, 8), jnp.float32)
    mask = jax.random.bernoulli(keys[4], 0.6, (2, 1, 5, 7)).at[0, 0, 1].set(False)  # a query
    for m in (None, mask):                                                      # with no key
        def grads(fn, m=m):
            loss = lambda q, k, v: (fn(q, k, v, m).astype(jnp.float32) * cotangent).sum()
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        out = np.asarray(attention._attend(q, k, v, m), np.float32)
        np.testing.assert_allclose(out, np.asarray(_plain_attention(q, k, v, m), np.float32),
                                   rtol=tol, atol=tol)
        if m is not None:  # the query with no key: exactly zero, not NaN
            assert not np.any(out[0, :, 1])
        ours = grads(attention._attend)
        for mine, autodiffs in zip(ours, grads(_plain_attention), strict=True):
            assert mine.dtype == dtype
            np.testing.assert_allclose(np.asarray(mine, np.float32),
                                       np.asarray(autodiffs, np.float32), rtol=tol, atol=tol)
        if m is not None:  # the query that attends to nothing passes no gradient to its q row
            assert not np.any(np.asarray(ours[0][0, :, 1], np.float32))


def test_explicit_attentions_compiled_gradient_contracts_each_left_operand_by_its_last_axis():
    # Autodiff's key and value gradients contract both operands' token rows; XLA:CPU ran those
    # batched matmuls about twice as slow as the same products on transposed copies.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    module = MultiHeadDotProductAttention(num_heads=2, impl="explicit")
    params = module.init(jax.random.PRNGKey(1), x)
    hlo = jax.jit(jax.grad(lambda p: module.apply(p, x)[0].sum())).lower(params).compile()
    batched = re.findall(r"lhs_batch_dims=\{0,1\}, lhs_contracting_dims=\{(\d)\}",
                         hlo.as_text())
    assert batched == ["3"] * 6


def test_a_checkpoint_trained_with_cudnn_loads_for_inference_off_a_gpu(tmp_path):
    from tiny_checkpoints import SMALL, write

    model, params = write(str(tmp_path / "run"), SMALL)
    contents = load_checkpoint(str(tmp_path / "run"))
    contents.config["model"]["attention_impl"] = "cudnn"  # as a GPU run saved it
    loaded = load_inference_model(contents)
    assert loaded.model.attention_impl == "explicit"  # "auto" on this CPU
    x = jnp.ones((1, 16, 16, 3))
    np.testing.assert_allclose(loaded.model.apply({"params": loaded.params}, x),
                               model.apply({"params": params}, x), atol=1e-6)
    assert attention_impl_here("cudnn", "gpu") == "cudnn"
    assert attention_impl_here("fused", "cpu") == "fused"
