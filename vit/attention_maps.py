"""Attention maps and attention rollout for a Vision Transformer.

Weights come from `VisionTransformer(..., return_attention=True)` as [depth, B, heads, T, T],
where T = prefix tokens (1 class token for classifier="token" or class_token=True, then the
model's register tokens) + patches. A "map" here is a distribution over the patch grid that sums
to 1: what the class token attends to (classifier="token"), or the average over the patch tokens
for models whose head pools them. Register tokens take part in the rollout's flow but never
appear in a map.

Rollout follows Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers": average
the heads, add the identity for the residual path (A_hat = 0.5 A + 0.5 I, rows renormalised) and
multiply through the layers, R = A_hat_L ... A_hat_1.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from vit.model import VisionTransformer

# Image and overlay PNGs are upscaled by an integer factor until their short side reaches this.
MIN_DISPLAY_SIDE = 224
# Each panel of the per-layer grid, in inches at LAYER_GRID_DPI (the title sits above the map).
PANEL_INCHES = (2.0, 2.2)
LAYER_GRID_DPI = 100


def prefix_token_count(model: VisionTransformer) -> int:
    """Tokens before the patches: the class token (if any) and the registers."""
    return int(model.has_class_token) + model.num_registers


def token_layout(model: VisionTransformer) -> dict[str, int | bool]:
    """`rollout` / `layer_maps` keywords for `model`: its prefix token count and whether the
    first of them is a class token (`rollout(w, **token_layout(model))`)."""
    return {"num_prefix_tokens": prefix_token_count(model),
            "class_token": model.classifier == "token"}  # the row the head reads


@functools.lru_cache(maxsize=4)
def _attention_fn(model: VisionTransformer) -> Callable[[object, jax.Array], jax.Array]:
    """The jitted map (params, images) -> stacked attention weights, compiled once per model."""
    return jax.jit(lambda p, x: model.apply({"params": p}, x, return_attention=True)[1])


def attention_weights(
    model: VisionTransformer, params: object, images: np.ndarray, *, batch_size: int = 32
) -> np.ndarray:
    """Attention probabilities of every layer and head, [depth, B, heads, T, T] float32.

    `images` are preprocessed float images [B, H, W, C], as the model was trained on.
    """
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"attention maps need a vit.VisionTransformer, got "
                         f"{type(model).__name__}; build the model with vit.create_model")
    images = np.asarray(images)
    if images.ndim != 4 or not len(images) or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be a non-empty float batch [B, H, W, C], got dtype "
                         f"{images.dtype} and shape {images.shape}; preprocess them first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    apply = _attention_fn(model)
    chunks = [np.asarray(apply(params, jnp.asarray(images[i:i + batch_size])))
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks, axis=1).astype(np.float32)


def _check_weights(weights: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 5 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"attention weights must be [depth, B, heads, T, T], got shape "
                         f"{weights.shape}; pass the output of attention_weights()")
    if not 0 <= num_prefix_tokens < weights.shape[-1]:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} does not fit "
                         f"{weights.shape[-1]} tokens; use token_layout(model)")
    return weights


def _check_index(name: str, value: int | None, size: int) -> None:
    if value is not None and size == 0:
        raise ValueError(f"{name}={value} is out of range; the model has no {name}s (depth 0): "
                         f"leave {name} unset")
    if value is not None and not 0 <= value < size:
        raise ValueError(f"{name}={value} is out of range; the model has {size} {name}s "
                         f"(0 to {size - 1})")


def _select_heads(weights: np.ndarray, head: int | None) -> np.ndarray:
    """[depth, B, heads, T, T] -> [depth, B, T, T]: one head, or the mean over heads."""
    _check_index("head", head, weights.shape[2])
    return weights.mean(axis=2) if head is None else weights[:, :, head]


def _query(num_tokens: int, num_prefix_tokens: int, class_token: bool | None) -> np.ndarray:
    """Whose attention a map shows: the class token, or every patch token equally."""
    if class_token is None and num_prefix_tokens:
        raise ValueError(f"with {num_prefix_tokens} prefix tokens, say whether the first is a "
                         "class token: class_token=True (classifier 'token') or False (gap / "
                         "map with registers); token_layout(model) gives both keywords")
    if class_token:
        return np.eye(num_tokens)[0]
    query = np.zeros(num_tokens)
    query[num_prefix_tokens:] = 1.0 / (num_tokens - num_prefix_tokens)
    return query


def _patch_distribution(rows: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
    """Drop the prefix-token columns and renormalise the rest to sum to 1 (uniform if all 0)."""
    patches = rows[..., num_prefix_tokens:]
    total = patches.sum(axis=-1, keepdims=True)
    uniform = np.full_like(patches, 1.0 / patches.shape[-1])
    return np.where(total > 0, patches / np.where(total > 0, total, 1.0), uniform).astype(
        np.float32)


def rollout(
    weights: np.ndarray, *, num_prefix_tokens: int, head: int | None = None,
    class_token: bool | None = None,
) -> np.ndarray:
    """Attention rollout over all layers, [B, patches]; each map sums to 1.

    Uses the mean over heads, or only `head`. Read from the class token (`class_token=True`),
    else averaged over the patch tokens; with prefix tokens `class_token` must be given
    (`**token_layout(model)` gives both keywords). Zero layers (depth 0) roll out to the query's
    own row: uniform over the patches.
    """
    weights = _check_weights(weights, num_prefix_tokens)
    attn = _select_heads(weights, head)
    attn = 0.5 * attn + 0.5 * np.eye(attn.shape[-1])
    attn /= attn.sum(axis=-1, keepdims=True)
    # The query row of A_hat_L ... A_hat_1, built from the last layer down as row-vector products.
    flow = np.broadcast_to(_query(attn.shape[-1], num_prefix_tokens, class_token),
                           attn.shape[1:3])
    for layer_attn in attn[::-1]:
        flow = np.einsum("bi,bij->bj", flow, layer_attn)
    return _patch_distribution(flow, num_prefix_tokens)


def layer_maps(
    weights: np.ndarray, *, num_prefix_tokens: int, layer: int | None = None,
    head: int | None = None, class_token: bool | None = None,
) -> np.ndarray:
    """Per-layer attention maps, [depth (or 1 with `layer`), B, patches]; each sums to 1
    (depth 0: an empty [0, B, patches] array).

    The class token's attention row (or the mean row without a class token) of the mean over
    heads, or of one `head`.
    """
    weights = _check_weights(weights, num_prefix_tokens)
    _check_index("layer", layer, weights.shape[0])
    attn = _select_heads(weights, head)
    if layer is not None:
        attn = attn[layer:layer + 1]
    rows = np.einsum("i,lbij->lbj", _query(attn.shape[-1], num_prefix_tokens, class_token),
                     attn)
    return _patch_distribution(rows, num_prefix_tokens)


def to_grid(maps: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Reshape maps [..., gh * gw] to the patch grid [..., gh, gw]."""
    gh, gw = grid
    maps = np.asarray(maps)
    if maps.shape[-1] != gh * gw:
        raise ValueError(f"maps have {maps.shape[-1]} patches but grid {gh}x{gw} has "
                         f"{gh * gw}; pass the model's grid (model.grid)")
    return maps.reshape(*maps.shape[:-1], gh, gw)


def upsample(
    maps_grid: np.ndarray, image_hw: Sequence[int], method: str = "bilinear"
) -> np.ndarray:
    """Resize maps [..., gh, gw] to [..., H, W] for display (values are not renormalised)."""
    maps_grid = np.asarray(maps_grid, np.float32)
    shape = (*maps_grid.shape[:-2], int(image_hw[0]), int(image_hw[1]))
    return np.asarray(jax.image.resize(maps_grid, shape, method=method))


def overlay(image_uint8: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5,
            cmap: str = "inferno") -> np.ndarray:
    """Blend a heat map [H, W] (min-max scaled, coloured) over an image [H, W, 3] -> uint8."""
    span = heat.max() - heat.min()
    scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colour = colormaps[cmap](scaled)[..., :3] * 255.0
    return ((1.0 - alpha) * image_uint8 + alpha * colour).round().astype(np.uint8)


def display_scale(image_hw: Sequence[int]) -> int:
    """The integer upscale that brings an image's short side to at least MIN_DISPLAY_SIDE."""
    return max(1, math.ceil(MIN_DISPLAY_SIDE / min(image_hw)))


def _save_png(path: str, pixels: np.ndarray) -> None:
    """Write an [H, W, 3] uint8 array as a PNG of exactly H x W pixels."""
    matplotlib.image.imsave(path, pixels)


def _save_layer_grid(path: str, image: np.ndarray, heats: np.ndarray, titles: list[str]) -> None:
    """Write one overlay panel per layer on a grid of ceil(sqrt(n)) columns."""
    cols = math.ceil(math.sqrt(len(heats)))
    rows = math.ceil(len(heats) / cols)
    fig = Figure(figsize=(cols * PANEL_INCHES[0], rows * PANEL_INCHES[1]), dpi=LAYER_GRID_DPI,
                 layout="constrained")
    for i, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_axis_off()
        if i < len(heats):
            ax.imshow(overlay(image, heats[i]))
            ax.set_title(titles[i], fontsize=9)
    fig.savefig(path, dpi=LAYER_GRID_DPI)


def write_attention_outputs(
    image_uint8: np.ndarray, weights_for_image: np.ndarray, out_dir: str, stem: str, *,
    grid: Sequence[int], num_prefix_tokens: int, layer: int | None = None,
    head: int | None = None, scale: int | None = None, class_token: bool | None = None,
) -> list[str]:
    """Write one image's PNGs (image, rollout overlay, per-layer grid) and .npy maps.

    `weights_for_image` is [depth, heads, T, T]. `layer`/`head` select what the per-layer grid
    shows; rollout always averages the heads. `scale` upscales the image and rollout PNGs
    (default: display_scale). Returns the paths written.
    """
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image_uint8 must be a uint8 RGB image [H, W, 3], got dtype "
                         f"{image.dtype} and shape {image.shape}")
    weights = np.asarray(weights_for_image)[:, None]
    if weights.ndim != 5:
        raise ValueError(f"weights_for_image must be [depth, heads, T, T], got shape "
                         f"{np.shape(weights_for_image)}; index one image: weights[:, i]")
    if not len(weights):
        raise ValueError("the model has no encoder blocks (depth 0), so no attention to draw: "
                         "use a checkpoint of a model with depth >= 1")
    roll = to_grid(rollout(weights, num_prefix_tokens=num_prefix_tokens,
                           class_token=class_token)[0], grid)
    layers = to_grid(layer_maps(weights, num_prefix_tokens=num_prefix_tokens, layer=layer,
                                head=head, class_token=class_token)[:, 0], grid)
    k = display_scale(image.shape[:2]) if scale is None else scale
    if k < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    big = np.repeat(np.repeat(image, k, axis=0), k, axis=1)

    os.makedirs(out_dir, exist_ok=True)
    path = lambda suffix: os.path.join(out_dir, f"{stem}_{suffix}")
    _save_png(path("image.png"), big)
    _save_png(path("rollout.png"), overlay(big, upsample(roll, big.shape[:2])))
    depth_ids = range(len(layers)) if layer is None else [layer]
    head_name = "mean of heads" if head is None else f"head {head}"
    _save_layer_grid(path("layers.png"), image, upsample(layers, image.shape[:2]),
                     [f"layer {i}, {head_name}" for i in depth_ids])
    np.save(path("attention.npy"), np.asarray(weights_for_image, np.float32))
    np.save(path("rollout.npy"), roll)
    np.save(path("layers.npy"), layers)
    return [path(s) for s in ("image.png", "rollout.png", "layers.png", "attention.npy",
                              "rollout.npy", "layers.npy")]


def write_attention_batch(
    model: VisionTransformer, params: object, images: np.ndarray, images_uint8: np.ndarray,
    out_dir: str, stems: Sequence[str], *, layer: int | None = None, head: int | None = None,
) -> list[str]:
    """Compute attention for a batch and write every image's outputs; returns all paths.

    `images` are the model's preprocessed inputs, `images_uint8` the same pictures for display.
    """
    if not len(images) == len(images_uint8) == len(stems):
        raise ValueError(f"got {len(images)} images, {len(images_uint8)} display images and "
                         f"{len(stems)} stems; pass one of each per image")
    weights = attention_weights(model, params, images)
    paths = []
    for i, stem in enumerate(stems):
        paths += write_attention_outputs(
            images_uint8[i], weights[:, i], out_dir, stem, grid=model.grid,
            layer=layer, head=head, **token_layout(model))
    return paths
