"""Random erasing (Zhong et al. 2020) on device, per image, as timm's `RandomErasing` with
`--reprob P --remode pixel` (DeiT's recipe: P = 0.25) does it.

With probability `prob` each image of the batch gets one box filled with per-pixel N(0, 1)
noise, on the normalised image (where 0 is the mean pixel). The box has an area of
`area_min`..`area_max` of the image, uniform, and an aspect ratio (height / width) log-uniform in
[aspect_min, 1 / aspect_min]; of `ATTEMPTS` such boxes the first that fits inside the image is
taken, and an image with none that fits is left whole, as timm's ten tries do. Called inside
the train step before mixup / cutmix (timm erases in its per-image transform, before it mixes
the batch).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vit.mix import box_mask

ATTEMPTS = 10
AREA = (0.02, 1 / 3)  # timm's RandomErasing defaults
ASPECT_MIN = 0.3


def check_prob(prob: float) -> float:
    """`prob` as a float if it is in [0, 1], else a one-line ValueError naming the key."""
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"config.random_erase={prob} must be a probability in [0, 1] (0 = off; "
                         "DeiT uses 0.25)")
    return float(prob)


def erase_boxes(rng: jax.Array, batch: int, height: int, width: int, prob: float
                ) -> jax.Array:
    """Boolean [batch, height, width]: the pixels each image has erased (none for an image
    that draws no erasing or no box that fits)."""
    k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(rng, 5)
    area = height * width * jax.random.uniform(k_area, (batch, ATTEMPTS), minval=AREA[0],
                                               maxval=AREA[1])
    log_aspect = math.log(ASPECT_MIN)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (batch, ATTEMPTS), minval=log_aspect,
                                        maxval=-log_aspect))
    box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (box_h < height) & (box_w < width)
    first = jnp.argmax(fits, axis=1)[:, None]  # the first attempt that fits (0 if none does)
    box_h = jnp.take_along_axis(box_h, first, axis=1)[:, 0]
    box_w = jnp.take_along_axis(box_w, first, axis=1)[:, 0]
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - box_h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - box_w + 1)).astype(jnp.int32)
    erase = (jax.random.uniform(k_apply, (batch,)) < prob) & jnp.any(fits, axis=1)
    inside = box_mask(height, width, top, top + box_h, left, left + box_w)
    return inside & erase[:, None, None]


def random_erase(rng: jax.Array, images: jax.Array, prob: float) -> jax.Array:
    """Normalised images [B, H, W, C] with a random box of each image, with probability
    `prob`, replaced by N(0, 1) noise; the images themselves when `prob` is 0."""
    if check_prob(prob) == 0.0:
        return images
    k_box, k_noise = jax.random.split(rng)
    batch, height, width, _ = images.shape
    boxes = erase_boxes(k_box, batch, height, width, prob)
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    return jnp.where(boxes[..., None], noise, images)
