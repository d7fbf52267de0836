"""ResNet-v2 hybrids (vit/resnet.py): variants, vit_jax names, timm counts and parity, loading.

The parity fixture tests/fixtures/timm_r_hybrid_tiny.{json,npz} holds a recipe for random weights
of a tiny timm hybrid and the logits timm (and vit_jax's own code) computed from them; see
tools/make_pretrained_fixtures/make_hybrid_fixture.py. Neither torch nor timm is needed here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import vit
from vit import optim, resnet
from vit.config_schema import default_config, model_config, validate_config
from vit.pretrained import adapt_params, load_pretrained, read_weights
from vit.weight_formats import POSEMB, to_vit_naming

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("random_weights", FIXTURES / "random_weights.py")
random_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(random_weights)

# The fixture's model: two one-unit stages of width 32 (stride 8), 2x2 patches -> stride 16.
TINY = dict(resnet_layers=(1, 1), resnet_width=32, width=64, depth=2, num_heads=2, mlp_dim=128)


def tiny(image_size: int = 64, num_classes: int = 10, **kw) -> vit.VisionTransformer:
    return vit.create_model("Ti/16", num_classes=num_classes, image_size=image_size,
                            **{**TINY, **kw})


def shapes(model: vit.VisionTransformer) -> dict[str, tuple[int, ...]]:
    tree = jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))
    return {k: v.shape for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def zeros_like_params(model: vit.VisionTransformer) -> dict:
    """A target for adapt_params without running init (compiling it is the slow part here)."""
    tree = jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)


def logits(model: vit.VisionTransformer, params: dict, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, x))


@pytest.fixture(scope="module")
def tiny32() -> tuple[vit.VisionTransformer, dict]:
    """The tiny hybrid at 32 px (a 2x2 token grid) and its initial parameters."""
    model = tiny(image_size=32)
    return model, jax.jit(lambda: vit.init_params(model, jax.random.PRNGKey(0)))()


def fixture() -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads((FIXTURES / "timm_r_hybrid_tiny.json").read_text())
    with np.load(FIXTURES / "timm_r_hybrid_tiny.npz") as f:
        return meta, {k: f[k] for k in f.files}


def fixture_images(meta: dict) -> np.ndarray:
    rng = np.random.RandomState(meta["input_seed"])
    size = meta["image_size"]
    return rng.standard_normal((meta["batch"], size, size, 3)).astype(np.float32)


# --- variants and names -----------------------------------------------------------------------


@pytest.mark.parametrize("variant, layers, width", [
    ("R50+B/16", (3, 4, 9), 768), ("R26+S/32", (2, 2, 2, 2), 384),
    ("R50+L/32", (3, 4, 6, 3), 1024), ("R26+B/32", (2, 2, 2, 2), 768)])
def test_hybrid_variants(variant, layers, width):
    model = vit.create_model(variant)
    assert model.resnet_layers == layers and model.width == width and model.stem == "patchify"
    assert model.patch_size == (int(variant.split("/")[1]),) * 2  # the token grid's stride
    assert model.grid == (224 // model.patch_size[0],) * 2


def test_parameter_names_are_vit_jax_at_the_top_level():
    names = shapes(vit.create_model("R50+B/16"))
    top = {k.split("/")[0] for k in names}
    assert top == {"conv_root", "gn_root", "block1", "block2", "block3", "embedding", "cls",
                   "Transformer", "head"}
    assert names["conv_root/kernel"] == (7, 7, 3, 64)
    assert names["gn_root/scale"] == names["gn_root/bias"] == (64,)
    assert names["block1/unit1/conv_proj/kernel"] == (1, 1, 64, 256)
    assert names["block1/unit1/gn_proj/scale"] == (256,)
    assert names["block2/unit1/conv2/kernel"] == (3, 3, 128, 128)
    assert names["block3/unit9/conv3/kernel"] == (1, 1, 256, 1024)
    assert names["block3/unit9/gn3/bias"] == (1024,)
    assert names["embedding/kernel"] == (1, 1, 1024, 768)
    assert names[POSEMB] == (1, 1 + 14 * 14, 768)
    units = {b: {k.split("/")[1] for k in names if k.startswith(b + "/")}
             for b in ("block1", "block2", "block3")}
    assert units == {b: {f"unit{j}" for j in range(1, n + 1)}
                     for b, n in (("block1", 3), ("block2", 4), ("block3", 9))}
    layers = {k.split("/", 2)[2].rsplit("/", 1)[0] for k in names if k.startswith("block2/unit2/")}
    assert layers == {"conv1", "gn1", "conv2", "gn2", "conv3", "gn3"}  # no projection


# timm's counts (timm 1.0.31, torch 2.13), from shapes on torch's "meta" device:
#   sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
# recorded by tools/make_pretrained_fixtures/make_hybrid_fixture.py in the fixture's json.
@pytest.mark.parametrize("variant, options, timm_name, expected", [
    ("R50+B/16", {}, "vit_base_r50_s16_224", 98_659_112),
    ("R26+S/32", {}, "vit_small_r26_s32_224", 36_431_912),
    ("R50+L/32", {}, "vit_large_r50_s32_224", 328_994_856),
    ("R26+B/32", {}, "vit_base_r26_s32_224", 101_383_976),
    ("Ti/32", dict(resnet_layers=()), "vit_tiny_r_s16_p8_224", 6_337_704),  # root only, 8x8
])
def test_parameter_counts_equal_timms(variant, options, timm_name, expected):
    model = vit.create_model(variant, num_classes=1000, image_size=224, **options)
    assert vit.count_params(model) == expected
    meta, _ = fixture()
    assert meta["timm_param_counts"][timm_name] == expected


# --- parity with timm and vit_jax -------------------------------------------------------------


def test_timm_hybrid_parity(tmp_path):
    meta, ref = fixture()
    path = tmp_path / "hybrid.safetensors"
    safetensors.numpy.save_file(random_weights.build(meta["manifest"], meta["seed"]), str(path))
    model = tiny(gelu_approximate=False, resnet_numerics="timm")  # timm's exact GELU, epsilons
    params, notes = load_pretrained(path, model, zeros_like_params(model))
    out = logits(model, params, fixture_images(meta))
    np.testing.assert_allclose(out, ref["logits"], atol=1e-4, rtol=0)  # measured: 2e-6
    assert notes[0] == f"read timm weights from {path}"
    assert "resnet_numerics='timm'" in notes[1] and len(notes) == 2


def test_vit_jax_hybrid_parity():
    """The same weights in vit_jax's names give vit_jax's own model's logits."""
    meta, ref = fixture()
    state = to_vit_naming(random_weights.build(meta["manifest"], meta["seed"]))
    model = tiny()  # vit_jax's tanh GELU and epsilons are the defaults
    params, _ = adapt_params(state, zeros_like_params(model), model)
    out = logits(model, params, fixture_images(meta))
    np.testing.assert_allclose(out, ref["logits_vit_jax"], atol=1e-4, rtol=0)  # measured: 2e-6


def test_timm_trunk_names_and_kernel_layout():
    """timm's OIHW conv weights become HWIO kernels; a stem-only trunk has no `.stem.`."""
    conv = np.arange(2 * 3 * 7 * 7, dtype=np.float32).reshape(2, 3, 7, 7)
    state = {"patch_embed.proj.weight": np.zeros((4, 2, 1, 1), np.float32),
             "patch_embed.backbone.conv.weight": conv,
             "patch_embed.backbone.norm.weight": np.ones(2, np.float32),
             "patch_embed.backbone.stages.1.blocks.2.downsample.norm.bias": np.ones(2, np.float32),
             "patch_embed.backbone.stages.0.blocks.0.conv3.weight": conv}
    renamed = to_vit_naming(state)
    assert set(renamed) == {"embedding/kernel", "conv_root/kernel", "gn_root/scale",
                            "block2/unit3/gn_proj/bias", "block1/unit1/conv3/kernel"}
    np.testing.assert_array_equal(renamed["conv_root/kernel"], conv.transpose(2, 3, 1, 0))


# --- fine-tuning: public names round-trip, adaptation ------------------------------------------


def test_vit_jax_npz_round_trips_and_adapts(tmp_path, tiny32):
    model, target = tiny32
    flat = flax.traverse_util.flatten_dict(target, sep="/")
    np.savez(tmp_path / "R_tiny.npz", **flat)
    weights = read_weights(tmp_path / "R_tiny.npz")
    assert weights.source == "vit_jax" and set(weights) == set(flat)
    params, notes = adapt_params(weights, jax.tree.map(jnp.zeros_like, target), model)
    assert notes == []
    jax.tree.map(np.testing.assert_array_equal, params, target)

    bigger = tiny(image_size=64, num_classes=3)  # fine-tune at 2x the resolution, new classes
    params, notes = adapt_params(weights, zeros_like_params(bigger), bigger)
    assert "posemb resampled 2x2 -> 4x4 (zoom)" in notes  # vit_jax weights: its resampling
    assert "head re-initialised: 10 -> 3 classes" in notes
    np.testing.assert_array_equal(params["block2"]["unit1"]["conv2"]["kernel"],
                                  target["block2"]["unit1"]["conv2"]["kernel"])
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 16, 64)


def test_group_norms_saved_by_old_flax_as_1_1_1_c_load(tmp_path, tiny32):
    """The public R50+ViT .npz files were written by a flax that stored GroupNorm parameters as
    [1, 1, 1, C]: they are read as [C] (as vit_jax's loader does), with a note."""
    model, target = tiny32
    flat = flax.traverse_util.flatten_dict(target, sep="/")
    old = {k: v.reshape(1, 1, 1, -1) if "/gn" in f"/{k}" and k.endswith(("scale", "bias")) else v
           for k, v in flat.items()}
    shaped = [k for k in old if old[k].ndim == 4 and flat[k].ndim == 1]
    assert "gn_root/scale" in shaped and "block1/unit1/gn1/bias" in shaped
    np.savez(tmp_path / "R_old.npz", **old)
    weights = read_weights(tmp_path / "R_old.npz")
    assert weights.notes == [f"{len(shaped)} GroupNorm scales / biases of shape [1, 1, 1, C] "
                             "(flax < 0.3.6's layout, as in the public hybrid .npz files) read "
                             "as [C]"]
    params, _ = adapt_params(weights, jax.tree.map(jnp.zeros_like, target), model)
    jax.tree.map(np.testing.assert_array_equal, params, target)


def test_layer_decay_treats_the_trunk_as_the_input_layer():
    model = tiny()
    params = jax.eval_shape(lambda: vit.init_params(model, jax.random.PRNGKey(0)))
    mult = flax.traverse_util.flatten_dict(optim.layer_decay_multipliers(params, 0.5), sep="/")
    embed = 0.5 ** (model.depth + 1)
    for name in ("conv_root/kernel", "gn_root/scale", "block1/unit1/conv1/kernel",
                 "block2/unit1/gn_proj/bias", "embedding/kernel"):
        assert mult[name] == embed, name
    assert mult["head/kernel"] == 1.0


def test_config_builds_a_hybrid():
    config = default_config()
    config.model = model_config("R26+S/32", resnet_numerics="timm")
    validate_config(config)
    model = vit.model_from_config(config.model, num_classes=10, image_size=224)
    assert model.resnet_layers == (2, 2, 2, 2) and model.resnet_numerics == "timm"
    small = model_config("Ti/16", resnet_layers=(1, 1), resnet_width=32)
    assert vit.model_from_config(small, num_classes=10, image_size=64).resnet_layers == (1, 1)


# --- a tiny hybrid runs and trains --------------------------------------------------------------


def test_tiny_hybrid_forward_attention_and_gradients(tiny32):
    _, params = tiny32
    assert not np.any(params["block1"]["unit1"]["gn3"]["scale"])  # vit_jax's zero-init
    assert np.all(params["block1"]["unit1"]["gn2"]["scale"] == 1)
    model = tiny(image_size=32, dropout_rate=0.1, drop_path_rate=0.1)
    params = jax.tree.map(lambda p: p + 0.01, params)  # head and gn3 scales start at zero
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    out, maps = jax.jit(lambda p: model.apply({"params": p}, x, return_attention=True))(params)
    assert out.shape == (2, 10) and maps.shape == (2, 2, 2, 1 + 4, 1 + 4)

    def loss(p):
        out = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
        return jnp.sum(out ** 2)

    grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params), sep="/")
    assert any(k.startswith("block2/unit1/conv_proj") for k in grads)
    for name, g in grads.items():
        assert float(jnp.abs(g).max()) > 0, name


def test_weight_standardisation_formulas():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 5)) * 0.1 + 0.3
    flat = np.asarray(w).reshape(-1, 5)
    centred = flat - flat.mean(0)
    np.testing.assert_allclose(resnet.standardize(w, "vit_jax").reshape(-1, 5),
                               centred / (flat.std(0) + 1e-5), atol=1e-5)
    np.testing.assert_allclose(resnet.standardize(w, "timm").reshape(-1, 5),
                               centred / np.sqrt(flat.var(0) + 1e-8), atol=1e-5)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["R50+B/8", "R50+X/16", "R34+B/16", "R50+", "+B/16",
                                     "R50+B/16/2", "Rx+B/16", "R50+R26+B/16"])
def test_bad_hybrid_variants_name_the_valid_forms(variant):
    with pytest.raises(ValueError, match=r"R<depth>\+<size>/<stride>") as err:
        vit.create_model(variant)
    message = str(err.value)
    assert "\n" not in message and repr(variant) in message and "R50+B/16" in message


@pytest.mark.parametrize("options, match", [
    (dict(resnet_layers=(1, 1, 1)), r"not a multiple of the ResNet trunk's stride 16"),
    (dict(resnet_layers=(1, 0)), r"at least one unit per stage"),
    (dict(resnet_width=48), r"resnet_width must be a positive multiple of 32 .*, got 48"),
    (dict(stem="conv"), r"use stem='patchify', not 'conv'"),
    (dict(resnet_numerics="torch"), r"unknown resnet_numerics 'torch'; use one of"),
])
def test_bad_hybrid_options(options, match):
    with pytest.raises(ValueError, match=match):
        vit.create_model("Ti/8", image_size=64, **{**TINY, **options})
