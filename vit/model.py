"""The Vision Transformer family as flax.linen modules.

Follows "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021) and the big_vision / vit_jax
variants; the encoder blocks, position embeddings and MAP head are in vit/encoder.py. Parameter
names match the public vit_jax checkpoints one to one:

    embedding/{kernel,bias}                          patch embedding (conv, kernel = stride = patch)
    stem/{conv_i,norm_i}                             stem="conv" only: 3x3 convs before a 1x1
                                                     `embedding` (vit/stems.py)
    conv_root, gn_root, block{i}/unit{j}/...         hybrids only ("R50+B/16"): the ResNet-v2
                                                     trunk before `embedding` (vit/resnet.py)
    cls                                              class token (classifier="token" or class_token)
    Transformer/posembed_input/pos_embedding         learned position embedding (posemb="learn")
    Transformer/encoderblock_{i}/LayerNorm_0
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value,out}  no key/bias
                                                     with key_bias=False (DINOv3)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query_norm,key_norm}  qk_norm only
    Transformer/encoderblock_{i}/LayerNorm_2
    Transformer/encoderblock_{i}/MlpBlock_3/{Dense_0,Dense_1}    Dense_0 2 x mlp_dim wide for swiglu
    Transformer/registers                            num_registers > 0 only: [1, R, width]
    Transformer/pre_norm                             pre_norm=True only (CLIP): before block 0
    Transformer/encoder_norm                         fc_norm (after GAP) instead with fc_norm=True
    Transformer/encoderblock_{i}/MlpBlock_3/hidden_norm                     mlp_norm only (EVA-02)
    MAPHead_0/...                                    attention-pooling head (classifier="map")
    pre_logits/{kernel,bias}                         optional (representation_size)
    head/{kernel,bias}                               zero-initialised classifier
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit import resnet, stems
from vit.attention import attention_impl_here, platform_name, resolve_attention_impl
from vit.elementwise import elementwise_impl_here, resolve_elementwise_impl
from vit.encoder import Encoder, MAPHead, dense_layer, static_tokens
from vit.matmul import blas_operand_dtype, matmul_impl_here, resolve_matmul_impl
from vit.model_options import compute_dtype, int_tuple, pair, validate

Dtype = Any
Array = jax.Array

class VisionTransformer(nn.Module):
    """ViT: patchify, prepend a class token (optional), encode, pool, classify.

    Call with images [B, H, W, C]; `train=True` enables dropout and stochastic depth (needs a
    "dropout" rng); `return_attention=True` also returns the attention weights of every layer,
    stacked as [depth, B, heads, tokens, tokens] (depth 0: an empty [0, B, ...] array), tokens
    ordered (class token, registers, patches). `token_mask` [B, grid rows * cols] (True = real
    patch) hides padded patches: no token attends to them and the GAP / MAP heads ignore them;
    a conv stem or ResNet trunk, whose windows cross patch borders, sees their pixels as zeros.
    """

    num_classes: int
    patch_size: tuple[int, int] = (16, 16)
    image_size: tuple[int, int] = (224, 224)
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    classifier: str = "token"
    posemb: str = "learn"
    representation_size: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    head_bias_init: float = 0.0
    dtype: Dtype = jnp.float32
    gelu_approximate: bool = True  # tanh GELU as vit_jax / big_vision; False: exact, as timm / HF
    quick_gelu: bool = False  # OpenAI CLIP's x * sigmoid(1.702 x) instead of GELU (open_clip name)
    pre_norm: bool = False  # CLIP: a LayerNorm on the tokens before the first block
    # SwiGLU MLPs (DINOv2-g): MlpBlock's Dense_0 gives 2 x mlp_dim, silu(first half) x second half
    swiglu: bool = False
    # LayerNorm over each head's queries and keys in every block (timm's qk_norm; ViT-22B):
    # query_norm / key_norm in MultiHeadDotProductAttention_1
    qk_norm: bool = False
    # Rotary position embeddings of the patches' queries and keys in every block (vit/rope.py):
    # "dinov3" (with posemb="none" the only position the model has) or "eva02" (beside a learned
    # position embedding, coordinates scaled to rope_grid)
    rope: str = "none"
    # False: the blocks' attention key projections have no bias (DINOv3; a key bias shifts every
    # logit of a query alike, which softmax ignores, but not once RoPE rotates the keys)
    key_bias: bool = True
    # every LayerNorm's epsilon in the encoder and heads: 1e-6 as vit_jax, big_vision and timm's
    # ViT; 1e-5 for CLIP and DINOv3, 1e-12 for HF ViT (converted weights take their source's)
    norm_epsilon: float = 1e-6
    # rope="eva02": the patch grid its coordinates are scaled to (EVA-02: (16, 16), its
    # pretraining grid); None: the model's own
    rope_grid: tuple[int, int] | None = None
    mlp_norm: bool = False  # a LayerNorm on each MLP's hidden units before Dense_1 (EVA-02)
    # the final LayerNorm on the pooled features (`fc_norm`) instead of on the tokens
    # (`Transformer/encoder_norm`), as timm's fc_norm in EVA-02's and MAE's GAP heads
    fc_norm: bool = False
    # a class token in the sequence for a head that pools otherwise (classifier "gap" or "map"),
    # as timm's class_token=True with global_pool="avg" (EVA-02); classifier="token" has one
    class_token: bool = False
    stem: str = "patchify"  # | "conv": 3x3 convs then a 1x1 projection (vit/stems.py)
    stem_channels: tuple[int, ...] | None = None  # conv stem widths; None: Xiao et al.'s
    stem_strides: tuple[int, ...] | None = None  # conv stem strides; None: the last ones are 2
    stem_norm: str = "layernorm"  # | "groupnorm": the conv stem's norm
    # Hybrids ("R50+B/16"): units per stage of a ResNet-v2 trunk run before the patchify stem,
    # whose kernel is then patch_size / the trunk's stride (vit/resnet.py). None: no trunk.
    resnet_layers: tuple[int, ...] | None = None
    resnet_width: int = 64  # the trunk's root channels (vit_jax's 64 * width_factor)
    resnet_numerics: str = "vit_jax"  # | "timm": the trunk's epsilons (vit/resnet.py)
    token_keep_ratio: float = 1.0  # PatchDropout in training: share of patch tokens kept
    num_registers: int = 0  # learned register tokens (Darcet et al. 2024), dropped before the head
    # "explicit" | "fused": a concrete kernel (vit/attention.py). create_model's default "auto"
    # is resolved there, once, from the platform the model will run on.
    attention_impl: str = "explicit"
    quant: str = "none"  # | "int8": int8 dense / attention kernels (vit/int8.py, vit/quantize.py)
    # | "bfloat16": bfloat16 operands, float32 accumulation in dense and attention-projection
    # matmuls, activations still in `dtype` (vit/matmul.py; ~4x faster matmuls on AMX CPUs)
    matmul_dtype: str = "float32"
    # "xla" | "blas": who computes dense matmuls, XLA's dot or MKL's GEMMs (float32 or bfloat16
    # operands; vit/matmul.py, vit/blas_gemm.py); "blas" also runs attention's core as fused
    # calls of the same handler library. create_model's default "auto" is resolved there, as
    # attention_impl is.
    matmul_impl: str = "xla"
    # "xla" | "fused": who computes the encoder's LayerNorms and the MLP's tanh GELU, flax / XLA
    # or the handler's one-pass calls on the CPU (vit/elementwise.py); "auto" resolved likewise
    elementwise_impl: str = "xla"
    # "block" | "dots": recompute each encoder block's activations in the backward pass instead
    # of keeping them (less memory, about a third more compute; vit/encoder.py REMAT_POLICIES)
    remat: str = "none"
    # CaiT / DeiT III LayerScale: each block's attention and MLP branch scaled per channel by a
    # learned vector starting at this value (timm's init_values, e.g. 1e-5); None: none
    layer_scale: float | None = None

    @property
    def mlp_activation(self) -> str:
        """The MLP's nonlinearity, a key of vit.encoder.MLP_ACTIVATIONS."""
        if self.swiglu:
            return "swiglu"
        if self.quick_gelu:
            return "quick_gelu"
        return "gelu_tanh" if self.gelu_approximate else "gelu"

    @property
    def has_class_token(self) -> bool:
        """Whether a class token (`cls`) leads the sequence: classifier="token" or class_token."""
        return self.classifier == "token" or self.class_token

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (rows, cols) for `image_size`."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @nn.compact
    def __call__(
        self, images: Array, *, train: bool = False, return_attention: bool = False,
        token_mask: Array | None = None,
    ) -> Array | tuple[Array, Array]:
        if tuple(images.shape[1:3]) != tuple(self.image_size):
            raise ValueError(
                f"the model was built for {self.image_size[0]}x{self.image_size[1]} images, got "
                f"{images.shape[1]}x{images.shape[2]}: pass image_size= to create_model, or "
                "resize the input")
        deterministic = not train
        b = images.shape[0]
        rows, cols = self.grid
        if token_mask is not None and tuple(token_mask.shape) != (b, rows * cols):
            raise ValueError(f"token_mask must be [batch, patches] = [{b}, {rows * cols}], got "
                             f"{tuple(token_mask.shape)}")
        x = images.astype(self.dtype)
        if token_mask is not None and (self.stem == "conv" or self.resnet_layers is not None):
            # Their convolutions and GroupNorm reach across patch borders: masked pixels are 0.
            x = zero_masked_patches(x, token_mask, (rows, cols))
        kernel = self.patch_size
        if self.resnet_layers is not None:  # a hybrid: patchify the trunk's feature map
            x = resnet.resnet_trunk(x, self.resnet_layers, self.resnet_width,
                                    self.resnet_numerics, self.dtype)
            kernel = resnet.embedding_kernel(self.resnet_layers, self.resnet_width,
                                             self.patch_size)
        elif self.stem == "conv":
            x = stems.ConvStem(self.width, self.patch_size, self.stem_channels,
                               self.stem_strides, self.stem_norm, self.dtype, name="stem")(x)
            kernel = (1, 1)
        x = nn.Conv(self.width, kernel, strides=kernel, padding="VALID", dtype=self.dtype,
                    name="embedding")(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        num_prefix = 0
        if self.has_class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
            num_prefix = 1

        x, maps, patch_mask = Encoder(
            self.depth, self.mlp_dim, self.num_heads, self.posemb, (h, w), num_prefix,
            self.dropout_rate, self.attention_dropout_rate, self.drop_path_rate, self.dtype,
            self.mlp_activation, self.token_keep_ratio, self.num_registers,
            self.attention_impl, self.quant, self.matmul_dtype, self.remat,
            layer_scale=self.layer_scale, pre_norm=self.pre_norm, qk_norm=self.qk_norm,
            rope=self.rope, key_bias=self.key_bias, norm_epsilon=self.norm_epsilon,
            rope_grid=self.rope_grid, mlp_norm=self.mlp_norm, final_norm=not self.fc_norm,
            matmul_impl=self.matmul_impl, elementwise_impl=self.elementwise_impl,
            name="Transformer",
        )(x, token_mask=token_mask, deterministic=deterministic, return_weights=return_attention)

        x_tokens = x.shape[1]  # prefix, registers and the patches kept
        patches = static_tokens(x, num_prefix + self.num_registers)
        if self.classifier == "token":
            x = jax.lax.index_in_dim(x, 0, axis=1, keepdims=False)
        elif self.classifier == "gap":
            if patch_mask is None:
                x = jnp.mean(patches, axis=1)
            else:
                weight = patch_mask.astype(patches.dtype)[..., None]
                x = (patches * weight).sum(1) / jnp.maximum(weight.sum(1), 1.0)
            if self.fc_norm:
                x = nn.LayerNorm(self.norm_epsilon, self.dtype, name="fc_norm")(x)
        else:
            mask = None if patch_mask is None else patch_mask.astype(bool)[:, None, None]
            x, _ = MAPHead(self.num_heads, self.mlp_dim, self.dtype, self.attention_impl,
                           self.quant, self.matmul_dtype, self.mlp_activation,
                           self.norm_epsilon, self.matmul_impl, self.elementwise_impl,
                           name="MAPHead_0")(patches, mask)

        if self.representation_size is not None:
            x = nn.tanh(dense_layer(self.representation_size, self.dtype, self.quant, "pre_logits",
                                    self.matmul_dtype, matmul_impl=self.matmul_impl)(x))
        logits = dense_layer(
            self.num_classes, self.dtype, self.quant, "head", self.matmul_dtype,
            matmul_impl=self.matmul_impl, kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.constant(self.head_bias_init),
        )(x).astype(jnp.float32)
        if return_attention:
            return logits, _stack_attention(maps, (b, self.num_heads, x_tokens, x_tokens))
        return logits


def zero_masked_patches(images: Array, token_mask: Array, grid: tuple[int, int]) -> Array:
    """`images` [B, H, W, C] with the pixels of each patch that `token_mask` [B, rows * cols]
    marks False set to zero."""
    b, height, width, channels = images.shape
    rows, cols = grid
    keep = token_mask.astype(bool).reshape(b, rows, 1, cols, 1, 1)
    tiles = images.reshape(b, rows, height // rows, cols, width // cols, channels)
    return jnp.where(keep, tiles, jnp.zeros((), images.dtype)).reshape(images.shape)


def _stack_attention(maps: list[Array], shape: tuple[int, ...]) -> Array:
    """Per-layer attention weights as [depth, B, heads, T, T]; [0, B, heads, T, T] at depth 0."""
    return jnp.stack(maps) if maps else jnp.zeros((0, *shape), jnp.float32)


# width, depth, mlp_dim, num_heads: ViT paper (B, L, H), DeiT (Ti, S), big_vision (M, g, G, e).
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
    # SigLIP's shape-optimised 400M (Alabdulmohsin et al., 2023), as big_vision names it
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
}

_FIELDS = tuple(f for f in VisionTransformer.__dataclass_fields__ if f not in ("parent", "name"))


def grid_from_config(model_config: Mapping[str, Any] | None, image_size: Any
                     ) -> tuple[int, int] | None:
    """The patch grid (rows, cols) a run config's `model` and `image_size` give; None when they
    do not say (no variant, no image size)."""
    try:
        patch = model_config.get("patch_size") or parse_variant(model_config["variant"])[1]
        (ih, iw), (ph, pw) = pair(image_size), pair(patch, "patch_size")
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return (ih // ph, iw // pw) if min(ih, iw, ph, pw) > 0 else None


def parse_variant(variant: str) -> tuple[dict[str, Any], tuple[int, int]]:
    """Split a variant string like "S/16" into its size hyper-parameters and patch size.

    A hybrid "R<depth>+<size>/<stride>" ("R50+B/16", "R26+S/32", "R50+L/32") also sets
    `resnet_layers`; its /<stride> is the token grid's patch size, as for plain variants.
    """
    resnet_name, plus, plain = variant.partition("+")
    if plus:
        try:
            sizes, patch = parse_variant(plain)
        except ValueError:
            raise resnet.hybrid_error(variant) from None
        layers = resnet.hybrid_layers(resnet_name, patch[0])
        if layers is None:
            raise resnet.hybrid_error(variant)
        return {**sizes, "resnet_layers": layers}, patch
    name, sep, patch = variant.partition("/")
    if name not in VARIANTS or not sep or not patch.isdigit() or int(patch) < 1:
        raise ValueError(
            f"unknown ViT variant {variant!r}: use '<size>/<patch>' with size one of "
            f"{', '.join(VARIANTS)} and a positive patch size, e.g. 'Ti/16', 'S/4', 'B/16', "
            "or a ResNet hybrid 'R<depth>+<size>/<stride>' such as 'R50+B/16'")
    return dict(VARIANTS[name]), (int(patch), int(patch))


def create_model(
    variant: str, *, num_classes: int = 1000, image_size: int | tuple[int, int] = 224,
    platform: str | None = None, **overrides: Any,
) -> VisionTransformer:
    """Build a ViT from a variant string ("Ti/16", "B/16", ...) with optional field overrides.

    `attention_impl` defaults to "auto", resolved here for `platform` ("cpu", "gpu", "tpu"; None:
    JAX's default backend) and the compute dtype: the model holds "explicit" on CPU, "cudnn" on a
    GPU computing in bfloat16 / float16 (else "explicit"), "fused" on TPU. `matmul_impl`
    defaults to "auto" too: "blas" (MKL's GEMMs) on an Intel CPU where `vit[mkl]` is installed,
    for float32 and (with AMX or AVX512_BF16) bfloat16 operands, else "xla"
    (`vit.matmul.resolve_matmul_impl`); `elementwise_impl` "auto" is "fused" on an x86-64 CPU where
    the handler builds (`vit.elementwise.resolve_elementwise_impl`).
    """
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; valid options: "
                         f"{', '.join(_FIELDS)}")
    sizes, patch = parse_variant(variant)
    kwargs: dict[str, Any] = dict(sizes, patch_size=patch, num_classes=num_classes,
                                  image_size=image_size)
    kwargs.update(overrides)
    kwargs["patch_size"] = pair(kwargs["patch_size"], "patch_size")
    kwargs["image_size"] = pair(kwargs["image_size"], "image_size")
    for key in ("stem_channels", "stem_strides", "resnet_layers"):
        if kwargs.get(key) is not None:
            kwargs[key] = int_tuple(kwargs[key], key)
    if kwargs.get("rope_grid") is not None:
        kwargs["rope_grid"] = pair(kwargs["rope_grid"], "rope_grid")
    kwargs.setdefault("attention_impl", "auto")
    kwargs.setdefault("matmul_impl", "auto")
    kwargs.setdefault("elementwise_impl", "auto")
    defaults = {f: VisionTransformer.__dataclass_fields__[f].default for f in _FIELDS}
    validate(kwargs, defaults)
    dtype = kwargs.get("dtype", defaults["dtype"])
    kwargs["attention_impl"] = resolve_attention_impl(
        kwargs["attention_impl"], platform, dtype=dtype,
        head_dim=kwargs["width"] // kwargs["num_heads"])
    kwargs["matmul_impl"] = resolve_matmul_impl(
        kwargs["matmul_impl"], platform_name(platform), dtype=dtype,
        matmul_dtype=kwargs.get("matmul_dtype", defaults["matmul_dtype"]),
        quant=kwargs.get("quant", defaults["quant"]))
    kwargs["elementwise_impl"] = resolve_elementwise_impl(
        kwargs["elementwise_impl"], platform_name(platform), dtype=dtype)
    return VisionTransformer(**kwargs)


def model_from_config(
    model_config: Mapping[str, Any], *, num_classes: int, image_size: int | tuple[int, int],
    platform: str | None = None,
) -> VisionTransformer:
    """Build the model a run's `config.model` describes: {"variant": "Ti/4", **overrides}.

    `platform` is where it will run (None: JAX's default backend); it decides attention "auto".
    """
    options = {k: v for k, v in dict(model_config).items() if v is not None}
    if "dtype" in options:
        options["dtype"] = compute_dtype(options["dtype"])
    if "variant" not in options:
        raise ValueError("config.model needs a 'variant' such as 'Ti/16' or 'S/4'")
    variant = options.pop("variant")
    return create_model(variant, num_classes=num_classes, image_size=image_size,
                        platform=platform, **options)


def init_params(model: VisionTransformer, rng: Array, batch_size: int = 1) -> Any:
    """Initialise the model's parameters for a batch of its own image size."""
    dummy = jnp.zeros((batch_size, *model.image_size, 3), jnp.float32)
    return model.init({"params": rng}, dummy)["params"]


def count_params(model: VisionTransformer) -> int:
    """Number of parameters, computed from shapes alone with `jax.eval_shape` (no memory)."""
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def saved_model_from_config(
    model_config: Mapping[str, Any], *, num_classes: int, image_size: int | tuple[int, int],
) -> VisionTransformer:
    """`model_from_config` for a checkpoint's saved `config.model`, to run here: a model trained
    with attention "cudnn" on a GPU runs "auto" elsewhere (`attention.attention_impl_here`)."""
    options = dict(model_config)
    options["attention_impl"] = attention_impl_here(options.get("attention_impl") or "auto")
    bf16 = blas_operand_dtype(options.get("matmul_dtype") or "float32",
                              compute_dtype(options.get("dtype") or "float32")) == jnp.bfloat16
    options["matmul_impl"] = matmul_impl_here(options.get("matmul_impl") or "auto",
                                              platform_name(None), bf16=bf16)
    options["elementwise_impl"] = elementwise_impl_here(
        options.get("elementwise_impl") or "auto", platform_name(None))
    return model_from_config(options, num_classes=num_classes, image_size=image_size)
