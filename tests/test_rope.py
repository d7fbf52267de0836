"""Tests for vit.rope and RoPE models: the tables, the model, DINOv3 and EVA-02 weights.

Parity fixtures: tools/make_pretrained_fixtures/make_rope_fixtures.py (timm's DINOv3 Eva and
transformers' DINOv3ViTModel on 64x48 images) and make_eva02_fixtures.py (timm's EVA-02 on 56x42
images); neither torch nor timm is needed here.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from test_pretrained import fixture, images, random_weights
from tiny_checkpoints import PLAIN, write

import vit
from vit.convert import convert_weights, export_weights
from vit.evaluate import load_inference_model
from vit.fewshot import head_input
from vit.model import init_params
from vit.pretrained import load_pretrained
from vit.rope import apply_rope, kept_tables, rope_tables, rotate_half, rotate_pairs
from vit.weight_formats import WeightsError, flatten_params

# DINOv3's options (configs/finetune.py's dinov3 family), at the fixtures' size
DINOV3 = dict(rope="dinov3", posemb="none", key_bias=False, num_registers=4, layer_scale=1e-5,
              gelu_approximate=False, norm_epsilon=1e-5)
ROPE = dict(PLAIN, rope="dinov3", posemb="none", key_bias=False, gelu_approximate=False,
            norm_epsilon=1e-5, layer_scale=0.5, num_registers=2)
# EVA-02 B's options (configs/finetune.py's eva02 family), at the fixtures' size
EVA02 = dict(rope="eva02", rope_grid=(16, 16), swiglu=True, classifier="gap", class_token=True,
             fc_norm=True, key_bias=False, gelu_approximate=False, mlp_dim=512)


def test_tables_hold_dinov3s_angles_and_leave_the_prefix_alone():
    """Row r, column c of a rows x cols grid sits at ((r + .5) / rows * 2 - 1, (c + .5) / cols *
    2 - 1); head_dim / 4 periods 100 ** (2j / (head_dim / 2)) per axis, rows' first, the whole
    repeated for the rotate-half layout; prefix tokens: sin 0, cos 1."""
    sin, cos = rope_tables((2, 3), 8, num_prefix=2)
    assert sin.shape == cos.shape == (2 + 6, 8) and sin.dtype == np.float32
    np.testing.assert_array_equal(sin[:2], 0.0)
    np.testing.assert_array_equal(cos[:2], 1.0)
    periods = 100.0 ** (np.arange(2) * 2 / 4)  # [1, 10]
    r, c = 1, 2  # the last patch: row coordinate 0.5, column coordinate 2/3
    y, x = (r + 0.5) / 2 * 2 - 1, (c + 0.5) / 3 * 2 - 1
    angles = 2 * np.pi * np.array([y / periods[0], y / periods[1], x / periods[0], x / periods[1]])
    np.testing.assert_allclose(sin[2 + r * 3 + c], np.sin(np.tile(angles, 2)), atol=1e-6)
    np.testing.assert_allclose(cos[2 + r * 3 + c], np.cos(np.tile(angles, 2)), atol=1e-6)
    with pytest.raises(ValueError, match="head size .* divisible by 4, got 6"):
        rope_tables((2, 2), 6)


def test_rotation_keeps_norms_and_scores_depend_on_the_offset_only():
    """Each (c, c + d/2) plane is rotated: norms are kept, rotate_half is [-x2, x1], and the
    score of one query and one key depends only on their offset on the grid."""
    np.testing.assert_array_equal(rotate_half(jnp.arange(4.0)), [-2.0, -3.0, 0.0, 1.0])
    sin, cos = (jnp.asarray(t) for t in rope_tables((4, 4), 16))
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal(16), jnp.float32) for _ in range(2))
    rotated = apply_rope(jnp.tile(q, (16, 1)), sin, cos)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q), rtol=1e-6)

    def score(a: int, b: int) -> float:
        return float(apply_rope(q, sin[a], cos[a]) @ apply_rope(k, sin[b], cos[b]))

    # (0, 0) -> (1, 2) and (2, 1) -> (3, 3): the same offset of one row and two columns
    assert score(0, 6) == pytest.approx(score(9, 15), abs=1e-5)
    assert abs(score(0, 6) - score(0, 5)) > 1e-3


def test_kept_tables_follow_patchdropouts_choice():
    tables = rope_tables((2, 2), 8, num_prefix=1)
    idx = jnp.array([[3, 0], [1, 2]])
    sin, cos = kept_tables(tables, 1, idx)
    assert sin.shape == (2, 3, 8)
    for b in range(2):
        np.testing.assert_array_equal(sin[b], tables[0][[0, 1 + idx[b, 0], 1 + idx[b, 1]]])
        np.testing.assert_array_equal(cos[b], tables[1][[0, 1 + idx[b, 0], 1 + idx[b, 1]]])


def _model(**kw) -> vit.VisionTransformer:
    options = dict(num_classes=5, image_size=16, width=32, depth=2, num_heads=2, mlp_dim=64)
    return vit.create_model("Ti/4", **{**options, **kw})


def test_rope_gives_a_model_without_position_embedding_its_positions():
    """With posemb='none' a GAP model is blind to where its patches are (moving the image's 4x4
    patches around moves nothing); RoPE makes it see them."""
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    tiles = x.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)  # [B, row, col, 4, 4, C]
    moved = tiles[:, ::-1].transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)  # patch rows reversed
    for rope, blind in (("none", True), ("dinov3", False)):
        model = _model(posemb="none", classifier="gap", rope=rope)
        params = init_params(model, jax.random.PRNGKey(0))
        leaves, tree = jax.tree_util.tree_flatten(params)  # random weights, the head's too
        rng = np.random.default_rng(1)
        params = jax.tree_util.tree_unflatten(
            tree, [p + 0.2 * rng.standard_normal(p.shape) for p in leaves])
        a, b = (np.asarray(model.apply({"params": params}, v)) for v in (x, moved))
        assert np.allclose(a, b, atol=1e-5) == blind, rope


def test_rope_model_kernels_remat_and_token_dropping_agree():
    """The explicit and fused attention kernels give the same logits; remat gives the same
    gradients bit for bit; PatchDropout trains with the kept patches' tables."""
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    model = _model(**{k: v for k, v in ROPE.items() if k != "variant"})
    params = init_params(model, jax.random.PRNGKey(0))
    fused = model.clone(attention_impl="fused")
    np.testing.assert_allclose(model.apply({"params": params}, x),
                               fused.apply({"params": params}, x), atol=1e-5, rtol=0)

    def grads(m):
        loss = lambda p: jnp.sum(m.apply({"params": p}, x, train=True,
                                          rngs={"dropout": jax.random.PRNGKey(1)}) ** 2)
        return flatten_params(jax.grad(loss)(params))

    dropping = model.clone(token_keep_ratio=0.5)
    plain, remat = grads(dropping), grads(dropping.clone(remat="block"))
    for name in plain:
        np.testing.assert_array_equal(plain[name], remat[name], name)
    assert all(np.all(np.isfinite(g)) for g in plain.values())


@pytest.mark.parametrize("stem,extra", [("timm_dinov3_tiny", {}),
                                        ("timm_dinov3_swiglu_tiny", dict(swiglu=True))])
def test_timm_dinov3_parity_through_load_and_convert(tmp_path, stem, extra):
    """timm's DINOv3 (Eva: q / v biases and none for k, or none at all and SwiGLU's fc1_g /
    fc1_x; gamma_1 / gamma_2, reg_token, no pos_embed) gives its logits on 64x48 images through
    a DINOv3 model, and `vit convert` finds RoPE, the missing key bias, the epsilon and the
    registers in the arrays."""
    meta, ref = fixture(stem)
    state = random_weights.build(meta["manifest"], meta["seed"])
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(path))
    x = images(meta)
    model = vit.create_model("Ti/16", num_classes=10, image_size=(64, 48), depth=2,
                             mlp_dim=meta["mlp_dim"], **DINOV3, **extra)
    params, notes = load_pretrained(path, model, init_params(model, jax.random.PRNGKey(0)),
                                    keep_head=True)
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/bias" not in \
        flatten_params(params)
    np.testing.assert_allclose(model.apply({"params": params}, x), ref["logits_gelu_erf"],
                               atol=1e-5, rtol=0)
    checkpoint, notes = convert_weights(str(path), str(tmp_path / "run"), image_size=(64, 48))
    loaded = load_inference_model(checkpoint)
    m = loaded.model
    assert (m.rope, m.posemb, m.key_bias, m.norm_epsilon, m.num_registers) == \
        ("dinov3", "none", False, 1e-5, 4)
    assert m.swiglu == bool(extra) and m.mlp_dim == meta["mlp_dim"]
    np.testing.assert_allclose(m.apply({"params": loaded.params}, x), ref["logits_gelu_erf"],
                               atol=1e-5, rtol=0)
    _, notes = convert_weights(str(path), str(tmp_path / "square"))
    assert load_inference_model(str(tmp_path / "square")).config.image_size == 224
    assert any(n.startswith("image size 224x224 assumed: RoPE weights run at any size") for n in
               notes)


def test_huggingface_dinov3_parity_through_load_and_convert(tmp_path):
    """transformers' DINOv3ViTModel (model.layer.{i}, q/k/v/o_proj without a key bias,
    mlp.up_proj / down_proj, layer_scale{1,2}, norm): its pooled class token; `vit convert`
    with its config.json takes the epsilon and image size stated there."""
    meta, ref = fixture("hf_dinov3_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    folder = tmp_path / "hf"
    folder.mkdir()
    safetensors.numpy.save_file(state, str(folder / "model.safetensors"))
    x = images(meta)
    model = vit.create_model("Ti/16", num_classes=10, image_size=(64, 48), depth=2, **DINOV3)
    params, notes = load_pretrained(folder / "model.safetensors", model,
                                    init_params(model, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(head_input(model, params, x), ref["pooled_gelu_erf"], atol=1e-5,
                               rtol=0)
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "dinov3_vit", "hidden_size": 192, "num_attention_heads": 3,
         "intermediate_size": 768, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
         "image_size": [64, 48], "num_register_tokens": 4}))
    checkpoint, _ = convert_weights(str(folder), str(tmp_path / "run"), num_classes=3)
    loaded = load_inference_model(checkpoint)
    assert loaded.config.image_size == [64, 48] and loaded.model.norm_epsilon == 1e-5
    np.testing.assert_allclose(head_input(loaded.model, loaded.params, x),
                               ref["pooled_gelu_erf"], atol=1e-5, rtol=0)


def test_rope_weights_refuse_a_model_without_rope_and_key_biases_a_model_without_them(tmp_path):
    meta, _ = fixture("timm_dinov3_tiny")
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    plain = vit.create_model("Ti/16", num_classes=10, image_size=64, depth=2,
                             **dict(DINOV3, rope="none"))
    with pytest.raises(WeightsError, match="trained with rope='dinov3' .* build it with "
                                           "rope='dinov3' and posemb='none'"):
        load_pretrained(path, plain, init_params(plain, jax.random.PRNGKey(0)))
    learned = vit.create_model("Ti/16", num_classes=10, image_size=64, depth=2,
                               **dict(DINOV3, posemb="learn"))
    with pytest.raises(WeightsError, match="missing from the weights: Transformer/posembed_input"
                                           ".*build the model with posemb='none'"):
        load_pretrained(path, learned, init_params(learned, jax.random.PRNGKey(0)))

    _, params = write(str(tmp_path / "keyed"), dict(PLAIN, rope="dinov3"))
    keyless = vit.create_model("Ti/4", num_classes=5, image_size=16, width=32, depth=2,
                               num_heads=2, mlp_dim=64, rope="dinov3", key_bias=False)
    with pytest.raises(WeightsError, match="the weights have key biases: build the model with "
                                           "key_bias=True"):
        load_pretrained(str(tmp_path / "keyed"), keyless, init_params(keyless,
                                                                      jax.random.PRNGKey(0)))


def test_a_rope_model_goes_to_timms_dinov3_and_back_exactly(tmp_path):
    """--to timm writes timm's Eva (vit_small_patch16_dinov3_qkvb, sizes in model_args) and
    converting it back gives the same parameters; it refuses what Eva cannot hold."""
    _, params = write(str(tmp_path / "run"), ROPE, image_size=(16, 12), normalize="imagenet")
    export_weights(str(tmp_path / "run"), "timm", str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_dinov3_qkvb"
    args = config["model_args"]
    assert (args["num_reg_tokens"], args["qkv_bias"], args["img_size"]) == (2, True, [16, 12])
    state = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "pos_embed" not in state and "blocks.0.attn.q_bias" in state
    assert "blocks.0.attn.k_bias" not in state
    path, _ = convert_weights(str(tmp_path / "out" / "model.safetensors"), str(tmp_path / "back"))
    before, after = load_inference_model(str(tmp_path / "run")), load_inference_model(path)
    got, want = flatten_params(after.params), flatten_params(params)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)
    assert after.model.norm_epsilon == before.model.norm_epsilon == 1e-5
    x = np.random.default_rng(0).standard_normal((2, 16, 12, 3)).astype(np.float32)
    np.testing.assert_array_equal(after.model.apply({"params": after.params}, x),
                                  before.model.apply({"params": before.params}, x))

    write(str(tmp_path / "tanh"), dict(ROPE, gelu_approximate=True))
    write(str(tmp_path / "keyed"), dict(ROPE, key_bias=True))
    for run, why in (("tanh", "tanh or quick GELU"), ("keyed", "key biases that are not zero")):
        with pytest.raises(WeightsError, match=f"cannot hold {why}.*use --to npz"):
            export_weights(str(tmp_path / run), "timm", str(tmp_path / f"{run}-out"))
    with pytest.raises(WeightsError, match="rotary position embeddings, which HF ViT lacks"):
        export_weights(str(tmp_path / "run"), "hf", str(tmp_path / "hf"))


def test_dinov3_finetune_family():
    from configs import finetune

    c = finetune.get_config("dinov3_S+/16-cifar10-256")
    assert (c.model.variant, c.model.swiglu, c.model.rope, c.model.posemb) == \
        ("S/16", True, "dinov3", "none")
    assert (c.model.key_bias, c.model.norm_epsilon, c.pp.normalize) == (False, 1e-5, "imagenet")
    assert finetune.get_config("dinov3_H+/16-cifar100").model.num_heads == 20
    with pytest.raises(ValueError, match="the '\\+' models are DINOv3's"):
        finetune.get_config("dinov2_S+/14-cifar10")


def test_a_model_without_key_biases_quantizes_and_prunes(tmp_path):
    """int8 (the key projection keeps its scale, with no bias) and structured pruning of heads
    run on a DINOv3-shaped model."""
    from vit.prune import prune_structured
    from vit.quantize import quantize_checkpoint

    model, params = write(str(tmp_path / "float"), ROPE)
    quantize_checkpoint(str(tmp_path / "float"), str(tmp_path / "int8"))
    quantized = load_inference_model(str(tmp_path / "int8"))
    attention = flatten_params(quantized.params)
    assert attention["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"] \
        .dtype == np.int8
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    want = np.asarray(model.apply({"params": params}, x))
    got = np.asarray(quantized.model.apply({"params": quantized.params}, x))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    pruned, masks, _ = prune_structured(params, 0.5)
    kernel = flatten_params(pruned)["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
                                    "key/kernel"]
    assert int(np.sum(np.all(kernel == 0, axis=(0, 2)))) == 1  # one of the two heads gone


def test_eva02_tables_scale_indices_to_the_reference_grid_and_pair_neighbours():
    """EVA-02: patch (r, c) at (r * 16 / rows, c * 16 / cols), head_dim / 4 frequencies 10000 **
    (-j / (head_dim / 4)) per axis, rows' first, each repeated for the interleaved pairs."""
    sin, cos = rope_tables((2, 4), 8, num_prefix=1, kind="eva02", ref_grid=(16, 16))
    bands = 1.0 / 10000.0 ** (np.arange(2) / 2)  # [1, 0.01]
    r, c = 1, 3
    angles = np.array([r * 8 * bands[0], r * 8 * bands[1], c * 4 * bands[0], c * 4 * bands[1]])
    np.testing.assert_allclose(sin[1 + r * 4 + c], np.sin(np.repeat(angles, 2)), atol=1e-6)
    np.testing.assert_allclose(cos[1 + r * 4 + c], np.cos(np.repeat(angles, 2)), atol=1e-6)
    np.testing.assert_array_equal(cos[0], 1.0)
    own = rope_tables((2, 4), 8, kind="eva02")[0]  # no reference grid: the indices themselves
    np.testing.assert_allclose(own[r * 4 + c], np.sin(np.repeat(angles / [8, 8, 4, 4], 2)),
                               atol=1e-6)
    np.testing.assert_array_equal(rotate_pairs(jnp.arange(4.0)), [-1.0, 0.0, -3.0, 2.0])


@pytest.mark.parametrize("stem,extra", [("timm_eva02_tiny", {}),
                                        ("timm_eva02_base_tiny", dict(mlp_norm=True))])
def test_timm_eva02_parity_through_load_and_convert(tmp_path, stem, extra):
    """timm's EVA-02 (Ti: a fused qkv with q / v biases and a packed SwiGLU fc1; B: q_proj /
    k_proj / v_proj and SwiGLU fc1_g / fc1_x with a LayerNorm on the hidden units): its logits
    on 56x42 images, the class token in the sequence, GAP over the patches, then fc_norm;
    `vit convert` finds it all from the arrays, with the image size from timm's config.json."""
    meta, ref = fixture(stem)
    folder = tmp_path / "src"
    folder.mkdir()
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]),
                                str(folder / "model.safetensors"))
    x = images(meta)
    model = vit.create_model("Ti/14", num_classes=10, image_size=(56, 42), depth=2,
                             **EVA02, **extra)
    params, notes = load_pretrained(folder / "model.safetensors", model,
                                    init_params(model, jax.random.PRNGKey(0)), keep_head=True,
                                    old_grid=(4, 3))
    np.testing.assert_allclose(model.apply({"params": params}, x), ref["logits_gelu_erf"],
                               atol=1e-5, rtol=0)
    (folder / "config.json").write_text(json.dumps(
        {"architecture": "eva02_tiny_patch14_224", "model_args": {"img_size": [56, 42]},
         "pretrained_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                            "std": [0.26862954, 0.26130258, 0.27577711]}}))
    checkpoint, _ = convert_weights(str(folder / "model.safetensors"), str(tmp_path / "run"),
                                    num_heads=3)
    loaded = load_inference_model(checkpoint)
    m = loaded.model
    assert (m.rope, m.rope_grid, m.posemb, m.classifier, m.class_token, m.fc_norm, m.mlp_norm,
            m.key_bias) == ("eva02", (16, 16), "learn", "gap", True, True, bool(extra), False)
    assert loaded.config.pp.normalize == "clip"
    np.testing.assert_allclose(m.apply({"params": loaded.params}, x), ref["logits_gelu_erf"],
                               atol=1e-5, rtol=0)
    export_weights(checkpoint, "timm", str(tmp_path / "out"))  # back as timm's EVA-02
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "eva02_base_patch14_224"
    assert config["model_args"]["ref_feat_shape"] == [16, 16]
    assert config["model_args"]["scale_mlp"] == bool(extra)
    back, _ = convert_weights(str(tmp_path / "out" / "model.safetensors"), str(tmp_path / "back"))
    again = load_inference_model(back)
    np.testing.assert_array_equal(again.model.apply({"params": again.params}, x),
                                  m.apply({"params": loaded.params}, x))
    plain = vit.create_model("Ti/14", num_classes=10, image_size=56, depth=2,
                             **dict(EVA02, rope="none", rope_grid=None), **extra)
    with pytest.raises(WeightsError, match="trained with rope='eva02'.*rope_grid=\\(16, 16\\)"):
        load_pretrained(folder / "model.safetensors", plain, init_params(plain,
                                                                         jax.random.PRNGKey(0)))


def test_fc_norm_weights_into_a_model_without_it_load_as_encoder_norm_with_a_note(tmp_path):
    meta, _ = fixture("timm_eva02_tiny")
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    model = vit.create_model("Ti/14", num_classes=10, image_size=56, depth=2,
                             **dict(EVA02, fc_norm=False))
    params, notes = load_pretrained(path, model, init_params(model, jax.random.PRNGKey(0)),
                                    old_grid=(4, 3))
    assert any(n.startswith("fc_norm (LayerNorm after pooling) loaded as encoder_norm") for n in
               notes)
    np.testing.assert_array_equal(params["Transformer"]["encoder_norm"]["scale"],
                                  random_weights.build(meta["manifest"], meta["seed"])[
                                      "fc_norm.weight"])


def test_a_class_token_beside_gap_joins_attention_and_stays_out_of_the_pool():
    """class_token=True with classifier='gap': the token attends (changing it changes the
    logits), the pool averages the patches alone (fc_norm after it), and the attention maps
    count it as a prefix token."""
    from vit.attention_maps import token_layout

    model = _model(classifier="gap", class_token=True, fc_norm=True)
    params = init_params(model, jax.random.PRNGKey(0))
    assert "cls" in params and "fc_norm" in params and "encoder_norm" not in params["Transformer"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(2)
    params = jax.tree_util.tree_unflatten(
        tree, [p + 0.2 * rng.standard_normal(p.shape) for p in leaves])
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    moved = jax.tree_util.tree_map(lambda p: p, params)
    moved["cls"] = params["cls"] + rng.standard_normal(params["cls"].shape)
    assert not np.allclose(model.apply({"params": params}, x), model.apply({"params": moved}, x))
    assert token_layout(model) == {"num_prefix_tokens": 1, "class_token": False}  # GAP: patches
    with pytest.raises(ValueError, match="fc_norm normalises the pooled patches of "
                                         "classifier='gap', not classifier='token'"):
        _model(classifier="token", fc_norm=True)


def test_eva02_finetune_family():
    from configs import finetune

    c = finetune.get_config("eva02_L/14-cifar100-448")
    assert (c.model.mlp_dim, c.model.mlp_norm, tuple(c.model.rope_grid), c.pp.normalize) == \
        (2730, True, (16, 16), "clip")
    assert finetune.get_config("eva02_Ti/14-cifar10-224").model.mlp_norm is False
    with pytest.raises(ValueError, match="EVA-02 comes in eva02_Ti/14"):
        finetune.get_config("eva02_H/14-cifar10-224")


def _dinov3_folder(tmp_path, config: dict | None) -> tuple:
    meta, ref = fixture("timm_dinov3_tiny")
    folder = tmp_path / "src"
    folder.mkdir()
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]),
                                str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    x = images(meta)
    return folder / "model.safetensors", x, ref


def test_timms_average_pooling_of_dinov3_converts_to_gap_beside_a_class_token(tmp_path):
    """timm's config.json saying global_pool="avg" (its DINOv3 default: the patches' mean, the
    class token and registers still attending) gives classifier="gap" with class_token=True,
    and timm's logits of that pooling."""
    path, x, ref = _dinov3_folder(tmp_path, {
        "architecture": "vit_small_patch16_dinov3_qkvb", "global_pool": "avg",
        "model_args": {"img_size": [64, 48]}})
    checkpoint, _ = convert_weights(str(path), str(tmp_path / "run"))
    loaded = load_inference_model(checkpoint)
    assert (loaded.model.classifier, loaded.model.class_token) == ("gap", True)
    np.testing.assert_allclose(loaded.model.apply({"params": loaded.params}, x),
                               ref["logits_avg_pool"], atol=1e-5, rtol=0)


def test_timm_eva_weights_of_other_rope_forms_are_refused_or_noted(tmp_path):
    """A config.json naming another Eva (naver's RoPE ViT) is refused; without one the arrays
    decide, with a note saying which form was taken."""
    path, _, _ = _dinov3_folder(tmp_path, {"architecture": "vit_base_patch16_rope_224"})
    with pytest.raises(WeightsError, match="timm's vit_base_patch16_rope_224 computes a RoPE "
                                           "form this toolkit does not"):
        convert_weights(str(path), str(tmp_path / "run"))
    (path.parent / "config.json").unlink()
    _, notes = convert_weights(str(path), str(tmp_path / "guessed"))
    assert any(n.startswith("timm Eva weights without a config.json naming their architecture: "
                            "taken as DINOv3's") for n in notes)


def test_to_timm_refuses_a_layernorm_epsilon_its_architecture_does_not_compute(tmp_path):
    write(str(tmp_path / "hf-like"), dict(PLAIN, norm_epsilon=1e-12))
    with pytest.raises(WeightsError, match="timm's vit_base_patch16_224 computes its LayerNorms "
                                           "with epsilon 1e-06, this model with 1e-12"):
        export_weights(str(tmp_path / "hf-like"), "timm", str(tmp_path / "out"))
    write(str(tmp_path / "rope"), dict(ROPE, norm_epsilon=1e-6))
    with pytest.raises(WeightsError, match="vit_small_patch16_dinov3_qkvb computes its "
                                           "LayerNorms with epsilon 1e-05"):
        export_weights(str(tmp_path / "rope"), "timm", str(tmp_path / "out2"))


def test_train_from_timms_dinov3_at_another_size(tmp_path):
    """`vit train` from timm's DINOv3 file (trained on 64x48 images) at 32 px, nothing
    resampled: the step-1 checkpoint (lr 0 at step 0) holds the file's encoder as it is, with a
    new head of the run's classes."""
    import importlib.util as iu
    from pathlib import Path

    from vit import checkpoint, trainer

    root = Path(__file__).resolve().parents[1]
    spec = iu.spec_from_file_location("smoke", root / "configs" / "smoke.py")
    smoke = iu.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    meta, _ = fixture("timm_dinov3_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(path))
    c = smoke.get_config()
    c.data_dir = str((root.parent / "shared" / "data" / "tfds").resolve())
    c.eval_split = "test[:64]"
    c.model.update(variant="Ti/16", width=192, num_heads=3, mlp_dim=768, depth=2, **DINOV3)
    c.update(init_from=str(path), classes=[3, 4], total_steps=2, checkpoint_every=1,
             keep_checkpoints=2, log_every=1)
    trainer.train(c, str(tmp_path / "run"))
    step1 = flatten_params(checkpoint.load_checkpoint(str(tmp_path / "run"), step=1).params)
    np.testing.assert_array_equal(
        step1["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"],
        state["blocks.1.mlp.fc1.weight"].T)
    np.testing.assert_array_equal(step1["Transformer/registers"], state["reg_token"])
    assert step1["head/kernel"].shape == (192, 2)
    assert "Transformer/posembed_input/pos_embedding" not in step1


def test_an_eva02_form_run_without_rope_grid_reloads_and_keeps_its_grid(tmp_path):
    """A run of rope="eva02" left to its own grid (rope_grid None: 4x4 at 16 px) loads into its
    own model; a model of another grid must state the run's; converting it to another size pins
    that grid, so its outputs at the trained size stay exact."""
    model = dict(PLAIN, rope="eva02", posemb="none", swiglu=True, classifier="gap",
                 class_token=True)
    _, params = write(str(tmp_path / "run"), model)
    same = vit.create_model("Ti/4", num_classes=5, image_size=16, **_sizes(model))
    loaded, _ = load_pretrained(str(tmp_path / "run"), same, init_params(same, PRNG))
    for name, value in flatten_params(params).items():
        np.testing.assert_array_equal(flatten_params(loaded)[name], value, name)
    larger = vit.create_model("Ti/4", num_classes=5, image_size=32, **_sizes(model))
    with pytest.raises(WeightsError, match="the weights scale their RoPE coordinates to a 4x4 "
                                           "grid, the model to 8x8: build it with "
                                           "rope_grid=\\(4, 4\\)"):
        load_pretrained(str(tmp_path / "run"), larger, init_params(larger, PRNG))
    pinned = vit.create_model("Ti/4", num_classes=5, image_size=32, rope_grid=(4, 4),
                              **_sizes(model))
    load_pretrained(str(tmp_path / "run"), pinned, init_params(pinned, PRNG))

    convert_weights(str(tmp_path / "run"), str(tmp_path / "big"), image_size=32)
    big = load_inference_model(str(tmp_path / "big"))
    assert big.model.rope_grid == (4, 4) and big.config.image_size == 32
    convert_weights(str(tmp_path / "big"), str(tmp_path / "back"), image_size=16)
    back, before = (load_inference_model(str(tmp_path / p)) for p in ("back", "run"))
    x = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(back.model.apply({"params": back.params}, x),
                                  before.model.apply({"params": before.params}, x))


def test_timm_eva02_weights_without_ref_feat_shape_say_which_grid_is_assumed(tmp_path):
    meta, _ = fixture("timm_eva02_tiny")
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    args = {"img_size": [56, 42]}
    for stated, out in ((None, "c"), ([8, 8], "d")):
        (tmp_path / "config.json").write_text(json.dumps(
            {"architecture": "eva02_tiny_patch14_224",
             "model_args": dict(args, **({"ref_feat_shape": stated} if stated else {}))}))
        checkpoint, notes = convert_weights(str(path), str(tmp_path / out), num_heads=3)
        assumed = [n for n in notes if "grid assumed" in n]
        assert load_inference_model(checkpoint).model.rope_grid == tuple(stated or (16, 16))
        assert assumed == ([] if stated else [
            "RoPE coordinates scaled to a 16x16 grid assumed (EVA-02's 224 px pretraining): "
            "nothing beside the weights states ref_feat_shape; give the config.json they came "
            "with if they were trained otherwise"])


def _sizes(model: dict) -> dict:
    """create_model keyword arguments of a config.model dict (its variant dropped)."""
    return {k: v for k, v in model.items() if k != "variant"}


PRNG = jax.random.PRNGKey(0)


def test_review_cases_eva02_unscaled_naver_like_and_mlp_norm_out_and_pruning(tmp_path):
    """EVA-02 weights refuse a model without rope_grid; an Eva without position embedding or
    registers (naver's RoPE ViT) is refused without a config.json too; an mlp_norm ViT goes to
    timm as scale_mlp_norm and back exactly; structured pruning refuses mlp_norm."""
    from vit.prune import prune_checkpoint

    meta, _ = fixture("timm_eva02_tiny")
    path = tmp_path / "model.safetensors"
    state = random_weights.build(meta["manifest"], meta["seed"])
    safetensors.numpy.save_file(state, str(path))
    unscaled = vit.create_model("Ti/14", num_classes=10, image_size=56, depth=2,
                                **dict(EVA02, rope_grid=None))
    with pytest.raises(WeightsError, match="build it with rope_grid=\\(16, 16\\)"):
        load_pretrained(path, unscaled, init_params(unscaled, jax.random.PRNGKey(0)))
    meta, _ = fixture("timm_dinov3_tiny")
    naver = random_weights.build(meta["manifest"], meta["seed"])
    del naver["reg_token"]
    safetensors.numpy.save_file(naver, str(tmp_path / "naver.safetensors"))
    with pytest.raises(WeightsError, match="Eva without a position embedding or registers "
                                           "computes a RoPE form this toolkit does not"):
        convert_weights(str(tmp_path / "naver.safetensors"), str(tmp_path / "n"))

    _, params = write(str(tmp_path / "run"), dict(PLAIN, mlp_norm=True))
    export_weights(str(tmp_path / "run"), "timm", str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_args"]["scale_mlp_norm"] is True
    back, _ = convert_weights(str(tmp_path / "out" / "model.safetensors"), str(tmp_path / "b"))
    got = flatten_params(load_inference_model(back).params)
    for name, value in flatten_params(params).items():
        np.testing.assert_array_equal(got[name], value, name)
    with pytest.raises(ValueError, match="mlp_norm's LayerNorm .* --method magnitude"):
        prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "pruned"), method="structured",
                         sparsity=0.5)
