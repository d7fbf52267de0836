"""What the JSON beside a weight file says of its model: GELU, heads, MLP size, image size,
normalisation, evaluation crop and class names, from HF's, timm's Hub or this toolkit's own
config.json.

`vit.convert` asks these readers what the arrays cannot tell. Unreadable or self-contradicting
JSON is a one-line WeightsError naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from vit.data_options import NORMALIZATIONS
from vit.model_options import pair
from vit.weight_formats import WeightsError

GELUS = ("erf", "tanh", "quick")  # "quick": OpenAI CLIP's x * sigmoid(1.702 x)
_TANH_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_tanh")


def read_sidecars(src: str) -> tuple[dict, dict]:
    """(config.json, preprocessor_config.json) beside a weight file; {} where absent."""
    folder = Path(src) if os.path.isdir(src) else Path(src).parent
    found = []
    for name in ("config.json", "preprocessor_config.json"):
        path = folder / name
        if not path.is_file():
            found.append({})
            continue
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise WeightsError(f"{path} beside the weights cannot be read as JSON ({err}): it "
                               "says how to rebuild the model; fix it, or move it away to "
                               "convert without it") from None
        if not isinstance(found[-1], dict):
            raise WeightsError(f"{path} beside the weights is not a JSON object: fix it, or "
                               "move it away to convert without it")
    return found[0], found[1]


_ERF_ACTS = ("gelu", "gelu_python", "gelu_erf")


def _gelu_kind(activation: Any, where: str) -> str:
    """"tanh", "erf" or "quick" for a timm / HF activation name (None: the default, erf GELU);
    WeightsError for any other activation, which this toolkit's MLP does not compute."""
    if activation in _TANH_ACTS:
        return "tanh"
    if activation == "quick_gelu":
        return "quick"
    if activation is None or activation in _ERF_ACTS:
        return "erf"
    raise WeightsError(f"{where} is {activation!r}: this toolkit's ViT computes GELU (erf or "
                       "tanh) or CLIP's quick GELU in its MLP, so these weights cannot be "
                       "converted to the same model")


def _stated_normalization(mean: Any, std: Any) -> str:
    """The NORMALIZATIONS name of a file's stated mean / std; WeightsError when none fits."""
    name = _normalization_name(mean, std)
    if name is None:
        raise WeightsError(f"the file's input normalisation (mean {list(mean)}, std {list(std)}) "
                           f"is none of {', '.join(NORMALIZATIONS)}: pass --normalize NAME to "
                           "convert with that one instead")
    return name


def _normalization_name(mean: Any, std: Any) -> str | None:
    for name, (m, s) in NORMALIZATIONS.items():
        if np.allclose(m, mean, atol=1e-3) and np.allclose(s, std, atol=1e-3):
            return name
    return None


def _mean_std(cfg: dict, keys: tuple[str, str], where: str) -> tuple[Any, Any] | None:
    """(mean, std) stated in `cfg` under `keys`, None when neither is; WeightsError for one."""
    mean, std = (cfg.get(k) for k in keys)
    if not mean and not std:
        return None
    if not mean or not std:
        missing, given = (keys[0], keys[1]) if not mean else (keys[1], keys[0])
        raise WeightsError(f"{where} gives {given} but no {missing}, so the input normalisation "
                           "is unknown; add it, or pass --normalize NAME")
    return mean, std


def check_own_model(said: Any, where: str, fix: str) -> dict:
    """This toolkit's own {model, image_size, ...} (a run config, or the "vit" entry of the
    config.json `--to npz` writes), checked for what rebuilding the model needs."""
    model = said.get("model") if isinstance(said, dict) else None
    missing = ("an object" if not isinstance(said, dict)
               else "model" if not isinstance(model, dict)
               else "model.variant" if "variant" not in model
               else "image_size" if said.get("image_size") is None else None)
    if missing:
        raise WeightsError(f"{where} has no {missing}, so the model cannot be rebuilt: {fix}")
    try:
        pair(said["image_size"])
    except ValueError as err:
        raise WeightsError(f"{where}: {err}; {fix}") from None
    return said


def _timm_image_size(args: dict, cfg: dict) -> Any:
    """timm's stated image size: model_args.img_size, else pretrained_cfg.input_size [3, H, W]."""
    if args.get("img_size") is not None:
        return args["img_size"]
    size = cfg.get("input_size")
    return list(size[1:]) if isinstance(size, list) and len(size) == 3 else None


TIMM_SWIGLU = "vit_giant_patch14_dinov2"  # timm's ViT with packed SwiGLU MLPs (DINOv2-g)


def timm_norm_epsilon(architecture: str) -> float:
    """The LayerNorm epsilon timm builds `architecture` with: 1e-5 for its CLIP and DINOv3
    architectures, else 1e-6 (ViT, DINOv2, EVA-02)."""
    return 1e-5 if "_clip_" in architecture or "dinov3" in architecture else 1e-6


# HF image towers (alone, or inside a two-tower model's vision_config): their default activation.
_HF_TOWER_ACTS = {"clip_vision_model": "quick_gelu", "clip": "quick_gelu",
                  "siglip_vision_model": "gelu_pytorch_tanh", "siglip": "gelu_pytorch_tanh"}
_HF_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit", *_HF_TOWER_ACTS)


def what_the_file_says(config: dict, preprocessor: dict, normalize: str | None = None) -> dict:
    """GELU, heads, MLP size, image size, normalisation, evaluation crop and this toolkit's model
    config found in sidecar JSON.

    A stated normalisation this toolkit does not know is an error unless `normalize` (the
    caller's choice) is given.
    """
    said: dict[str, Any] = {}
    mean_std = None
    if "vit" in config:  # written by `vit convert --to npz`
        said.update(check_own_model(config["vit"], "the \"vit\" entry of config.json beside the "
                               "weights", "fix it, or move it away to convert without it"))
    elif config.get("model_type") in _HF_MODEL_TYPES:  # HuggingFace
        kind = config["model_type"]
        tower = (config.get("vision_config") or {}) if kind in ("clip", "siglip") else config
        if not (tower.get("use_gated_mlp") or tower.get("use_swiglu_ffn")):  # DINOv3's and
            # DINOv2-g's SwiGLU (silu): found in the MLP's shapes
            said["gelu"] = _gelu_kind(tower.get("hidden_act", _HF_TOWER_ACTS.get(kind)),
                                      "config.json's hidden_act")
        said["norm_epsilon"] = tower.get("layer_norm_eps")
        said["num_heads"] = tower.get("num_attention_heads")
        said["mlp_dim"] = tower.get("intermediate_size")
        said["image_size"] = tower.get("image_size")
        labels = (config.get("id2label") or {}) if kind == "vit" else {}  # towers name no classes
        said["class_names"] = [labels[k] for k in sorted(labels, key=int)] or None
        mean_std = _mean_std(preprocessor, ("image_mean", "image_std"),
                             "preprocessor_config.json")
        size = preprocessor.get("size") or {}
        if preprocessor.get("do_center_crop") and isinstance(size, dict):
            said["eval_resize"] = size.get("shortest_edge")
    elif {"model_args", "pretrained_cfg", "architecture"} & set(config):  # timm's Hub config
        args = config.get("model_args") or {}  # only written for non-default arguments
        architecture = str(config.get("architecture", ""))
        cfg = config.get("pretrained_cfg") or {}
        act = args.get("act_layer")
        if act is None and "quickgelu" in architecture:
            act = "quick_gelu"  # timm's *_clip_quickgelu_* models: OpenAI CLIP weights
        said["gelu"] = _gelu_kind(act, "config.json's model_args.act_layer")
        if said["gelu"] != "quick" and cfg.get("tag") == "openai" and "_clip_" in architecture:
            said["gelu_note"] = (f"OpenAI's CLIP weights: timm's {architecture} runs them with "
                                 "exact GELU, as this conversion does; OpenAI trained them with "
                                 "quick GELU: pass --gelu quick for its own activation")
        said["num_heads"] = args.get("num_heads")
        if args.get("mlp_ratio") and args.get("embed_dim"):  # as timm sizes its first layer
            first = int(args["mlp_ratio"] * args["embed_dim"])
            said["mlp_dim"] = first // 2 if architecture == TIMM_SWIGLU else first
        said["image_size"] = _timm_image_size(args, cfg)
        if architecture:
            said["norm_epsilon"] = timm_norm_epsilon(architecture)
        said["global_pool"] = config.get("global_pool") or args.get("global_pool")
        said["rope_grid"] = args.get("ref_feat_shape")  # EVA-02's reference grid
        said["class_names"] = cfg.get("label_names")
        mean_std = _mean_std(cfg, ("mean", "std"), "config.json's pretrained_cfg")
        said["timm_crop"] = (cfg["crop_pct"], cfg.get("crop_mode")) if cfg.get("crop_pct") else None
    if mean_std is not None and normalize is None:
        said["normalize"] = _stated_normalization(*mean_std)
    return {k: v for k, v in said.items() if v is not None}


def _timm_eval_resize(crop: tuple[float, str | None], size: int) -> tuple[int | None, str | None]:
    """(pp.eval_resize, note) for timm's eval crop (crop_pct, crop_mode) at image size `size`
    (its shorter side): "center" (the default) resizes the shorter side to floor(size /
    crop_pct), as timm does."""
    pct, mode = crop
    if mode in (None, "center"):
        return math.floor(size / pct), None
    if mode == "squash" and pct == 1.0:
        return None, None
    return None, (f"timm's crop_mode {mode!r} at crop_pct {pct} has no counterpart here: "
                  "evaluation resizes straight to the image size")


def stated_eval_resize(said: dict, image_size: Any) -> tuple[int | None, list[str]]:
    """The stated pp.eval_resize (our own, HF's shortest_edge or timm's crop) and notes, for a
    model of `image_size` (an int or (rows, cols)), whose shorter side it must not be below."""
    notes = []
    size = min(pair(image_size))
    resize = said.get("eval_resize")
    if "timm_crop" in said:
        resize, note = _timm_eval_resize(said["timm_crop"], size)
        notes += [note] if note else []
    if resize is not None and int(resize) < size:
        notes.append(f"the file's evaluation resize {resize} is below the image size "
                     f"{image_size}: evaluation resizes straight to the image size")
        resize = None
    return (None if resize is None else int(resize)), notes
