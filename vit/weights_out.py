"""Write this toolkit's parameters in other namings: timm, HuggingFace ViT, vit_jax `.npz`.

The inverse of `vit.weight_formats`' readers, array for array, so ours -> format -> ours is
exact. Each writer returns a flat {name: float32 array} state dict and a `config.json` payload
that says what the arrays cannot: sizes, heads, GELU, classifier, input normalisation.

- timm `VisionTransformer`: fused `attn.qkv` ([3D, D]), OIHW patch kernel, `act_layer`
  "gelu_tanh" for tanh-GELU models; a GAP model is timm's `global_pool="avg", fc_norm=False`.
  The config.json is timm's Hub format: `timm.create_model(cfg["architecture"],
  pretrained_cfg_overlay={"file": "model.safetensors"}, num_classes=..., **cfg["model_args"])`.
- HuggingFace `ViTForImageClassification` (saved names: `vit.encoder.layer.{i}...`), with its
  config.json (`hidden_act` "gelu" or "gelu_pytorch_tanh", `layer_norm_eps` the model's).
- vit_jax / big_vision `.npz`: the params flattened with "/" (the public checkpoints' layout);
  the config.json then carries this toolkit's own model config, for any architecture.

The timm and HF configs state the run's evaluation resize: without `pp.eval_resize` a plain
resize to the model's size (timm `crop_mode="squash"`, `crop_pct=1`; HF `ViTImageProcessor`),
with it the shorter side resized to eval_resize and the centre cropped (timm
`crop_mode="center"`, `crop_pct` = size / eval_resize; HF `BitImageProcessor` with
`shortest_edge` and `crop_size`).

A model of rectangular images states its size as [rows, cols] (timm `img_size`, HF
`image_size`; a square stays an int) and [3, rows, cols] in timm's `input_size`. Its evaluation
crop (`vit.preprocess.eval_crop`: resize, keeping the aspect ratio, to cover (rows, cols) scaled
so its shorter side is eval_resize, then crop the centre) is timm's "center" crop at crop_pct =
min(rows, cols) / eval_resize (to a pixel: timm floors the box that we round). HF's processors
cannot resize to cover a box: BitImageProcessor's `shortest_edge` is eval_resize, which is the
same crop on images of the model's aspect ratio only (HF pads the crop of other shapes).

timm and HF hold plain patchify ViTs only: a conv stem, ResNet trunk, MAP head or pre-logits
layer (and for HF registers or LayerScale) raises WeightsError naming `--to npz`, which holds
everything. Registers go to timm as DINOv2-reg's `reg_token` with `no_embed_class`. A sin-cos
position embedding is written as a learned one with the same values (same outputs). RoPE models
go to timm's `Eva` as DINOv3 or EVA-02 (vit/timm_eva.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vit import weight_sidecars
from vit.data_options import NORMALIZATIONS
from vit.encoder import posemb_sincos_2d
from vit.model_options import json_image_size
from vit.weight_formats import POSEMB, WeightsError, flatten_params

TARGETS = ("timm", "hf", "npz")
_ATTN = "MultiHeadDotProductAttention_1"


_HF_ACTS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


def timm_mlp_ratio(model: Any, hidden: int | None = None) -> float:
    """timm's mlp_ratio for `hidden` (default: the model's first MLP layer's width), which timm
    takes as int(embed_dim * mlp_ratio): nudged up where the plain ratio would round below it."""
    hidden = hidden or model.mlp_dim * (2 if model.swiglu else 1)
    ratio = hidden / model.width
    return ratio if int(model.width * ratio) == hidden else (hidden + 0.25) / model.width


def _plain_vit_only(model: Any, target: str) -> None:
    extras = [name for name, bad in (
        ("a conv stem", model.stem != "patchify"), ("a ResNet trunk", model.resnet_layers),
        ("register tokens, which HF ViT lacks", target == "hf" and model.num_registers),
        ("a MAP head", model.classifier == "map"),
        ("a pre-logits layer", model.representation_size is not None),
        ("an HF classifier on GAP (HF ViT pools the class token)",
         target == "hf" and model.classifier == "gap"),
        ("LayerScale, which HF ViT lacks", target == "hf" and model.layer_scale is not None),
        ("a pre-norm (CLIP), which HF ViT lacks", target == "hf" and model.pre_norm),
        ("SwiGLU MLPs, which HF ViT lacks", target == "hf" and model.swiglu),
        ("qk-norm, which HF ViT lacks", target == "hf" and model.qk_norm),
        ("rotary position embeddings, which HF ViT lacks", target == "hf" and model.rope != "none"),
        ("LayerNorms in the MLPs, which HF ViT lacks", target == "hf" and model.mlp_norm),
        ("fc_norm, which HF ViT lacks", target == "hf" and model.fc_norm),
        ("no position embedding", model.posemb == "none" and model.rope == "none"),
    ) if bad]
    if extras:
        raise WeightsError(f"--to {target} holds plain patchify ViTs only, and this model has "
                           f"{', '.join(extras)}; use --to npz, which holds any model")


def _posemb(p: dict[str, np.ndarray], model: Any) -> np.ndarray:
    if POSEMB in p:
        return p[POSEMB]
    prefix = int(model.has_class_token)
    return np.pad(posemb_sincos_2d(*model.grid, model.width), ((0, 0), (prefix, 0), (0, 0)))


def norm_state(p: dict[str, np.ndarray], ours: str, theirs: str) -> dict[str, np.ndarray]:
    """The LayerNorm `ours/{scale,bias}` under torch's names `theirs.{weight,bias}`."""
    return {f"{theirs}.weight": p[f"{ours}/scale"], f"{theirs}.bias": p[f"{ours}/bias"]}


def final_norm(p: dict[str, np.ndarray], model: Any) -> dict[str, np.ndarray]:
    """timm's final LayerNorm: `fc_norm` after pooling (fc_norm=True), else `norm`."""
    if model.fc_norm:
        return norm_state(p, "fc_norm", "fc_norm")
    return norm_state(p, "Transformer/encoder_norm", "norm")


def block_norms(p: dict[str, np.ndarray], i: int, model: Any) -> dict[str, np.ndarray]:
    """Block i's optional LayerNorms in timm's names (its ViT's and Eva's alike): the MLP's on
    its hidden units (mlp_norm: `mlp.norm`) and qk-norm's (`attn.q_norm`, `attn.k_norm`)."""
    ours, theirs = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    out = {}
    if model.mlp_norm:
        out.update(norm_state(p, ours + "MlpBlock_3/hidden_norm", theirs + "mlp.norm"))
    if model.qk_norm:
        for t, name in (("q", "query"), ("k", "key")):
            out.update(norm_state(p, f"{ours}{_ATTN}/{name}_norm", f"{theirs}attn.{t}_norm"))
    return out


def per_block(p: dict[str, np.ndarray], i: int, width: int) -> dict[str, np.ndarray]:
    """One block's matrices in torch layout ([out, in] weights) under short neutral names."""
    b = f"Transformer/encoderblock_{i}/"
    a = b + _ATTN + "/"
    out = {"ln1.w": p[b + "LayerNorm_0/scale"], "ln1.b": p[b + "LayerNorm_0/bias"],
           "ln2.w": p[b + "LayerNorm_2/scale"], "ln2.b": p[b + "LayerNorm_2/bias"],
           "proj.w": p[a + "out/kernel"].reshape(width, width).T, "proj.b": p[a + "out/bias"],
           "fc1.w": p[b + "MlpBlock_3/Dense_0/kernel"].T, "fc1.b": p[b + "MlpBlock_3/Dense_0/bias"],
           "fc2.w": p[b + "MlpBlock_3/Dense_1/kernel"].T, "fc2.b": p[b + "MlpBlock_3/Dense_1/bias"]}
    for n in ("query", "key", "value"):
        out[f"{n}.w"] = p[a + f"{n}/kernel"].reshape(width, width).T
        out[f"{n}.b"] = p.get(a + f"{n}/bias", np.zeros(width, np.float32)).reshape(width)
    return out


def _f32(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}


def _normalization(kind: str) -> dict[str, list[float]]:
    mean, std = NORMALIZATIONS[kind]
    return {"mean": list(mean), "std": list(std)}


def _crop_pct(size: int, eval_resize: int) -> float:
    """timm's crop_pct for a resize of the shorter side to `eval_resize` and a central crop whose
    shorter side is `size`: size / eval_resize, nudged down where needed so timm's
    floor(size / crop_pct) is `eval_resize` again."""
    pct = size / eval_resize
    while math.floor(size / pct) < eval_resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def _timm_crop(size: int, eval_resize: int | None) -> dict[str, Any]:
    """timm's eval crop settings: "squash" (a plain resize) without eval_resize, else "center"."""
    if eval_resize is None:
        return {"crop_pct": 1.0, "crop_mode": "squash"}
    return {"crop_pct": _crop_pct(size, eval_resize), "crop_mode": "center"}


def to_timm(params: Any, model: Any, class_names: list[str], normalize: str,
            eval_resize: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(timm state dict, timm config.json) of a plain patchify ViT; `eval_resize` is the run's
    pp.eval_resize (None: images resized straight to the model's size)."""
    _plain_vit_only(model, "timm")
    p = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    if model.rope != "none":
        from vit.timm_eva import to_timm_eva  # it builds on this module's helpers

        state, args, architecture = to_timm_eva(p, model)
        return _f32(state), _timm_config(architecture, args, model, class_names, normalize,
                                         eval_resize)
    posemb = _posemb(p, model)
    state = {"patch_embed.proj.weight": p["embedding/kernel"].transpose(3, 2, 0, 1)}
    if model.pre_norm:  # timm's pre-norm patch embedding has no bias: it joins the patches' posemb
        posemb = posemb.copy()
        posemb[:, posemb.shape[1] - model.grid[0] * model.grid[1]:] += p["embedding/bias"]
        state.update({"norm_pre.weight": p["Transformer/pre_norm/scale"],
                      "norm_pre.bias": p["Transformer/pre_norm/bias"]})
    else:
        state["patch_embed.proj.bias"] = p["embedding/bias"]
    if model.has_class_token:
        state["cls_token"] = p["cls"]
    if model.num_registers:
        # timm's no_embed_class: the patches alone take a position embedding, as the registers
        # do here; the class token's own embedding is a constant, folded into the token.
        state["reg_token"] = p["Transformer/registers"]
        if model.has_class_token:
            state["cls_token"] = p["cls"] + posemb[:, :1]
            posemb = posemb[:, 1:]
    state["pos_embed"] = posemb
    for i in range(model.depth):
        blk = per_block(p, i, model.width)
        pre = f"blocks.{i}."
        state.update({
            pre + "norm1.weight": blk["ln1.w"], pre + "norm1.bias": blk["ln1.b"],
            pre + "attn.qkv.weight": np.concatenate([blk["query.w"], blk["key.w"],
                                                     blk["value.w"]]),
            pre + "attn.qkv.bias": np.concatenate([blk["query.b"], blk["key.b"], blk["value.b"]]),
            pre + "attn.proj.weight": blk["proj.w"], pre + "attn.proj.bias": blk["proj.b"],
            pre + "norm2.weight": blk["ln2.w"], pre + "norm2.bias": blk["ln2.b"],
            pre + "mlp.fc1.weight": blk["fc1.w"], pre + "mlp.fc1.bias": blk["fc1.b"],
            pre + "mlp.fc2.weight": blk["fc2.w"], pre + "mlp.fc2.bias": blk["fc2.b"]})
        state.update(block_norms(p, i, model))  # mlp_norm: timm's scale_mlp_norm
        if model.layer_scale is not None:
            b = f"Transformer/encoderblock_{i}/"
            state.update({pre + "ls1.gamma": p[b + "LayerScale_1/scale"],
                          pre + "ls2.gamma": p[b + "LayerScale_3/scale"]})
    state.update({**final_norm(p, model),
                  "head.weight": p["head/kernel"].T, "head.bias": p["head/bias"]})
    pool = "token" if model.classifier == "token" else "avg"
    args = {"img_size": json_image_size(model.image_size), "patch_size": model.patch_size[0],
            "embed_dim": model.width, "depth": model.depth, "num_heads": model.num_heads,
            "mlp_ratio": timm_mlp_ratio(model), "class_token": model.has_class_token,
            "global_pool": pool, "fc_norm": model.fc_norm}
    if model.layer_scale is not None:
        args["init_values"] = model.layer_scale
    if model.num_registers:
        args.update(reg_tokens=model.num_registers, no_embed_class=True)
    if model.pre_norm:
        args["pre_norm"] = True
    if model.qk_norm:
        args["qk_norm"] = True
    if model.mlp_norm:
        args["scale_mlp_norm"] = True
    architecture = "vit_base_patch16_224"  # LayerNorm eps 1e-6
    if model.pre_norm and model.norm_epsilon == 1e-5:
        architecture = "vit_base_patch16_clip_224"  # CLIP's LayerNorm eps 1e-5
    if model.swiglu:  # timm builds SwiGLU (SwiGLUPacked MLPs, SiLU) for DINOv2-g's architecture
        architecture = weight_sidecars.TIMM_SWIGLU
        # That architecture's default is LayerScale 1e-5; timm drops None arguments, and reads
        # 0.0 as "no LayerScale".
        args.setdefault("init_values", 0.0)
    elif model.mlp_activation != "gelu":
        args["act_layer"] = model.mlp_activation
    check_timm_epsilon(architecture, model)
    return _f32(state), _timm_config(architecture, args, model, class_names, normalize,
                                     eval_resize)


def check_timm_epsilon(architecture: str, model: Any) -> None:
    """WeightsError when timm's `architecture` computes its LayerNorms with another epsilon than
    the model (its outputs would differ)."""
    theirs = weight_sidecars.timm_norm_epsilon(architecture)
    if model.norm_epsilon != theirs:
        try:
            _plain_vit_only(model, "hf")
            hf = ", or --to hf, whose config.json states the epsilon"
        except WeightsError:
            hf = ""
        raise WeightsError(f"timm's {architecture} computes its LayerNorms with epsilon "
                           f"{theirs:g}, this model with {model.norm_epsilon:g} (norm_epsilon): "
                           f"timm's outputs would differ; use --to npz{hf}")


def _timm_config(architecture: str, args: dict, model: Any, class_names: list[str],
                 normalize: str, eval_resize: int | None) -> dict:
    """timm's Hub config.json for `architecture` built with `args`."""
    return {"architecture": architecture, "num_classes": model.num_classes,
            "num_features": model.width, "global_pool": args["global_pool"], "model_args": args,
            "pretrained_cfg": {"input_size": [3, *model.image_size], "interpolation": "bilinear",
                               **_timm_crop(min(model.image_size), eval_resize),
                               "num_classes": model.num_classes,
                               "label_names": list(class_names), **_normalization(normalize)}}


def to_hf(params: Any, model: Any, class_names: list[str], normalize: str,
          eval_resize: int | None = None) -> tuple[dict[str, np.ndarray], dict, dict]:
    """(HF state dict, config.json, preprocessor_config.json) of a class-token ViT; with
    `eval_resize`, the shorter side resized to it and the centre cropped (BitImageProcessor)."""
    _plain_vit_only(model, "hf")
    p = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    state = {"vit.embeddings.cls_token": p["cls"],
             "vit.embeddings.position_embeddings": _posemb(p, model),
             "vit.embeddings.patch_embeddings.projection.weight":
                 p["embedding/kernel"].transpose(3, 2, 0, 1),
             "vit.embeddings.patch_embeddings.projection.bias": p["embedding/bias"]}
    names = {"ln1": "layernorm_before", "ln2": "layernorm_after",
             "query": "attention.attention.query", "key": "attention.attention.key",
             "value": "attention.attention.value", "proj": "attention.output.dense",
             "fc1": "intermediate.dense", "fc2": "output.dense"}
    for i in range(model.depth):
        for short, value in per_block(p, i, model.width).items():
            module, leaf = short.split(".")
            state[f"vit.encoder.layer.{i}.{names[module]}.{'weight' if leaf == 'w' else 'bias'}"] \
                = value
    state.update({"vit.layernorm.weight": p["Transformer/encoder_norm/scale"],
                  "vit.layernorm.bias": p["Transformer/encoder_norm/bias"],
                  "classifier.weight": p["head/kernel"].T, "classifier.bias": p["head/bias"]})
    config = {"architectures": ["ViTForImageClassification"], "model_type": "vit",
              "hidden_size": model.width, "num_hidden_layers": model.depth,
              "num_attention_heads": model.num_heads, "intermediate_size": model.mlp_dim,
              "hidden_act": _HF_ACTS[model.mlp_activation],
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "layer_norm_eps": model.norm_epsilon,
              "image_size": json_image_size(model.image_size),
              "patch_size": model.patch_size[0], "num_channels": 3, "qkv_bias": True,
              "id2label": {str(i): n for i, n in enumerate(class_names)},
              "label2id": {n: i for i, n in enumerate(class_names)}}
    return _f32(state), config, _hf_preprocessor(model, normalize, eval_resize)


def _hf_preprocessor(model: Any, normalize: str, eval_resize: int | None) -> dict:
    """preprocessor_config.json: a plain resize (ViTImageProcessor), or with `eval_resize` the
    shorter side resized to it and a central crop (BitImageProcessor; ViT's has no crop)."""
    height, width = model.image_size
    norm = _normalization(normalize)
    resize: dict[str, Any] = {"image_processor_type": "ViTImageProcessor",
                              "size": {"height": height, "width": width}}
    if eval_resize is not None:
        resize = {"image_processor_type": "BitImageProcessor",
                  "size": {"shortest_edge": eval_resize}, "do_center_crop": True,
                  "crop_size": {"height": height, "width": width}, "do_convert_rgb": True}
    return {**resize, "do_resize": True, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": norm["mean"],
            "image_std": norm["std"]}


def to_npz(params: Any, run_config: dict, class_names: list[str]
           ) -> tuple[dict[str, np.ndarray], dict]:
    """(vit_jax-named flat arrays, config.json with this toolkit's model config) of any model."""
    arrays = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    config = {"vit": {"model": run_config["model"], "image_size": run_config["image_size"],
                      "normalize": run_config["pp"]["normalize"],
                      "eval_resize": run_config["pp"].get("eval_resize"),
                      "class_names": list(class_names)}}
    return arrays, config
