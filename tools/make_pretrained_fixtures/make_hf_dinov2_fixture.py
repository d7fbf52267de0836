"""Throwaway: reference features of HuggingFace transformers' DINOv2 (with registers, and with
SwiGLU MLPs as DINOv2-g) for the tests.

Never run by tests. Needs torch and transformers, e.g.
    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 timm transformers
Run from the repository root:
    /tmp/peer/bin/python tools/make_pretrained_fixtures/make_hf_dinov2_fixture.py
Writes tests/fixtures/hf_dinov2_reg_tiny.{json,npz}: Dinov2WithRegistersModel (the naming of
facebook/dinov2-with-registers-*) at width 192, depth 2, 3 heads, 4 registers, 56 px with 14 px
patches, random weights from the manifest (tests/fixtures/random_weights.py; the LayerScale
vectors random too), in the names transformers 5 holds in memory and the names its files use,
the input seed and the pooled output (the final LayerNorm's class token); and
tests/fixtures/hf_dinov2_swiglu_tiny.{json,npz}: Dinov2Model with use_swiglu_ffn=True (as
facebook/dinov2-giant) at the same size without registers, in the names transformers 5 holds in
memory (mlp.gate_proj / up_proj / down_proj; its files hold mlp.weights_in, the two stacked, and
mlp.weights_out), and its pooled output.
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
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

SEED, INPUT_SEED, IMAGE, BATCH = 0, 1, 56, 2
# The names of the same modules in the files transformers writes (its save_pretrained).
FILE_NAMES = {"attention.q_proj": "attention.attention.query",
              "attention.k_proj": "attention.attention.key",
              "attention.v_proj": "attention.attention.value",
              "attention.o_proj": "attention.output.dense"}

config = Dinov2WithRegistersConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                                   image_size=IMAGE, patch_size=14, num_register_tokens=4)
model = Dinov2WithRegistersModel(config)
state = model.state_dict()
manifest = load_random_weights(model, SEED)
with torch.no_grad():
    pooled = model(input_images(INPUT_SEED, BATCH, IMAGE)).pooler_output
file_names = []
for name in state:
    for memory, file in FILE_NAMES.items():
        name = name.replace(memory, file)
    file_names.append(name)
meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=IMAGE, batch=BATCH, manifest=manifest,
            file_names=file_names,
            versions=dict(torch=torch.__version__, transformers=transformers.__version__),
            model="transformers Dinov2WithRegistersModel(hidden_size=192, num_hidden_layers=2, "
                  "num_attention_heads=3, image_size=56, patch_size=14, num_register_tokens=4)",
            patch=14, width=192, depth=2, heads=3, mlp_dim=768)
with open("tests/fixtures/hf_dinov2_reg_tiny.json", "w") as f:
    json.dump(meta, f)
np.savez("tests/fixtures/hf_dinov2_reg_tiny.npz", features_gelu_erf=pooled.numpy())
print("hf_dinov2_reg_tiny", pooled.shape, float(pooled.abs().mean()), file_names[:8])

config = Dinov2Config(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                      image_size=IMAGE, patch_size=14, use_swiglu_ffn=True)
model = Dinov2Model(config)
manifest = load_random_weights(model, SEED)
with torch.no_grad():
    pooled = model(input_images(INPUT_SEED, BATCH, IMAGE)).pooler_output
meta = dict(seed=SEED, input_seed=INPUT_SEED, image_size=IMAGE, batch=BATCH, manifest=manifest,
            versions=dict(torch=torch.__version__, transformers=transformers.__version__),
            model="transformers Dinov2Model(hidden_size=192, num_hidden_layers=2, "
                  "num_attention_heads=3, image_size=56, patch_size=14, use_swiglu_ffn=True)",
            patch=14, width=192, depth=2, heads=3,
            mlp_dim=int(model.state_dict()["encoder.layer.0.mlp.down_proj.weight"].shape[1]))
with open("tests/fixtures/hf_dinov2_swiglu_tiny.json", "w") as f:
    json.dump(meta, f)
np.savez("tests/fixtures/hf_dinov2_swiglu_tiny.npz", features_swiglu=pooled.numpy())
print("hf_dinov2_swiglu_tiny", pooled.shape, float(pooled.abs().mean()), meta["mlp_dim"])
