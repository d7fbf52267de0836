"""Tiny random checkpoints for the export, convert, quantize and prune tests (seconds on a CPU).

Every parameter is perturbed with noise, so norms, biases and the (zero-initialised) head all
matter and a wrong mapping shows in the logits.
"""

from __future__ import annotations

import jax
import numpy as np
from PIL import Image

from vit import data
from vit.checkpoint import write_params
from vit.model import init_params, model_from_config
from vit.model_options import pair

SMALL = dict(variant="Ti/4", width=32, depth=2, num_heads=2, mlp_dim=64)
PLAIN = dict(SMALL, classifier="token", posemb="learn")
# The CIFAR-10 recipe's shape: conv stem with GroupNorm, GAP head, sin-cos posemb, PatchDropout.
RECIPE = dict(SMALL, stem="conv", stem_norm="groupnorm", classifier="gap", posemb="sincos2d",
              token_keep_ratio=0.5)


def write(workdir: str, model: dict, *, num_classes: int = 5,
          image_size: int | tuple[int, int] = 16, normalize: str = "cifar10", seed: int = 0,
          **config_overrides) -> tuple:
    """Save a random checkpoint of `model` (a config.model dict) of `image_size` (an int, or
    (rows, cols) for rectangular images); returns (model, params)."""
    config = data.default_config()
    config.dataset = "tiny"
    config.image_size = image_size
    config.pp.normalize = normalize
    config.model = dict(model)
    config.update(config_overrides)
    vit_model = model_from_config(dict(model), num_classes=num_classes, image_size=image_size)
    params = init_params(vit_model, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(x) + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
              for x in leaves]
    params = jax.tree_util.tree_unflatten(tree, leaves)
    names = tuple(f"c{i}" for i in range(num_classes))
    if config.dataset == "cifar10":
        names = data.dataset_info(config).class_names
    info = data.DatasetInfo(config.dataset, num_classes, names, (*pair(image_size), 3), {})
    write_params(workdir, 3, params, config.to_dict(), info.to_dict())
    return vit_model, params


def image_files(folder, count: int = 3) -> list[str]:
    """`count` PNG files of different sizes with random pixels; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20 + 5 * i, 16 + 3 * i, 3), np.uint8)).save(path)
        paths.append(str(path))
    return paths
