"""Tests for vit.pretrained and vit.weight_formats: sources, parity, adaptation, resampling.

Parity fixtures (tests/fixtures/*.json + .npz) hold recipes for random weights and the logits that
timm, HuggingFace transformers and the original vit_jax code computed from them; see
tools/make_pretrained_fixtures/. Neither torch nor timm is needed here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

import vit
from vit.convert import convert_weights
from vit.evaluate import load_inference_model
from vit.fewshot import head_input
from vit.model_options import pair
from vit.pretrained import (
    WeightsError,
    adapt_params,
    load_pretrained,
    read_weights,
    resample_posemb,
    resize_patch_kernel,
)
from vit.weight_formats import POSEMB

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("random_weights", FIXTURES / "random_weights.py")
random_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(random_weights)


def fixture(stem: str) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((FIXTURES / f"{stem}.json").read_text())
    with np.load(FIXTURES / f"{stem}.npz") as f:
        return meta, {k: f[k] for k in f.files}


def saved(folder: Path, state: dict) -> Path:
    """`state` written as folder/model.safetensors (a Hub-like folder); returns its path."""
    folder.mkdir()
    safetensors.numpy.save_file(state, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def ti(image_size: int = 64, num_classes: int = 1000, **kw) -> vit.VisionTransformer:
    return vit.create_model("Ti/16", num_classes=num_classes, image_size=image_size, depth=2, **kw)


def init(model: vit.VisionTransformer) -> dict:
    return vit.init_params(model, jax.random.PRNGKey(0))


def images(meta: dict, size: int | None = None) -> np.ndarray:
    """The fixture's N(0, 1) input images: square, or [rows, cols] where its image_size says so."""
    rows, cols = pair(size or meta["image_size"])
    rng = np.random.RandomState(meta["input_seed"])
    return rng.standard_normal((meta["batch"], rows, cols, 3)).astype(np.float32)


def logits(model, params, x) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, x))


def converted(checkpoint: str, meta: dict) -> tuple:
    """(the model `vit convert` wrote at `checkpoint`, its logits on the fixture's images)."""
    loaded = load_inference_model(checkpoint)
    return loaded, logits(loaded.model, loaded.params, images(meta))


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory) -> Path:
    meta, _ = fixture("timm_vit_tiny")
    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    return path


# --- parity with the implementations the weights came from -----------------------------------


def test_timm_safetensors_parity(timm_file):
    meta, ref = fixture("timm_vit_tiny")
    model = ti()
    params, notes = load_pretrained(timm_file, model, init(model))
    out = logits(model, params, images(meta))
    # tanh-approximated GELU (vit_jax's) is the default; timm's own models use exact GELU.
    np.testing.assert_allclose(out, ref["logits_gelu_tanh"], atol=1e-4, rtol=0)
    assert notes == [f"read timm weights from {timm_file}"]
    exact = ti(gelu_approximate=False)
    np.testing.assert_allclose(logits(exact, params, images(meta)), ref["logits_gelu_erf"],
                               atol=1e-4, rtol=0)


def test_timm_layer_scale_parity_through_load_and_convert(tmp_path):
    """timm's init_values ViT (blocks.i.ls1.gamma / ls2.gamma, random): its logits from
    `load_pretrained` into a layer_scale model, and from `vit convert`, which finds LayerScale
    in the file."""
    meta, ref = fixture("timm_vit_tiny_ls")
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    model = ti(gelu_approximate=False, layer_scale=0.1)
    params, _ = load_pretrained(path, model, init(model))
    scale = np.asarray(params["Transformer"]["encoderblock_1"]["LayerScale_3"]["scale"])
    np.testing.assert_array_equal(scale, random_weights.build(meta["manifest"], meta["seed"])[
        "blocks.1.ls2.gamma"])
    np.testing.assert_allclose(logits(model, params, images(meta)), ref["logits_gelu_erf"],
                               atol=1e-4, rtol=0)
    checkpoint, _ = convert_weights(str(path), str(tmp_path / "run"))
    loaded = load_inference_model(checkpoint)
    assert loaded.model.layer_scale is not None and not loaded.model.gelu_approximate
    np.testing.assert_allclose(logits(loaded.model, loaded.params, images(meta)),
                               ref["logits_gelu_erf"], atol=1e-4, rtol=0)
    plain = ti(gelu_approximate=False)  # weights with LayerScale do not fit a model without
    with pytest.raises(WeightsError, match="the weights have LayerScale: build the model with "
                                           "layer_scale set"):
        load_pretrained(path, plain, init(plain))
    meta, _ = fixture("timm_vit_tiny")  # and the other way round
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    with pytest.raises(WeightsError, match="the weights have no LayerScale, which the model has"):
        load_pretrained(path, model, init(model))


def test_deit3_and_dinov2_registers_parity(tmp_path):
    """timm's no_embed_class ViTs (the class token and registers take no position embedding):
    DeiT III's logits, and a head-less DINOv2-with-registers backbone's pooled features."""
    meta, ref = fixture("timm_deit3_tiny")
    path = tmp_path / "deit3.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    model = ti(gelu_approximate=False, layer_scale=0.1)
    params, notes = load_pretrained(path, model, init(model))
    assert any("no_embed_class" in n for n in notes)
    np.testing.assert_allclose(logits(model, params, images(meta)), ref["logits_gelu_erf"],
                               atol=1e-4, rtol=0)

    meta, ref = fixture("timm_dinov2_reg_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    assert "reg_token" in state and "head.weight" not in state
    params, notes = _dinov2_reg_features_match(tmp_path, state, meta, ref)
    assert "head initialised: 10 classes (none in the weights)" in notes
    np.testing.assert_array_equal(params["Transformer"]["registers"], state["reg_token"])


def test_clip_image_tower_parity_through_load_and_convert(tmp_path):
    """timm's OpenAI-CLIP ViT (pre-norm, no patch-embedding bias, quick GELU, LayerNorm eps
    1e-5): its logits from `load_pretrained` into a pre_norm / quick_gelu model, and from
    `vit convert`, which reads the pre-norm from the weights and quick GELU and the CLIP
    normalisation from timm's config.json."""
    meta, ref = fixture("timm_clip_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    assert "norm_pre.weight" in state and "patch_embed.proj.bias" not in state
    path = saved(tmp_path / "clip", state)
    model = ti(num_classes=10, pre_norm=True, quick_gelu=True)
    params, notes = load_pretrained(path, model, init(model))
    assert "the patch embedding has no bias in the weights (CLIP): zeros loaded" in notes
    np.testing.assert_array_equal(params["Transformer"]["pre_norm"]["scale"],
                                  state["norm_pre.weight"])
    np.testing.assert_allclose(logits(model, params, images(meta)), ref["logits_quick_gelu"],
                               atol=1e-4, rtol=0)
    erf = ti(num_classes=10, pre_norm=True, gelu_approximate=False)  # the activation matters
    assert np.abs(logits(erf, params, images(meta)) - ref["logits_quick_gelu"]).max() > 1e-2

    (path.parent / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_clip_quickgelu_224", "num_classes": 10,
        "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}))
    checkpoint, _ = convert_weights(str(path), str(tmp_path / "run"), num_heads=3)
    loaded = load_inference_model(checkpoint)
    assert loaded.model.pre_norm and loaded.model.mlp_activation == "quick_gelu"
    assert loaded.config.pp.normalize == "clip"
    np.testing.assert_allclose(logits(loaded.model, loaded.params, images(meta)),
                               ref["logits_quick_gelu"], atol=1e-4, rtol=0)

    # timm's vit_base_patch16_clip_224.openai: OpenAI's weights, which timm runs with exact GELU
    (path.parent / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_clip_224", "num_classes": 10,
        "pretrained_cfg": {"tag": "openai", "input_size": [3, 64, 64]}}))
    checkpoint, notes = convert_weights(str(path), str(tmp_path / "timm-way"), num_heads=3)
    assert load_inference_model(checkpoint).model.mlp_activation == "gelu"
    assert ("OpenAI's CLIP weights: timm's vit_base_patch16_clip_224 runs them with exact GELU, "
            "as this conversion does; OpenAI trained them with quick GELU: pass --gelu quick "
            "for its own activation") in notes
    checkpoint, notes = convert_weights(str(path), str(tmp_path / "openai-way"), num_heads=3,
                                        gelu="quick")
    assert not any(n.startswith("OpenAI's CLIP weights") for n in notes)
    np.testing.assert_allclose(converted(checkpoint, meta)[1], ref["logits_quick_gelu"],
                               atol=1e-4, rtol=0)

    plain = ti(num_classes=10, quick_gelu=True)
    with pytest.raises(WeightsError, match="the weights have a pre-norm \\(CLIP's image tower\\): "
                                           "build the model with pre_norm=True"):
        load_pretrained(path, plain, init(plain))


def test_huggingface_clip_image_tower_parity_through_load_and_convert(tmp_path):
    """transformers' CLIPVisionModelWithProjection (class embedding [D], position embedding
    [T, D], pre_layrnorm, a projection without bias as the head): its image_embeds, loaded into
    a pre_norm / quick_gelu model; and a whole CLIPModel's file, whose text tower is dropped,
    through `vit convert` with the model's config.json and preprocessor_config.json."""
    meta, ref = fixture("hf_clip_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    path = saved(tmp_path / "vision", state)
    model = ti(num_classes=10, pre_norm=True, quick_gelu=True)
    params, notes = load_pretrained(path, model, init(model), keep_head=True)
    assert "the head (CLIP's projection) has no bias in the weights (CLIP): zeros loaded" in notes
    np.testing.assert_array_equal(params["cls"][0, 0],
                                  state["vision_model.embeddings.class_embedding"])
    np.testing.assert_allclose(logits(model, params, images(meta)),
                               ref["image_embeds_quick_gelu"], atol=1e-4, rtol=0)

    whole = tmp_path / "clip" / "model.safetensors"
    whole.parent.mkdir()
    text = {"text_model.embeddings.token_embedding.weight": np.zeros((7, 4), np.float32),
            "text_projection.weight": np.zeros((10, 4), np.float32),
            "logit_scale": np.zeros((), np.float32)}
    safetensors.numpy.save_file({**state, **text}, str(whole))
    (whole.parent / "config.json").write_text(json.dumps(
        {"model_type": "clip", "vision_config": meta["config"], "id2label": {"0": "LABEL_0"}}))
    (whole.parent / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.48145466, 0.4578275, 0.40821073], "do_center_crop": True,
         "image_std": [0.26862954, 0.26130258, 0.27577711], "size": {"shortest_edge": 64}}))
    checkpoint, notes = convert_weights(str(whole), str(tmp_path / "run"))
    assert any(n.startswith("the text tower (3 arrays") for n in notes)
    loaded = load_inference_model(checkpoint)
    assert loaded.model.pre_norm and loaded.model.mlp_activation == "quick_gelu"
    assert loaded.model.num_heads == 3 and loaded.config.pp.normalize == "clip"
    np.testing.assert_allclose(logits(loaded.model, loaded.params, images(meta)),
                               ref["image_embeds_quick_gelu"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("stem", ["timm_dinov2_giant_tiny", "hf_dinov2_swiglu_tiny",
                                  "hf_dinov2_swiglu_tiny_file"])
def test_swiglu_dinov2_giant_parity_through_load_and_convert(tmp_path, stem):
    """DINOv2-g's SwiGLU MLPs: timm's vit_giant_patch14_dinov2 (fc1 [gate; value] packed) and
    transformers' Dinov2Model(use_swiglu_ffn=True), in its in-memory names (gate_proj, up_proj,
    down_proj) and its files' (weights_in, the two stacked; weights_out): the pooled features of
    a swiglu model, and `vit convert`, which finds SwiGLU in the kernels' shapes."""
    meta, ref = fixture(stem.removesuffix("_file"))
    state = random_weights.build(meta["manifest"], meta["seed"])
    if stem.endswith("_file"):
        for i in range(meta["depth"]):
            mlp = f"encoder.layer.{i}.mlp."
            for leaf in ("weight", "bias"):
                state[f"{mlp}weights_in.{leaf}"] = np.concatenate(
                    [state.pop(f"{mlp}gate_proj.{leaf}"), state.pop(f"{mlp}up_proj.{leaf}")])
                state[f"{mlp}weights_out.{leaf}"] = state.pop(f"{mlp}down_proj.{leaf}")
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(path))
    assert meta["mlp_dim"] == 512  # after the gate; the first layer is 1024 wide
    model = vit.create_model("Ti/14", num_classes=10, image_size=56, depth=2, mlp_dim=512,
                             layer_scale=0.1, swiglu=True)
    params, _ = load_pretrained(path, model, init(model))
    kernel = params["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"]
    assert kernel.shape == (192, 1024)
    np.testing.assert_allclose(np.asarray(head_input(model, params, images(meta))),
                               ref["features_swiglu"], atol=1e-4, rtol=0)
    checkpoint, _ = convert_weights(str(path), str(tmp_path / "run"), num_classes=2)
    loaded = load_inference_model(checkpoint)
    assert loaded.model.swiglu and loaded.model.mlp_dim == 512
    plain = vit.create_model("Ti/14", num_classes=10, image_size=56, depth=2, layer_scale=0.1)
    with pytest.raises(WeightsError, match="the weights have SwiGLU MLPs \\(DINOv2-g\\): build the "
                                           "model with swiglu=True and mlp_dim=512"):
        load_pretrained(path, plain, init(plain))
    np.testing.assert_allclose(np.asarray(head_input(loaded.model, loaded.params, images(meta))),
                               ref["features_swiglu"], atol=1e-4, rtol=0)


def test_siglip_image_tower_parity_timm_and_huggingface(tmp_path):
    """SigLIP's tower (no class token, attention-pooling MAP head): timm's
    vit_base_patch16_siglip_224 (attn_pool with a fused kv) gives its logits through a map model
    with exact GELU; transformers' SiglipVisionModel (head with a fused in_proj, tanh GELU) its
    pooled features, and as a whole SiglipModel file (text tower dropped) through `vit convert`
    with the model's config.json and preprocessor_config.json."""
    meta, ref = fixture("timm_siglip_tiny")
    path = saved(tmp_path / "timm", random_weights.build(meta["manifest"], meta["seed"]))
    model = ti(num_classes=10, classifier="map", gelu_approximate=False)
    params, _ = load_pretrained(path, model, init(model))
    np.testing.assert_allclose(logits(model, params, images(meta)), ref["logits_gelu_erf"],
                               atol=1e-4, rtol=0)

    meta, ref = fixture("hf_siglip_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    assert "head.attention.in_proj_weight" in state and "embeddings.class_embedding" not in state
    path = saved(tmp_path / "hf", state)
    model = ti(num_classes=10, classifier="map")  # tanh GELU, as SigLIP's
    params, _ = load_pretrained(path, model, init(model))
    np.testing.assert_allclose(np.asarray(head_input(model, params, images(meta))),
                               ref["features_gelu_tanh"], atol=1e-4, rtol=0)

    whole = tmp_path / "siglip" / "model.safetensors"
    whole.parent.mkdir()
    text = {"text_model.head.weight": np.zeros((4, 4), np.float32),
            "logit_scale": np.zeros(1, np.float32), "logit_bias": np.zeros(1, np.float32)}
    safetensors.numpy.save_file({**{f"vision_model.{k}": v for k, v in state.items()}, **text},
                                str(whole))
    (whole.parent / "config.json").write_text(json.dumps(
        {"model_type": "siglip", "vision_config": meta["config"]}))
    (whole.parent / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    checkpoint, notes = convert_weights(str(whole), str(tmp_path / "run"), num_classes=10)
    assert any(n.startswith("the text tower (3 arrays") for n in notes)
    loaded = load_inference_model(checkpoint)
    assert loaded.model.classifier == "map" and loaded.model.mlp_activation == "gelu_tanh"
    assert loaded.config.pp.normalize == "minus_one_to_one"
    np.testing.assert_allclose(np.asarray(head_input(loaded.model, loaded.params, images(meta))),
                               ref["features_gelu_tanh"], atol=1e-4, rtol=0)


def test_timm_map_head_with_registers_pools_the_patches_alone(tmp_path):
    """timm's attn_pool with registers (SigLIP with 2 registers outside the position embedding,
    as vit_so150m_patch16_reg4_map_256) pools the patches alone (pool_include_prefix=False, its
    default), as the MAP head here does: its logits through load_pretrained and `vit convert`."""
    meta, ref = fixture("timm_siglip_reg_tiny")
    path = saved(tmp_path / "timm", random_weights.build(meta["manifest"], meta["seed"]))
    model = ti(num_classes=10, classifier="map", gelu_approximate=False, num_registers=2)
    params, _ = load_pretrained(path, model, init(model))
    np.testing.assert_allclose(logits(model, params, images(meta)), ref["logits_gelu_erf"],
                               atol=1e-4, rtol=0)
    checkpoint, _ = convert_weights(str(path), str(tmp_path / "run"), num_heads=3, gelu="erf")
    loaded = load_inference_model(checkpoint)
    assert (loaded.model.classifier, loaded.model.num_registers) == ("map", 2)
    np.testing.assert_allclose(logits(loaded.model, loaded.params, images(meta)),
                               ref["logits_gelu_erf"], atol=1e-4, rtol=0)


def test_big_vision_two_tower_scanned_layout_loads_as_its_image_tower(tmp_path):
    """big_vision's SigLIP .npz layout, written here from a MAP model's params (big_vision's
    code is not run: a layout test): params/img/ before every image-tower name, the position
    embedding at img/pos_embedding, the blocks scanned (stacked on a leading axis) under
    per-type layer names, and a text tower (txt/, t, b) beside it."""
    from vit.weight_formats import flatten_params

    model = ti(num_classes=10, classifier="map")
    params = jax.tree_util.tree_map(
        lambda v: np.random.default_rng(0).standard_normal(v.shape).astype(np.float32) * 0.1,
        init(model))
    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    per_type = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
                "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
    npz = {"params/txt/Encoder_0/kernel": np.zeros((3, 3), np.float32),
           "params/t": np.zeros(1, np.float32), "params/b": np.zeros(1, np.float32)}
    blocks: dict[str, list] = {}
    for name, value in flat.items():
        if name.startswith("Transformer/encoderblock_"):
            _, _, layer, rest = name.split("/", 3)
            blocks.setdefault(f"{per_type.get(layer, layer)}/{rest}", []).append(value)
        else:
            npz["params/img/" + ("pos_embedding" if name == POSEMB else name)] = value
    for rest, layers in blocks.items():
        npz[f"params/img/Transformer/encoderblock/{rest}"] = np.stack(layers)
    np.savez(tmp_path / "siglip.npz", **npz)
    weights = read_weights(tmp_path / "siglip.npz")
    assert weights.notes[:2] == [
        "the text tower (3 arrays: txt/..., t, b) dropped: the image tower (img/) loads",
        "scanned encoder blocks (Transformer/encoderblock/..., big_vision's scan=True) split "
        "into encoderblock_{i}"]
    assert set(weights) == set(flat)
    loaded, _ = load_pretrained(tmp_path / "siglip.npz", model, init(model))
    x = images({"input_seed": 1, "batch": 2, "image_size": 64})
    np.testing.assert_array_equal(logits(model, loaded, x), logits(model, params, x))


def test_timm_qk_norm_parity_through_load_and_convert(tmp_path):
    """timm's qk_norm=True ViT (attn.q_norm / k_norm, LayerNorms of [head_dim]): its logits
    from a qk_norm model, and from `vit convert`, which finds qk-norm in the arrays."""
    meta, ref = fixture("timm_qknorm_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    path = saved(tmp_path / "qk", state)
    model = ti(num_classes=10, gelu_approximate=False, qk_norm=True)
    params, _ = load_pretrained(path, model, init(model))
    attention = params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_1"]
    np.testing.assert_array_equal(attention["key_norm"]["bias"], state["blocks.1.attn.k_norm.bias"])
    np.testing.assert_allclose(logits(model, params, images(meta)), ref["logits_gelu_erf"],
                               atol=1e-4, rtol=0)
    loaded, out = converted(convert_weights(str(path), str(tmp_path / "run"))[0], meta)
    assert loaded.model.qk_norm
    np.testing.assert_allclose(out, ref["logits_gelu_erf"], atol=1e-4, rtol=0)
    plain = ti(num_classes=10, gelu_approximate=False)
    with pytest.raises(WeightsError, match="the weights have qk-norm: build the model with "
                                           "qk_norm=True"):
        load_pretrained(path, plain, init(plain))


def _dinov2_reg_features_match(tmp_path, state: dict, meta: dict, ref: dict
                               ) -> tuple[dict, list[str]]:
    """Load `state` (written as a .safetensors file) into the DINOv2-reg fixtures' model and
    check its pooled features against `ref`; returns the params and notes."""
    path = tmp_path / "dinov2.safetensors"
    safetensors.numpy.save_file(state, str(path))
    model = vit.create_model("Ti/14", num_classes=10, image_size=56, depth=2,
                             gelu_approximate=False, layer_scale=0.1, num_registers=4)
    params, notes = load_pretrained(path, model, init(model))
    np.testing.assert_allclose(np.asarray(head_input(model, params, images(meta))),
                               ref["features_gelu_erf"], atol=1e-4, rtol=0)
    return params, notes


@pytest.mark.parametrize("names", ["file", "memory"])
def test_huggingface_dinov2_with_registers_parity(tmp_path, names):
    """transformers' Dinov2WithRegistersModel (facebook/dinov2-with-registers-*): its pooled
    output from `load_pretrained` and from `vit convert`, in both namings of its modules."""
    meta, ref = fixture("hf_dinov2_reg_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    if names == "file":
        state = dict(zip(meta["file_names"], state.values(), strict=True))
    _, notes = _dinov2_reg_features_match(tmp_path, state, meta, ref)
    assert "hf parameter embeddings.mask_token has no counterpart here; dropped" in notes
    if names == "file":  # as the Hub folder has them: the normalisation and crop are read
        (tmp_path / "config.json").write_text(json.dumps(
            {"model_type": "dinov2_with_registers", "hidden_act": "gelu", "layer_norm_eps": 1e-6,
             "num_attention_heads": 3, "image_size": 56, "num_register_tokens": 4}))
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(
            {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
             "do_center_crop": True, "size": {"shortest_edge": 64}}))
    checkpoint, notes = convert_weights(str(tmp_path / "dinov2.safetensors"),
                                        str(tmp_path / "run"), num_classes=2)
    loaded = load_inference_model(checkpoint)
    if names == "file":
        assert loaded.config.pp.normalize == "imagenet" and loaded.config.pp.eval_resize == 64
        assert not any("--normalize" in n for n in notes), notes
    assert loaded.model.num_registers == 4 and loaded.model.layer_scale is not None
    np.testing.assert_allclose(np.asarray(head_input(loaded.model, loaded.params, images(meta))),
                               ref["features_gelu_erf"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("names", ["file", "memory"])
def test_huggingface_parity(tmp_path, names):
    meta, ref = fixture("hf_vit_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    if names == "memory":  # transformers 5 renames modules in memory
        state = dict(zip(meta["memory_names"], state.values(), strict=True))
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(path))
    weights = read_weights(path)
    assert weights.source == "hf"
    model = ti(num_classes=10)
    params, _ = adapt_params(weights, init(model), model)
    np.testing.assert_allclose(logits(model, params, images(meta)), ref["logits_gelu_tanh"],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_vit_jax_npz_parity(tmp_path, classifier):
    meta, ref = fixture("vit_jax_ti")
    recipe = meta[classifier]
    path = tmp_path / "augreg.npz"
    np.savez(path, **random_weights.build(recipe["manifest"], meta["seed"]))
    model = ti(num_classes=10, classifier=classifier,
               representation_size=recipe["representation_size"])
    params, notes = load_pretrained(path, model, init(model))
    np.testing.assert_allclose(logits(model, params, images(meta)), ref[f"logits_{classifier}"],
                               atol=1e-4, rtol=0)
    # vit_jax's code run on today's flax numbers its layers per type, unlike the public .npz files.
    assert notes == [f"read vit_jax weights from {path}",
                     "per-type layer names (flax >= 0.4 / big_vision) mapped to vit_jax's"]


# --- sources ----------------------------------------------------------------------------------


def test_npz_of_a_random_init_round_trips_exactly(tmp_path):
    model = vit.create_model("Ti/4", num_classes=10, image_size=16, width=32, depth=1,
                             num_heads=2, mlp_dim=64)
    target = init(model)
    flat = traverse_util.flatten_dict(target, sep="/")
    np.savez(tmp_path / "plain.npz", **flat)
    np.savez(tmp_path / "prefixed.npz", **{f"params/{k}": v for k, v in flat.items()},
             **{"opt/step": np.zeros(())})
    for name in ("plain.npz", "prefixed.npz"):
        weights = read_weights(tmp_path / name)
        assert weights.source == "vit_jax" and set(weights) == set(flat)
        for k, v in flat.items():
            np.testing.assert_array_equal(weights[k], v)
    params, notes = adapt_params(weights, jax.tree.map(jnp.zeros_like, target), model)
    assert notes == []
    jax.tree.map(np.testing.assert_array_equal, params, target)


def test_bfloat16_safetensors_are_cast_with_a_note(tmp_path, timm_file):
    import ml_dtypes

    state = safetensors.numpy.load_file(str(timm_file))
    half = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
    safetensors.numpy.save_file(half, str(tmp_path / "bf16.safetensors"))
    model = ti()
    params, notes = load_pretrained(tmp_path / "bf16.safetensors", model, init(model))
    assert "weights cast bfloat16 -> float32" in notes
    assert params["head"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(params["head"]["bias"],
                                  state["head.bias"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_own_checkpoint_params_and_ema(tmp_path):
    from vit.checkpoint import Checkpointer, CheckpointError

    model = vit.create_model("Ti/8", num_classes=3, image_size=16, width=32, depth=1,
                             num_heads=2, mlp_dim=64)
    params = init(model)
    ema = jax.tree.map(lambda x: x + 1.0, params)
    for workdir, ema_params in ((tmp_path / "ema", ema), (tmp_path / "plain", None)):
        ckpt = Checkpointer(str(workdir))
        state = {"step": np.int32(7), "params": params, "ema_params": ema_params}
        ckpt.save(7, state, config={}, dataset_info={}, force=True)
        ckpt.close()
    loaded, notes = load_pretrained(tmp_path / "ema", model, params, use_ema=True)
    assert notes[:2] == [f"read checkpoint weights from {tmp_path / 'ema'}",
                         f"loaded EMA params of step 7 from {tmp_path / 'ema'}"]
    jax.tree.map(np.testing.assert_array_equal, loaded, ema)
    plain, _ = load_pretrained(tmp_path / "plain", model, init(model))
    jax.tree.map(np.testing.assert_array_equal, plain, params)
    assert read_weights(tmp_path / "plain").source == "checkpoint"
    with pytest.raises(CheckpointError, match="holds no EMA params"):
        read_weights(tmp_path / "plain", use_ema=True)


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights at"):
        read_weights(tmp_path / "nope.npz")
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"unsupported weight file .*w\.h5"):
        read_weights(tmp_path / "w.h5")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_torch_file_without_torch_is_one_clear_line(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(WeightsError, match="needs PyTorch") as err:
        read_weights(tmp_path / "model.bin")
    assert "\n" not in str(err.value)


def test_unsupported_timm_parameters_are_named(tmp_path, timm_file):
    state = safetensors.numpy.load_file(str(timm_file))
    state["blocks.0.attn.norm.weight"] = np.ones((768,), np.float32)  # Eva's scale_attn_inner
    safetensors.numpy.save_file(state, str(tmp_path / "attn_norm.safetensors"))
    with pytest.raises(WeightsError, match=r"blocks.0.attn.norm.weight \(768,\); only ViTs "
                                           r"\(LayerScale, registers, a pre-norm, qk-norm, packed "
                                           r"SwiGLU, MAP heads\), DINOv3, EVA-02 and ResNet-v2 "
                                           r"hybrids can be loaded"):
        read_weights(tmp_path / "attn_norm.safetensors")


def test_unrecognised_naming(tmp_path):
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    with pytest.raises(WeightsError, match="unrecognised weight naming.*foo"):
        read_weights(tmp_path / "x.npz")


# --- adaptation -------------------------------------------------------------------------------


def test_new_classes_reinitialise_the_head(timm_file):
    model = ti(num_classes=10)
    target = init(model)
    params, notes = load_pretrained(timm_file, model, target)
    assert "head re-initialised: 1000 -> 10 classes" in notes
    np.testing.assert_array_equal(params["head"]["kernel"], np.zeros((192, 10)))
    with pytest.raises(WeightsError, match=r"head/kernel weights \(192, 1000\) vs model \(192, 1"):
        load_pretrained(timm_file, model, target, keep_head=True)
    same = ti()
    params, notes = load_pretrained(timm_file, same, init(same), keep_head=False)
    assert "head re-initialised: 1000 -> 1000 classes" in notes
    assert not np.any(params["head"]["kernel"])


def test_pre_logits_kept_reinitialised_or_dropped(tmp_path):
    meta, _ = fixture("vit_jax_ti")
    path = tmp_path / "w.npz"
    np.savez(path, **random_weights.build(meta["gap"]["manifest"], meta["seed"]))
    source = read_weights(path)
    with_rep = ti(num_classes=10, classifier="gap", representation_size=32)
    target = init(with_rep)
    kept, _ = adapt_params(source, target, with_rep)
    np.testing.assert_array_equal(kept["pre_logits"]["kernel"], source["pre_logits/kernel"])
    fresh, notes = adapt_params(source, target, with_rep, keep_pre_logits=False)
    assert "pre_logits re-initialised" in notes
    np.testing.assert_array_equal(fresh["pre_logits"]["kernel"], target["pre_logits"]["kernel"])
    without = ti(num_classes=10, classifier="gap")
    params, notes = adapt_params(source, init(without), without)
    assert "pre_logits dropped (not in the model)" in notes
    assert "head re-initialised: 10 -> 10 classes" in notes  # 32-wide head cannot be kept
    assert "pre_logits" not in params


def test_mismatch_lists_every_offending_name_in_one_line_and_the_fix_that_applies(timm_file):
    model = vit.create_model("Ti/16", num_classes=1000, image_size=64, depth=1, width=96,
                             num_heads=3, mlp_dim=384)
    with pytest.raises(WeightsError) as err:
        load_pretrained(timm_file, model, init(model))
    msg = str(err.value)
    assert "\n" not in msg
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel weights (192, 768) vs model " \
           "(96, 384)" in msg
    assert "not in the model: Transformer/encoderblock_1/LayerNorm_0/bias (192,)" in msg
    assert "embedding/kernel weights (16, 16, 3, 192) vs model (16, 16, 3, 96)" in msg
    # the patch size is the same: no patch-resize hint
    assert "resize" not in msg and msg.endswith(
        "build the model with the weights' variant (width, depth, heads, mlp_dim, classifier)")


def test_token_weights_into_gap_model_drop_class_token(timm_file):
    model = ti(classifier="gap")
    params, notes = load_pretrained(timm_file, model, init(model))
    assert {"cls dropped (not in the model)",
            "class-token position embedding dropped (model has no class token)"} <= set(notes)
    state = safetensors.numpy.load_file(str(timm_file))
    np.testing.assert_array_equal(params["Transformer"]["posembed_input"]["pos_embedding"],
                                  state["pos_embed"][:, 1:])


def test_model_at_a_new_size_runs_forward_and_a_gradient_step(tmp_path):
    small = dict(width=32, depth=1, num_heads=2, mlp_dim=64)
    source = vit.create_model("Ti/8", num_classes=5, image_size=32, **small)
    flat = traverse_util.flatten_dict(vit.init_params(source, jax.random.PRNGKey(3)), sep="/")
    np.savez(tmp_path / "small.npz", **flat)
    model = vit.create_model("Ti/8", num_classes=3, image_size=48, **small)
    params, notes = load_pretrained(tmp_path / "small.npz", model, init(model),
                                    posemb_method="bicubic")
    assert {"posemb resampled 4x4 -> 6x6 (bicubic)",
            "head re-initialised: 5 -> 3 classes"} <= set(notes)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 32)
    x = np.random.RandomState(0).standard_normal((2, 48, 48, 3)).astype(np.float32)
    y = np.array([1, 2])

    def loss(p):
        out = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
        return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(2), y])

    value, grads = jax.value_and_grad(loss)(params)
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    assert np.isfinite(value) and float(loss(stepped)) < float(value)


def test_new_patch_size_needs_resize_patch(timm_file):
    model = vit.create_model("Ti/8", num_classes=1000, image_size=32, depth=2)
    with pytest.raises(WeightsError, match=r"embedding/kernel weights \(16, 16, 3, 192\) vs "
                                           r"model \(8, 8, 3, 192\).*resize_patch=True"):
        load_pretrained(timm_file, model, init(model))
    params, notes = load_pretrained(timm_file, model, init(model), resize_patch=True)
    assert "patch embedding resized 16x16 -> 8x8 (PI-resize)" in notes
    assert params["embedding"]["kernel"].shape == (8, 8, 3, 192)


# --- position-embedding resampling and PI-resize ----------------------------------------------


def smooth_posemb(grid: tuple[int, int], width: int = 8, prefix: int = 1) -> np.ndarray:
    y, x = np.meshgrid(np.linspace(0, 1, grid[0]), np.linspace(0, 1, grid[1]), indexing="ij")
    freqs = np.random.RandomState(0).uniform(0.2, 1.5, (2, width))
    grid_part = np.sin(y[..., None] * freqs[0] + x[..., None] * freqs[1]).reshape(1, -1, width)
    return np.concatenate([np.full((1, prefix, width), 7.0), grid_part], 1).astype(np.float32)


@pytest.mark.parametrize(("method", "max_err", "mean_err"),
                         [("bilinear", 0.08, 0.012), ("bicubic", 0.02, 0.004)])
def test_resample_posemb_properties(method, max_err, mean_err):
    pe = smooth_posemb((8, 8))
    np.testing.assert_array_equal(resample_posemb(pe, (8, 8), num_prefix_tokens=1,
                                                  method=method), pe)
    up = resample_posemb(pe, (16, 16), num_prefix_tokens=1, method=method)
    assert up.shape == (1, 1 + 256, 8)
    np.testing.assert_array_equal(up[:, :1], pe[:, :1])
    back = resample_posemb(up, (8, 8), num_prefix_tokens=1, method=method)
    error = np.abs(back - pe)  # the field spans [-1, 1]; interpolation smooths it a little
    assert error.max() < max_err and error.mean() < mean_err
    wide = resample_posemb(pe, (3, 5), num_prefix_tokens=1, method=method)
    assert wide.shape == (1, 16, 8)
    again = resample_posemb(wide, (8, 8), num_prefix_tokens=1, old_grid=(3, 5), method=method)
    assert again.shape == pe.shape


def test_zoom_resampling_is_vit_jax_and_big_visions_corner_aligned_linear_one():
    """"zoom" keeps the corner patches' embeddings and interpolates linearly between them (what
    scipy.ndimage.zoom(order=1) does in vit_jax / big_vision), where "bilinear" (half-pixel,
    antialiased) averages; "auto" takes it for vit_jax / big_vision files only."""
    from vit.pretrained import posemb_resampling
    from vit.weight_formats import Weights

    four = np.arange(16, dtype=np.float32).reshape(1, 16, 1)
    np.testing.assert_array_equal(
        resample_posemb(four, (2, 2), num_prefix_tokens=0, method="zoom")[0, :, 0], [0, 3, 12, 15])
    assert not np.allclose(resample_posemb(four, (2, 2), num_prefix_tokens=0)[0, :, 0],
                           [0, 3, 12, 15])
    two = np.concatenate([np.full((1, 1, 1), 7.0), four[:, [0, 3, 12, 15]]], 1)
    up = resample_posemb(two, (4, 4), num_prefix_tokens=1, method="zoom")
    np.testing.assert_allclose(up[0, 1:, 0].reshape(4, 4),
                               np.add.outer(np.linspace(0, 12, 4), np.linspace(0, 3, 4)),
                               atol=1e-5)
    assert up[0, 0, 0] == 7.0
    assert [posemb_resampling("auto", Weights({}, source)) for source in
            ("vit_jax", "timm", "hf", "checkpoint")] == ["zoom"] + ["bilinear"] * 3
    ours = Weights({}, "vit_jax", grid=(4, 4))  # a --to npz file: its config.json says its grid
    assert posemb_resampling("auto", ours) == "bilinear"
    assert posemb_resampling("bicubic", Weights({}, "vit_jax")) == "bicubic"


def test_resample_posemb_bad_inputs():
    pe = smooth_posemb((2, 3), prefix=0)
    with pytest.raises(WeightsError, match="pass old_grid"):
        resample_posemb(pe, (4, 4), num_prefix_tokens=0)
    with pytest.raises(WeightsError, match="unknown posemb resampling method 'area'"):
        resample_posemb(pe, (4, 4), num_prefix_tokens=0, old_grid=(2, 3), method="area")


def test_resize_patch_kernel_same_patch_is_identity():
    kernel = np.random.RandomState(0).standard_normal((8, 8, 3, 16)).astype(np.float32)
    np.testing.assert_array_equal(resize_patch_kernel(kernel, (8, 8)), kernel)


@pytest.mark.parametrize("new", [(12, 12), (16, 16), (8, 12)])
def test_pi_resize_preserves_the_embedding_when_upsampling(new):
    from vit.pretrained import resize_patch

    rng = np.random.RandomState(0)
    kernel = rng.standard_normal((8, 8, 3, 16)).astype(np.float32)
    patches = rng.standard_normal((5, 8, 8, 3)).astype(np.float32)
    original = np.einsum("bhwc,hwcd->bd", patches, kernel)
    resized = np.einsum("bhwc,hwcd->bd", resize_patch(patches, new),
                        resize_patch_kernel(kernel, new))
    np.testing.assert_allclose(resized, original, atol=1e-3, rtol=1e-4)
    naive = np.einsum("bhwc,hwcd->bd", resize_patch(patches, new),
                      resize_patch(kernel.transpose(3, 0, 1, 2).reshape(-1, 8, 8, 1), new)
                      .reshape(16, 3, *new).transpose(2, 3, 1, 0))
    assert np.abs(naive - original).mean() > 0.1  # plain kernel resizing does not preserve it


def test_posemb_without_class_position_gets_zeros(timm_file):
    # timm's no_embed_class models store a posemb for the patch tokens only.
    state = safetensors.numpy.load_file(str(timm_file))
    weights = read_weights(timm_file)
    weights[POSEMB] = state["pos_embed"][:, 1:]
    model = ti()
    params, notes = adapt_params(weights, init(model), model)
    assert ("class-token position embedding set to zeros (none in the weights; they add none to "
            "their class token (timm's no_embed_class: DeiT III, DINOv2-reg), so the outputs "
            "are theirs)") in notes
    pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_array_equal(pe[:, 0], 0)
    np.testing.assert_array_equal(pe[:, 1:], state["pos_embed"][:, 1:])


# --- the source grid, not the shape, decides resampling -----------------------------------------

SMALL = dict(width=32, depth=1, num_heads=2, mlp_dim=64)


def small(image_size, **kw) -> vit.VisionTransformer:
    return vit.create_model("Ti/4", num_classes=3, image_size=image_size, **SMALL, **kw)


def random_params(model, seed: int = 1) -> dict:
    return vit.init_params(model, jax.random.PRNGKey(seed))


def posemb_of(params) -> np.ndarray:
    return np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])


def save_checkpoint(workdir: Path, model, params, image_size) -> None:
    """A checkpoint of this toolkit whose run config says the model and image size."""
    from vit.checkpoint import Checkpointer

    config = {"model": {"variant": "Ti/4", **SMALL}, "image_size": image_size}
    ckpt = Checkpointer(str(workdir))
    ckpt.save(2, {"step": 2, "params": params}, config=config, dataset_info={}, force=True)
    ckpt.close()


def test_a_square_grid_is_resampled_into_a_rectangle_of_as_many_tokens():
    source = random_params(small(32))  # 8x8 patches: 1 + 64 tokens
    model = small((16, 64))  # 4x16 patches: also 1 + 64 tokens
    params, notes = adapt_params(source, init(model), model)
    assert "posemb resampled 8x8 -> 4x16 (bilinear)" in notes
    np.testing.assert_array_equal(posemb_of(params),
                                  resample_posemb(posemb_of(source), (4, 16), num_prefix_tokens=1))
    assert np.abs(posemb_of(params) - posemb_of(source)).max() > 0.01  # not copied verbatim


def test_a_rectangular_checkpoint_carries_its_grid(tmp_path):
    wide, tall = small((32, 48)), small((48, 32))  # 8x12 and 12x8 patches: 1 + 96 tokens each
    source = random_params(wide)
    expected = resample_posemb(posemb_of(source), (12, 8), num_prefix_tokens=1, old_grid=(8, 12))
    save_checkpoint(tmp_path / "run", wide, source, [32, 48])
    assert read_weights(tmp_path / "run").grid == (8, 12)
    params, notes = load_pretrained(tmp_path / "run", tall, init(tall))
    assert "posemb resampled 8x12 -> 12x8 (bilinear)" in notes
    np.testing.assert_array_equal(posemb_of(params), expected)
    same, notes = load_pretrained(tmp_path / "run", wide, init(wide))
    np.testing.assert_array_equal(posemb_of(same), posemb_of(source))
    assert not any("posemb" in note for note in notes)
    # Bare arrays do not say their grid: a non-square token count needs old_grid.
    with pytest.raises(WeightsError, match=r"^cannot tell the patch grid of a position embedding "
                                           r"of 96 patch tokens \(not a square\): pass "
                                           r"old_grid=\(rows, cols\)"):
        adapt_params(source, init(tall), tall)
    params, _ = adapt_params(source, init(tall), tall, old_grid=(8, 12))
    np.testing.assert_array_equal(posemb_of(params), expected)
    # `vit convert --to npz` writes the run config beside the arrays: the grid is read from it.
    flat = traverse_util.flatten_dict(source, sep="/")
    np.savez(tmp_path / "model.npz", **flat)
    (tmp_path / "config.json").write_text(json.dumps(
        {"vit": {"model": {"variant": "Ti/4", **SMALL}, "image_size": [32, 48]}}))
    params, _ = load_pretrained(tmp_path / "model.npz", tall, init(tall))
    np.testing.assert_array_equal(posemb_of(params), expected)
    # `vit convert` rebuilds the model at the image size its run config states.
    from vit.convert import convert_weights
    from vit.evaluate import load_inference_model

    path, _ = convert_weights(str(tmp_path / "run"), str(tmp_path / "converted"))
    converted = load_inference_model(path)
    x = np.random.default_rng(0).standard_normal((2, 32, 48, 3)).astype(np.float32)
    np.testing.assert_array_equal(logits(converted.model, converted.params, x),
                                  logits(wide, source, x))


def test_a_rectangular_checkpoint_fine_tunes_into_a_square_model_via_init_from(tmp_path):
    from vit import trainer
    from vit.config_schema import default_config

    wide = small((32, 48))
    source = random_params(wide)
    save_checkpoint(tmp_path / "run", wide, source, [32, 48])
    config = default_config()
    config.init_from = str(tmp_path / "run")
    square = small(32)
    params = trainer.initial_params(config, square, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(
        posemb_of(params),
        resample_posemb(posemb_of(source), (8, 8), num_prefix_tokens=1, old_grid=(8, 12)))
    block = ("Transformer", "encoderblock_0", "MlpBlock_3", "Dense_0", "kernel")
    kernel = lambda p: np.asarray(traverse_util.flatten_dict(p)[block])
    np.testing.assert_array_equal(kernel(params), kernel(source))


def test_a_said_grid_that_does_not_fit_the_posemb_is_one_line():
    model = small(32)
    with pytest.raises(WeightsError, match=r"^a position embedding of 65 tokens does not fit the "
                                           r"patch grid 4x4 it was said to have"):
        adapt_params(random_params(model), init(model), model, old_grid=(4, 4))


def test_a_head_count_stated_beside_flat_weights_is_checked(timm_file, tmp_path):
    """timm's flat [D, D] attention matrices fit any head count dividing the width; the head
    count its config.json states is held against the model's."""
    (tmp_path / "hub").mkdir()
    path = tmp_path / "hub" / "model.safetensors"
    shutil.copy(timm_file, path)
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"model_args": {"num_heads": 3}}))
    six = ti(num_heads=6)
    with pytest.raises(WeightsError, match=r"^the weights' attention has 3 heads \(their "
                                           r"config.json says so\), the model 6: build the model "
                                           r"with num_heads=3$"):
        load_pretrained(path, six, init(six))
    params, _ = load_pretrained(path, ti(), init(ti()))
    np.testing.assert_array_equal(params["head"]["bias"],
                                  load_pretrained(timm_file, ti(), init(ti()))[0]["head"]["bias"])


def test_a_learned_posemb_or_a_map_head_the_model_lacks_is_an_error(timm_file, tmp_path):
    """Dropping them would replace what the backbone learned (its positions, its pooling)."""
    sincos = ti(posemb="sincos2d")
    with pytest.raises(WeightsError, match=r"not in the model: Transformer/posembed_input/"
                                           r"pos_embedding \(1, \d+, 192\); the weights have a "
                                           r"learned position embedding: build the model with "
                                           r"posemb='learn'$"):
        load_pretrained(timm_file, sincos, init(sincos))
    pooled = ti(classifier="map")
    np.savez(tmp_path / "map.npz", **traverse_util.flatten_dict(init(pooled), sep="/"))
    with pytest.raises(WeightsError, match=r"not in the model: MAPHead_0/.*the weights pool "
                                           r"with a MAP head: build the model with "
                                           r"classifier='map'$"):
        load_pretrained(tmp_path / "map.npz", ti(), init(ti()))
