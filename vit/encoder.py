"""The transformer encoder of a ViT: blocks, position embeddings, token dropping, MAP head.

Module names match the public vit_jax checkpoints (`Transformer/encoderblock_{i}/...`); the
whole model around them is `vit/model.py`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit import fused_gelu, int8, matmul
from vit.attention import MultiHeadDotProductAttention
from vit.fused_layer_norm import layer_norm
from vit.rope import kept_tables, rope_tables

Dtype = Any
Array = jax.Array

# Activation rematerialisation of each encoder block in the backward pass ("none": keep all).
# "block" keeps only each block's input and recomputes the rest; "dots" also keeps the outputs of
# matmuls without batch dimensions (the dense layers, XLA's dots or the BLAS's, named
# matmul.BLAS_OUTPUT), recomputing norms, GELU and attention.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(matmul.BLAS_OUTPUT)),
}


def _swiglu(x: Array) -> Array:
    gate, value = jnp.split(x, 2, axis=-1)
    return nn.silu(gate) * value


# The MLP's nonlinearity, from the model's options (VisionTransformer.mlp_activation): tanh GELU
# (vit_jax, big_vision), exact erf GELU (timm, HF), OpenAI CLIP's x * sigmoid(1.702 x), and
# SwiGLU (DINOv2-g), which gates one half of the first layer's 2 x mlp_dim outputs by the other.
MLP_ACTIVATIONS: dict[str, Any] = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "swiglu": _swiglu,
}
GATED_ACTIVATIONS = ("swiglu",)  # their first layer is twice mlp_dim wide

_xavier = nn.initializers.xavier_uniform()
_bias_init = nn.initializers.normal(stddev=1e-6)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of shape [1, h * w, width] (MoCo v3 / big_vision)."""
    if width % 4 or width < 8:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4 and >= 8, "
                         f"got {width}")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe[None].astype(np.float32)


class MlpBlock(nn.Module):
    """Transformer MLP: Dense -> GELU (a key of MLP_ACTIVATIONS) -> dropout -> Dense -> dropout.

    A gated activation (SwiGLU) takes a first layer of 2 x mlp_dim outputs: [gate | value]."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"
    quant: str = "none"  # | "int8": int8 kernels (vit/int8.py)
    matmul_dtype: str = "float32"  # | "bfloat16": operands of the two matmuls (vit/matmul.py)
    hidden_norm: bool = False  # a LayerNorm over the hidden units before Dense_1 (EVA-02's sub-LN)
    norm_epsilon: float = 1e-6
    matmul_impl: str = "xla"  # | "blas": who computes the matmuls (vit/matmul.py)
    elementwise_impl: str = "xla"  # | "fused": LayerNorms and GELU by custom calls (elementwise.py)

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        width = x.shape[-1]
        dense = lambda n, name: dense_layer(n, self.dtype, self.quant, name, self.matmul_dtype,
                                            matmul_impl=self.matmul_impl, kernel_init=_xavier,
                                            bias_init=_bias_init)
        hidden = self.mlp_dim * (2 if self.activation in GATED_ACTIVATIONS else 1)
        if fused_gelu.fuses(self.activation, self.dtype, self.elementwise_impl, self.quant):
            x = fused_gelu.bias_gelu(*UnbiasedDense(hidden, self.dtype, self.matmul_dtype,
                                                    self.matmul_impl, name="Dense_0")(x))
        else:
            x = MLP_ACTIVATIONS[self.activation](dense(hidden, "Dense_0")(x))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        if self.hidden_norm:
            x = layer_norm(self.norm_epsilon, self.dtype, self.elementwise_impl, "hidden_norm")(x)
        x = dense(width, "Dense_1")(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class UnbiasedDense(nn.Module):
    """nn.Dense's parameters (`kernel`, `bias`, as MlpBlock initialises them) and its product
    without the bias, returned beside it for the caller to add (`fused_gelu.bias_gelu`)."""

    features: int
    dtype: Dtype = jnp.float32
    matmul_dtype: str = "float32"
    matmul_impl: str = "xla"

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        kernel = self.param("kernel", _xavier, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", _bias_init, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return matmul.matmul(x, kernel, self.matmul_dtype, self.dtype, self.matmul_impl), bias


def dense_layer(features: int, dtype: Dtype, quant: str, name: str,
                matmul_dtype: str = "float32", *, matmul_impl: str = "xla",
                **inits: Any) -> nn.Module:
    """nn.Dense with `matmul_dtype` operands computed by `matmul_impl`, or for quant="int8" its
    int8 counterpart (same name, int8 kernel + scale)."""
    if quant == "int8":
        return int8.Int8Dense(features, dtype, name=name)
    return nn.Dense(features, dtype=dtype, name=name,
                    dot_general=matmul.dense_dot_general(matmul_dtype, matmul_impl), **inits)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example with probability `rate`."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        if self.rate == 0.0 or deterministic:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class LayerScale(nn.Module):
    """CaiT's LayerScale (timm's `init_values`): a learned per-channel scale of a residual
    branch, starting at `init_value`."""

    init_value: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * scale.astype(x.dtype)


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)); with
    `layer_scale`, each branch is scaled per channel first (LayerScale_1, LayerScale_3)."""

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"  # the MLP's, a key of MLP_ACTIVATIONS
    attention_impl: str = "explicit"
    quant: str = "none"
    matmul_dtype: str = "float32"
    layer_scale: float | None = None  # LayerScale's initial value; None: no LayerScale
    qk_norm: bool = False
    key_bias: bool = True
    norm_epsilon: float = 1e-6  # every LayerNorm's
    rope: str = "none"  # the kind of the RoPE tables the call may pass (vit/rope.py)
    mlp_norm: bool = False  # EVA-02's sub-LN in the MLP
    matmul_impl: str = "xla"  # | "blas" (vit/matmul.py)
    elementwise_impl: str = "xla"  # | "fused": LayerNorms and GELU by custom calls (elementwise.py)

    @nn.compact
    def __call__(
        self, x: Array, mask: Array | None = None, deterministic: bool = True,
        return_weights: bool = False, rope: tuple[Array, Array] | None = None,
    ) -> tuple[Array, Array | None]:
        # Positional flags: nn.remat (REMAT_POLICIES) marks them static by position.
        y = layer_norm(self.norm_epsilon, self.dtype, self.elementwise_impl, "LayerNorm_0")(x)
        y, weights = MultiHeadDotProductAttention(
            self.num_heads, self.attention_dropout_rate, self.dtype, self.attention_impl,
            self.quant, matmul_dtype=self.matmul_dtype, qk_norm=self.qk_norm,
            key_bias=self.key_bias, norm_epsilon=self.norm_epsilon,
            rope=self.rope, matmul_impl=self.matmul_impl, name="MultiHeadDotProductAttention_1",
        )(y, mask=mask, deterministic=deterministic, return_weights=return_weights, rope=rope)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        if self.layer_scale is not None:
            y = LayerScale(self.layer_scale, name="LayerScale_1")(y)
        x = x + DropPath(self.drop_path_rate)(y, deterministic=deterministic)
        y = layer_norm(self.norm_epsilon, self.dtype, self.elementwise_impl, "LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.activation,
                     self.quant, self.matmul_dtype, self.mlp_norm, self.norm_epsilon,
                     self.matmul_impl, self.elementwise_impl, name="MlpBlock_3")(
            y, deterministic=deterministic)
        if self.layer_scale is not None:
            y = LayerScale(self.layer_scale, name="LayerScale_3")(y)
        return x + DropPath(self.drop_path_rate)(y, deterministic=deterministic), weights


def random_keep_indices(rng: Array, batch: int, num_patches: int, keep_ratio: float) -> Array:
    """PatchDropout's choice: [batch, keep] sorted indices of the patches each image keeps."""
    keep = max(1, int(round(num_patches * keep_ratio)))
    scores = jax.random.uniform(rng, (batch, num_patches))
    return jnp.sort(jax.lax.top_k(scores, keep)[1], axis=1)


def keep_random_tokens(x: Array, num_prefix: int, keep_ratio: float, rng: Array) -> Array:
    """PatchDropout: keep the prefix tokens and a random `keep_ratio` of each image's patches.

    The kept patches stay in their original order; at least one is always kept.
    """
    idx = random_keep_indices(rng, x.shape[0], x.shape[1] - num_prefix, keep_ratio)
    return _keep_patches(x, num_prefix, idx)


def _keep_patches(x: Array, num_prefix: int, idx: Array) -> Array:
    """The prefix tokens of x [B, T, D] followed by the patches at `idx` [B, keep]."""
    kept = jnp.take_along_axis(x[:, num_prefix:], idx[:, :, None], axis=1)
    return jnp.concatenate([x[:, :num_prefix], kept], axis=1)


def static_tokens(x: Array, start: int, stop: int | None = None) -> Array:
    """x[:, start:stop] as a static slice: exports with a symbolic batch need no gather."""
    return jax.lax.slice_in_dim(x, start, stop, axis=1)


class LearnedPositionEmbedding(nn.Module):
    """A learned position embedding of shape [1, tokens, width], initialised N(0, 0.02)."""

    @nn.compact
    def __call__(self, shape: tuple[int, int]) -> Array:
        return self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, *shape))


class Encoder(nn.Module):
    """Position embedding (learned, sin-cos or none; RoPE in the attention with `rope`), the stack
    of encoder blocks (after an optional LayerNorm, `pre_norm`) and the final LayerNorm."""

    depth: int
    mlp_dim: int
    num_heads: int
    posemb: str = "learn"
    grid: tuple[int, int] = (14, 14)
    num_prefix_tokens: int = 1
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"
    token_keep_ratio: float = 1.0
    num_registers: int = 0
    attention_impl: str = "explicit"
    quant: str = "none"
    matmul_dtype: str = "float32"
    remat: str = "none"  # a key of REMAT_POLICIES
    layer_scale: float | None = None
    pre_norm: bool = False  # a LayerNorm on the tokens before the first block (CLIP's ln_pre)
    qk_norm: bool = False  # each block's attention normalises its queries and keys
    rope: str = "none"  # | "dinov3" | "eva02": rotary embeddings of the patches' queries and keys
    key_bias: bool = True  # False: the blocks' key projections have no bias (DINOv3)
    norm_epsilon: float = 1e-6  # every LayerNorm's (timm and vit_jax 1e-6; CLIP, DINOv3 1e-5)
    rope_grid: tuple[int, int] | None = None  # "eva02": the grid its coordinates are scaled to
    mlp_norm: bool = False  # a LayerNorm on each MLP's hidden units (EVA-02's sub-LN)
    final_norm: bool = True  # False: no encoder_norm here (the model's fc_norm after pooling)
    matmul_impl: str = "xla"  # | "blas" (vit/matmul.py)
    elementwise_impl: str = "xla"  # | "fused": LayerNorms and GELU by custom calls (elementwise.py)

    @nn.compact
    def __call__(
        self, x: Array, *, token_mask: Array | None = None, deterministic: bool = True,
        return_weights: bool = False,
    ) -> tuple[Array, list[Array], Array | None]:
        """Encode x [B, prefix + patches, width] -> (x with registers after the prefix tokens,
        per-layer attention weights, the patch mask [B, patches kept] or None)."""
        width, n_pre = x.shape[-1], self.num_prefix_tokens
        if self.posemb == "learn":
            pe = LearnedPositionEmbedding(name="posembed_input")(x.shape[1:])
        elif self.posemb == "sincos2d":
            pe = posemb_sincos_2d(*self.grid, width)
            pe = np.pad(pe, ((0, 0), (n_pre, 0), (0, 0)))
        else:  # "none": no absolute position (RoPE models)
            pe = None
        x = (x if pe is None else x + jnp.asarray(pe, self.dtype)).astype(self.dtype)
        tables = rope = None
        if self.rope != "none":  # registers join the prefix, which is not rotated
            tables = rope_tables(self.grid, width // self.num_heads, n_pre + self.num_registers,
                                 self.rope, self.rope_grid)
            rope = tuple(jnp.asarray(t)[None] for t in tables)
        if self.token_keep_ratio < 1.0 and not deterministic:
            idx = random_keep_indices(self.make_rng("dropout"), x.shape[0], x.shape[1] - n_pre,
                                      self.token_keep_ratio)
            x = _keep_patches(x, n_pre, idx)
            if token_mask is not None:
                token_mask = jnp.take_along_axis(token_mask, idx, axis=1)
            if tables is not None:
                rope = kept_tables(tables, n_pre + self.num_registers, idx)
        if self.num_registers:  # after the position embedding: registers have no position
            reg = self.param("registers", nn.initializers.normal(stddev=0.02),
                             (1, self.num_registers, width))
            reg = jnp.tile(reg.astype(x.dtype), (x.shape[0], 1, 1))
            x = jnp.concatenate([static_tokens(x, 0, n_pre), reg, static_tokens(x, n_pre)],
                                axis=1)
        mask = None
        if token_mask is not None:  # [B, 1 (heads), 1 (queries), keys]; prefix tokens always on
            prefix = jnp.ones((x.shape[0], n_pre + self.num_registers), bool)
            mask = jnp.concatenate([prefix, token_mask.astype(bool)], axis=1)[:, None, None]
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        if self.pre_norm:
            x = layer_norm(self.norm_epsilon, self.dtype, self.elementwise_impl, "pre_norm")(x)
        block = Encoder1DBlock
        if self.remat != "none":  # the same parameter names: a lifted transform adds no scope
            block = nn.remat(Encoder1DBlock, policy=REMAT_POLICIES[self.remat],
                             static_argnums=(3, 4))  # deterministic, return_weights (self is 0)
        maps = []
        for i in range(self.depth):
            # Stochastic depth grows linearly with depth, as in DeiT / timm.
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x, w = block(
                self.mlp_dim, self.num_heads, self.dropout_rate, self.attention_dropout_rate,
                rate, self.dtype, self.activation, self.attention_impl, self.quant,
                self.matmul_dtype, layer_scale=self.layer_scale, qk_norm=self.qk_norm,
                key_bias=self.key_bias, norm_epsilon=self.norm_epsilon, rope=self.rope,
                mlp_norm=self.mlp_norm, matmul_impl=self.matmul_impl,
                elementwise_impl=self.elementwise_impl, name=f"encoderblock_{i}",
            )(x, mask, deterministic, return_weights, rope)
            maps.append(w)
        if self.final_norm:
            x = layer_norm(self.norm_epsilon, self.dtype, self.elementwise_impl, "encoder_norm")(x)
        return x, maps, token_mask


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens, then an MLP."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "explicit"
    quant: str = "none"
    matmul_dtype: str = "float32"
    activation: str = "gelu_tanh"  # the MLP's, the model's option
    norm_epsilon: float = 1e-6
    matmul_impl: str = "xla"  # | "blas" (vit/matmul.py)
    elementwise_impl: str = "xla"  # | "fused": LayerNorms and GELU by custom calls (elementwise.py)

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> tuple[Array, Array | None]:
        width = x.shape[-1]
        probe = self.param("probe", _xavier, (1, 1, width))
        probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(self.dtype)
        y, w = MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype,
                                            impl=self.attention_impl, quant=self.quant,
                                            matmul_dtype=self.matmul_dtype,
                                            matmul_impl=self.matmul_impl,
                                            name="MultiHeadDotProductAttention_0")(
            probe, x, mask=mask)
        y = y + MlpBlock(self.mlp_dim, dtype=self.dtype, activation=self.activation,
                         quant=self.quant, matmul_dtype=self.matmul_dtype,
                         matmul_impl=self.matmul_impl, elementwise_impl=self.elementwise_impl,
                         name="MlpBlock_0")(
            layer_norm(self.norm_epsilon, self.dtype, self.elementwise_impl, "LayerNorm_0")(y))
        return jax.lax.index_in_dim(y, 0, axis=1, keepdims=False), w
