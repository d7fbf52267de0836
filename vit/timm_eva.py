"""RoPE models written as timm's `Eva`: DINOv3's (`vit_small_patch16_dinov3_qkvb`) and EVA-02's
(`eva02_base_patch14_224`) architectures, the model's sizes in `model_args`.

The inverse of `vit.weight_formats`' reading of them, array for array: a fused `attn.qkv.weight`
with `q_bias` / `v_bias` (Eva's key has no bias: a model whose key biases are not zero is
refused), LayerScale as `gamma_1` / `gamma_2` (ones for a DINOv3-shaped model without it, whose
architecture has it), SwiGLU packed in `mlp.fc1` ([gate; value]) or, with EVA-02's LayerNorm on
the hidden units (`mlp_norm`, timm's `scale_mlp`: `mlp.norm`), as `fc1_g` / `fc1_x`; the final
LayerNorm as `norm` or `fc_norm`. Called by `vit.weights_out.to_timm` for models with `rope`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vit.model_options import json_image_size
from vit.weight_formats import POSEMB, WeightsError
from vit.weights_out import (
    block_norms,
    check_timm_epsilon,
    final_norm,
    per_block,
    timm_mlp_ratio,
)

ARCHITECTURES = {"dinov3": "vit_small_patch16_dinov3_qkvb", "eva02": "eva02_base_patch14_224"}
_ATTN = "MultiHeadDotProductAttention_1"


def _refusals(p: dict[str, np.ndarray], model: Any) -> list[str]:
    """What of the model timm's Eva cannot hold, as the architecture for its RoPE builds it."""
    keys = [v for k, v in p.items() if k.endswith(f"/{_ATTN}/key/bias")]
    dinov3 = model.rope == "dinov3"
    return [why for why, bad in (
        ("a learned or sin-cos position embedding beside DINOv3's RoPE",
         dinov3 and model.posemb != "none"),
        ("EVA-02's RoPE without a learned position embedding",
         not dinov3 and model.posemb != "learn"),
        ("registers beside EVA-02's RoPE", not dinov3 and model.num_registers),
        ("a pre-norm", model.pre_norm),
        ("tanh or quick GELU (timm's Eva computes exact GELU: build with gelu_approximate="
         "False)", model.mlp_activation not in ("gelu", "swiglu")),
        ("key biases that are not zero (timm's Eva has none: train RoPE models with "
         "key_bias=False, as the dinov3_ and eva02_ fine-tune families do)",
         any(np.any(k) for k in keys)),
    ) if bad]


def _mlp(blk: dict[str, np.ndarray], model: Any, pre: str) -> dict[str, np.ndarray]:
    """One block's MLP layers in Eva's names: a packed fc1, or with SwiGLU and mlp_norm (Eva's
    SwiGLU with a norm) fc1_g / fc1_x (its norm is `block_norms`')."""
    out = {pre + "mlp.fc2.weight": blk["fc2.w"], pre + "mlp.fc2.bias": blk["fc2.b"]}
    if not (model.mlp_norm and model.swiglu):
        return {**out, pre + "mlp.fc1.weight": blk["fc1.w"], pre + "mlp.fc1.bias": blk["fc1.b"]}
    gate_w, value_w = np.split(blk["fc1.w"], 2)  # Eva's SwiGLU with a norm: two layers
    gate_b, value_b = np.split(blk["fc1.b"], 2)
    return {**out, pre + "mlp.fc1_g.weight": gate_w, pre + "mlp.fc1_g.bias": gate_b,
            pre + "mlp.fc1_x.weight": value_w, pre + "mlp.fc1_x.bias": value_b}


def to_timm_eva(p: dict[str, np.ndarray], model: Any) -> tuple[dict[str, np.ndarray], dict, str]:
    """(state dict, model_args, architecture) of a RoPE model as timm's `Eva`; WeightsError
    naming `--to npz` for what Eva cannot hold."""
    problems = _refusals(p, model)
    if problems:
        raise WeightsError(f"--to timm writes RoPE models as timm's Eva, which cannot hold "
                           f"{'; '.join(problems)}; use --to npz, which holds any model")
    architecture = ARCHITECTURES[model.rope]
    check_timm_epsilon(architecture, model)
    dinov3 = model.rope == "dinov3"
    state = {"patch_embed.proj.weight": p["embedding/kernel"].transpose(3, 2, 0, 1),
             "patch_embed.proj.bias": p["embedding/bias"]}
    if model.has_class_token:
        state["cls_token"] = p["cls"]
    if model.num_registers:
        state["reg_token"] = p["Transformer/registers"]
    if model.posemb == "learn":
        state["pos_embed"] = p[POSEMB]
    scaled = model.layer_scale is not None or dinov3  # DINOv3's architecture has LayerScale
    ones = np.ones(model.width, np.float32)
    for i in range(model.depth):
        blk, pre, b = per_block(p, i, model.width), f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        state.update({
            pre + "norm1.weight": blk["ln1.w"], pre + "norm1.bias": blk["ln1.b"],
            pre + "attn.qkv.weight": np.concatenate([blk["query.w"], blk["key.w"],
                                                     blk["value.w"]]),
            pre + "attn.q_bias": blk["query.b"], pre + "attn.v_bias": blk["value.b"],
            pre + "attn.proj.weight": blk["proj.w"], pre + "attn.proj.bias": blk["proj.b"],
            pre + "norm2.weight": blk["ln2.w"], pre + "norm2.bias": blk["ln2.b"],
            **_mlp(blk, model, pre), **block_norms(p, i, model)})  # mlp_norm: Eva's scale_mlp
        if scaled:
            state.update({pre + "gamma_1": p.get(b + "LayerScale_1/scale", ones),
                          pre + "gamma_2": p.get(b + "LayerScale_3/scale", ones)})
    state.update({**final_norm(p, model),
                  "head.weight": p["head/kernel"].T, "head.bias": p["head/bias"]})
    args = {"img_size": json_image_size(model.image_size), "patch_size": model.patch_size[0],
            "embed_dim": model.width, "depth": model.depth, "num_heads": model.num_heads,
            "mlp_ratio": timm_mlp_ratio(model, model.mlp_dim), "qkv_bias": True,
            "qkv_fused": True, "class_token": model.has_class_token,
            "num_reg_tokens": model.num_registers, "use_fc_norm": model.fc_norm,
            "global_pool": "token" if model.classifier == "token" else "avg",
            "qk_norm": model.qk_norm, "swiglu_mlp": model.swiglu, "swiglu_align_to": 0,
            "scale_mlp": model.mlp_norm}
    if scaled:
        args["init_values"] = model.layer_scale or 1.0
    if not dinov3:  # EVA-02's coordinates: the model's own grid where it has no reference one
        args["ref_feat_shape"] = list(model.rope_grid or model.grid)
    return state, args, architecture
