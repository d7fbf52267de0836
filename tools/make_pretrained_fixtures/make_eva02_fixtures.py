"""Throwaway: reference outputs of timm's EVA-02 (RoPE beside a learned position embedding) for
the tests.

Never run by tests. Needs torch and timm, e.g.
    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 timm
Run from the repository root:
    /tmp/peer/bin/python tools/make_pretrained_fixtures/make_eva02_fixtures.py
Writes tests/fixtures/<stem>.{json,npz}, random weights from a manifest
(tests/fixtures/random_weights.py), on N(0, 1) images of 56x42 pixels (rows x cols) from the
input seed, 10 classes (GAP over the patches, then timm's fc_norm):
- timm_eva02_tiny: timm eva02_tiny_patch14_224 at width 192, 3 heads, depth 2 (a fused qkv with
  q / v biases, packed SwiGLU fc1, RoPE scaled to the 16x16 reference grid); its logits.
- timm_eva02_base_tiny: timm eva02_base_patch14_224 at the same size (q_proj / k_proj / v_proj,
  SwiGLU fc1_g / fc1_x with a LayerNorm on the hidden units, mlp.norm); its logits.
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

SEED, INPUT_SEED, BATCH, ROWS, COLS = 0, 1, 2, 56, 42
WIDTH, HEADS, DEPTH, CLASSES = 192, 3, 2, 10

pixels = input_images(INPUT_SEED, BATCH, (ROWS, COLS))
for stem, name in (("timm_eva02_tiny", "eva02_tiny_patch14_224"),
                   ("timm_eva02_base_tiny", "eva02_base_patch14_224")):
    kwargs = dict(embed_dim=WIDTH, num_heads=HEADS, depth=DEPTH, img_size=(ROWS, COLS),
                  num_classes=CLASSES)
    model = timm.create_model(name, **kwargs)
    manifest = load_random_weights(model, SEED)
    with torch.no_grad():
        out = model(pixels).numpy()
    fc2 = model.state_dict()["blocks.0.mlp.fc2.weight"]
    meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=[ROWS, COLS], batch=BATCH,
                manifest=manifest, patch=14, width=WIDTH, depth=DEPTH, heads=HEADS,
                mlp_dim=int(fc2.shape[1]), num_classes=CLASSES, rope_grid=[16, 16],
                model=f"timm {name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})",
                versions=dict(torch=torch.__version__, timm=timm.__version__))
    with open(f"tests/fixtures/{stem}.json", "w") as f:
        json.dump(meta, f)
    np.savez(f"tests/fixtures/{stem}.npz", logits_gelu_erf=out)
    print(stem, out.shape, float(np.abs(out).mean()), sorted(model.state_dict())[:8],
          meta["mlp_dim"])
