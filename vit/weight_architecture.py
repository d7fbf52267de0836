"""The architecture a weight file holds: a ViT's sizes and options from its arrays' shapes
and names (`infer_architecture`), and the patch grid it was trained on (`weight_grid`), from its
position embedding or, for RoPE weights, the image size a config.json beside it states.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vit.model_options import pair
from vit.rope import eva02_grid
from vit.weight_formats import POSEMB, Weights, WeightsError, mlp_widths


def _need(weights: Weights, key: str) -> np.ndarray:
    """weights[key]; WeightsError naming the missing array."""
    if key not in weights:
        raise WeightsError(f"the weights have no {key}, so the model cannot be inferred: the "
                           "file is incomplete or not a ViT of vit_jax / timm / HF layout")
    return weights[key]


def _attention_query(weights: Weights) -> np.ndarray | None:
    """The first attention's query kernel (block 0, else the MAP head's); None without one."""
    for attention in ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1",
                      "MAPHead_0/MultiHeadDotProductAttention_0"):
        if any(k.startswith(attention + "/") for k in weights):
            return _need(weights, attention + "/query/kernel")
    return None


def _heads(weights: Weights, width: int, num_heads: int | None) -> tuple[int, str | None]:
    """Heads from the per-head kernel shape [D, heads, head_dim] (or qk-norm's [head_dim]), else
    given, else guessed."""
    from vit.model import VARIANTS

    query = _attention_query(weights)
    qk_norm = weights.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
                          "query_norm/scale")
    known = (int(query.shape[1]) if query is not None and query.ndim == 3 else
             width // int(qk_norm.shape[-1]) if qk_norm is not None and qk_norm.ndim == 1
             else None)
    if known:
        if num_heads and num_heads != known:
            raise WeightsError(f"--num-heads {num_heads} contradicts the weights, whose "
                               f"attention holds {known} heads; drop --num-heads")
        return known, None
    if num_heads:
        return int(num_heads), None
    # timm / HF fuse or flatten the heads ([D, D]): the file cannot tell them apart. DINOv3's
    # heads are 64 wide (its 7B's 128), whatever their width.
    heads = next((v["num_heads"] for v in VARIANTS.values() if v["width"] == width),
                 width // 64 if width % 64 == 0 else None)
    if weights.rope == "dinov3" and width % 64 == 0:
        heads = 32 if width == 4096 else width // 64
    if query is None:  # no attention at all (depth 0): the heads change nothing
        return heads or 1, None
    if heads is None:
        raise WeightsError(f"cannot tell the number of heads of width-{width} weights; "
                           "pass --num-heads")
    return heads, (f"{heads} heads assumed for width {width} (head_dim {width // heads}); the "
                   "file does not say: pass --num-heads if that is wrong")


def _mlp_dim(weights: Weights, width: int, stated: int | None) -> tuple[int, bool]:
    """(the MLP's hidden size, SwiGLU?) from block 0 (else the MAP head's MLP), else stated, else
    4 x width (no MLP in the weights at all: it changes nothing); `mlp_widths` tells SwiGLU."""
    for mlp in ("Transformer/encoderblock_0/MlpBlock_3", "MAPHead_0/MlpBlock_0"):
        if any(k.startswith(mlp + "/") for k in weights):
            return mlp_widths(_need(weights, mlp + "/Dense_0/kernel"),
                              _need(weights, mlp + "/Dense_1/kernel"))
    return int(stated or 4 * width), False


def _patch_and_width(weights: Weights) -> tuple[int, int]:
    """(patch size, width) of a conv patch embedding [patch, patch, channels, width]."""
    kernel = weights["embedding/kernel"]
    if kernel.ndim != 4:
        raise WeightsError(f"embedding/kernel has shape {tuple(kernel.shape)}, not [patch, patch, "
                           "channels, width]: only convolutional patch embeddings can be converted")
    return int(kernel.shape[0]), int(kernel.shape[3])


LOADED_LAYER_SCALE = 1e-5  # the layer_scale a converted model with LayerScale is built with


def infer_architecture(weights: Weights, num_heads: int | None = None,
                       mlp_dim: int | None = None) -> tuple[str, dict, list[str]]:
    """(variant, create_model overrides, notes) that rebuild the model `weights` came from;
    `mlp_dim` is used only when the weights hold no MLP (depth 0)."""
    if "embedding/kernel" not in weights:
        raise WeightsError("the weights have no embedding/kernel, so the model cannot be "
                           "inferred; fine-tune from them with configs/finetune.py")
    if any(k.startswith(("stem/", "conv_root/")) for k in weights):
        raise WeightsError("conv-stem and hybrid weights do not tell their strides and norms: "
                           "convert a file written by `vit convert --to npz` (it has a "
                           "config.json), or fine-tune from them with configs/finetune.py")
    patch, width = _patch_and_width(weights)
    depth = len({k.split("/")[1] for k in weights if k.startswith("Transformer/encoderblock_")})
    heads, note = _heads(weights, width, num_heads)
    classifier = ("map" if any(k.startswith("MAPHead_0/") for k in weights) else
                  "gap" if "cls" in weights and "fc_norm/scale" in weights else
                  "token" if "cls" in weights else "gap")
    mlp_dim, swiglu = _mlp_dim(weights, width, mlp_dim)
    posemb = "learn" if POSEMB in weights else "none" if weights.rope != "none" else "sincos2d"
    overrides = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                     classifier=classifier, posemb=posemb)
    if weights.rope != "none":
        overrides["rope"] = weights.rope
    if weights.rope == "eva02":
        overrides["rope_grid"] = eva02_grid((patch, patch))
    if "cls" in weights and classifier != "token":
        overrides["class_token"] = True  # beside a GAP head (EVA-02) or a MAP head
    if "fc_norm/scale" in weights:
        overrides["fc_norm"] = True
    if any(k.endswith("/MlpBlock_3/hidden_norm/scale") for k in weights):
        overrides["mlp_norm"] = True
    if weights.rope == "dinov3" or "Transformer/pre_norm/scale" in weights:
        overrides["norm_epsilon"] = 1e-5  # DINOv3's and CLIP's LayerNorms (EVA-02's: 1e-6)
    attention = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
    if attention + "key/kernel" in weights and attention + "key/bias" not in weights:
        overrides["key_bias"] = False
    if swiglu:
        overrides["swiglu"] = True
    if "pre_logits/kernel" in weights:
        overrides["representation_size"] = int(weights["pre_logits/kernel"].shape[1])
    if "Transformer/pre_norm/scale" in weights:
        overrides["pre_norm"] = True
    if any(k.endswith("/query_norm/scale") for k in weights):
        overrides["qk_norm"] = True
    if "Transformer/registers" in weights:
        overrides["num_registers"] = int(weights["Transformer/registers"].shape[1])
    if any(k.endswith("/LayerScale_1/scale") for k in weights):
        overrides["layer_scale"] = LOADED_LAYER_SCALE  # on; the loaded scales replace it
    from vit.model import VARIANTS

    sizes = {k: overrides[k] for k in ("width", "depth", "mlp_dim", "num_heads")}
    name = next((name for name, v in VARIANTS.items() if v == sizes), "Ti")  # else overridden
    return f"{name}/{patch}", overrides, [note] if note else []


def weight_grid(weights: Weights, has_cls: bool, stated: Any, patch: int
          ) -> tuple[tuple[int, int], list[str]]:
    """(the patch grid of the learned position embedding, notes): the stated image size's
    where it holds the embedding's patch tokens, else the square its token count makes."""
    from vit.pretrained import square_grid

    if POSEMB not in weights and weights.rope != "none":
        return _rope_grid(stated, patch)
    if POSEMB not in weights:
        raise WeightsError("weights without a learned position embedding do not tell the image "
                           "size; fine-tune from them with configs/finetune.py instead")
    total = weights[POSEMB].shape[1]
    # With a class token: its own embedding first, else none (timm's no_embed_class, as DeiT III
    # and DINOv2-reg, and big_vision's "tok" pooling; HF ViT always has one).
    counts = [total] if not has_cls else [total - 1] + [total] * (weights.source != "hf")
    tokens = counts[0]
    squares = [grid for grid in map(square_grid, counts) if grid]
    side = squares[0][0] if squares else 0
    if stated is not None:
        sides = _stated_sides(stated)
        rows, cols = (s // patch for s in sides)
        if rows * cols in counts and not any(s % patch for s in sides):
            return (rows, cols), []
        if not squares:
            raise WeightsError(f"config.json beside the weights states image size {stated}, "
                               f"which {patch}-pixel patches do not cut into the position "
                               f"embedding's {tokens} patch tokens: fix its image size")
        return (side, side), [f"config.json states image size {stated}, which does not fit the "
                              f"position embedding's {side * side} patch tokens: taken as "
                              f"{side * patch}x{side * patch}, their square"]
    if not squares:
        raise WeightsError(f"the position embedding has {tokens} patch tokens, not a square "
                           "grid, and no config.json beside the weights states the image size: "
                           "add the one it was written with, or fine-tune from these weights "
                           "with configs/finetune.py")
    return (side, side), []


ROPE_DEFAULT_SIZE = 224  # a RoPE model's size when nothing states one (it runs at any)


def _stated_sides(stated: Any) -> tuple[int, int]:
    """The image size a config.json beside the weights states, as (rows, cols); WeightsError
    naming the file for anything else."""
    try:
        return pair(stated)
    except ValueError as err:
        raise WeightsError(f"config.json beside the weights: {err}") from None


def _rope_grid(stated: Any, patch: int) -> tuple[tuple[int, int], list[str]]:
    """(patch grid, notes) of RoPE weights, which hold no grid: the stated image size's, else
    that of ROPE_DEFAULT_SIZE."""
    if stated is None:
        side = ROPE_DEFAULT_SIZE // patch
        return (side, side), [f"image size {side * patch}x{side * patch} assumed: RoPE weights "
                              "run at any size and do not state one; pass --image-size for "
                              "another"]
    rows, cols = _stated_sides(stated)
    grid = (max(rows // patch, 1), max(cols // patch, 1))
    if grid != (rows / patch, cols / patch):
        return grid, [f"config.json states image size {rows}x{cols}, which {patch}-pixel "
                      f"patches do not divide: taken as {grid[0] * patch}x{grid[1] * patch}"]
    return grid, []
