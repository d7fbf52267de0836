"""Throwaway: reference image embeddings of HuggingFace transformers' CLIP image tower for tests.

Never run by tests. Needs torch and transformers, e.g.
    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 timm transformers
Run from the repository root:
    /tmp/peer/bin/python tools/make_pretrained_fixtures/make_hf_clip_fixture.py
Writes tests/fixtures/hf_clip_tiny.{json,npz}: CLIPVisionModelWithProjection (the vision half
of openai/clip-vit-*: pre-norm, quick GELU, no patch-embedding bias, LayerNorm eps 1e-5, a
projection without bias) at width 192, depth 2, 3 heads, 64 px with 16 px patches, projection
to 10, random weights from the manifest (tests/fixtures/random_weights.py), the input seed and
its image_embeds (the projected, pooled class token).
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
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

SEED, INPUT_SEED, IMAGE, BATCH = 0, 1, 64, 2

config = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=2,
                          num_attention_heads=3, image_size=IMAGE, patch_size=16,
                          projection_dim=10)
model = CLIPVisionModelWithProjection(config)
manifest = load_random_weights(model, SEED)
with torch.no_grad():
    embeds = model(pixel_values=input_images(INPUT_SEED, BATCH, IMAGE)).image_embeds
meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=IMAGE, batch=BATCH, manifest=manifest,
            config=config.to_dict(),
            versions=dict(torch=torch.__version__, transformers=transformers.__version__),
            model="transformers CLIPVisionModelWithProjection(hidden_size=192, "
                  "intermediate_size=768, num_hidden_layers=2, num_attention_heads=3, "
                  "image_size=64, patch_size=16, projection_dim=10)",
            patch=16, width=192, depth=2, heads=3, mlp_dim=768)
with open("tests/fixtures/hf_clip_tiny.json", "w") as f:
    json.dump(meta, f)
np.savez("tests/fixtures/hf_clip_tiny.npz", image_embeds_quick_gelu=embeds.numpy())
print("hf_clip_tiny", embeds.shape, float(embeds.abs().mean()), [m[0] for m in manifest][:6])
