"""Throwaway: reference logits of the original vit_jax model for tests/test_pretrained.py.

Never run by tests. Needs google-research/vision_transformer's vit_jax/models_vit.py (not part
of this repository) importable, e.g. as /tmp/vit_jax_ref/vit_jax/models_vit.py with a stub
models_resnet.py beside it, and jax + flax + ml_collections (the project's venv has them).
Run from the repository root:
    PYTHONPATH=/tmp/vit_jax_ref .venv/bin/python \
        tools/make_pretrained_fixtures/make_vit_jax_fixture.py
Writes tests/fixtures/vit_jax_ti.{json,npz}: the manifest of random weights in vit_jax's naming
(see tests/fixtures/random_weights.py), the input seed and the logits, for token and gap heads.
"""

import json
import sys

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from vit_jax import models_vit

sys.path.insert(0, "tests/fixtures")
import random_weights  # noqa: E402

SEED, INPUT_SEED, IMAGE, BATCH = 0, 1, 64, 2
meta, outputs = {}, {}
for classifier, representation in (("token", None), ("gap", 32)):
    model = models_vit.VisionTransformer(
        num_classes=10, patches=ml_collections.ConfigDict({"size": (16, 16)}), hidden_size=192,
        transformer=dict(num_layers=2, mlp_dim=768, num_heads=3, dropout_rate=0.0,
                         attention_dropout_rate=0.0),
        representation_size=representation, classifier=classifier)
    images = np.random.RandomState(INPUT_SEED).standard_normal((BATCH, IMAGE, IMAGE, 3))
    images = images.astype(np.float32)
    init = model.init(jax.random.PRNGKey(0), images, train=False)["params"]
    flat = traverse_util.flatten_dict(init, sep="/")
    manifest = [random_weights.recipe(k, v.shape) for k, v in flat.items()]
    weights = random_weights.build(manifest, SEED)
    params = traverse_util.unflatten_dict(weights, sep="/")
    outputs[f"logits_{classifier}"] = np.asarray(model.apply({"params": params}, images,
                                                             train=False))
    meta[classifier] = dict(manifest=manifest, representation_size=representation)
    print(classifier, float(np.abs(outputs[f"logits_{classifier}"]).mean()))
meta.update(seed=SEED, input_seed=INPUT_SEED, image_size=IMAGE, batch=BATCH, patch=16,
            width=192, depth=2, heads=3, mlp_dim=768, num_classes=10,
            model="vit_jax models_vit.VisionTransformer (Ti/16, depth 2, 64px)")
with open("tests/fixtures/vit_jax_ti.json", "w") as f:
    json.dump(meta, f)
np.savez("tests/fixtures/vit_jax_ti.npz", **outputs)
