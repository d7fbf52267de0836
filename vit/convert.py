"""`vit convert`: weights in from timm / HF / vit_jax files, and weights out to them.

In (`convert_weights`): any file `vit.weight_formats.read_weights` reads becomes a checkpoint
of this toolkit that rebuilds the source model exactly: its architecture is inferred from the
array shapes, its GELU is the source's (exact erf for timm and HF, tanh for vit_jax) and its
input normalisation is recorded as the run's `pp.normalize`. What the arrays cannot tell comes
from a `config.json` beside the file when there is one (HF's, timm's Hub config, or the one
`--to npz` writes), else from the caller (`gelu`, `normalize`, `num_heads`), else a stated
default. Out (`export_weights`): a checkpoint to timm / HF safetensors or a vit_jax .npz, each
with its config.json (`vit.weights_out`); converting that back gives the same params.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vit.data_options import NORMALIZATIONS
from vit.weight_formats import POSEMB, Weights, WeightsError, read_weights

GELUS = ("erf", "tanh")
_TANH_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_tanh")


def _sidecars(src: str) -> tuple[dict, dict]:
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
    """"tanh" or "erf" for a timm / HF activation name (None: the default, erf GELU);
    WeightsError for any other activation, which this toolkit's MLP does not compute."""
    if activation in _TANH_ACTS:
        return "tanh"
    if activation is None or activation in _ERF_ACTS:
        return "erf"
    raise WeightsError(f"{where} is {activation!r}: this toolkit's ViT computes GELU (erf or "
                       "tanh) in its MLP, so these weights cannot be converted to the same model")


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


def _what_the_file_says(config: dict, preprocessor: dict, normalize: str | None = None) -> dict:
    """GELU, heads, normalisation and this toolkit's model config found in sidecar JSON.

    A stated normalisation this toolkit does not know is an error unless `normalize` (the
    caller's choice) is given.
    """
    said: dict[str, Any] = {}
    mean_std = None
    if "vit" in config:  # written by `vit convert --to npz`
        said.update(config["vit"])
    elif config.get("model_type") == "vit":  # HuggingFace
        said["gelu"] = _gelu_kind(config.get("hidden_act"), "config.json's hidden_act")
        said["num_heads"] = config.get("num_attention_heads")
        labels = config.get("id2label") or {}
        said["class_names"] = [labels[k] for k in sorted(labels, key=int)] or None
        if preprocessor.get("image_mean"):
            mean_std = preprocessor["image_mean"], preprocessor["image_std"]
    elif "model_args" in config:  # timm's Hub config.json
        args = config["model_args"]
        said["gelu"] = _gelu_kind(args.get("act_layer"), "config.json's model_args.act_layer")
        said["num_heads"] = args.get("num_heads")
        cfg = config.get("pretrained_cfg", {})
        said["class_names"] = cfg.get("label_names")
        if cfg.get("mean"):
            mean_std = cfg["mean"], cfg["std"]
    if mean_std is not None and normalize is None:
        said["normalize"] = _stated_normalization(*mean_std)
    return {k: v for k, v in said.items() if v is not None}


def _heads(weights: Weights, width: int, num_heads: int | None) -> tuple[int, str | None]:
    """Heads from the per-head kernel shape [D, heads, head_dim], else given, else guessed."""
    from vit.model import VARIANTS

    query = weights["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    if query.ndim == 3:
        if num_heads and num_heads != query.shape[1]:
            raise WeightsError(f"--num-heads {num_heads} contradicts the weights, whose "
                               f"attention kernels hold {query.shape[1]} heads; drop --num-heads")
        return int(query.shape[1]), None
    if num_heads:
        return int(num_heads), None
    # timm / HF fuse or flatten the heads ([D, D]): the file cannot tell them apart.
    heads = next((v["num_heads"] for v in VARIANTS.values() if v["width"] == width),
                 width // 64 if width % 64 == 0 else None)
    if heads is None:
        raise WeightsError(f"cannot tell the number of heads of width-{width} weights; "
                           "pass --num-heads")
    return heads, (f"{heads} heads assumed for width {width} (head_dim {width // heads}); the "
                   "file does not say: pass --num-heads if that is wrong")


def infer_architecture(weights: Weights, num_heads: int | None = None
                       ) -> tuple[str, dict, list[str]]:
    """(variant, create_model overrides, notes) that rebuild the model `weights` came from."""
    if "embedding/kernel" not in weights or "head/kernel" not in weights:
        raise WeightsError("the weights have no embedding/kernel or head/kernel, so the model "
                           "cannot be inferred; fine-tune from them with configs/finetune.py")
    if any(k.startswith(("stem/", "conv_root/")) for k in weights):
        raise WeightsError("conv-stem and hybrid weights do not tell their strides and norms: "
                           "convert a file written by `vit convert --to npz` (it has a "
                           "config.json), or fine-tune from them with configs/finetune.py")
    patch, _, _, width = weights["embedding/kernel"].shape
    depth = len({k.split("/")[1] for k in weights if k.startswith("Transformer/encoderblock_")})
    heads, note = _heads(weights, int(width), num_heads)
    block = "Transformer/encoderblock_0/"
    classifier = ("token" if "cls" in weights else
                  "map" if any(k.startswith("MAPHead_0/") for k in weights) else "gap")
    overrides = dict(width=int(width), depth=depth, num_heads=heads,
                     mlp_dim=int(weights[block + "MlpBlock_3/Dense_0/kernel"].shape[1]),
                     classifier=classifier, posemb="learn" if POSEMB in weights else "sincos2d")
    if "pre_logits/kernel" in weights:
        overrides["representation_size"] = int(weights["pre_logits/kernel"].shape[1])
    if "Transformer/registers" in weights:
        overrides["num_registers"] = int(weights["Transformer/registers"].shape[1])
    return f"Ti/{patch}", overrides, [note] if note else []


def _image_size(weights: Weights, patch: int, classifier: str) -> int:
    if POSEMB not in weights:
        raise WeightsError("weights without a learned position embedding do not tell the image "
                           "size; fine-tune from them with configs/finetune.py instead")
    tokens = weights[POSEMB].shape[1] - (classifier == "token")
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise WeightsError(f"the position embedding has {tokens} patch tokens, not a square "
                           "grid; fine-tune from these weights with configs/finetune.py")
    return side * patch


def _class_names(path: str | None, said: list[str] | None, num_classes: int) -> list[str]:
    if path:
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"{path!r} lists {len(names)} class names but the head has "
                             f"{num_classes} classes; give one name per line for each")
        return names
    if said and len(said) == num_classes:
        return list(said)
    return [f"class_{i}" for i in range(num_classes)]


def convert_weights(src: str, dst: str, *, num_heads: int | None = None,
                    class_names_file: str | None = None, normalize: str | None = None,
                    gelu: str | None = None) -> tuple[str, list[str]]:
    """Turn weights `read_weights` reads into a checkpoint in workdir `dst`: (its dir, notes).

    `gelu` ("erf" | "tanh") and `normalize` (a `preprocess.NORMALIZATIONS` name) override what
    the file and its config.json say; defaults: the source's GELU (erf for timm / HF, tanh for
    vit_jax), "minus_one_to_one" normalisation (timm's DeiT-style models need "imagenet").
    """
    import jax

    from vit import data
    from vit.checkpoint import Checkpointer
    from vit.model import init_params, model_from_config
    from vit.pretrained import adapt_params

    if gelu is not None and gelu not in GELUS:
        raise ValueError(f"unknown gelu {gelu!r}; use one of {', '.join(GELUS)}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; use one of "
                         f"{', '.join(NORMALIZATIONS)}")
    weights = read_weights(src)
    said = _what_the_file_says(*_sidecars(src), normalize=normalize)
    notes = list(weights.notes)
    if "model" in said:  # our own config.json: the model exactly as it was
        model_config = dict(said["model"])
        variant = model_config.pop("variant")
        model_config = {k: v for k, v in model_config.items() if v is not None}
        image_size = int(said["image_size"])
    else:
        variant, model_config, arch_notes = infer_architecture(
            weights, num_heads or said.get("num_heads"))
        notes += arch_notes
        image_size = _image_size(weights, int(variant.split("/")[1]), model_config["classifier"])
        default_gelu = "erf" if weights.source in ("timm", "hf") else "tanh"
        model_config["gelu_approximate"] = (gelu or said.get("gelu", default_gelu)) == "tanh"
    if gelu is not None:
        model_config["gelu_approximate"] = gelu == "tanh"
    if normalize is None and "normalize" not in said:
        notes.append("input normalisation assumed minus_one_to_one (0.5 / 0.5): the file does "
                     "not say; pass --normalize imagenet for DeiT-style timm models")
    normalize = normalize or said.get("normalize", "minus_one_to_one")
    num_classes = int(weights["head/kernel"].shape[-1])
    model = model_from_config({"variant": variant, **model_config}, num_classes=num_classes,
                              image_size=image_size)
    params, adapt_notes = adapt_params(weights, init_params(model, jax.random.PRNGKey(0)), model,
                                       keep_head=True)
    notes += [n for n in adapt_notes if n not in notes]
    names = _class_names(class_names_file, said.get("class_names"), num_classes)
    config = data.default_config()
    config.dataset = os.path.basename(os.path.normpath(src))
    config.image_size = image_size
    config.pp.normalize = normalize
    if said.get("eval_resize") is not None:
        config.pp.eval_resize = int(said["eval_resize"])
    config.model = {"variant": variant, **model_config}
    info = data.DatasetInfo(config.dataset, num_classes, tuple(names),
                            (image_size, image_size, 3), {})
    checkpointer = Checkpointer(dst)
    checkpointer.save(0, {"step": 0, "params": params}, config=config.to_dict(),
                      dataset_info=info.to_dict(), force=True)
    checkpointer.close()
    return str(checkpointer.directory / "0"), notes


EXPORTED_FILES = {"timm": ("model.safetensors", "config.json"),
                  "hf": ("model.safetensors", "config.json", "preprocessor_config.json"),
                  "npz": ("model.npz", "config.json")}


def _save_safetensors(state: dict, path: Path) -> Path:
    """safetensors' save_file, with the permissions of any file this process makes (it writes
    0600)."""
    from safetensors.numpy import save_file

    save_file(state, str(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


def export_weights(checkpoint: str, target: str, out_dir: str, *, use_ema: bool = False
                   ) -> list[str]:
    """Write a checkpoint's params for timm, HF or as a vit_jax .npz in `out_dir`; the paths."""
    import jax

    from vit import weights_out
    from vit.evaluate import load_inference_model

    if target not in weights_out.TARGETS:
        raise ValueError(f"unknown --to {target!r}; use one of {', '.join(weights_out.TARGETS)}")
    there = [name for name in EXPORTED_FILES[target] if (Path(out_dir) / name).exists()]
    if there:
        raise ValueError(f"{out_dir} already holds {', '.join(there)}; write the --to {target} "
                         "files to a new directory, or remove them first")
    loaded = load_inference_model(checkpoint, use_ema=use_ema)
    if any(np.asarray(v).dtype == np.int8 for v in jax.tree_util.tree_leaves(loaded.params)):
        raise WeightsError("this checkpoint holds int8-quantised weights: convert the float "
                           "checkpoint it was quantised from")
    names, kind = list(loaded.info.class_names), loaded.config.pp.normalize
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    if target == "timm":
        state, files["config.json"] = weights_out.to_timm(loaded.params, loaded.model, names, kind)
        written = [_save_safetensors(state, out / "model.safetensors")]
    elif target == "hf":
        state, files["config.json"], files["preprocessor_config.json"] = weights_out.to_hf(
            loaded.params, loaded.model, names, kind)
        written = [_save_safetensors(state, out / "model.safetensors")]
    else:
        arrays, files["config.json"] = weights_out.to_npz(loaded.params, loaded.config.to_dict(),
                                                          names)
        np.savez(out / "model.npz", **arrays)
        written = [out / "model.npz"]
    for name, payload in files.items():
        (out / name).write_text(json.dumps(payload, indent=2) + "\n")
        written.append(out / name)
    return [str(p) for p in written]

