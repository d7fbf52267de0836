"""vit_jax's and big_vision's own layouts of a flat state dict read as this toolkit's: a
`params/` prefix, two-tower files (SigLIP, LiT), scanned blocks, old flax GroupNorm shapes and
the per-type layer names of newer flax."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from vit.weight_dict import POSEMB, Weights, WeightsError

# Newer flax numbers auto-named modules per type, so vit_jax's code run today (and big_vision)
# names a block's layers LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0.
_PER_TYPE_NAMES = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                   "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
_BIG_VISION_NAMES = {"pos_embedding": POSEMB}


def _from_per_type_names(state: Mapping[str, np.ndarray]) -> Weights:
    out, renamed = {}, False
    for key, value in state.items():
        parts = key.split("/")
        if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = _PER_TYPE_NAMES.get(parts[2], parts[2])
        new = _BIG_VISION_NAMES.get(key, "/".join(parts))
        renamed |= new != key
        out[new] = value
    note = "per-type layer names (flax >= 0.4 / big_vision) mapped to vit_jax's"
    return Weights(out, "vit_jax", [note] if renamed else [])


def from_jax_layouts(state: Mapping[str, np.ndarray]) -> Weights:
    """A vit_jax / big_vision state dict in this toolkit's names: the `params/` prefix, a
    two-tower file's image tower, scanned blocks, old GroupNorm shapes and per-type layer names
    undone, each with a note."""
    if any(k.startswith("params/") for k in state):
        state = {k.removeprefix("params/"): v for k, v in state.items() if k.startswith("params/")}
    notes = []
    if "img/embedding/kernel" in state:  # big_vision's two-tower models (SigLIP, LiT)
        text = [k for k in state if not k.startswith("img/")]
        state = {k.removeprefix("img/"): v for k, v in state.items() if k.startswith("img/")}
        if text:
            notes.append(f"the text tower ({len(text)} arrays: txt/..., t, b) dropped: the image "
                         "tower (img/) loads")
    if any(k.startswith("Transformer/encoderblock/") for k in state):
        state = _unscanned(state)
        notes.append("scanned encoder blocks (Transformer/encoderblock/..., big_vision's "
                     "scan=True) split into encoderblock_{i}")
    state, squeezed = _squeezed_group_norms(state)
    if squeezed:
        notes.append(f"{squeezed} GroupNorm scales / biases of shape [1, 1, 1, C] (flax < 0.3.6's "
                     "layout, as in the public hybrid .npz files) read as [C]")
    weights = _from_per_type_names(state)
    weights.notes[:0] = notes
    return weights


_GROUP_NORM = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")


def _squeezed_group_norms(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The ResNet trunk's GroupNorm parameters as [C] where an old flax saved them [1, 1, 1, C]
    (vit_jax's own loader squeezes them the same way); and how many were."""
    out, count = {}, 0
    for key, value in state.items():
        if _GROUP_NORM.search(key) and np.ndim(value) == 4 and np.shape(value)[:3] == (1, 1, 1):
            value, count = np.reshape(value, -1), count + 1
        out[key] = value
    return out, count


def _unscanned(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scan=True layout, every block's arrays stacked on a leading axis, as one
    Transformer/encoderblock_{i}/... per block."""
    scanned = "Transformer/encoderblock/"
    flat = [k for k, v in state.items() if k.startswith(scanned) and not np.ndim(v)]
    if flat:
        raise WeightsError(f"{flat[0]} is a scalar, not stacked over the layers as big_vision's "
                           "scanned blocks are: the file is damaged or not a ViT")
    depths = {int(np.shape(v)[0]) for k, v in state.items() if k.startswith(scanned)}
    if len(depths) != 1:
        raise WeightsError(f"scanned encoder blocks ({scanned}...) of different depths "
                           f"{sorted(depths)}: the file is damaged or not one model")
    out = {k: v for k, v in state.items() if not k.startswith(scanned)}
    for key, value in state.items():
        if key.startswith(scanned):
            for i, layer in enumerate(np.asarray(value)):
                out[f"Transformer/encoderblock_{i}/{key.removeprefix(scanned)}"] = layer
    return out
