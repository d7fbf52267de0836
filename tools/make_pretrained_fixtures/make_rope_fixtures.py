"""Throwaway: reference outputs of DINOv3's RoPE ViTs, timm's and HF transformers', for the tests.

Never run by tests. Needs torch, timm and transformers, e.g.
    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 timm transformers
Run from the repository root:
    /tmp/peer/bin/python tools/make_pretrained_fixtures/make_rope_fixtures.py
Writes tests/fixtures/<stem>.{json,npz}, random weights from a manifest
(tests/fixtures/random_weights.py), on N(0, 1) images of 64x48 pixels (rows x cols: RoPE's
coordinates are normalised per axis) from the input seed:
- timm_dinov3_tiny: timm vit_small_patch16_dinov3_qkvb at width 192, 3 heads, depth 2, 10
  classes (4 registers, LayerScale, q / v biases and no k bias, no absolute position
  embedding, the class token pooled as upstream DINOv3 does); its logits, and as
  logits_avg_pool those of timm's default pooling (global_pool="avg": the patches' mean).
- timm_dinov3_swiglu_tiny: timm vit_huge_plus_patch16_dinov3 at the same size (SwiGLU MLPs
  fc1_g / fc1_x, no qkv bias); its logits.
- hf_dinov3_tiny: transformers DINOv3ViTModel at the same size (4 registers, LayerScale, no key
  bias); its pooler_output (the class token after the final norm).
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
import transformers  # noqa: E402

SEED, INPUT_SEED, BATCH, ROWS, COLS = 0, 1, 2, 64, 48
WIDTH, HEADS, DEPTH, CLASSES = 192, 3, 2, 10


def write(stem: str, model: torch.nn.Module, out: np.ndarray, output: str, manifest: list,
          described: str, mlp_dim: int) -> None:
    meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=[ROWS, COLS], batch=BATCH,
                manifest=manifest, model=described, patch=16, width=WIDTH, depth=DEPTH,
                heads=HEADS, mlp_dim=mlp_dim, num_classes=CLASSES,
                versions=dict(torch=torch.__version__, timm=timm.__version__,
                              transformers=transformers.__version__))
    with open(f"tests/fixtures/{stem}.json", "w") as f:
        json.dump(meta, f)
    np.savez(f"tests/fixtures/{stem}.npz", **{output: out})
    print(stem, out.shape, float(np.abs(out).mean()), sorted(model.state_dict())[:4])


pixels = input_images(INPUT_SEED, BATCH, (ROWS, COLS))
for stem, name in (("timm_dinov3_tiny", "vit_small_patch16_dinov3_qkvb"),
                   ("timm_dinov3_swiglu_tiny", "vit_huge_plus_patch16_dinov3")):
    kwargs = dict(embed_dim=WIDTH, num_heads=HEADS, depth=DEPTH, img_size=(ROWS, COLS),
                  num_classes=CLASSES, global_pool="token")
    model = timm.create_model(name, **kwargs)
    manifest = load_random_weights(model, SEED)
    with torch.no_grad():
        out = model(pixels).numpy()
        model.global_pool = "avg"  # timm's default for DINOv3: the patches' mean, cls beside
        averaged = model(pixels).numpy()
    fc2 = model.state_dict()["blocks.0.mlp.fc2.weight"]
    write(stem, model, out, "logits_gelu_erf", manifest,
          f"timm {name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})", int(fc2.shape[1]))
    with np.load(f"tests/fixtures/{stem}.npz") as f:
        np.savez(f"tests/fixtures/{stem}.npz", **f, logits_avg_pool=averaged)

config = transformers.DINOv3ViTConfig(
    hidden_size=WIDTH, num_attention_heads=HEADS, num_hidden_layers=DEPTH,
    intermediate_size=4 * WIDTH, image_size=ROWS, patch_size=16, num_register_tokens=4,
    layerscale_value=1e-5)
model = transformers.DINOv3ViTModel(config)
manifest = load_random_weights(model, SEED)
with torch.no_grad():
    out = model(pixel_values=pixels).pooler_output.numpy()
write("hf_dinov3_tiny", model, out, "pooled_gelu_erf", manifest,
      f"transformers DINOv3ViTModel({config.to_diff_dict()})", 4 * WIDTH)
