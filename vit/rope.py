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

`rope="eva02"` (Fang et al., 2023; timm's `rope_type="cat"`): patch (i, j) sits at its index,
scaled to a reference grid (`rope_grid`, the pretraining grid: 16 x 16 for EVA-02's 224 px,
14 px patches) as i * ref_rows / rows; head_dim / 4 frequencies per axis, 10000 ** (-j /
(head_dim / 4)), rows' then columns', and interleaved pairs: channel 2c turns with 2c + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ROPE_KINDS = ("none", "dinov3", "eva02")
DINOV3_BASE = 100.0
EVA02_BASE = 10_000.0
EVA02_PRETRAINING_SIZE = 224  # EVA-02's coordinates are scaled to this size's patch grid

Array = jax.Array


def check_head_dim(head_dim: int, kind: str = "dinov3") -> None:
    """ValueError unless `head_dim` splits into the 2 axes x 2 (sin, cos) RoPE needs."""
    if head_dim % 4:
        raise ValueError(f"rope={kind!r} needs a head size (width / num_heads) divisible by 4, "
                         f"got {head_dim}: change width or num_heads, or set rope='none'")


def eva02_grid(patch_size: tuple[int, int]) -> tuple[int, int]:
    """EVA-02's reference grid (`rope_grid`) for patches of `patch_size`: that of its 224 px
    pretraining, (16, 16) for 14 px patches."""
    return (EVA02_PRETRAINING_SIZE // patch_size[0], EVA02_PRETRAINING_SIZE // patch_size[1])


def _points(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """[len(rows) * len(cols), 2] (row, col) coordinates of a grid, row-major."""
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)


def _centred_coords(grid: tuple[int, int]) -> np.ndarray:
    """[rows * cols, 2] float32 (row, col) patch centres on [-1, 1], row-major."""
    axes = [np.arange(0.5, n, dtype=np.float32) / np.float32(n) for n in grid]
    return np.float32(2.0) * _points(*axes) - np.float32(1.0)


def _index_coords(grid: tuple[int, int], ref_grid: tuple[int, int] | None) -> np.ndarray:
    """[rows * cols, 2] float32 (row, col) patch indices, scaled to `ref_grid` if given."""
    axes = [np.arange(n, dtype=np.float32) for n in grid]
    if ref_grid is not None:
        axes = [a / np.float32(n) * np.float32(r) for a, n, r in zip(axes, grid, ref_grid,
                                                                       strict=True)]
    return _points(*axes)


def _angles(kind: str, grid: tuple[int, int], head_dim: int,
            ref_grid: tuple[int, int] | None) -> np.ndarray:
    """[rows * cols, head_dim] float32 rotation angles in `kind`'s channel layout."""
    quarter = head_dim // 4
    if kind == "dinov3":
        periods = np.float32(DINOV3_BASE) ** (np.float32(2.0) * np.arange(quarter, dtype=np.float32)
                                              / np.float32(head_dim // 2))
        angles = np.float32(2 * np.pi) * _centred_coords(grid)[:, :, None] / periods
    else:  # eva02
        bands = np.float32(1.0) / np.float32(EVA02_BASE) ** (
            np.arange(quarter, dtype=np.float32) / np.float32(quarter))
        angles = _index_coords(grid, ref_grid)[:, :, None] * bands
    angles = angles.reshape(angles.shape[0], -1)  # [tokens, rows' then cols' frequencies]
    if kind == "dinov3":
        return np.concatenate([angles, angles], axis=-1)  # rotate half: c with c + d / 2
    return np.repeat(angles, 2, axis=-1)  # interleaved: 2c with 2c + 1


def rope_tables(grid: tuple[int, int], head_dim: int, num_prefix: int = 0,
                kind: str = "dinov3", ref_grid: tuple[int, int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos), each [num_prefix + rows * cols, head_dim] float32, of `kind` ("dinov3" or
    "eva02", whose coordinates `ref_grid` scales) for the tokens of a `grid` of patches after
    `num_prefix` prefix tokens (sin 0, cos 1: not rotated)."""
    check_head_dim(head_dim, kind)
    if kind not in ROPE_KINDS[1:]:
        raise ValueError(f"unknown rope {kind!r}; use one of {ROPE_KINDS[1:]}")
    angles = _angles(kind, grid, head_dim, ref_grid)
    sin = np.concatenate([np.zeros((num_prefix, head_dim), np.float32), np.sin(angles)])
    cos = np.concatenate([np.ones((num_prefix, head_dim), np.float32), np.cos(angles)])
    return sin.astype(np.float32), cos.astype(np.float32)


def rotate_half(x: Array) -> Array:
    """[x1, x2] -> [-x2, x1] over the last axis (DINOv3's pairs)."""
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def rotate_pairs(x: Array) -> Array:
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] over the last axis (EVA-02's pairs)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


ROTATIONS = {"dinov3": rotate_half, "eva02": rotate_pairs}


def apply_rope(x: Array, sin: Array, cos: Array, kind: str = "dinov3") -> Array:
    """x rotated by `kind`'s tables, which broadcast against it (computed in float32, returned
    in x's dtype)."""
    y = x.astype(jnp.float32)
    return (y * cos + ROTATIONS[kind](y) * sin).astype(x.dtype)


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
