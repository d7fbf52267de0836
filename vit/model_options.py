"""The Vision Transformer's options checked: one ValueError line naming a bad option and its fix.

`vit.model.create_model` runs `validate` on every option before a module is built, so a bad
value fails where it is given, not deep inside Flax or XLA.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vit import int8, matmul, resnet, rope, stems
from vit.attention import ATTENTION_IMPLS
from vit.elementwise import ELEMENTWISE_IMPLS
from vit.encoder import REMAT_POLICIES

CLASSIFIERS = ("token", "gap", "map")
POSEMB_KINDS = ("learn", "sincos2d", "none")


def is_int(value: Any) -> bool:
    """True for a Python or NumPy integer (bool is not one)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """True for a Python or NumPy int or float (bool is not one)."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_)


def pair(value: Any, name: str = "image_size") -> tuple[int, int]:
    """An int or a pair of ints as (rows, cols); ValueError naming `name` for anything else."""
    if is_int(value):
        return (int(value), int(value))
    if (isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes)
            and len(value) == 2 and all(is_int(v) for v in value)):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints (rows, cols), got {value!r}: "
                     f"pass e.g. {name}=32 or {name}=(32, 48)")


def json_image_size(image_size: Any) -> int | list[int]:
    """An image size as a config states it (the inverse of `pair`): an int for a square, else
    [rows, cols]."""
    rows, cols = pair(image_size)
    return rows if rows == cols else [rows, cols]


def int_tuple(value: Any, name: str) -> tuple[int, ...]:
    """A sequence of ints as a tuple; ValueError naming `name` for anything else."""
    if (isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes)
            and all(is_int(v) for v in value)):
        return tuple(int(v) for v in value)
    raise ValueError(f"model {name} must be a tuple of ints, e.g. (32, 64), got {value!r}")


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(value: Any) -> jnp.dtype:
    """`value` ("bfloat16", jnp.float32, ...) as a dtype the model computes in; ValueError naming
    the choices otherwise."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown model dtype {getattr(value, '__name__', value)!r}; use one of "
                         f"{', '.join(COMPUTE_DTYPES)}")
    return dtype


def check_int(key: str, value: Any, low: int, allowed: str = "") -> None:
    """ValueError unless `value` is an int >= `low`; `allowed` names other accepted values."""
    if not is_int(value):
        raise ValueError(f"model {key} must be an integer >= {low}{allowed}, got {value!r}")
    if value < low:
        raise ValueError(f"model {key} must be >= {low}{allowed}, got {value}")


def validate(kw: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """ValueError, in one line naming the option and the fix, for any bad model option in `kw`
    (the model's `defaults` fill in the rest)."""
    kw = {**defaults, **kw}
    # depth 0: embedding and head alone, as a probe
    for key, low in (("width", 1), ("num_heads", 1), ("mlp_dim", 1), ("depth", 0),
                     ("num_classes", 1), ("num_registers", 0), ("resnet_width", 1)):
        check_int(key, kw[key], low)
    if kw["representation_size"] is not None:
        check_int("representation_size", kw["representation_size"], 1,
                   " or None (no pre-logits layer)")
    if kw["stem_channels"] is not None and (not kw["stem_channels"]
                                            or min(kw["stem_channels"]) < 1):
        raise ValueError(f"model stem_channels must be positive conv widths, e.g. (32, 64), or "
                         f"None for the default ones, got {kw['stem_channels']}")
    for key in ("image_size", "patch_size"):
        if min(kw[key]) < 1:
            raise ValueError(f"{key} must be positive, got {kw[key]}")
    compute_dtype(kw["dtype"])
    if kw["classifier"] not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {kw['classifier']!r}; use one of {CLASSIFIERS}")
    if kw["posemb"] not in POSEMB_KINDS:
        raise ValueError(f"unknown posemb {kw['posemb']!r}; use one of {POSEMB_KINDS}")
    (ih, iw), (ph, pw) = kw["image_size"], kw["patch_size"]
    if ih % ph or iw % pw:
        raise ValueError(f"image size {ih}x{iw} is not divisible by the patch size {ph}x{pw}: "
                         f"use sides that are multiples of it (e.g. {ih // ph * ph or ph}x"
                         f"{iw // pw * pw or pw}) or another patch size")
    if kw["width"] % kw["num_heads"]:
        raise ValueError(f"width {kw['width']} is not divisible by num_heads {kw['num_heads']}: "
                         "use a width that is a multiple of num_heads")
    if kw["posemb"] == "sincos2d" and (kw["width"] % 4 or kw["width"] < 8):
        raise ValueError(f"posemb='sincos2d' needs a width divisible by 4 and >= 8, got width "
                         f"{kw['width']}: use such a width, or posemb='learn'")
    if kw["rope"] not in rope.ROPE_KINDS:
        raise ValueError(f"unknown rope {kw['rope']!r}; use one of {rope.ROPE_KINDS}")
    if kw["rope"] != "none":
        rope.check_head_dim(kw["width"] // kw["num_heads"], kw["rope"])
    if kw["rope_grid"] is not None and (kw["rope"] != "eva02" or min(kw["rope_grid"]) < 1):
        raise ValueError(f"model rope_grid scales rope='eva02' coordinates to a grid of positive "
                         f"sides, got {kw['rope_grid']} with rope={kw['rope']!r}: set "
                         "rope='eva02', or leave rope_grid unset")
    if kw["fc_norm"] and kw["classifier"] != "gap":
        raise ValueError(f"model fc_norm normalises the pooled patches of classifier='gap', not "
                         f"classifier={kw['classifier']!r}: set classifier='gap' or fc_norm=False")
    if kw["stem"] not in stems.STEMS:
        raise ValueError(f"unknown stem {kw['stem']!r}; use one of {stems.STEMS}")
    if kw["stem"] == "conv":
        channels = kw["stem_channels"]
        if channels is None:
            channels = stems.default_stem_channels(kw["width"], kw["patch_size"])
        stems.conv_strides(len(channels), kw["patch_size"], kw["stem_strides"])
    if kw["resnet_layers"] is not None:
        if kw["stem"] != "patchify":
            raise ValueError(f"a ResNet hybrid (resnet_layers={kw['resnet_layers']}) patchifies "
                             f"its trunk's features: use stem='patchify', not {kw['stem']!r}")
        resnet.embedding_kernel(kw["resnet_layers"], kw["resnet_width"], kw["patch_size"])
    if kw["resnet_numerics"] not in resnet.NUMERICS:
        raise ValueError(f"unknown resnet_numerics {kw['resnet_numerics']!r}; use one of "
                         f"{resnet.NUMERICS}")
    if kw["stem_norm"] not in stems.STEM_NORMS:
        raise ValueError(f"unknown stem_norm {kw['stem_norm']!r}; use one of {stems.STEM_NORMS}")
    if kw["attention_impl"] not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {kw['attention_impl']!r}; use one of "
                         f"{ATTENTION_IMPLS}")
    if kw["quant"] not in int8.QUANT_MODES:
        raise ValueError(f"unknown quant {kw['quant']!r}; use one of {int8.QUANT_MODES}")
    matmul.check_matmul_dtype(kw["matmul_dtype"])
    if kw["matmul_impl"] not in matmul.MATMUL_IMPLS:
        raise ValueError(f"unknown matmul_impl {kw['matmul_impl']!r}; use one of "
                         f"{matmul.MATMUL_IMPLS}")
    if kw["elementwise_impl"] not in ELEMENTWISE_IMPLS:
        raise ValueError(f"unknown elementwise_impl {kw['elementwise_impl']!r}; use one of "
                         f"{ELEMENTWISE_IMPLS}")
    if kw["remat"] not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {kw['remat']!r}; use one of {tuple(REMAT_POLICIES)}")
    for key in ("token_keep_ratio", "dropout_rate", "attention_dropout_rate", "drop_path_rate",
                "head_bias_init"):
        if not _is_real(kw[key]):
            raise ValueError(f"model {key} must be a number, got {kw[key]!r}")
    if not isinstance(kw["gelu_approximate"], bool | np.bool_):
        raise ValueError(f"model gelu_approximate must be True (tanh GELU) or False (exact erf), "
                         f"got {kw['gelu_approximate']!r}")
    for key in ("quick_gelu", "pre_norm", "swiglu", "qk_norm", "key_bias", "mlp_norm", "fc_norm",
                "class_token"):
        if not isinstance(kw[key], bool | np.bool_):
            raise ValueError(f"model {key} must be True or False, got {kw[key]!r}")
    if kw["swiglu"] and kw["quick_gelu"]:
        raise ValueError("model swiglu and quick_gelu are two MLPs: set one of them")
    for key in ("stem_channels", "stem_strides"):
        if kw[key] is not None and kw["stem"] != "conv":
            raise ValueError(f"model {key} shapes the conv stem, but stem={kw['stem']!r}: set "
                             f"stem='conv', or leave {key} unset")
    if kw["layer_scale"] is not None and not (_is_real(kw["layer_scale"])
                                              and 0.0 < kw["layer_scale"] < math.inf):
        raise ValueError(f"model layer_scale must be a positive number (LayerScale's initial "
                         f"value, e.g. 1e-5) or None (off), got {kw['layer_scale']!r}")
    if not (_is_real(kw["norm_epsilon"]) and 0.0 < kw["norm_epsilon"] < 1.0):
        raise ValueError(f"model norm_epsilon must be a small positive number (LayerNorm's "
                         f"epsilon, e.g. 1e-6), got {kw['norm_epsilon']!r}")
    if not 0.0 < kw["token_keep_ratio"] <= 1.0:
        raise ValueError(f"token_keep_ratio must be in (0, 1], got {kw['token_keep_ratio']}")
    for rate in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
        if not 0.0 <= kw[rate] < 1.0:
            raise ValueError(f"{rate} must be in [0, 1), got {kw[rate]}")
