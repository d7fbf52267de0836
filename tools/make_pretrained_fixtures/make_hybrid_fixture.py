"""Throwaway: reference logits of a tiny ResNet-v2 hybrid ViT for tests/test_hybrid.py.

Never run by tests. Two steps, run from the repository root:

1. timm (a separate environment with torch and timm, as make_torch_fixtures.py describes):
       /tmp/refenv/bin/python tools/make_pretrained_fixtures/make_hybrid_fixture.py timm
   builds timm's hybrid (`HybridEmbed(ResNetV2(...))` as timm's `_resnetv2` builds it for
   `vit_base_r50_s16_224`, at half width and two one-unit stages, a 64 px input and 2x2 patches
   on the 1/8 feature map), loads random weights from a recipe (tests/fixtures/random_weights.py)
   and writes tests/fixtures/timm_r_hybrid_tiny.{json,npz}: the manifest, the input seed, the
   logits, and timm's parameter counts of its published hybrids (from shapes on torch's "meta"
   device).
2. vit_jax (optional; this project's venv, with google-research/vision_transformer's
   vit_jax/models_vit.py and models_resnet.py importable, e.g. under /tmp/vit_jax_ref/vit_jax/):
       PYTHONPATH=/tmp/vit_jax_ref .venv/bin/python \
           tools/make_pretrained_fixtures/make_hybrid_fixture.py vit_jax
   renames the same weights to vit_jax's names with vit.weight_formats, checks they are exactly
   the names vit_jax's own model creates, and adds vit_jax's logits for them to the .npz.
"""

import importlib.util
import json
import sys
from functools import partial

import numpy as np

sys.path[:0] = ["tests/fixtures", "tools/make_pretrained_fixtures", "."]
import random_weights  # noqa: E402

STEM = "tests/fixtures/timm_r_hybrid_tiny"
SEED, INPUT_SEED, IMAGE, BATCH = 0, 1, 64, 2
CONFIG = dict(resnet_layers=[1, 1], resnet_width=32, patch=16, width=64, depth=2, heads=2,
              mlp_dim=128, num_classes=10)
PUBLISHED = ("vit_base_r50_s16_224", "vit_small_r26_s32_224", "vit_large_r50_s32_224",
             "vit_base_r26_s32_224", "vit_tiny_r_s16_p8_224")


def images() -> np.ndarray:
    rng = np.random.RandomState(INPUT_SEED)
    return rng.standard_normal((BATCH, IMAGE, IMAGE, 3)).astype(np.float32)


def timm_step() -> None:
    import torch

    if importlib.util.find_spec("torchvision") is None:
        import torchvision_stub

        torchvision_stub.install()
    import timm
    from timm.layers import StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_hybrid import HybridEmbed

    backbone = ResNetV2(  # timm's _resnetv2(), at width_factor 0.5: stem 32, stages 128, 256
        layers=tuple(CONFIG["resnet_layers"]), width_factor=0.5, num_classes=0, global_pool="",
        preact=False, stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8))
    model = VisionTransformer(
        img_size=IMAGE, patch_size=2, embed_dim=CONFIG["width"], depth=CONFIG["depth"],
        num_heads=CONFIG["heads"], mlp_ratio=CONFIG["mlp_dim"] / CONFIG["width"],
        num_classes=CONFIG["num_classes"], embed_layer=partial(HybridEmbed, backbone=backbone))
    state = model.state_dict()
    manifest = [random_weights.recipe(k, tuple(v.shape)) for k, v in state.items()]
    weights = random_weights.build(manifest, SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(images()).permute(0, 3, 1, 2)).numpy()

    counts = {}
    for name in PUBLISHED:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=1000)  # r50_s16's default tag has none
            counts[name] = sum(p.numel() for p in model.parameters())
    meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=IMAGE, batch=BATCH,
                manifest=manifest, model="timm VisionTransformer(embed_layer=HybridEmbed("
                "ResNetV2(layers=(1, 1), width_factor=0.5, preact=False, stem_type='same', "
                "conv_layer=StdConv2dSame(eps=1e-8))), img_size=64, patch_size=2, embed_dim=64, "
                "depth=2, num_heads=2, mlp_ratio=2, num_classes=10)", **CONFIG,
                timm_param_counts=counts,
                versions=dict(torch=torch.__version__, timm=timm.__version__))
    with open(f"{STEM}.json", "w") as f:
        json.dump(meta, f)
    np.savez(f"{STEM}.npz", logits=logits)
    print(STEM, logits.shape, float(np.abs(logits).mean()), counts)


def vit_jax_step() -> None:
    import jax
    import ml_collections
    from flax import traverse_util
    from vit_jax import models_vit

    from vit.weight_formats import to_vit_naming

    with open(f"{STEM}.json") as f:
        meta = json.load(f)
    with np.load(f"{STEM}.npz") as f:
        outputs = {k: f[k] for k in f.files}
    model = models_vit.VisionTransformer(
        num_classes=CONFIG["num_classes"], patches=ml_collections.ConfigDict({"size": (2, 2)}),
        hidden_size=CONFIG["width"],
        transformer=dict(num_layers=CONFIG["depth"], mlp_dim=CONFIG["mlp_dim"],
                         num_heads=CONFIG["heads"], dropout_rate=0.0, attention_dropout_rate=0.0),
        resnet=ml_collections.ConfigDict(dict(num_layers=tuple(CONFIG["resnet_layers"]),
                                              width_factor=0.5)),
        representation_size=None, classifier="token")
    init = model.init(jax.random.PRNGKey(0), images(), train=False)["params"]
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(init, sep="/").items()}
    # flax >= 0.4 numbers a block's layers per type; the public .npz files (and we) do not.
    per_type = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
                "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
    weights = to_vit_naming(random_weights.build(meta["manifest"], meta["seed"]))
    flat = {}
    for name, value in weights.items():
        for ours, theirs in per_type.items():
            name = name.replace(f"/{ours}/", f"/{theirs}/")
        if name.split("/")[-2:-1] and name.split("/")[-2] in ("query", "key", "value", "out"):
            value = value.reshape(shapes[name])  # timm's [D, D] matrices -> vit_jax's heads
        flat[name] = value
    assert set(flat) == set(shapes), sorted(set(flat) ^ set(shapes))
    assert all(flat[k].shape == shapes[k] for k in flat)
    params = traverse_util.unflatten_dict(flat, sep="/")
    outputs["logits_vit_jax"] = np.asarray(model.apply({"params": params}, images(), train=False))
    np.savez(f"{STEM}.npz", **outputs)
    print(STEM, "vit_jax", float(np.abs(outputs["logits_vit_jax"] - outputs["logits"]).max()))


if __name__ == "__main__":
    {"timm": timm_step, "vit_jax": vit_jax_step}[sys.argv[1]]()
