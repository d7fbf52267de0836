"""Stems: how images become tokens before the transformer.

- `"patchify"`: one conv with kernel = stride = patch size (the ViT paper), named `embedding`.
- `"conv"`: "Early Convolutions Help Transformers See Better" (Xiao et al., 2021): a stack of
  3x3 convolutions, each followed by a norm (LayerNorm over channels, or GroupNorm; no
  BatchNorm) and ReLU, then a 1x1 projection to the width named `embedding`. By default the
  last log2(patch) convolutions have stride 2 and any earlier ones stride 1; `strides` places
  them anywhere (their product must be the patch size), so the patch size still fixes the
  token grid. Parameters: `stem/conv_{i}/kernel`, `stem/norm_{i}/{scale,bias}`,
  `embedding/{kernel,bias}`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STEMS = ("patchify", "conv")
STEM_NORMS = ("layernorm", "groupnorm")

Dtype = Any


def stride_two_convs(patch_size: tuple[int, int]) -> int:
    """How many stride-2 convolutions make a square power-of-two patch; ValueError otherwise."""
    p = patch_size[0]
    if patch_size[0] != patch_size[1] or p < 2 or p & (p - 1):
        raise ValueError(f"stem='conv' needs a square power-of-two patch size >= 2, got "
                         f"{patch_size[0]}x{patch_size[1]}: use a patch of 2, 4, 8, 16 or 32, "
                         "or stem='patchify'")
    return int(math.log2(p))


def conv_strides(num_convs: int, patch_size: tuple[int, int],
                 strides: Sequence[int] | None = None) -> tuple[int, ...]:
    """Each conv's stride: `strides` checked, or stride 1 first and 2 for the last log2(patch)."""
    n_down = stride_two_convs(patch_size)
    if strides is None:
        if num_convs < n_down:
            raise ValueError(f"stem_channels has {num_convs} convolutions; a {patch_size[0]}x"
                             f"{patch_size[0]} patch needs at least {n_down} (one per stride-2 "
                             "step)")
        return (1,) * (num_convs - n_down) + (2,) * n_down
    strides = tuple(int(s) for s in strides)
    if len(strides) != num_convs or set(strides) - {1, 2} or math.prod(strides) != patch_size[0]:
        raise ValueError(f"stem_strides {strides} must give each of the {num_convs} stem "
                         f"convolutions a stride of 1 or 2, multiplying to the patch size "
                         f"{patch_size[0]}")
    return strides


def default_stem_channels(width: int, patch_size: tuple[int, int]) -> tuple[int, ...]:
    """Xiao et al.'s channels: one stride-2 conv per halving, doubling up to `width`."""
    n = stride_two_convs(patch_size)
    return tuple(max(width // 2 ** (n - 1 - i), 8) for i in range(n))


class ConvStem(nn.Module):
    """3x3 convs (norm, ReLU) down to the patch grid, then a 1x1 projection to `width`."""

    width: int
    patch_size: tuple[int, int]
    channels: Sequence[int] | None = None
    strides: Sequence[int] | None = None
    norm: str = "layernorm"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        channels = (default_stem_channels(self.width, self.patch_size) if self.channels is None
                    else tuple(self.channels))
        strides = conv_strides(len(channels), self.patch_size, self.strides)
        x = images.astype(self.dtype)
        for i, (c, stride) in enumerate(zip(channels, strides, strict=True)):
            x = nn.Conv(c, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                        use_bias=False, dtype=self.dtype, name=f"conv_{i}")(x)
            if self.norm == "layernorm":
                x = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x)
            else:
                x = nn.GroupNorm(num_groups=math.gcd(32, c), dtype=self.dtype, name=f"norm_{i}")(x)
            x = nn.relu(x)
        return x
