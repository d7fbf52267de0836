"""Throwaway: reference outputs of timm's DeiT III, DINOv2 (with registers, and giant's SwiGLU),
CLIP, SigLIP and qk-norm ViTs for the tests.

Never run by tests. Needs torch and timm only (no transformers), e.g.
    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 timm
Run from the repository root:
    /tmp/peer/bin/python tools/make_pretrained_fixtures/make_backbone_fixtures.py
Writes tests/fixtures/timm_deit3_tiny.{json,npz} (deit3_small_patch16_224 at width 192, depth 2,
64 px: no_embed_class, LayerScale; its logits) and tests/fixtures/timm_dinov2_reg_tiny.{json,npz}
(vit_small_patch14_reg4_dinov2 at width 192, depth 2, 56 px: no_embed_class, 4 register tokens,
LayerScale, no head; its pooled features) and tests/fixtures/timm_clip_tiny.{json,npz}
(vit_base_patch16_clip_quickgelu_224 at width 192, depth 2, 64 px, 10 classes: pre-norm, no
patch-embedding bias, quick GELU, LayerNorm eps 1e-5; its logits) and
tests/fixtures/timm_dinov2_giant_tiny.{json,npz} (vit_giant_patch14_dinov2 at width 192, depth 2,
56 px: SwiGLU MLPs, fc1 1024 wide, 512 after the gate; LayerScale, no head; its pooled features)
and tests/fixtures/timm_siglip_tiny.{json,npz} (vit_base_patch16_siglip_224 at width 192, depth
2, 64 px, 10 classes: no class token, the attention-pooling head `attn_pool`, exact GELU; its
logits) and tests/fixtures/timm_qknorm_tiny.{json,npz} (vit_base_patch16_224 with qk_norm=True
at width 192, depth 2, 64 px, 10 classes: LayerNorm over each head's queries and keys; its
logits) and tests/fixtures/timm_siglip_reg_tiny.{json,npz} (the SigLIP one with 2 register
tokens outside the position embedding, as vit_so150m_patch16_reg4_map_256, which its attn_pool
leaves out: pool_include_prefix=False; its logits). Random weights from the manifest
(tests/fixtures/random_weights.py), the input seed and the outputs. Name fixtures on the command
line to write only those.
"""

import json
import sys

import numpy as np
import torch

sys.path[:0] = ["tests/fixtures", "tools/make_pretrained_fixtures"]
import torchvision_stub  # noqa: E402
from torch_reference import input_images, load_random_weights  # noqa: E402

torchvision_stub.install()  # the local index's torchvision is a CUDA build whose ops do not load
import timm  # noqa: E402

SEED, INPUT_SEED, BATCH = 0, 1, 2
MODELS = {
    "timm_deit3_tiny": ("deit3_small_patch16_224", 64, 16, {}, "logits_gelu_erf"),
    "timm_dinov2_reg_tiny": ("vit_small_patch14_reg4_dinov2", 56, 14, {"num_classes": 0},
                             "features_gelu_erf"),
    "timm_clip_tiny": ("vit_base_patch16_clip_quickgelu_224", 64, 16, {"num_classes": 10},
                       "logits_quick_gelu"),
    "timm_dinov2_giant_tiny": ("vit_giant_patch14_dinov2", 56, 14, {"num_classes": 0},
                               "features_swiglu"),
    "timm_siglip_tiny": ("vit_base_patch16_siglip_224", 64, 16, {"num_classes": 10},
                         "logits_gelu_erf"),
    "timm_qknorm_tiny": ("vit_base_patch16_224", 64, 16, {"num_classes": 10, "qk_norm": True},
                         "logits_gelu_erf"),
    "timm_siglip_reg_tiny": ("vit_base_patch16_siglip_224", 64, 16,
                             {"num_classes": 10, "reg_tokens": 2, "no_embed_class": True},
                             "logits_gelu_erf"),
}
WANTED = sys.argv[1:] or list(MODELS)  # fixture names: the others are left as they are

for stem, (name, image, patch, extra, output) in MODELS.items():
    if stem not in WANTED:
        continue
    kwargs = dict(embed_dim=192, num_heads=3, depth=2, img_size=image, **extra)
    model = timm.create_model(name, **kwargs)
    state = model.state_dict()
    manifest = load_random_weights(model, SEED)
    with torch.no_grad():
        out = model(input_images(INPUT_SEED, BATCH, image)).numpy()
    meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=image, batch=BATCH,
                manifest=manifest, versions=dict(torch=torch.__version__, timm=timm.__version__),
                model=f"timm {name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})",
                patch=patch, width=192, depth=2, heads=3,
                mlp_dim=int(state["blocks.0.mlp.fc2.weight"].shape[1]),
                num_classes=extra.get("num_classes", 1000))
    with open(f"tests/fixtures/{stem}.json", "w") as f:
        json.dump(meta, f)
    np.savez(f"tests/fixtures/{stem}.npz", **{output: out})
    print(stem, out.shape, float(np.abs(out).mean()), sorted(state)[:6])
