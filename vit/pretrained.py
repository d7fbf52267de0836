"""Pretrained weights for fine-tuning: read any supported source and adapt it to a model.

Adaptation follows vit_jax / big_vision / FlexiViT: a new number of classes re-initialises the
head (zeros), a new image size or patch grid resamples the position embedding (the prefix
tokens' embeddings kept apart), and a new patch size can PI-resize the patch-embedding kernel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vit.error_text import first_names
from vit.rope import eva02_grid
from vit.weight_formats import (
    POSEMB,
    Weights,
    WeightsError,
    flatten_params,
    has_real_class_names,
    read_weights,
)
from vit.weight_mismatch import raise_if_unmapped, swiglu_fix

__all__ = ["Weights", "WeightsError", "adapt_params", "load_pretrained", "read_weights",
           "resample_posemb", "resize_patch_kernel"]

# "zoom": vit_jax's and big_vision's resample_posemb (scipy.ndimage.zoom, order 1: linear with
# the corner patches' embeddings kept, no antialiasing); the others: jax.image.resize's
# (half-pixel centres, antialiased when shrinking). "auto" (adapt_params) picks by the source.
RESAMPLE_METHODS = ("zoom", "bilinear", "bicubic", "nearest", "lanczos3")
EMBEDDING = "embedding/kernel"
# Parts of the weights a model may lack, dropped with a note; a learned position embedding or
# a MAP head the model lacks is an error (what the backbone learned would be replaced).
DROPPABLE = ("pre_logits/", "cls", "Transformer/registers")


def square_grid(tokens: int) -> tuple[int, int] | None:
    """(side, side) when `tokens` patch tokens make a square grid, else None."""
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens and side > 0 else None


def resample_posemb(
    posemb: np.ndarray, new_grid: tuple[int, int], *, num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None, method: str = "bilinear",
) -> np.ndarray:
    """Resample a [1, T, D] position embedding to `new_grid`; the prefix tokens are kept apart.

    `old_grid` defaults to the square grid of the T - num_prefix_tokens patch tokens.
    Returns [1, num_prefix_tokens + gh * gw, D]; resampling to the same grid returns a copy.
    """
    if method not in RESAMPLE_METHODS:
        raise WeightsError(f"unknown posemb resampling method {method!r}; use one of "
                           f"{', '.join(RESAMPLE_METHODS)} (or auto, for adapt_params)")
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise WeightsError(f"a position embedding is shaped [1, tokens, width], got {posemb.shape}")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    old_grid = old_grid or square_grid(grid.shape[0])
    if old_grid is None or old_grid[0] * old_grid[1] != grid.shape[0]:
        raise WeightsError(f"{grid.shape[0]} patch tokens of the position embedding do not form "
                           f"the grid {old_grid or 'of a square'}: pass old_grid=(rows, cols)")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return posemb.copy()
    width = grid.shape[-1]
    if method == "zoom":
        from scipy import ndimage

        factors = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1.0)
        resized = ndimage.zoom(grid.reshape(*old_grid, width).astype(np.float32), factors,
                               order=1)
    else:
        image = jnp.asarray(grid.reshape(*old_grid, width), jnp.float32)
        resized = jax.image.resize(image, (*new_grid, width), method=method)
    resized = np.asarray(resized, posemb.dtype).reshape(1, -1, width)
    return np.concatenate([prefix, resized], axis=1)


def _resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
    """The [new_h*new_w, old_h*old_w] matrix of bilinear resizing (no antialiasing) a patch."""
    basis = jnp.eye(old[0] * old[1], dtype=jnp.float32).reshape(-1, *old)
    resize = jax.vmap(lambda x: jax.image.resize(x, new, "bilinear", antialias=False))
    return np.asarray(resize(basis), np.float64).reshape(old[0] * old[1], -1).T


def resize_patch(patch: np.ndarray, new_patch: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize [..., h, w, C] patches (no antialiasing): the resize PI-resize inverts."""
    matrix = _resize_matrix(patch.shape[-3:-1], tuple(new_patch))
    flat = np.moveaxis(np.asarray(patch), -1, -3).reshape(*patch.shape[:-3], patch.shape[-1], -1)
    out = (flat @ matrix.T).reshape(*patch.shape[:-3], patch.shape[-1], *new_patch)
    return np.moveaxis(out, -3, -1).astype(patch.dtype)


def resize_patch_kernel(kernel: np.ndarray, new_patch: tuple[int, int]) -> np.ndarray:
    """FlexiViT's PI-resize of a [p, p, C, D] patch-embedding kernel to [new_p, new_p, C, D].

    The new kernel w' solves <resize(x), w'> = <x, w> in the least-squares sense (exactly when
    upsampling), with `resize_patch` as the resize; see Beyer et al., "FlexiViT", 2023.
    """
    kernel = np.asarray(kernel)
    old, new = tuple(kernel.shape[:2]), (int(new_patch[0]), int(new_patch[1]))
    if old == new:
        return kernel.copy()
    matrix = _resize_matrix(old, new)                  # [new_hw, old_hw]
    flat = kernel.reshape(old[0] * old[1], -1).astype(np.float64)
    resized = np.linalg.pinv(matrix.T) @ flat          # [new_hw, C * D]
    return resized.reshape(*new, *kernel.shape[2:]).astype(kernel.dtype)


# ---------------------------------------------------------------------------------------------
# adapt_params: loaded weights -> params shaped like the model's.


def _as_matrix_layout(name: str, value: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Split timm / HF attention matrices ([D, D] kernels, [D] biases) into the model's heads."""
    if ("MultiHeadDotProductAttention" in name and value.ndim < target.ndim
            and value.size == target.size):
        keep = -1 if name.endswith("out/kernel") else 0
        if value.ndim == 1 or value.shape[keep] == target.shape[keep]:
            return value.reshape(target.shape)
    return value


def _source_grid(value: np.ndarray, has_cls: bool, old_grid: tuple[int, int] | None
                 ) -> tuple[tuple[int, int], int]:
    """(patch grid, prefix tokens) of a loaded [1, T, D] position embedding: `old_grid` when
    known (this toolkit's checkpoints say it), else the square the token count makes."""
    tokens = value.shape[1]
    if old_grid is not None:
        old_grid = (int(old_grid[0]), int(old_grid[1]))
        prefix = tokens - old_grid[0] * old_grid[1]
        if prefix not in (0, 1):
            raise WeightsError(f"a position embedding of {tokens} tokens does not fit the patch "
                               f"grid {old_grid[0]}x{old_grid[1]} it was said to have (plus at "
                               "most a class token): pass the weights' own grid as old_grid")
        return old_grid, prefix
    prefix = 1 if has_cls else 0
    if square_grid(tokens - prefix) is None and square_grid(tokens):
        prefix = 0  # e.g. timm's no_embed_class models: the class token had no posemb
    grid = square_grid(tokens - prefix)
    if grid is None:
        raise WeightsError(f"cannot tell the patch grid of a position embedding of "
                           f"{tokens - prefix} patch tokens (not a square): pass "
                           "old_grid=(rows, cols) to adapt_params / load_pretrained")
    return grid, prefix


def _adapt_posemb(value: np.ndarray, target: np.ndarray, model: Any, has_cls: bool,
                  method: str, old_grid: tuple[int, int] | None) -> tuple[np.ndarray, list[str]]:
    """The loaded position embedding on the model's grid and prefix tokens, and notes."""
    prefix = int(getattr(model, "has_class_token",
                         getattr(model, "classifier", "token") == "token"))
    old, src_prefix = _source_grid(value, has_cls, old_grid)
    new_grid = tuple(model.grid)
    notes = []
    grid = resample_posemb(value, new_grid, num_prefix_tokens=src_prefix, old_grid=old,
                           method=method)
    if old != new_grid:
        notes.append(f"posemb resampled {old[0]}x{old[1]} -> {new_grid[0]}x{new_grid[1]} "
                     f"({method})")
        if old_grid is None and new_grid[0] != new_grid[1]:
            notes.append(f"posemb grid {old[0]}x{old[1]} assumed (the weights do not say): pass "
                         "old_grid=(rows, cols) if they were trained on another")
    grid = grid[:, src_prefix:]
    if prefix == src_prefix:
        head = value[:, :prefix]
    elif prefix == 0:
        head = value[:, :0]
        notes.append("class-token position embedding dropped (model has no class token)")
    else:
        head = np.zeros_like(target[:, :prefix])
        notes.append("class-token position embedding set to zeros (none in the weights" +
                     ("; they add none to their class token (timm's no_embed_class: DeiT III, "
                      "DINOv2-reg), so the outputs are theirs)" if has_cls else ")"))
    return np.concatenate([head, grid], axis=1), notes


def _head_notes(loaded: Mapping[str, np.ndarray], target: Mapping[str, Any]) -> str:
    new = target["head/kernel"].shape[-1]
    if "head/kernel" in loaded:
        return f"head re-initialised: {loaded['head/kernel'].shape[-1]} -> {new} classes"
    return f"head initialised: {new} classes (none in the weights)"


# Token parameters a model may add to weights without them; they start from their init.
_NEW_TOKENS = {"cls": "class token", "Transformer/registers": "register tokens"}


def posemb_resampling(method: str, loaded: Any) -> str:
    """`method`, or for "auto" the resampling the weights' own code base fine-tunes with: "zoom"
    for vit_jax / big_vision files (their resample_posemb), else "bilinear". A .npz this toolkit
    wrote (`vit convert --to npz`) has vit_jax's names but a config.json stating its grid."""
    if method != "auto":
        return method
    from_vit_jax = (getattr(loaded, "source", None) == "vit_jax"
                    and getattr(loaded, "grid", None) is None)
    return "zoom" if from_vit_jax else "bilinear"


def adapt_params(
    loaded: Mapping[str, Any], target: Mapping[str, Any], model: Any, *,
    keep_head: bool | None = None, keep_pre_logits: bool = True,
    posemb_method: str = "auto", resize_patch: bool = False,
    old_grid: tuple[int, int] | None = None, class_names: Sequence[str] | None = None,
    normalize: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Map `loaded` weights (flat or nested) onto `target`, the model's freshly initialised params.

    Returns params shaped like `target` and notes on what was adapted. `keep_head=None` keeps the
    head iff its shapes match and, where both name them, its classes are `class_names` (the
    run's; `loaded.class_names` the weights'), and a note says when the run's input
    `normalize` is not the one the weights learned on; `keep_pre_logits=False` re-initialises a
    pre-logits layer (build
    the model without representation_size to drop it). The position embedding is resampled
    unless its patch grid is `model.grid`: `old_grid`, else `loaded.grid` (this toolkit's
    checkpoints record it), else the square its token count makes. Raises WeightsError naming
    every parameter that cannot be adapted.
    """
    src = {k: np.asarray(v) for k, v in flatten_params(loaded).items()}
    tgt = flatten_params(target)
    _check_rope(getattr(loaded, "rope", "none"), getattr(loaded, "rope_grid", None), model)
    heads = getattr(loaded, "num_heads", None)
    if heads and getattr(model, "num_heads", heads) != heads:
        raise WeightsError(f"the weights' attention has {heads} heads (their config.json says "
                           f"so), the model {model.num_heads}: build the model with "
                           f"num_heads={heads}")
    notes = list(getattr(loaded, "notes", []))
    _norm_before_pooling(src, tgt, notes)
    out: dict[str, Any] = {}
    mismatched, missing = [], []
    free: set[str] = set()  # attention projections the weights hold without a bias
    new_patch = False  # the embedding differs in its patch size, which resize_patch adapts
    reinit = {"head/": keep_head is False, "pre_logits/": not keep_pre_logits}
    learned_on = getattr(loaded, "normalize", None)
    if learned_on and normalize and learned_on != normalize:
        notes.append(f"the weights learned on inputs normalised as {learned_on!r} and this run "
                     f"normalises as {normalize!r}: set pp.normalize={learned_on} to feed them "
                     "what they learned on")
    theirs = getattr(loaded, "class_names", None)
    other_classes = bool(theirs and class_names and tuple(theirs) != tuple(class_names)
                         and has_real_class_names(theirs) and has_real_class_names(class_names))
    if keep_head is None:
        reinit["head/"] = other_classes or any(
            k.startswith("head/") and (k not in src or src[k].shape != v.shape)
            for k, v in tgt.items())
    same_shape = "head/kernel" in src and src["head/kernel"].shape == tgt["head/kernel"].shape
    if "pre_logits/kernel" in tgt and "pre_logits/kernel" not in src:
        reinit["pre_logits/"] = True
    for group, on in reinit.items():
        if not on or not any(k.startswith(group) for k in tgt):
            continue
        if group == "pre_logits/":
            notes.append("pre_logits re-initialised")
        elif keep_head is None and other_classes and same_shape:
            notes.append(f"head re-initialised: the weights' classes ({first_names(theirs)}) "
                         f"are not this run's ({first_names(class_names)}); init_keep_head=True "
                         "keeps it")
        else:
            notes.append(_head_notes(src, tgt))

    for name, init in tgt.items():
        init = np.asarray(init)
        if any(on and name.startswith(group) for group, on in reinit.items()):
            out[name] = init
            continue
        if name not in src:
            if name in _NEW_TOKENS:
                out[name] = init
                notes.append(f"{_NEW_TOKENS[name]} initialised (none in the weights)")
            elif _bias_free_projection(name, src):
                out[name] = np.zeros_like(init)
                free.add(name.split("/")[-2])
            else:
                missing.append(f"{name} {init.shape}")
            continue
        value = _as_matrix_layout(name, src[name], init)
        if name == POSEMB and value.ndim == 3:  # the grid, not the shape: 8x8 != 4x16
            value, posemb_notes = _adapt_posemb(value, init, model, "cls" in src,
                                                posemb_resampling(posemb_method, loaded),
                                                old_grid or getattr(loaded, "grid", None))
            notes.extend(posemb_notes)
        if (name == EMBEDDING and resize_patch and value.shape[2:] == init.shape[2:]
                and value.shape[:2] != init.shape[:2]):
            notes.append(f"patch embedding resized {value.shape[0]}x{value.shape[1]} -> "
                         f"{init.shape[0]}x{init.shape[1]} (PI-resize)")
            value = resize_patch_kernel(value, init.shape[:2])
        if value.shape != init.shape:
            mismatched.append(f"{name} weights {src[name].shape} vs model {init.shape}")
            new_patch = new_patch or (name == EMBEDDING and value.shape[:2] != init.shape[:2])
            continue
        if value.dtype != init.dtype and f"cast {value.dtype}" not in " ".join(notes):
            notes.append(f"weights cast {value.dtype} -> {init.dtype}")
        out[name] = value.astype(init.dtype)

    if free:
        which = "/".join(n for n in ("query", "key", "value") if n in free)
        notes.append(f"the attention's {which} projections have no bias in the weights "
                     "(DINOv3, EVA-02): zeros loaded")
    unexpected = []
    for name in sorted(set(src) - set(tgt)):
        if name.endswith("/key/bias") and not np.any(src[name]):
            if "zero key biases dropped (the model has none: key_bias=False)" not in notes:
                notes.append("zero key biases dropped (the model has none: key_bias=False)")
        elif name.startswith(DROPPABLE):
            group = name if name in _NEW_TOKENS else name.split("/")[0]
            if f"{group} dropped (not in the model)" not in notes:
                notes.append(f"{group} dropped (not in the model)")
        else:
            unexpected.append(f"{name} {src[name].shape}")
    keyed = not getattr(model, "key_bias", True) and any("/key/bias " in n for n in unexpected)
    raise_if_unmapped(mismatched, missing, unexpected, new_patch,
                      "the weights have key biases: build the model with key_bias=True"
                      if keyed else swiglu_fix(src, model))
    return traverse_util.unflatten_dict(out, sep="/"), notes


def _norm_before_pooling(src: dict[str, np.ndarray], tgt: Mapping[str, Any],
                         notes: list[str]) -> None:
    """Weights whose final LayerNorm follows the pooling (fc_norm) going to a model whose norm
    precedes it (encoder_norm): loaded there, with a note (in place)."""
    norm = "Transformer/encoder_norm/"
    if "fc_norm/scale" in src and "fc_norm/scale" not in tgt and norm + "scale" in tgt \
            and norm + "scale" not in src:
        for leaf in ("scale", "bias"):
            src[norm + leaf] = src.pop(f"fc_norm/{leaf}")
        notes.append("fc_norm (LayerNorm after pooling) loaded as encoder_norm (before "
                     "pooling): outputs differ from the weights' model until fine-tuned; build "
                     "the model with fc_norm=True for theirs")


def _bias_free_projection(name: str, src: Mapping[str, np.ndarray]) -> bool:
    """Whether `name` is the bias of a query / key / value projection whose kernel the weights
    hold without it (DINOv3's keys, or all three)."""
    return (name.endswith(("/query/bias", "/key/bias", "/value/bias"))
            and name.removesuffix("bias") + "kernel" in src)


def _check_rope(theirs: str, their_grid: tuple[int, int] | None, model: Any) -> None:
    """WeightsError when weights trained with rotary embeddings go to a model without them (it
    would be blind to where each patch is), with another kind, or (EVA-02's form) with its
    coordinates scaled to another grid than `their_grid` (unknown: the model must state one)."""
    ours = getattr(model, "rope", "none")
    wanted = their_grid or eva02_grid(getattr(model, "patch_size", (14, 14)))
    grid = f"rope_grid={tuple(wanted)}"
    if theirs != "none" and ours != theirs:
        also = " and posemb='none'" if theirs == "dinov3" else f" and {grid}"
        raise WeightsError(f"the weights were trained with rope={theirs!r} (rotary position "
                           f"embeddings), which the model lacks: build it with rope={theirs!r}"
                           f"{also}")
    if theirs != "eva02":
        return
    stated = getattr(model, "rope_grid", None)
    if their_grid is None and stated is None:
        raise WeightsError(f"EVA-02's weights scale their RoPE coordinates to the grid of its 224 "
                           f"px pretraining, and the model has no rope_grid: build it with {grid}")
    scaled_to = tuple(stated or model.grid)  # rope_grid None: the model's own patch grid
    if their_grid is not None and scaled_to != tuple(their_grid):
        raise WeightsError(f"the weights scale their RoPE coordinates to a {their_grid[0]}x"
                           f"{their_grid[1]} grid, the model to {scaled_to[0]}x{scaled_to[1]}: "
                           f"build it with {grid}")


def load_pretrained(
    path: str | os.PathLike[str], model: Any, target_params: Mapping[str, Any], *,
    use_ema: bool = False, **adapt_kwargs: Any,
) -> tuple[dict[str, Any], list[str]]:
    """Read weights from `path` (any supported source) and adapt them to `model`'s params."""
    weights = read_weights(path, use_ema=use_ema)
    params, notes = adapt_params(weights, target_params, model, **adapt_kwargs)
    return params, [f"read {weights.source} weights from {os.fspath(path)}", *notes]
