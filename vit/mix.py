"""Label smoothing, mixup and cutmix on device, in JAX; called per device inside the train step.

Semantics follow timm's batch mode: every example is paired with the batch reversed, one
lambda ~ Beta(alpha, alpha) per batch, and cutmix's lambda is corrected to the pasted box area.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Integer labels [B] -> soft targets [B, num_classes]: one-hot * (1 - s) + s / C."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def box_mask(height: int, width: int, top: jax.Array, bottom: jax.Array, left: jax.Array,
             right: jax.Array) -> jax.Array:
    """Boolean [..., height, width]: rows [top, bottom) and columns [left, right) of each box,
    the bounds scalars or arrays of shape [...]."""
    edge = lambda v: jnp.asarray(v)[..., None, None]
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    return ((rows >= edge(top)) & (rows < edge(bottom))
            & (cols >= edge(left)) & (cols < edge(right)))


def _mixup(lam: jax.Array, images: jax.Array, targets: jax.Array):
    mixed = lam * images + (1.0 - lam) * images[::-1]
    return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * targets[::-1]


def _cutmix(rng: jax.Array, lam: jax.Array, images: jax.Array, targets: jax.Array):
    """Pastes a box of area ~(1 - lam) from the reversed batch; lambda = 1 - pasted area."""
    h, w = images.shape[1], images.shape[2]
    cut = jnp.sqrt(1.0 - lam)
    cy, cx = jax.random.uniform(rng, (2,)) * jnp.array([h, w])
    half_h, half_w = jnp.round(cut * h) / 2, jnp.round(cut * w) / 2
    top = jnp.clip(jnp.round(cy - half_h), 0, h)
    bottom = jnp.clip(jnp.round(cy + half_h), 0, h)
    left = jnp.clip(jnp.round(cx - half_w), 0, w)
    right = jnp.clip(jnp.round(cx + half_w), 0, w)
    box = box_mask(h, w, top, bottom, left, right)
    mixed = jnp.where(box[None, :, :, None], images[::-1], images)
    lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Mixes images [B, H, W, C] and soft targets [B, K]; identity when both alphas are 0.

    With both alphas > 0, cutmix is chosen with probability switch_prob, else mixup.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: use alphas >= 0")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return images, targets
    k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 4)
    if cutmix_alpha == 0:
        return _mixup(jax.random.beta(k_mix, mixup_alpha, mixup_alpha), images, targets)
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha)
    if mixup_alpha == 0:
        return _cutmix(k_box, lam_cut, images, targets)
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha)
    return jax.lax.cond(
        use_cutmix,
        lambda: _cutmix(k_box, lam_cut, images, targets),
        lambda: _mixup(lam_mix, images, targets),
    )
