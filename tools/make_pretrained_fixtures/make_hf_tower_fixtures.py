"""Throwaway: reference outputs of HuggingFace transformers' CLIP and SigLIP image towers for tests.

Never run by tests. Needs torch and transformers, e.g.
    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 timm transformers
Run from the repository root:
    /tmp/peer/bin/python tools/make_pretrained_fixtures/make_hf_tower_fixtures.py
Writes, at width 192, depth 2, 3 heads, MLP 768, 64 px with 16 px patches, random weights from
the manifest (tests/fixtures/random_weights.py) and the input seed:
- tests/fixtures/hf_clip_tiny.{json,npz}: CLIPVisionModelWithProjection (the vision half of
  openai/clip-vit-*: pre-norm, quick GELU, no patch-embedding bias, LayerNorm eps 1e-5, a
  projection without bias) projecting to 10; its image_embeds (the projected, pooled class
  token).
- tests/fixtures/hf_siglip_tiny.{json,npz}: SiglipVisionModel (google/siglip-*: no class token,
  tanh GELU, the attention-pooling head with a fused in_proj); its pooler_output.
"""

import json
import sys

import numpy as np
import torch

sys.path[:0] = ["tests/fixtures", "tools/make_pretrained_fixtures"]
import torchvision_stub  # noqa: E402
from torch_reference import input_images, load_random_weights  # noqa: E402

torchvision_stub.install()  # the local index's torchvision is a CUDA build whose ops do not load
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    SiglipVisionConfig,
    SiglipVisionModel,
)

SEED, INPUT_SEED, IMAGE, BATCH = 0, 1, 64, 2
SIZE = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=3,
            image_size=IMAGE, patch_size=16)
TOWERS = {
    "hf_clip_tiny": (CLIPVisionModelWithProjection, CLIPVisionConfig(**SIZE, projection_dim=10),
                     "image_embeds", "image_embeds_quick_gelu"),
    "hf_siglip_tiny": (SiglipVisionModel, SiglipVisionConfig(**SIZE), "pooler_output",
                       "features_gelu_tanh"),
}

for stem, (model_class, config, output, saved_as) in TOWERS.items():
    model = model_class(config)
    manifest = load_random_weights(model, SEED)
    with torch.no_grad():
        out = getattr(model(pixel_values=input_images(INPUT_SEED, BATCH, IMAGE)), output)
    meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=IMAGE, batch=BATCH,
                manifest=manifest, config=config.to_dict(),
                versions=dict(torch=torch.__version__, transformers=transformers.__version__),
                model=f"transformers {model_class.__name__}("
                      f"{', '.join(f'{k}={v}' for k, v in SIZE.items())})",
                patch=16, width=192, depth=2, heads=3, mlp_dim=768)
    with open(f"tests/fixtures/{stem}.json", "w") as f:
        json.dump(meta, f)
    np.savez(f"tests/fixtures/{stem}.npz", **{saved_as: out.numpy()})
    print(stem, out.shape, float(out.abs().mean()), [m[0] for m in manifest][:4])
