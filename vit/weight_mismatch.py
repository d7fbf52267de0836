"""Why weights do not fit a model: one WeightsError naming every offending parameter with both
shapes, and the model option that would make them fit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vit.weight_formats import POSEMB, WeightsError, mlp_widths


def swiglu_fix(src: Mapping[str, np.ndarray], model: Any) -> str | None:
    """The fix when the weights' MLPs are SwiGLU and the model's are not, or the other way."""
    first, second = (src.get(f"Transformer/encoderblock_0/MlpBlock_3/Dense_{i}/kernel")
                     for i in (0, 1))
    if first is None or second is None or first.ndim != 2 or second.ndim != 2:
        return None
    mlp_dim, theirs = mlp_widths(first, second)
    if theirs and not getattr(model, "swiglu", False):
        return (f"the weights have SwiGLU MLPs (DINOv2-g): build the model with swiglu=True and "
                f"mlp_dim={mlp_dim}")
    if not theirs and getattr(model, "swiglu", False):
        return "the weights have plain MLPs: build the model with swiglu=False"
    return None


def raise_if_unmapped(mismatched: list[str], missing: list[str], unexpected: list[str],
                       new_patch: bool, model_fix: str | None = None) -> None:
    parts = [f"{label}: {', '.join(items)}" for label, items in
             (("shape mismatch", mismatched), ("missing from the weights", missing),
              ("not in the model", unexpected)) if items]
    if not parts:
        return
    fix = "build the model with the weights' variant (width, depth, heads, mlp_dim, classifier)"
    if any("/LayerScale_" in name for name in unexpected):
        fix = "the weights have LayerScale: build the model with layer_scale set (e.g. 1e-5)"
    elif any("/LayerScale_" in name for name in missing):
        fix = ("the weights have no LayerScale, which the model has: build it with "
               "layer_scale=None")
    elif any(name.startswith("Transformer/pre_norm/") for name in unexpected):
        fix = "the weights have a pre-norm (CLIP's image tower): build the model with pre_norm=True"
    elif any(name.startswith("Transformer/pre_norm/") for name in missing):
        fix = "the weights have no pre-norm, which the model has: build it with pre_norm=False"
    elif any("/query_norm/" in name for name in unexpected):
        fix = "the weights have qk-norm: build the model with qk_norm=True"
    elif any("/query_norm/scale" in name for name in missing):
        fix = "the weights have no qk-norm, which the model has: build it with qk_norm=False"
    elif any(name.startswith("fc_norm/") for name in missing):
        fix = ("the weights have no fc_norm (their final LayerNorm comes before pooling): build "
               "the model with fc_norm=False")
    elif any("/hidden_norm/" in name for name in unexpected):
        fix = ("the weights have a LayerNorm in their MLPs (EVA-02): build the model with "
               "mlp_norm=True")
    elif any("/hidden_norm/" in name for name in missing):
        fix = "the weights have no LayerNorm in their MLPs: build the model with mlp_norm=False"
    elif model_fix:  # SwiGLU or key biases
        fix = model_fix
    elif any(name.startswith(POSEMB) for name in unexpected):
        fix = ("the weights have a learned position embedding: build the model with "
               "posemb='learn'")
    elif any(name.startswith("MAPHead_0/") for name in unexpected):
        fix = "the weights pool with a MAP head: build the model with classifier='map'"
    elif any(name.startswith(POSEMB) for name in missing):
        fix = ("the weights have no position embedding: build the model with posemb='none' "
               "(RoPE weights, DINOv3: and rope='dinov3') or posemb='sincos2d'")
    if new_patch:
        fix += (", or resize the patch kernel to the new patch size (resize_patch=True; "
                "training: --config.init_resize_patch=True)")
    raise WeightsError(f"weights do not fit the model: {'; '.join(parts)}; {fix}")
