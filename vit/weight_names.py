"""Parameter namings: timm's, HuggingFace's and big_vision's state dicts renamed to this toolkit's.

This toolkit's names are vit_jax's (`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`).
`to_vit_naming` detects the naming of a flat state dict and renames it: timm's
`VisionTransformer` (plain, with LayerScale or registers as DeiT III and DINOv2, a ResNet-v2
hybrid such as `vit_base_r50_s16_224`) and its `Eva` as DINOv3 (RoPE, no position embedding) or
EVA-02 (RoPE beside one); HuggingFace transformers' `ViTModel` / `ViTForImageClassification`,
`Dinov2Model` / `Dinov2WithRegistersModel`, `DINOv3ViTModel`, CLIP's and SigLIP's image towers;
big_vision's per-type layer names, two-tower files and scanned blocks (vit/jax_weight_names.py).
timm's and HF's arrays are transposed (conv kernels OIHW -> HWIO); their attention projections
come out as plain matrices ([D, D] kernels, [D] biases, none where the file has none), which
`vit.pretrained.adapt_params` splits into the model's heads. Weights of RoPE models say so
(`Weights.rope`): their positions are in the attention, not in an array. vit_jax's hybrid trunk
names (`conv_root`, `block{i}/unit{j}/...`, see vit/resnet.py) need no renaming.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

from vit.jax_weight_names import from_jax_layouts
from vit.weight_dict import POSEMB, Weights, WeightsError

# How a torch module's "weight"/"bias" become flax params: (kernel or scale name, weight transform).
_LAYOUTS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "dense": ("kernel", lambda w: w.T),
    "conv": ("kernel", lambda w: w.transpose(2, 3, 1, 0)),
    "norm": ("scale", lambda w: w),
}
# Fused attention projections, stacked along torch's output axis, split into these layers.
_FUSED = {"qkv": ("query", "key", "value"), "kv": ("key", "value")}
_MAP = "MAPHead_0"
_MAP_ATTN = _MAP + "/MultiHeadDotProductAttention_0"
_BLOCK = r"Transformer/encoderblock_\1"
_QKV_NAMES = {"q": "query", "k": "key", "v": "value"}
_ATTN = _BLOCK + "/MultiHeadDotProductAttention_1"
Target = str | Callable[[re.Match[str]], str]


def _unit(layer: str) -> Callable[[re.Match[str]], str]:
    """timm's stages.{i}.blocks.{j} (from 0) -> vit_jax's block{i+1}/unit{j+1}/<layer>."""
    return lambda m: f"block{int(m[1]) + 1}/unit{int(m[2]) + 1}/{layer.format(*m.groups()[2:])}"


# timm's ResNet-v2 hybrid trunk (HybridEmbed.backbone; a stem-only trunk has no `.stem`).
_TIMM_TRUNK = r"patch_embed\.backbone\."
_TIMM_UNIT = _TIMM_TRUNK + r"stages\.(\d+)\.blocks\.(\d+)\."
_TIMM_HYBRID_NOTE = ("timm ResNet-v2 hybrid: build the model with resnet_numerics='timm' to "
                     "reproduce timm's outputs exactly (its StdConv / GroupNorm epsilons)")

# (module-name regex, flax module name, layout); "param" rules match a whole parameter name.
_TIMM_RULES: list[tuple[str, Target, str]] = [
    (r"cls_token", "cls", "param"),
    (r"reg_token", "Transformer/registers", "param"),  # DINOv2-reg: no position, after cls
    (r"pos_embed", POSEMB, "param"),
    (r"patch_embed\.proj", "embedding", "conv"),
    (_TIMM_TRUNK + r"(?:stem\.)?conv", "conv_root", "conv"),
    (_TIMM_TRUNK + r"(?:stem\.)?norm", "gn_root", "norm"),
    (_TIMM_UNIT + r"conv([123])", _unit("conv{}"), "conv"),
    (_TIMM_UNIT + r"norm([123])", _unit("gn{}"), "norm"),
    (_TIMM_UNIT + r"downsample\.conv", _unit("conv_proj"), "conv"),
    (_TIMM_UNIT + r"downsample\.norm", _unit("gn_proj"), "norm"),
    (r"blocks\.(\d+)\.norm1", _BLOCK + "/LayerNorm_0", "norm"),
    (r"blocks\.(\d+)\.ls1\.gamma", _BLOCK + "/LayerScale_1/scale", "param"),
    (r"blocks\.(\d+)\.ls2\.gamma", _BLOCK + "/LayerScale_3/scale", "param"),
    (r"blocks\.(\d+)\.gamma_1", _BLOCK + "/LayerScale_1/scale", "param"),  # timm's Eva (DINOv3)
    (r"blocks\.(\d+)\.gamma_2", _BLOCK + "/LayerScale_3/scale", "param"),
    # Eva's fused qkv keeps its biases apart: q and v (DINOv3's *_qkvb); k has none
    (r"blocks\.(\d+)\.attn\.([qkv])_bias",
     lambda m: f"Transformer/encoderblock_{m[1]}/MultiHeadDotProductAttention_1/"
               f"{_QKV_NAMES[m[2]]}/bias", "param"),
    (r"blocks\.(\d+)\.attn\.qkv", _ATTN, "qkv"),
    (r"blocks\.(\d+)\.attn\.proj", _ATTN + "/out", "dense"),
    (r"blocks\.(\d+)\.attn\.q_norm", _ATTN + "/query_norm", "norm"),
    (r"blocks\.(\d+)\.attn\.k_norm", _ATTN + "/key_norm", "norm"),
    (r"blocks\.(\d+)\.norm2", _BLOCK + "/LayerNorm_2", "norm"),
    (r"blocks\.(\d+)\.mlp\.fc1", _BLOCK + "/MlpBlock_3/Dense_0", "dense"),
    (r"blocks\.(\d+)\.mlp\.fc1_g", _BLOCK + "/MlpBlock_3/gate", "dense"),  # Eva's SwiGLU
    (r"blocks\.(\d+)\.mlp\.fc1_x", _BLOCK + "/MlpBlock_3/up", "dense"),
    (r"blocks\.(\d+)\.mlp\.norm", _BLOCK + "/MlpBlock_3/hidden_norm", "norm"),  # EVA-02 sub-LN
    # Eva's qkv_fused=False (EVA-02 B, L): q_proj, k_proj (no bias), v_proj
    (r"blocks\.(\d+)\.attn\.([qkv])_proj",
     lambda m: f"Transformer/encoderblock_{m[1]}/MultiHeadDotProductAttention_1/"
               f"{_QKV_NAMES[m[2]]}", "dense"),
    (r"blocks\.(\d+)\.mlp\.fc2", _BLOCK + "/MlpBlock_3/Dense_1", "dense"),
    (r"norm_pre", "Transformer/pre_norm", "norm"),  # CLIP image towers (pre_norm=True)
    (r"norm", "Transformer/encoder_norm", "norm"),
    (r"fc_norm", "fc_norm", "norm"),  # after pooling (fc_norm=True; else as encoder_norm)
    (r"pre_logits\.fc", "pre_logits", "dense"),
    (r"head", "head", "dense"),
    # global_pool="map" (SigLIP): timm's AttentionPoolLatent is big_vision's MAP head.
    (r"attn_pool\.latent", _MAP + "/probe", "param"),
    (r"attn_pool\.q", _MAP_ATTN + "/query", "dense"),
    (r"attn_pool\.kv", _MAP_ATTN, "kv"),
    (r"attn_pool\.proj", _MAP_ATTN + "/out", "dense"),
    (r"attn_pool\.norm", _MAP + "/LayerNorm_0", "norm"),
    (r"attn_pool\.mlp\.fc([12])", lambda m: f"{_MAP}/MlpBlock_0/Dense_{int(m[1]) - 1}", "dense"),
]
def _split_attention_rules(module: str, out: str) -> list[tuple[str, Target, str]]:
    """Rules of an attention `module` with separate q_proj / k_proj / v_proj and `out` layers."""
    qkv = [(module + rf"{short}_proj", _ATTN + f"/{name}", "dense")
           for short, name in (("q", "query"), ("k", "key"), ("v", "value"))]
    return [*qkv, (module + out, _ATTN + "/out", "dense")]


_HF_LAYER = r"(?:encoder\.layers?|layers|(?:model\.)?layer)\.(\d+)\."
_HF_RULES: list[tuple[str, str, str]] = [
    (r"embeddings\.cls_token", "cls", "param"),
    (r"embeddings\.position_embeddings", POSEMB, "param"),
    # DINOv3ViTModel's has no .projection
    (r"embeddings\.patch_embeddings(?:\.projection)?", "embedding", "conv"),
    # A block's norms and MLP under each model's names: ViT's files (layernorm_before / _after,
    # intermediate / output.dense), DINOv2's (norm1 / norm2), CLIP's and SigLIP's (layer_norm1 /
    # 2), transformers 5's in memory (mlp.fc1 / fc2); with use_swiglu_ffn (dinov2-giant) its
    # files' weights_in ([gate; up] stacked, as this toolkit's Dense_0 holds them: vit.encoder's
    # SwiGLU) and weights_out, which transformers 5 holds as gate_proj and up_proj (stacked
    # here) and down_proj.
    (_HF_LAYER + r"(?:layernorm_before|norm1|layer_norm1)", _BLOCK + "/LayerNorm_0", "norm"),
    (_HF_LAYER + r"(?:layernorm_after|norm2|layer_norm2)", _BLOCK + "/LayerNorm_2", "norm"),
    (_HF_LAYER + r"(?:intermediate\.dense|mlp\.fc1|mlp\.weights_in)",
     _BLOCK + "/MlpBlock_3/Dense_0", "dense"),
    (_HF_LAYER + r"(?:output\.dense|mlp\.fc2|mlp\.weights_out|mlp\.down_proj)",
     _BLOCK + "/MlpBlock_3/Dense_1", "dense"),
    (_HF_LAYER + r"mlp\.(gate|up)_proj", _BLOCK + r"/MlpBlock_3/\2", "dense"),
    # Attention: ViT's files, transformers 5's in memory (its save_pretrained still writes the
    # former), CLIP's and SigLIP's.
    (_HF_LAYER + r"attention\.attention\.(query|key|value)", _ATTN + r"/\2", "dense"),
    (_HF_LAYER + r"attention\.output\.dense", _ATTN + "/out", "dense"),
    *_split_attention_rules(_HF_LAYER + r"attention\.", "o_proj"),
    *_split_attention_rules(_HF_LAYER + r"self_attn\.", "out_proj"),
    # Dinov2Model / Dinov2WithRegistersModel (facebook/dinov2-*).
    (_HF_LAYER + r"layer_scale1\.lambda1", _BLOCK + "/LayerScale_1/scale", "param"),
    (_HF_LAYER + r"layer_scale2\.lambda1", _BLOCK + "/LayerScale_3/scale", "param"),
    (r"embeddings\.register_tokens", "Transformer/registers", "param"),
    (r"layernorm|norm", "Transformer/encoder_norm", "norm"),  # DINOv3ViTModel: norm
    (r"pooler\.dense", "pre_logits", "dense"),
    (r"classifier", "head", "dense"),
    # CLIPVisionModel(WithProjection) / CLIPModel's image tower (openai/clip-vit-*), with
    # "vision_model." stripped; the projection to the joint embedding is the head, as in timm.
    (r"embeddings\.class_embedding", "cls", "param"),
    (r"embeddings\.position_embedding\.weight", POSEMB, "param"),
    (r"embeddings\.patch_embedding", "embedding", "conv"),
    (r"pre_layrnorm", "Transformer/pre_norm", "norm"),
    (r"post_layernorm", "Transformer/encoder_norm", "norm"),
    (r"visual_projection", "head", "dense"),
    # SiglipVisionModel's attention-pooling head (google/siglip-*), big_vision's MAP head.
    (r"head\.probe", _MAP + "/probe", "param"),
    (r"head\.attention\.in_proj", _MAP_ATTN, "qkv"),
    (r"head\.attention\.out_proj", _MAP_ATTN + "/out", "dense"),
    (r"head\.layernorm", _MAP + "/LayerNorm_0", "norm"),
    (r"head\.mlp\.fc([12])", lambda m: f"{_MAP}/MlpBlock_0/Dense_{int(m[1]) - 1}", "dense"),
]
_HF_DROPPED = ("embeddings.mask_token",)
_HF_DINOV3_PATCHES = "embeddings.patch_embeddings.weight"  # DINOv3ViTModel
_TOWER_PATCHES = "embeddings.patch_embedding.weight"  # HF CLIP's and SigLIP's image towers
_TOWER_TEXT = ("text_model.", "text_projection.", "logit_scale", "logit_bias")


def _image_tower(state: Mapping[str, np.ndarray]) -> Weights:
    """HF CLIP's or SigLIP's image tower in this toolkit's names; a whole CLIPModel's or
    SiglipModel's text tower is dropped."""
    text = [k for k in state if k.startswith(_TOWER_TEXT)]
    tower = {k.removeprefix("vision_model.").replace("attention.in_proj_", "attention.in_proj."):
             v for k, v in state.items()
             if k not in text and not k.endswith("embeddings.position_ids")}
    if "classifier.weight" in tower:
        raise WeightsError("HF CLIPForImageClassification / SiglipForImageClassification pool by "
                           "a mean over the tokens, which this toolkit's CLIP (class token) and "
                           "SigLIP (MAP head) models do not: convert the image tower "
                           "(CLIPVisionModel / SiglipVisionModel weights) and fine-tune a head")
    cls, posemb = "embeddings.class_embedding", "embeddings.position_embedding.weight"
    for key, rank in ((cls, 1), (posemb, 2)):  # [D] and [T, D] here, [1, 1, D] and [1, T, D] there
        if key in tower and tower[key].ndim == rank:
            tower[key] = tower[key].reshape((1,) * (3 - rank) + tower[key].shape)
    weights = _rename(tower, _HF_RULES, "hf")
    if text:
        weights.notes.append(f"the text tower ({len(text)} arrays: text_model, text_projection "
                             "or logit_scale / logit_bias) dropped: the image tower loads")
    return weights


_OTHER_EVA_ROPE = ("timm's {} computes a RoPE form this toolkit does not (naver's RoPE ViTs, "
                   "EVA-02's CLIP towers): only DINOv3's and EVA-02's image models load")


def _timm_eva_rope(state: Mapping[str, np.ndarray], weights: Weights,
                   architecture: str | None) -> str:
    """The RoPE of a timm state dict: "none" unless it is an `Eva` (its own names: gamma_1,
    q_bias, q_proj, fc1_g). The architecture named in a config.json beside the file decides
    (DINOv3's, EVA-02's, EVA-01's without RoPE, else refused); without one the arrays do: no
    position embedding is DINOv3, one with SwiGLU MLPs EVA-02, one with plain MLPs and no
    LayerScale EVA-01, each with a note; naver's RoPE ViTs (LayerScale, plain MLPs) are refused."""
    eva = any(k.endswith((".gamma_1", ".attn.q_bias")) or ".attn.q_proj." in k
              or ".mlp.fc1_g." in k for k in state)
    if not eva:
        return "none"
    if architecture:
        if "dinov3" in architecture:
            return "dinov3"
        if architecture.startswith("eva02") and "_clip_" not in architecture:
            return "eva02"
        if architecture.startswith("eva_"):
            return "none"  # EVA-01: a position embedding, no RoPE
        raise WeightsError(_OTHER_EVA_ROPE.format(architecture))
    mlp = "Transformer/encoderblock_0/MlpBlock_3/Dense_"
    swiglu = (f"{mlp}0/kernel" in weights and f"{mlp}1/kernel" in weights
              and mlp_widths(weights[f"{mlp}0/kernel"], weights[f"{mlp}1/kernel"])[1])
    if "pos_embed" not in state and "reg_token" in state:
        kind, which = "dinov3", "DINOv3's (no position embedding, registers)"
    elif "pos_embed" not in state:
        raise WeightsError(_OTHER_EVA_ROPE.format("Eva without a position embedding or "
                                                  "registers"))
    elif swiglu:
        kind, which = "eva02", "EVA-02's (a position embedding and SwiGLU MLPs)"
    elif any(k.endswith(".gamma_1") for k in state):
        raise WeightsError(_OTHER_EVA_ROPE.format("Eva with a position embedding, LayerScale "
                                                  "and plain MLPs"))
    else:
        kind, which = "none", "EVA-01's, without RoPE (a position embedding and plain MLPs)"
    weights.notes.append(f"timm Eva weights without a config.json naming their architecture: "
                         f"taken as {which}; naver's RoPE ViTs (vit_*_rope_*) would differ")
    return kind


def _rename_one(key: str, value: np.ndarray, rules: list[tuple[str, Target, str]]
                ) -> dict[str, np.ndarray] | None:
    module, _, leaf = key.rpartition(".")
    for pattern, target, layout in rules:
        if layout == "param":
            whole = re.fullmatch(pattern, key)
            if whole:
                return {whole.expand(target) if isinstance(target, str) else target(whole): value}
            continue
        match = re.fullmatch(pattern, module)
        if match is None or leaf not in ("weight", "bias"):
            continue
        name = match.expand(target) if isinstance(target, str) else target(match)
        if layout in _FUSED:
            parts = np.split(value, len(_FUSED[layout]), axis=0)
            kind = "kernel" if leaf == "weight" else "bias"
            return {f"{name}/{n}/{kind}": p.T if leaf == "weight" else p
                    for n, p in zip(_FUSED[layout], parts, strict=True)}
        if leaf == "bias":
            return {f"{name}/bias": value}
        if layout == "conv" and value.ndim != 4:
            raise WeightsError(f"{key} has shape {tuple(value.shape)}, not a convolution's [out, "
                               "in, patch, patch]: linear patch embeddings (SigLIP 2's NaFlex) "
                               "cannot be loaded")
        param, transform = _LAYOUTS[layout]
        return {f"{name}/{param}": transform(value)}
    return None


def mlp_widths(first: np.ndarray, second: np.ndarray) -> tuple[int, bool]:
    """(mlp_dim, SwiGLU?) of an MLP's kernels [width, hidden] and [mlp_dim, width]: a first
    layer twice as wide as the second takes is SwiGLU's [gate | value] (DINOv2-g)."""
    return int(second.shape[0]), int(first.shape[-1]) == 2 * int(second.shape[0])


def _stack_gate_and_up(out: dict[str, np.ndarray], up_alone_is_plain: bool = False) -> None:
    """Split SwiGLU layers (`.../MlpBlock_3/gate`, `/up`) become one Dense_0 of [gate | up];
    with `up_alone_is_plain`, an `up` alone in a file with no gate at all (HF DINOv3's plain
    MLP: up_proj, down_proj) is Dense_0."""
    split = re.compile(r"(.*/MlpBlock_3)/(?:gate|up)/(?:kernel|bias)")
    plain = up_alone_is_plain and not any("/MlpBlock_3/gate/" in k for k in out)
    for mlp in sorted({m[1] for m in map(split.fullmatch, out) if m}):
        for leaf in ("kernel", "bias"):
            gate, up = out.pop(f"{mlp}/gate/{leaf}", None), out.pop(f"{mlp}/up/{leaf}", None)
            if plain and up is not None:
                out[f"{mlp}/Dense_0/{leaf}"] = up
                continue
            if gate is None and up is None and leaf == "bias":
                continue  # bias-free projections
            if gate is None or up is None:
                raise WeightsError(f"{mlp}: a SwiGLU MLP has gate_proj and up_proj {leaf}s in "
                                   f"pairs, and the {'gate' if gate is None else 'up'} one is "
                                   "missing: the file is incomplete")
            out[f"{mlp}/Dense_0/{leaf}"] = np.concatenate([gate, up], axis=-1)


def _rename(state: Mapping[str, np.ndarray], rules: list[tuple[str, Target, str]], source: str,
            dropped: tuple[str, ...] = (), up_alone_is_plain: bool = False) -> Weights:
    out: dict[str, np.ndarray] = {}
    notes, unknown = [], []
    for key, value in state.items():
        if key in dropped:
            notes.append(f"{source} parameter {key} has no counterpart here; dropped")
            continue
        renamed = _rename_one(key, value, rules)
        if renamed is None:
            unknown.append(f"{key} {tuple(value.shape)}")
        else:
            out.update(renamed)
    if unknown:
        which = ("only ViTs (LayerScale, registers, a pre-norm, qk-norm, packed SwiGLU, MAP "
                 "heads), DINOv3, EVA-02 and ResNet-v2 hybrids can be loaded, no other CNN stems"
                 if source == "timm" else
                 "only ViT, DINOv2, DINOv3 and CLIP / SigLIP image towers load from HF naming")
        raise WeightsError(f"{source} parameters with no counterpart in this toolkit's ViT: "
                           f"{', '.join(unknown)}; {which}")
    _stack_gate_and_up(out, up_alone_is_plain)
    clip = "Transformer/pre_norm/scale" in out  # CLIP's patch embedding and projection: no bias
    for layer, what in (("embedding", "the patch embedding"), ("head", "the head (CLIP's "
                                                                  "projection)")):
        if clip and f"{layer}/kernel" in out and f"{layer}/bias" not in out:
            out[f"{layer}/bias"] = np.zeros(out[f"{layer}/kernel"].shape[-1], np.float32)
            notes.append(f"{what} has no bias in the weights (CLIP): zeros loaded")
    if source == "timm" and "conv_root/kernel" in out:
        notes.append(_TIMM_HYBRID_NOTE)
    return Weights(out, source, notes)


def _strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def detect_naming(keys: list[str]) -> str:
    """Name the parameter naming of a flat state dict: "vit" (ours / vit_jax), "timm" or "hf"."""
    keyset = set(keys)
    if any("/" in k for k in keys):
        return "vit"
    if "patch_embed.proj.weight" in keyset:
        return "timm"
    if {"embeddings.patch_embeddings.projection.weight", _HF_DINOV3_PATCHES,
        "vit.embeddings.patch_embeddings.projection.weight",
        "dinov2.embeddings.patch_embeddings.projection.weight", _TOWER_PATCHES,
        "vision_model." + _TOWER_PATCHES} & keyset:
        return "hf"
    shown = ", ".join(sorted(keys)[:5]) or "(no arrays)"
    raise WeightsError(f"unrecognised weight naming (first keys: {shown}): expected a vit_jax "
                       ".npz, a timm or a HuggingFace ViT state dict")


def to_vit_naming(state: Mapping[str, np.ndarray], architecture: str | None = None) -> Weights:
    """Rename a flat state dict of any supported naming to this toolkit's; tags its source.
    `architecture` is timm's name for the model, where a config.json beside the file says it."""
    naming = detect_naming(list(state))
    if naming == "timm":
        weights = _rename(state, _TIMM_RULES, "timm")
        weights.rope = _timm_eva_rope(state, weights, architecture)
        return weights
    if naming == "hf" and _HF_DINOV3_PATCHES in state:
        weights = _rename(state, _HF_RULES, "hf", _HF_DROPPED, up_alone_is_plain=True)
        weights.rope = "dinov3"
        return weights
    if naming == "hf" and {_TOWER_PATCHES, "vision_model." + _TOWER_PATCHES} & set(state):
        return _image_tower(state)
    if naming == "hf":
        prefix = "dinov2." if any(k.startswith("dinov2.") for k in state) else "vit."
        return _rename(_strip_prefix(state, prefix), _HF_RULES, "hf", _HF_DROPPED)
    return from_jax_layouts(state)
