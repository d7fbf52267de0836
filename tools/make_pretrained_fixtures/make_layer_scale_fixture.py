"""Throwaway: reference logits of a timm ViT with LayerScale for tests/test_pretrained.py.

Never run by tests. Needs torch and timm only (no transformers), e.g.
    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 timm
Run from the repository root:
    /tmp/peer/bin/python tools/make_pretrained_fixtures/make_layer_scale_fixture.py
Writes tests/fixtures/timm_vit_tiny_ls.{json,npz}: timm's vit_tiny_patch16_224 at depth 2 and
64 px with init_values (LayerScale: blocks.i.ls1.gamma, ls2.gamma), random weights from the
manifest (tests/fixtures/random_weights.py), the input seed and the erf-GELU logits.
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

SEED, INPUT_SEED, IMAGE, BATCH = 0, 1, 64, 2

model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=IMAGE, init_values=1e-5)
state = model.state_dict()
manifest = load_random_weights(model, SEED)
with torch.no_grad():
    logits = model(input_images(INPUT_SEED, BATCH, IMAGE)).numpy()
meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=IMAGE, batch=BATCH, manifest=manifest,
            versions=dict(torch=torch.__version__, timm=timm.__version__),
            model="timm vit_tiny_patch16_224(depth=2, img_size=64, init_values=1e-5)",
            patch=16, width=192, depth=2, heads=3, mlp_dim=768, num_classes=1000)
with open("tests/fixtures/timm_vit_tiny_ls.json", "w") as f:
    json.dump(meta, f)
np.savez("tests/fixtures/timm_vit_tiny_ls.npz", logits_gelu_erf=logits)
print("timm_vit_tiny_ls", logits.shape, float(np.abs(logits).mean()),
      [k for k in state if "ls" in k])
