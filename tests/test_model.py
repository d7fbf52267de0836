"""The ViT family: shapes, parameter counts and names, determinism, dropout, gradients."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit
from vit.encoder import posemb_sincos_2d

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64)


def _tiny(**kw):
    return vit.create_model("Ti/4", num_classes=10, image_size=16, **{**TINY, **kw})


def _images(batch=2, size=16, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))


@pytest.mark.parametrize(
    "variant,expected",
    [("Ti/16", 5_717_416), ("S/16", 22_050_664), ("B/16", 86_567_656),
     ("L/16", 304_326_632), ("H/14", 632_045_800)],
)
def test_published_parameter_counts(variant, expected):
    assert vit.count_params(vit.create_model(variant, num_classes=1000, image_size=224)) == expected


# Every variant with the class token, every classifier on Ti/16 (MAP on B/32 too): the head does
# not depend on the variant, and tracing H/14 or g/14 takes seconds each.
@pytest.mark.parametrize("variant,classifier", [
    *((v, "token") for v in ("Ti/16", "S/16", "M/16", "B/32", "L/16", "H/14", "g/14")),
    ("Ti/16", "gap"), ("Ti/16", "map"), ("B/32", "map")])
def test_output_shape_every_variant_and_classifier(variant, classifier):
    model = vit.create_model(variant, num_classes=7, image_size=224, classifier=classifier)
    params = jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))
    out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params,
                         jax.ShapeDtypeStruct((3, 224, 224, 3), jnp.float32))
    assert out.shape == (3, 7) and out.dtype == jnp.float32


def test_parameter_names_follow_vit_jax():
    model = vit.create_model("Ti/16", num_classes=5, image_size=32, depth=2,
                             representation_size=16)
    params = jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))
    names = set(flax.traverse_util.flatten_dict(params, sep="/"))
    block = "Transformer/encoderblock_1/"
    attention = block + "MultiHeadDotProductAttention_1/"
    expected = {
        "embedding/kernel", "embedding/bias", "cls",
        "Transformer/posembed_input/pos_embedding",
        block + "LayerNorm_0/scale", block + "LayerNorm_0/bias",
        *(attention + f"{p}/{w}" for p in ("query", "key", "value", "out")
          for w in ("kernel", "bias")),
        block + "LayerNorm_2/scale", block + "LayerNorm_2/bias",
        block + "MlpBlock_3/Dense_0/kernel", block + "MlpBlock_3/Dense_1/bias",
        "Transformer/encoder_norm/scale", "pre_logits/kernel", "head/kernel", "head/bias",
    }
    assert expected <= names
    assert len(names) == 4 + 2 * 16 + 2 + 2 + 2 + 2 + 2 - 4  # embedding 2, cls, posemb = 4
    assert params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"][
        "kernel"].shape == (192, 3, 64)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 5, 192)
    assert params["embedding"]["kernel"].shape == (16, 16, 3, 192)


def test_gap_and_sincos_have_no_class_token_or_learned_posemb():
    params = vit.init_params(_tiny(classifier="gap", posemb="sincos2d"), jax.random.PRNGKey(0))
    assert "cls" not in params and "posembed_input" not in params["Transformer"]
    map_params = vit.init_params(_tiny(classifier="map"), jax.random.PRNGKey(0))
    assert set(map_params["MAPHead_0"]) == {
        "probe", "MultiHeadDotProductAttention_0", "LayerNorm_0", "MlpBlock_0"}


def test_head_is_zero_initialised_so_initial_logits_are_zero():
    model = _tiny()
    params = vit.init_params(model, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(params["head"]["kernel"], 0)
    np.testing.assert_array_equal(model.apply({"params": params}, _images()), 0)


def _randomise_head(params, seed=1):
    head = jax.random.normal(jax.random.PRNGKey(seed), params["head"]["kernel"].shape)
    return {**params, "head": {**params["head"], "kernel": head}}


def test_same_seed_same_output_and_other_seed_differs():
    model = _tiny()
    p1 = _randomise_head(vit.init_params(model, jax.random.PRNGKey(0)))
    p2 = _randomise_head(vit.init_params(model, jax.random.PRNGKey(0)))
    p3 = _randomise_head(vit.init_params(model, jax.random.PRNGKey(1)))
    out1, out2, out3 = (model.apply({"params": p}, _images()) for p in (p1, p2, p3))
    np.testing.assert_array_equal(out1, out2)
    assert not np.allclose(out1, out3)


def test_dropout_only_in_training_mode():
    model = _tiny(dropout_rate=0.3, attention_dropout_rate=0.3, drop_path_rate=0.3)
    params = _randomise_head(vit.init_params(model, jax.random.PRNGKey(0)))
    x = _images()
    evals = [model.apply({"params": params}, x) for _ in range(2)]
    np.testing.assert_array_equal(evals[0], evals[1])
    no_dropout = _tiny()
    np.testing.assert_allclose(evals[0], no_dropout.apply({"params": params}, x), atol=1e-6)
    trains = [model.apply({"params": params}, x, train=True,
                          rngs={"dropout": jax.random.PRNGKey(s)}) for s in range(2)]
    assert not np.allclose(trains[0], trains[1])
    assert not np.allclose(trains[0], evals[0])
    with pytest.raises(flax.errors.InvalidRngError):
        model.apply({"params": params}, x, train=True)


@pytest.mark.parametrize("classifier", ["token", "gap", "map"])
def test_every_parameter_gets_a_nonzero_gradient(classifier):
    model = _tiny(classifier=classifier, representation_size=8)
    params = _randomise_head(vit.init_params(model, jax.random.PRNGKey(0)))
    labels = jnp.array([1, 3])

    def loss(p):
        logits = model.apply({"params": p}, _images(), train=True,
                             rngs={"dropout": jax.random.PRNGKey(0)})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    grads = flax.traverse_util.flatten_dict(jax.grad(loss)(params), sep="/")
    zero = [name for name, g in grads.items() if not np.any(np.asarray(g))]
    assert not zero, f"parameters without gradient: {zero}"


@pytest.mark.fusion_emitters
@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_keeps_the_parameters_and_gives_the_same_loss_and_gradients(remat):
    # Dropout, stochastic depth and token dropping draw inside or before the recomputed blocks:
    # the recomputation must draw the same numbers.
    kw = dict(dropout_rate=0.1, drop_path_rate=0.2, token_keep_ratio=0.5, classifier="map")
    plain, rematted = _tiny(**kw), _tiny(remat=remat, **kw)
    params = _randomise_head(vit.init_params(plain, jax.random.PRNGKey(0)))
    assert (jax.tree_util.tree_structure(vit.init_params(rematted, jax.random.PRNGKey(0)))
            == jax.tree_util.tree_structure(params))
    labels = jnp.array([1, 3])

    def loss(model, p):
        logits = model.apply({"params": p}, _images(), train=True,
                             rngs={"dropout": jax.random.PRNGKey(4)})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    want = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
    got = jax.jit(jax.value_and_grad(lambda p: loss(rematted, p)))(params)
    np.testing.assert_array_equal(got[0], want[0])
    for g, w in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1]),
                    strict=True):
        np.testing.assert_array_equal(g, w)
    assert np.any(np.asarray(want[1]["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
                             ["kernel"]))


def test_attention_weights_are_returned_and_match_the_fused_path():
    model = _tiny()
    params = _randomise_head(vit.init_params(model, jax.random.PRNGKey(0)))
    logits, attention = model.apply({"params": params}, _images(3), return_attention=True)
    assert attention.shape == (2, 3, 2, 17, 17)  # depth, batch, heads, tokens, tokens
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    # return_attention always takes the explicit path; the fused model runs
    # jax.nn.dot_product_attention (tests/test_attention.py checks both kernels against it).
    fused = _tiny(attention_impl="fused")
    np.testing.assert_allclose(logits, fused.apply({"params": params}, _images(3)), atol=1e-5)


def test_create_model_resolves_auto_attention_once_for_the_target_platform():
    expected = "explicit" if jax.default_backend() == "cpu" else "fused"
    assert _tiny().attention_impl == expected  # "auto", the default, is resolved here
    assert _tiny(attention_impl="auto", platform="cpu").attention_impl == "explicit"
    assert _tiny(platform="gpu").attention_impl == "explicit"  # float32: no cuDNN flash kernel
    assert _tiny(platform="gpu", dtype=jnp.bfloat16).attention_impl == "cudnn"  # heads of 16
    odd_heads = _tiny(platform="gpu", dtype="bfloat16", width=40, num_heads=4)  # heads of 10
    assert odd_heads.attention_impl == "explicit"
    assert _tiny(platform="tpu").attention_impl == "fused"
    assert _tiny(attention_impl="explicit", platform="gpu").attention_impl == "explicit"
    config = {"variant": "Ti/4", **TINY, "attention_impl": "auto"}
    built = vit.model_from_config(config, num_classes=10, image_size=16, platform="tpu")
    assert built.attention_impl == "fused"
    # Built for a TPU, the model still runs here: jax.nn.dot_product_attention has an XLA path.
    params = vit.init_params(built, jax.random.PRNGKey(0))
    assert built.apply({"params": params}, _images()).shape == (2, 10)


def test_bfloat16_compute_keeps_float32_parameters():
    model = _tiny(dtype=jnp.bfloat16)
    params = _randomise_head(vit.init_params(model, jax.random.PRNGKey(0)))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    out = model.apply({"params": params}, _images())
    reference = _tiny().apply({"params": params}, _images())
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference, atol=0.1 * float(np.abs(reference).max()))


@pytest.mark.parametrize("size,patch", [(24, 4), (20, 5), (64, 16)])
def test_any_image_size_divisible_by_the_patch(size, patch):
    model = vit.create_model(f"Ti/{patch}", num_classes=3, image_size=size, **TINY)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    assert model.apply({"params": params}, _images(2, size)).shape == (2, 3)
    tokens = params["Transformer"]["posembed_input"]["pos_embedding"].shape[1]
    assert tokens == (size // patch) ** 2 + 1


def test_rectangular_images():
    model = vit.create_model("Ti/4", num_classes=3, image_size=(16, 24), **TINY)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    assert model.apply({"params": params}, jnp.zeros((1, 16, 24, 3))).shape == (1, 3)
    assert model.grid == (4, 6)


def test_sincos_posemb_values():
    pe = posemb_sincos_2d(2, 3, 8)
    assert pe.shape == (1, 6, 8)
    np.testing.assert_allclose(pe[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    # token 4 sits at row 1, column 1: sin(1 * omega) for omega = [1, 1e-4] in x and y.
    np.testing.assert_allclose(pe[0, 4, :2], np.sin([1.0, 1e-4]), rtol=1e-6)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: vit.create_model("X/16"), "unknown ViT variant 'X/16'"),
        (lambda: vit.create_model("B"), "'<size>/<patch>'"),
        (lambda: vit.create_model("B/16", hidden=3), "unknown model option(s) hidden"),
        (lambda: vit.create_model("B/16", classifier="avg"), "unknown classifier 'avg'"),
        (lambda: vit.create_model("B/16", image_size=100), "not divisible by the patch size"),
        (lambda: vit.create_model("B/16", posemb="rope"), "unknown posemb 'rope'"),
        (lambda: vit.create_model("B/16", dropout_rate=1.5), "dropout_rate must be in"),
        (lambda: vit.create_model("B/16", remat="full"),
         "unknown remat 'full'; use one of ('none', 'block', 'dots')"),
    ],
)
def test_bad_options_fail_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=None) as err:
        call()
    assert message in str(err.value)


def test_wrong_input_size_names_the_fix():
    model = _tiny()
    params = vit.init_params(model, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="built for 16x16 images, got 32x32"):
        model.apply({"params": params}, _images(1, 32))


def test_explicit_attention_equals_jax_dot_product_attention():
    from vit.attention import attention_weights

    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 9, 3, 8)) for i in range(3))
    explicit = jnp.einsum("bhqk,bkhd->bqhd", attention_weights(q, k), v)
    np.testing.assert_allclose(explicit, jax.nn.dot_product_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(representation_size=0),
         "model representation_size must be >= 1 or None (no pre-logits layer), got 0"),
        (dict(representation_size=-3),
         "model representation_size must be >= 1 or None (no pre-logits layer), got -3"),
        (dict(stem="conv", stem_channels=(0, 32)), "model stem_channels must be positive conv "
         "widths, e.g. (32, 64), or None for the default ones, got (0, 32)"),
        (dict(stem="conv", stem_channels=()), "model stem_channels must be positive conv "
         "widths, e.g. (32, 64), or None for the default ones, got ()"),
        (dict(stem_channels=(8.5, 16)),
         "model stem_channels must be a tuple of ints, e.g. (32, 64), got (8.5, 16)"),
        (dict(num_registers=1.5), "model num_registers must be an integer >= 0, got 1.5"),
        (dict(num_classes=10.0), "model num_classes must be an integer >= 1, got 10.0"),
        (dict(num_classes=0), "model num_classes must be >= 1, got 0"),
        (dict(width=True), "model width must be an integer >= 1, got True"),
        (dict(image_size="32"), "image_size must be an int or a pair of ints (rows, cols), got "
         "'32': pass e.g. image_size=32 or image_size=(32, 48)"),
        (dict(image_size=(32,)), "image_size must be an int or a pair of ints (rows, cols), got "
         "(32,): pass e.g. image_size=32 or image_size=(32, 48)"),
        (dict(patch_size=(4, 4, 4)), "patch_size must be an int or a pair of ints (rows, cols), "
         "got (4, 4, 4): pass e.g. patch_size=32 or patch_size=(32, 48)"),
        (dict(posemb="sincos2d", width=4, num_heads=1), "posemb='sincos2d' needs a width "
         "divisible by 4 and >= 8, got width 4: use such a width, or posemb='learn'"),
        (dict(posemb="sincos2d", width=30), "posemb='sincos2d' needs a width divisible by 4 "
         "and >= 8, got width 30: use such a width, or posemb='learn'"),
        (dict(token_keep_ratio="0.5"), "model token_keep_ratio must be a number, got '0.5'"),
        (dict(dropout_rate=None), "model dropout_rate must be a number, got None"),
        (dict(head_bias_init="a"), "model head_bias_init must be a number, got 'a'"),
        (dict(gelu_approximate="False"), "model gelu_approximate must be True (tanh GELU) or "
         "False (exact erf), got 'False'"),
        (dict(quick_gelu=1), "model quick_gelu must be True or False, got 1"),
        (dict(pre_norm="yes"), "model pre_norm must be True or False, got 'yes'"),
        (dict(swiglu=None), "model swiglu must be True or False, got None"),
        (dict(qk_norm="on"), "model qk_norm must be True or False, got 'on'"),
        (dict(key_bias=0), "model key_bias must be True or False, got 0"),
        (dict(rope="eva"), "unknown rope 'eva'; use one of ('none', 'dinov3', 'eva02')"),
        (dict(rope="dinov3", width=24, num_heads=4), "rope='dinov3' needs a head size (width / "
         "num_heads) divisible by 4, got 6: change width or num_heads, or set rope='none'"),
        (dict(norm_epsilon=0.0), "model norm_epsilon must be a small positive number (LayerNorm's "
         "epsilon, e.g. 1e-6), got 0.0"),
        (dict(posemb="rope"), "unknown posemb 'rope'; use one of ('learn', 'sincos2d', 'none')"),
        (dict(rope="dinov3", rope_grid=(16, 16)), "model rope_grid scales rope='eva02' "
         "coordinates to a grid of positive sides, got (16, 16) with rope='dinov3': set "
         "rope='eva02', or leave rope_grid unset"),
        (dict(rope="eva02", rope_grid="16"), "rope_grid must be an int or a pair of ints (rows, "
         "cols), got '16': pass e.g. rope_grid=32 or rope_grid=(32, 48)"),
        (dict(classifier="map", fc_norm=True), "model fc_norm normalises the pooled patches of "
         "classifier='gap', not classifier='map': set classifier='gap' or fc_norm=False"),
        (dict(mlp_norm=1), "model mlp_norm must be True or False, got 1"),
        (dict(class_token="yes"), "model class_token must be True or False, got 'yes'"),
        (dict(swiglu=True, quick_gelu=True),
         "model swiglu and quick_gelu are two MLPs: set one of them"),
        (dict(stem_strides=(1, 1)), "model stem_strides shapes the conv stem, but "
         "stem='patchify': set stem='conv', or leave stem_strides unset"),
        (dict(platform="typo"), "unknown platform 'typo'; use one of cpu, gpu, tpu (or None for "
         "JAX's default backend)"),
    ],
)
def test_bad_numbers_and_sizes_fail_at_create_model_in_one_line(options, message):
    kwargs = {"num_classes": 10, "image_size": 16, **TINY, **options}
    with pytest.raises(ValueError) as err:
        vit.create_model("Ti/4", **kwargs)
    assert str(err.value) == message


def test_rectangular_sizes_may_be_lists_and_positive_options_build():
    model = vit.create_model("Ti/4", num_classes=np.int64(3), image_size=[16, 24],
                             representation_size=8, num_registers=np.int32(1), **TINY)
    assert (model.image_size, model.grid, model.num_registers) == ((16, 24), (4, 6), 1)
    sincos = vit.create_model("Ti/4", num_classes=3, image_size=16, posemb="sincos2d",
                              **{**TINY, "width": 8, "num_heads": 1})
    params = vit.init_params(sincos, jax.random.PRNGKey(0))
    assert np.isfinite(np.asarray(sincos.apply({"params": params}, _images()))).all()


def _map_probe(gelu_approximate: bool):
    """A depth-0 MAP classifier: the MAP head's MLP holds the model's only GELU."""
    return _tiny(depth=0, classifier="map", gelu_approximate=gelu_approximate)


def test_map_head_computes_the_models_gelu():
    tanh, exact = _map_probe(True), _map_probe(False)
    params = _randomise_head(vit.init_params(tanh, jax.random.PRNGKey(0)))
    names = flax.traverse_util.flatten_dict(params, sep="/")
    assert names.keys() == flax.traverse_util.flatten_dict(
        vit.init_params(exact, jax.random.PRNGKey(0)), sep="/").keys()
    x = _images()
    out_tanh, state = tanh.apply({"params": params}, x, capture_intermediates=True,
                                 mutable=["intermediates"])
    out_exact = exact.apply({"params": params}, x)
    # Everything up to the MLP's first dense layer is the same; after it only linear maps.
    hidden = state["intermediates"]["MAPHead_0"]["MlpBlock_0"]["Dense_0"]["__call__"][0]
    if isinstance(hidden, tuple):  # elementwise_impl="fused": the product, the bias GELU adds
        hidden = hidden[0] + hidden[1]
    mlp_out = names["MAPHead_0/MlpBlock_0/Dense_1/kernel"]
    gap = (jax.nn.gelu(hidden, approximate=False) - jax.nn.gelu(hidden, approximate=True))
    expected = out_tanh + (gap[:, 0] @ mlp_out) @ names["head/kernel"]
    assert np.abs(np.asarray(out_exact - out_tanh)).max() > 1e-3  # 100x the tolerance below
    np.testing.assert_allclose(out_exact, expected, atol=1e-5)


def test_depth_0_returns_an_empty_attention_stack():
    model = _tiny(depth=0, num_registers=2)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    logits, attention = model.apply({"params": params}, _images(3), return_attention=True)
    assert logits.shape == (3, 10)
    assert attention.shape == (0, 3, 2, 19, 19) and attention.dtype == jnp.float32


def test_layer_scale_scales_each_branch_per_channel():
    """LayerScale_1 / _3 start at layer_scale, and with every scale at 1 the model is the
    plain one: the scales multiply the residual branches and nothing else."""
    kw = dict(num_classes=3, image_size=16, width=32, depth=2, num_heads=2, mlp_dim=64)
    model = vit.create_model("Ti/8", layer_scale=1e-5, **kw)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    block = params["Transformer"]["encoderblock_1"]
    assert set(block) >= {"LayerScale_1", "LayerScale_3"}
    np.testing.assert_array_equal(block["LayerScale_3"]["scale"], np.full(32, 1e-5, np.float32))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    plain = vit.create_model("Ti/8", **kw)
    no_ls = {k: v for k, v in params.items()}
    no_ls["Transformer"] = {name: ({k: v for k, v in blk.items() if not k.startswith("LayerScale")}
                                   if name.startswith("encoderblock") else blk)
                            for name, blk in params["Transformer"].items()}
    ones = jax.tree_util.tree_map(lambda v: v, params)
    for i in range(2):
        for j in (1, 3):
            ones["Transformer"][f"encoderblock_{i}"][f"LayerScale_{j}"]["scale"] = np.ones(32)
    np.testing.assert_allclose(model.apply({"params": ones}, x), plain.apply({"params": no_ls}, x),
                               atol=1e-6)  # scales of 1: the plain model
    with pytest.raises(ValueError, match="layer_scale must be a positive number"):
        vit.create_model("Ti/8", layer_scale=0.0, **kw)


def test_pre_norm_normalises_the_tokens_before_the_first_block():
    """With pre_norm the blocks see LayerNorm(tokens): scaling every token by 10 (patch
    embedding, class token, position embedding) changes nothing; without it, it does."""
    kw = dict(num_classes=3, image_size=16, width=32, depth=2, num_heads=2, mlp_dim=64)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    for pre_norm in (True, False):
        model = vit.create_model("Ti/8", pre_norm=pre_norm, **kw)
        params = _randomise_head(vit.init_params(model, jax.random.PRNGKey(0)))
        params["cls"] = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 32))  # not tiny: eps
        assert ("pre_norm" in params["Transformer"]) == pre_norm
        scaled = jax.tree_util.tree_map(lambda v: v, params)
        for path in (("embedding", "kernel"), ("embedding", "bias"), ("cls",),
                     ("Transformer", "posembed_input", "pos_embedding")):
            parent = scaled
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = 10.0 * parent[path[-1]]
        diff = np.abs(np.asarray(model.apply({"params": scaled}, x)
                                 - model.apply({"params": params}, x))).max()
        assert diff < 1e-4 if pre_norm else diff > 1e-2


def test_swiglu_gates_one_half_of_the_first_layer_by_the_other():
    """Dense_0 is 2 x mlp_dim wide and Dense_1 reads silu(its first half) * its second half."""
    kw = dict(num_classes=3, image_size=16, width=32, depth=1, num_heads=2, mlp_dim=24)
    model = vit.create_model("Ti/8", swiglu=True, **kw)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    mlp = params["Transformer"]["encoderblock_0"]["MlpBlock_3"]
    assert mlp["Dense_0"]["kernel"].shape == (32, 48) and mlp["Dense_1"]["kernel"].shape == (24, 32)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    _, state = model.apply({"params": params}, x, capture_intermediates=True,
                           mutable=["intermediates"])
    seen = state["intermediates"]["Transformer"]["encoderblock_0"]["MlpBlock_3"]
    first, second = seen["Dense_0"]["__call__"][0], seen["Dense_1"]["__call__"][0]
    gated = jax.nn.silu(first[..., :24]) * first[..., 24:]
    np.testing.assert_allclose(second, gated @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"],
                               atol=1e-5)
    swapped = jax.nn.silu(first[..., 24:]) * first[..., :24]
    assert np.abs(np.asarray(swapped - gated)).max() > 1e-2  # the order is what is tested


def test_qk_norm_normalises_each_heads_queries_and_keys():
    """With qk_norm, scaling the query and key projections by 10 changes nothing (each head's
    q and k are LayerNormed over head_dim before the dot product); without it, it does."""
    kw = dict(num_classes=3, image_size=16, width=32, depth=1, num_heads=2, mlp_dim=64)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    for qk_norm in (True, False):
        model = vit.create_model("Ti/8", qk_norm=qk_norm, **kw)
        params = _randomise_head(vit.init_params(model, jax.random.PRNGKey(0)))
        attention = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
        assert ("query_norm" in attention) == qk_norm
        if qk_norm:
            assert attention["key_norm"]["scale"].shape == (16,)  # head_dim
        scaled = jax.tree_util.tree_map(lambda v: v, params)
        for name in ("query", "key"):
            layer = scaled["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"][name]
            layer["kernel"], layer["bias"] = 10.0 * layer["kernel"], 10.0 * layer["bias"] + 1.0
        diff = np.abs(np.asarray(model.apply({"params": scaled}, x)
                                 - model.apply({"params": params}, x))).max()
        assert diff < 1e-4 if qk_norm else diff > 1e-3
    fused = vit.create_model("Ti/8", qk_norm=True, attention_impl="fused", **kw)
    explicit = vit.create_model("Ti/8", qk_norm=True, attention_impl="explicit", **kw)
    params = _randomise_head(vit.init_params(explicit, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(fused.apply({"params": params}, x),  # [B, T, H, d] layout
                               explicit.apply({"params": params}, x), atol=1e-5)
