"""Throwaway: reference logits of timm's and HuggingFace's ViT for tests/test_pretrained.py.

Never run by tests. Needs a separate environment with torch, timm and transformers, e.g.
    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 transformers
    /tmp/refenv/bin/pip install --no-deps timm pillow pyyaml huggingface_hub
timm imports torchvision at start-up but its ViT never calls it; without torchvision this
script serves placeholders (torchvision_stub.py).
Run from the repository root:
    /tmp/refenv/bin/python tools/make_pretrained_fixtures/make_torch_fixtures.py
Writes tests/fixtures/{timm,hf}_vit_tiny.{json,npz}: the manifest (names, shapes, recipe of the
random weights, see tests/fixtures/random_weights.py), the input seed and the logits.
"""

import importlib.util
import json
import sys
import tempfile

import numpy as np
import safetensors.numpy
import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification

sys.path[:0] = ["tests/fixtures", "tools/make_pretrained_fixtures"]
import random_weights  # noqa: E402

if importlib.util.find_spec("torchvision") is None:  # after transformers, which probes for it
    import torchvision_stub  # noqa: E402

    torchvision_stub.install()
import timm  # noqa: E402

SEED, INPUT_SEED, IMAGE, BATCH = 0, 1, 64, 2


def file_names(model: torch.nn.Module, weights: dict) -> list[str]:
    """The names save_pretrained writes for each in-memory name (transformers 5 renames them)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = safetensors.numpy.load_file(f"{tmp}/model.safetensors")
    by_value = {v.tobytes(): k for k, v in saved.items()}
    return [by_value[v.tobytes()] for v in weights.values()]


def run(model: torch.nn.Module, forward, stem: str, extra: dict) -> None:
    state = model.state_dict()
    manifest = [random_weights.recipe(k, tuple(v.shape)) for k, v in state.items()]
    weights = random_weights.build(manifest, SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model.eval()
    if hasattr(model, "save_pretrained"):
        extra["memory_names"] = [row[0] for row in manifest]
        for row, name in zip(manifest, file_names(model, weights), strict=True):
            row[0] = name
    images = np.random.RandomState(INPUT_SEED).standard_normal((BATCH, IMAGE, IMAGE, 3))
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    outputs = {}
    with torch.no_grad():
        for name, fn in forward.items():
            outputs[name] = fn(x).numpy()
    meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=IMAGE, batch=BATCH,
                manifest=manifest, versions=dict(torch=torch.__version__, timm=timm.__version__,
                                                 transformers=transformers.__version__), **extra)
    with open(f"tests/fixtures/{stem}.json", "w") as f:
        json.dump(meta, f)
    np.savez(f"tests/fixtures/{stem}.npz", **outputs)
    print(stem, {k: (v.shape, float(np.abs(v).mean())) for k, v in outputs.items()})


def with_gelu(model: torch.nn.Module, approximate: str) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.GELU):
            module.approximate = approximate
    return model


timm_model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=IMAGE)
run(timm_model, {"logits_gelu_erf": lambda x: with_gelu(timm_model, "none")(x),
                 "logits_gelu_tanh": lambda x: with_gelu(timm_model, "tanh")(x)},
    "timm_vit_tiny", dict(model="timm vit_tiny_patch16_224(depth=2, img_size=64)", patch=16,
                          width=192, depth=2, heads=3, mlp_dim=768, num_classes=1000))

config = ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                   intermediate_size=768, image_size=IMAGE, patch_size=16, num_labels=10,
                   layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
hf = ViTForImageClassification(config)
run(hf, {"logits_gelu_tanh": lambda x: hf(pixel_values=x).logits}, "hf_vit_tiny",
    dict(model="transformers ViTForImageClassification (Ti, depth 2, 64px, tanh GELU)",
         patch=16, width=192, depth=2, heads=3, mlp_dim=768, num_classes=10))
