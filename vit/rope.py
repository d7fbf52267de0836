"""Rotary position embeddings (RoPE) of the patch tokens' queries and keys, DINOv3's axial form.

`rope="dinov3"` (Siméoni et al., 2025; timm's `rope_type="dinov3"`, HF's `DINOv3ViTModel`):
each patch's centre is placed on [-1, 1] along each axis, (i + 0.5) / rows * 2 - 1 and likewise
for columns, so a grid of any size spans the same range and the model runs at any resolution
with nothing to resample. A head of `head_dim` channels rotates in head_dim / 2 planes:
head_dim / 4 frequencies for the row coordinate, then as many for the column one, with periods
base ** (2 j / (head_dim / 2)), base 100. The "rotate half" layout pairs channel c with channel
c + head_dim / 2: x * cos + rotate_half(x) * sin. The prefix tokens (class token, registers)
carry no position: their rows of the tables are cos 1, sin 0, which leaves them exactly as they
were.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ROPE_KINDS = ("none", "dinov3")
DINOV3_BASE = 100.0

Array = jax.Array


def check_head_dim(head_dim: int) -> None:
    """ValueError unless `head_dim` splits into the 2 axes x 2 (sin, cos) RoPE needs."""
    if head_dim % 4:
        raise ValueError(f"rope='dinov3' needs a head size (width / num_heads) divisible by 4, "
                         f"got {head_dim}: change width or num_heads, or set rope='none'")


def _centred_coords(grid: tuple[int, int]) -> np.ndarray:
    """[rows * cols, 2] float32 (row, col) patch centres on [-1, 1], row-major."""
    axes = [np.arange(0.5, n, dtype=np.float32) / np.float32(n) for n in grid]
    rows, cols = np.meshgrid(*axes, indexing="ij")
    coords = np.stack([rows, cols], axis=-1).reshape(-1, 2)
    return np.float32(2.0) * coords - np.float32(1.0)


def rope_tables(grid: tuple[int, int], head_dim: int, num_prefix: int = 0,
                base: float = DINOV3_BASE) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos), each [num_prefix + rows * cols, head_dim] float32, for the tokens of a
    `grid` of patches after `num_prefix` prefix tokens (sin 0, cos 1: not rotated)."""
    check_head_dim(head_dim)
    quarter = head_dim // 4
    periods = np.float32(base) ** (np.float32(2.0) * np.arange(quarter, dtype=np.float32)
                                   / np.float32(head_dim // 2))
    angles = np.float32(2 * np.pi) * _centred_coords(grid)[:, :, None] / periods
    angles = angles.reshape(angles.shape[0], -1)  # [tokens, rows' then cols' frequencies]
    angles = np.concatenate([angles, angles], axis=-1)  # the rotate-half layout
    sin = np.concatenate([np.zeros((num_prefix, head_dim), np.float32), np.sin(angles)])
    cos = np.concatenate([np.ones((num_prefix, head_dim), np.float32), np.cos(angles)])
    return sin.astype(np.float32), cos.astype(np.float32)


def rotate_half(x: Array) -> Array:
    """[x1, x2] -> [-x2, x1] over the last axis."""
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """x rotated by the tables, which broadcast against it (computed in float32, returned in
    x's dtype)."""
    y = x.astype(jnp.float32)
    return (y * cos + rotate_half(y) * sin).astype(x.dtype)


def kept_tables(tables: tuple[np.ndarray, np.ndarray], num_prefix: int, idx: Array
                ) -> tuple[Array, Array]:
    """The tables of the prefix tokens and of the patches at `idx` [B, keep] (PatchDropout's
    choice): each [B, num_prefix + keep, head_dim]."""

    def keep(table: np.ndarray) -> Array:
        table = jnp.asarray(table)
        patches = jnp.take(table[num_prefix:], idx, axis=0)
        prefix = jnp.broadcast_to(table[:num_prefix], (idx.shape[0], *table[:num_prefix].shape))
        return jnp.concatenate([prefix, patches], axis=1)

    return keep(tables[0]), keep(tables[1])
