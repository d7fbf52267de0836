"""The ResNet-v2 trunk of the ViT paper's hybrids ("R50+B/16", "R26+S/32", "R50+L/32", ...).

A hybrid runs this trunk first and patchifies its feature map (`embedding`, kernel = the
model's patch size / the trunk's stride, 1x1 for the published hybrids). As in vit_jax's
`models_vit.py` / `models_resnet.py`, the trunk is a ResNet-v2 *without* pre-activation:
weight-standardised convolutions (StdConv) each followed by GroupNorm (32 groups) and ReLU.

    conv_root (7x7, stride 2) -> gn_root -> relu -> max-pool 3x3, stride 2, SAME
    block{i}/unit{j}: conv1 1x1 -> gn1 -> relu -> conv2 3x3 (stride 2 in unit1 of block2+)
                      -> gn2 -> relu -> conv3 1x1 -> gn3 (scale zero-initialised)
                      + shortcut (conv_proj 1x1 -> gn_proj where the shape changes) -> relu

Stage i (block{i+1}) has bottleneck width `width * 2**i` and `4 * width * 2**i` outputs; the
trunk's stride is 4 with no stages, then 4 * 2**(stages - 1). Its parameters sit at the top
level of the model's params, beside `embedding`, `cls` and `Transformer`, under the public
vit_jax checkpoints' names (`conv_root/kernel`, `gn_root/{scale,bias}`,
`block{i}/unit{j}/{conv1,conv2,conv3,conv_proj}/kernel`, `.../{gn1,gn2,gn3,gn_proj}/{scale,bias}`),
so their .npz files (e.g. R50+ViT-B_16.npz) load without renaming.

Numerics (`numerics`, the model's `resnet_numerics`): the two reference implementations differ
in their epsilons. "vit_jax" standardises a kernel as (w - mean) / (std + 1e-5) and uses
GroupNorm eps 1e-6 (flax's default), as the public .npz files were trained; "timm" standardises
as (w - mean) / sqrt(var + 1e-8) and uses GroupNorm eps 1e-5, as timm's `vit_*_r*_s*` models
(StdConv2dSame(eps=1e-8), GroupNormAct) compute. Both use TF "SAME" padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

NUMERICS = ("vit_jax", "timm")
GROUPS = 32
# (ResNet depth, overall stride) -> units per stage. Stride 16 uses three stages, with the last
# stage's units folded into the third (the ViT paper's R50: 3 + 4 + 9 units, as 3 + 4 + 6 + 3).
HYBRID_LAYERS: dict[tuple[int, int], tuple[int, ...]] = {
    (26, 32): (2, 2, 2, 2),     # vit_jax R26+ViT-{S,B}_32, timm vit_*_r26_s32
    (50, 16): (3, 4, 9),        # vit_jax R50+ViT-B_16, timm vit_base_r50_s16
    (50, 32): (3, 4, 6, 3),     # vit_jax R50+ViT-L_32, timm vit_large_r50_s32
}
HYBRID_FORMS = tuple(f"R{d}+<size>/{s}" for d, s in HYBRID_LAYERS)

# Per numerics: weight-standardisation eps, whether it adds to the std (vit_jax) or to the
# variance under the square root (timm), and the GroupNorm eps.
_EPS = {"vit_jax": (1e-5, False, 1e-6), "timm": (1e-8, True, 1e-5)}


def hybrid_layers(resnet: str, stride: int) -> tuple[int, ...] | None:
    """Units per stage of the "R<depth>" trunk of a hybrid of overall stride `stride`, or None."""
    depth = resnet.removeprefix("R")
    return HYBRID_LAYERS.get((int(depth), stride)) if depth.isdigit() else None


def hybrid_error(variant: str) -> ValueError:
    """The one-line error for a bad hybrid variant string; it names the valid forms."""
    return ValueError(
        f"unknown hybrid ViT variant {variant!r}: use 'R<depth>+<size>/<stride>', one of "
        f"{', '.join(HYBRID_FORMS)}, with size Ti, S, M, B, L, H, g or G, e.g. 'R50+B/16', "
        "'R26+S/32', 'R50+L/32'; or a plain variant with resnet_layers=(units per stage, ...)")


def trunk_stride(layers: Sequence[int]) -> int:
    """The trunk's total stride: 4 from the root (conv and pool), x2 per stage after the first."""
    return 4 * 2 ** max(len(layers) - 1, 0)


def embedding_kernel(layers: Sequence[int], width: int, patch_size: tuple[int, int]
                     ) -> tuple[int, int]:
    """Check a trunk's options; return the patch embedding's kernel on its feature map."""
    if any(int(u) < 1 for u in layers):
        raise ValueError(f"resnet_layers {tuple(layers)} must count at least one unit per stage, "
                         "e.g. (3, 4, 9)")
    if width < GROUPS or width % GROUPS:
        raise ValueError(f"resnet_width must be a positive multiple of {GROUPS} (GroupNorm uses "
                         f"{GROUPS} groups), got {width}")
    stride = trunk_stride(layers)
    if patch_size[0] % stride or patch_size[1] % stride:
        raise ValueError(
            f"patch size {patch_size[0]}x{patch_size[1]} is not a multiple of the ResNet trunk's "
            f"stride {stride} ({len(layers)} stages): for a hybrid the patch size is the token "
            f"stride; use a multiple of {stride}, or fewer stages in resnet_layers")
    return (patch_size[0] // stride, patch_size[1] // stride)


def standardize(kernel: Array, numerics: str = "vit_jax") -> Array:
    """Weight standardisation of an HWIO kernel over (H, W, I), per output channel."""
    eps, under_root, _ = _EPS[numerics]
    kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = jnp.mean(jnp.square(kernel), axis=(0, 1, 2), keepdims=True)
    return kernel / (jnp.sqrt(var + eps) if under_root else jnp.sqrt(var) + eps)


class StdConv(nn.Module):
    """A bias-free convolution with weight standardisation and TF "SAME" padding."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    numerics: str = "vit_jax"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        kernel = standardize(kernel.astype(jnp.float32), self.numerics)
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), self.strides, "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _group_norm(name: str, numerics: str, dtype: Dtype, zero_scale: bool = False) -> nn.GroupNorm:
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.GroupNorm(num_groups=GROUPS, epsilon=_EPS[numerics][2], dtype=dtype,
                        scale_init=scale_init, name=name)


class ResidualUnit(nn.Module):
    """A bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1, each conv with GroupNorm; no pre-act."""

    features: int
    strides: tuple[int, int] = (1, 1)
    numerics: str = "vit_jax"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out = 4 * self.features
        conv = lambda n, k, s, name: StdConv(n, k, s, self.numerics, self.dtype, name=name)
        norm = lambda name, zero=False: _group_norm(name, self.numerics, self.dtype, zero)
        residual = x
        if x.shape[-1] != out or self.strides != (1, 1):
            residual = norm("gn_proj")(conv(out, (1, 1), self.strides, "conv_proj")(x))
        y = nn.relu(norm("gn1")(conv(self.features, (1, 1), (1, 1), "conv1")(x)))
        y = nn.relu(norm("gn2")(conv(self.features, (3, 3), self.strides, "conv2")(y)))
        y = norm("gn3", zero=True)(conv(out, (1, 1), (1, 1), "conv3")(y))
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """`units` residual units; the first one strides (and projects the shortcut)."""

    units: int
    features: int
    first_stride: tuple[int, int]
    numerics: str = "vit_jax"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.units):
            stride = self.first_stride if j == 0 else (1, 1)
            x = ResidualUnit(self.features, stride, self.numerics, self.dtype,
                             name=f"unit{j + 1}")(x)
        return x


def resnet_trunk(x: Array, layers: Sequence[int], width: int = 64, numerics: str = "vit_jax",
                 dtype: Dtype = jnp.float32) -> Array:
    """Run the trunk on images [B, H, W, C] -> features [B, H / stride, W / stride, channels].

    Call it inside a compact method (VisionTransformer's): its layers become the caller's
    children, so their parameters sit at the caller's top level under vit_jax's names.
    """
    x = StdConv(width, (7, 7), (2, 2), numerics, dtype, name="conv_root")(x)
    x = nn.relu(_group_norm("gn_root", numerics, dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, units in enumerate(layers):
        stride = (1, 1) if i == 0 else (2, 2)
        x = ResNetStage(int(units), width * 2 ** i, stride, numerics, dtype,
                        name=f"block{i + 1}")(x)
    return x
