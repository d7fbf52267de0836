"""Read weight files into one flat dict in this toolkit's parameter naming.

Containers: a checkpoint directory of this toolkit (via `vit.checkpoint`), `.npz` (vit_jax /
AugReg, keys joined with "/"), `.safetensors`, and `.bin` / `.pth` / `.pt` (needs torch); the
config.json beside a file where it says what the arrays cannot (this toolkit's grid and RoPE,
timm's architecture). The namings (timm, HuggingFace, big_vision) are vit/weight_names.py's,
whose `Weights`, `WeightsError`, `POSEMB`, `mlp_widths`, `detect_naming` and `to_vit_naming`
this module re-exports.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from vit.error_text import first_line
from vit.model_options import pair
from vit.weight_names import (
    POSEMB,
    Weights,
    WeightsError,
    detect_naming,
    mlp_widths,
    to_vit_naming,
)

__all__ = ["POSEMB", "TORCH_SUFFIXES", "Weights", "WeightsError", "checkpoint_weights",
           "detect_naming", "flatten_params", "has_real_class_names", "mlp_widths",
           "read_weights", "run_grid", "run_rope", "run_rope_grid", "to_vit_naming"]

TORCH_SUFFIXES = (".bin", ".pth", ".pt")
_GENERIC_CLASS_NAME = re.compile(r"(class_)?\d+")


def has_real_class_names(names: Sequence[str]) -> bool:
    """Whether `names` say something: not all placeholders such as "class_3" or "3"."""
    return not all(_GENERIC_CLASS_NAME.fullmatch(str(n)) for n in names)


def run_grid(run_config: Any) -> tuple[int, int] | None:
    """The patch grid of this toolkit's run config ({model, image_size, ...}); None if unsaid."""
    from vit.model import grid_from_config

    if not isinstance(run_config, Mapping):
        return None
    return grid_from_config(run_config.get("model"), run_config.get("image_size"))


def run_rope(run_config: Any) -> str:
    """The rotary position embedding of this toolkit's run config's model ("none" if unsaid)."""
    model = run_config.get("model") if isinstance(run_config, Mapping) else None
    return (model.get("rope") if isinstance(model, Mapping) else None) or "none"


def run_rope_grid(run_config: Any) -> tuple[int, int] | None:
    """The grid an "eva02" RoPE run's coordinates were scaled to: its model's rope_grid, else its
    own patch grid; None for other runs."""
    if run_rope(run_config) != "eva02":
        return None
    stated = run_config["model"].get("rope_grid")
    return pair(stated, "rope_grid") if stated else run_grid(run_config)


def _timm_rope_grid(said: Mapping[str, Any]) -> tuple[int, int] | None:
    """EVA-02's reference grid (`ref_feat_shape`) in a timm config.json's `said` contents."""
    args = said.get("model_args")
    try:
        return pair(args["ref_feat_shape"], "ref_feat_shape")
    except (TypeError, KeyError, ValueError):
        return None


def _sidecar(path: str) -> dict:
    """The config.json beside `path` as a dict; {} if none (or not a JSON object)."""
    try:
        with open(os.path.join(os.path.dirname(path), "config.json")) as f:
            said = json.load(f)
    except (OSError, ValueError):
        return {}  # no config.json: what it would say is guessed from the arrays
    return said if isinstance(said, dict) else {}


def _sidecar_run(said: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The run config in a config.json `vit convert --to npz` wrote (its `said` contents); None
    if none."""
    run = said.get("vit")
    return run if isinstance(run, Mapping) else None


def _sidecar_architecture(said: Mapping[str, Any]) -> str | None:
    """timm's architecture name in a Hub config.json's `said` contents; None if none."""
    name = said.get("architecture")
    return name if isinstance(name, str) and name else None


def _stated_heads(said: Mapping[str, Any]) -> int | None:
    """The attention's head count a timm (model_args) or HF config.json states; None if none."""
    for value in ((said.get("model_args") or {}).get("num_heads"),
                  said.get("num_attention_heads"),
                  (said.get("vision_config") or {}).get("num_attention_heads")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def flatten_params(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a nested params dict to {"a/b/c": leaf}; an already flat dict passes through."""
    if not any(isinstance(v, Mapping) for v in tree.values()):
        return dict(tree)
    return traverse_util.flatten_dict(dict(tree), sep="/")


# ---------------------------------------------------------------------------------------------
# Containers: path -> flat {name: array} in the file's own naming.


def _read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading {path!r} needs PyTorch, which is not installed: "
                           "pip install torch, or convert the file to .safetensors") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_checkpoint(path: str, use_ema: bool) -> Weights:
    from vit.checkpoint import load_checkpoint  # orbax: only checkpoint directories need it

    return checkpoint_weights(load_checkpoint(path), path, use_ema)


def checkpoint_weights(contents: Any, path: str, use_ema: bool) -> Weights:
    """The `Weights` of this toolkit's loaded checkpoint `contents` (read from `path`): its params
    or EMA params, and what its run config says of them (grid, classes, normalisation, RoPE)."""
    params = contents.chosen_params(use_ema)
    arrays = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    which = "EMA params" if use_ema else "params"
    return Weights(arrays, "checkpoint", [f"loaded {which} of step {contents.step} from {path}"],
                   grid=run_grid(contents.config),
                   class_names=tuple(contents.dataset_info.get("class_names") or ()) or None,
                   normalize=(contents.config.get("pp") or {}).get("normalize"),
                   rope=run_rope(contents.config), rope_grid=run_rope_grid(contents.config))


def read_weights(path: str | os.PathLike[str], *, use_ema: bool = False) -> Weights:
    """Read any supported weight source into a flat {"a/b/c": array} `Weights` dict.

    `result.source` is the detected format ("checkpoint", "vit_jax", "timm" or "hf") and
    `result.notes` says what was dropped or approximated; `use_ema` picks a checkpoint's EMA params.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights at {path!r}: pass an existing .npz, .safetensors, "
                                ".bin/.pth file or checkpoint directory")
    if os.path.isdir(path):
        return _read_checkpoint(path, use_ema)
    if use_ema:
        raise WeightsError(f"use_ema applies to checkpoint directories only, not to {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    readers = {".npz": _read_npz, ".safetensors": _read_safetensors,
               **{s: _read_torch for s in TORCH_SUFFIXES}}
    if suffix not in readers:
        raise WeightsError(f"unsupported weight file {path!r}: use .npz, .safetensors, "
                           ".bin/.pth/.pt, or a checkpoint directory")
    try:
        state = readers[suffix](path)
    except WeightsError:
        raise
    except Exception as err:  # numpy, safetensors and torch each raise their own types
        raise WeightsError(f"cannot read {path!r} as a {suffix} weight file "
                           f"({first_line(err, with_type=True, limit=160)}): the file is damaged "
                           "or not what its name says; download or write it again") from None
    said = _sidecar(path)
    weights = to_vit_naming(state, _sidecar_architecture(said))
    run = _sidecar_run(said)
    weights.grid = run_grid(run)
    weights.num_heads = _stated_heads(said)
    if run is not None and weights.rope == "none":
        weights.rope = run_rope(run)
    if weights.rope == "eva02":
        weights.rope_grid = run_rope_grid(run) if run is not None else _timm_rope_grid(said)
    return weights
