"""`vit convert`: weights in from timm / HF / vit_jax files, and weights out to them.

In (`convert_weights`): any file `vit.weight_formats.read_weights` reads becomes a checkpoint
of this toolkit that rebuilds the source model exactly: its architecture is inferred from the
array shapes, its GELU is the source's (exact erf for timm and HF, tanh for vit_jax) and its
input normalisation is recorded as the run's `pp.normalize`. What the arrays cannot tell comes
from a `config.json` beside the file when there is one (HF's, timm's Hub config, or the one
`--to npz` writes), else from the caller (`gelu`, `normalize`, `num_heads`), else a stated
default. A checkpoint of this toolkit keeps its run's own config (model, image size,
normalisation, evaluation resize, class names); an int8 one is refused. The image size may be
rectangular where the source states it (the run config, or the config.json beside a file);
otherwise the square the position embedding's token count makes (with or without a class-token
entry: DeiT III and DINOv2-reg have none). `image_size` rebuilds the model for another size
instead; head-less backbones (DINOv2) need `num_classes` for a zero head. `rebuild_weights`
does all of it without writing (`vit info` reads it). Out
(`export_weights`): a checkpoint to timm / HF safetensors or a vit_jax .npz, each with its
config.json (`vit.weights_out`); converting that back gives the same params and eval resize.
Weights that cannot be mapped are one WeightsError line naming the missing array or format.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vit import weight_sidecars
from vit.data_options import NORMALIZATIONS
from vit.error_text import first_line
from vit.model_options import json_image_size, pair
from vit.weight_architecture import infer_architecture, weight_grid
from vit.weight_formats import Weights, WeightsError, checkpoint_weights, read_weights


def _read_class_names(path: str) -> list[str]:
    """The class names of a --class-names file, one per line; WeightsError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise WeightsError(f"--class-names {path!r} cannot be read as text "
                           f"({first_line(err, with_type=True, limit=120)}): give a UTF-8 text "
                           "file with one class name per line") from None


def _num_classes(weights: Weights, stated: int | None, class_names_file: str | None,
                 require_head: bool = True) -> tuple[int, list[str]]:
    """(classes of the converted model's head, notes): the head's, else `stated`, else as many
    as the class-names file lists; a head-less backbone (DINOv2) gets a zero head of them, or
    of 1 class without `require_head`."""
    if "head/kernel" in weights:
        have = int(weights["head/kernel"].shape[-1])
        if stated is not None and stated != have:
            raise WeightsError(f"--num-classes {stated} contradicts the weights, whose head has "
                               f"{have} classes; drop --num-classes")
        return have, []
    if stated is None and class_names_file:
        stated = len(_read_class_names(class_names_file))
        if not stated:
            raise WeightsError(f"{class_names_file!r} lists no class names: give one per line")
    if not stated and not require_head:
        return 1, []
    if not stated:
        raise WeightsError("the weights have no classification head (a backbone such as "
                           "DINOv2): pass --num-classes N (or --class-names FILE) to give the "
                           "checkpoint a zero-initialised head of N classes, for vit fewshot, "
                           "vit attention or fine-tuning from it")
    return stated, [f"the weights have no head: a zero-initialised head of {stated} classes "
                    "added (its logits are all 0 until fine-tuned; features are unchanged)"]


def _class_names(path: str | None, said: list[str] | None, num_classes: int) -> list[str]:
    if path:
        names = _read_class_names(path)
        if len(names) != num_classes:
            raise ValueError(f"{path!r} lists {len(names)} class names but the head has "
                             f"{num_classes} classes; give one name per line for each")
        return names
    if said and len(said) == num_classes:
        return list(said)
    return [f"class_{i}" for i in range(num_classes)]


# The run-config keys saying what a checkpoint's classes are: a converted checkpoint keeps them.
_DATA_KEYS = ("dataset", "data_dir", "classes", "train_split", "eval_split")


def _own_checkpoint(src: str, use_ema: bool) -> tuple[Weights, dict]:
    """(params, or its EMA params; what its run config says) of this toolkit's checkpoint `src`:
    the model config, image size, normalisation, evaluation resize, dataset and class names."""
    from vit.checkpoint import load_checkpoint

    contents = load_checkpoint(src)
    model = dict(contents.config.get("model") or {})
    if model.get("quant", "none") != "none":
        raise WeightsError(f"{src} holds {model['quant']}-quantised weights, which convert "
                           "cannot rebuild as a float model: convert the float checkpoint it was "
                           "quantised from")
    weights = checkpoint_weights(contents, src, use_ema)
    pp = contents.config.get("pp") or {}
    said = {"model": model, "image_size": contents.config.get("image_size"),
            "normalize": pp.get("normalize"), "eval_resize": pp.get("eval_resize"),
            "class_names": contents.dataset_info.get("class_names")}
    weight_sidecars.check_own_model(said, f"the run config of {src}",
                                    "convert a checkpoint written by vit train")
    said["data"] = {key: contents.config[key] for key in _DATA_KEYS if key in contents.config}
    return weights, {k: v for k, v in said.items() if v is not None}


# What a Hub folder (HF's from_pretrained, timm's) holds its weights in, most preferred first.
_HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.npz")


def weight_file_in(folder: str) -> str | None:
    """The weight file of a Hub-style folder (model.safetensors beside its config.json, ...);
    None for anything else, such as this toolkit's workdirs and checkpoints."""
    for name in _HUB_WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _read_source(src: str, normalize: str | None, use_ema: bool) -> tuple[Weights, dict]:
    """(weights, what the source says of its model): a checkpoint's own run config, else the
    config.json / preprocessor_config.json beside a weight file."""
    if os.path.isdir(src):
        inside = weight_file_in(src)
        if inside is None:
            return _own_checkpoint(src, use_ema)
        src = inside
    if use_ema:
        raise WeightsError(f"{src} is a weight file, which holds one set of parameters: drop "
                           "--ema (it picks a checkpoint's EMA parameters)")
    said = weight_sidecars.what_the_file_says(*weight_sidecars.read_sidecars(src),
                                              normalize=normalize)
    return read_weights(src), said


def _gelu_options(kind: str) -> dict[str, bool]:
    """The model options of a GELU kind (weight_sidecars.GELUS)."""
    return {"gelu_approximate": kind == "tanh", "quick_gelu": kind == "quick"}


def _model_config(weights: Weights, said: dict, num_heads: int | None, gelu: str | None
                  ) -> tuple[str, dict, tuple[int, int], list[str]]:
    """(variant, model overrides, image size (rows, cols), notes): as the source's own config
    says, else inferred from the arrays and the sidecar JSON (whose stated image size sets the
    position embedding's grid, which `weights.grid` then records)."""
    notes: list[str] = []
    if "model" in said:  # our own config: the model exactly as it was
        model_config = {k: v for k, v in said["model"].items() if v is not None}
        variant = model_config.pop("variant")
        image_size = pair(said["image_size"])
    else:
        variant, model_config, notes = infer_architecture(
            weights, num_heads or said.get("num_heads"), said.get("mlp_dim"))
        patch = int(variant.split("/")[1])
        weights.grid, grid_notes = weight_grid(weights, "cls" in weights,
                                               said.get("image_size"), patch)
        notes += grid_notes
        image_size = (weights.grid[0] * patch, weights.grid[1] * patch)
        if said.get("norm_epsilon"):
            model_config["norm_epsilon"] = float(said["norm_epsilon"])
        if said.get("rope_grid") and model_config.get("rope") == "eva02":
            model_config["rope_grid"] = tuple(pair(said["rope_grid"], "ref_feat_shape"))
        elif model_config.get("rope") == "eva02":
            rows, cols = model_config["rope_grid"]
            notes.append(f"RoPE coordinates scaled to a {rows}x{cols} grid assumed (EVA-02's "
                         "224 px pretraining): nothing beside the weights states ref_feat_shape; "
                         "give the config.json they came with if they were trained otherwise")
        if said.get("global_pool") == "avg" and model_config["classifier"] == "token":
            # timm's mean over the patches beside its class token (DINOv3's default)
            model_config.update(classifier="gap", class_token=True)
        default_gelu = "erf" if weights.source in ("timm", "hf") else "tanh"
        model_config.update(_gelu_options(gelu or said.get("gelu", default_gelu)))
        if gelu is None and said.get("gelu_note"):
            notes.append(said["gelu_note"])
    if gelu is not None:
        model_config.update(_gelu_options(gelu))
    return variant, model_config, image_size, notes


def _new_image_size(image_size: Any, variant: str, model_config: dict
                    ) -> tuple[int, int] | None:
    """The requested input size as (rows, cols), checked against the patch size; None if none."""
    if image_size is None:
        return None
    from vit.model import parse_variant

    rows, cols = pair(image_size)
    patch = pair(model_config.get("patch_size") or parse_variant(variant)[1], "patch_size")
    if rows % patch[0] or cols % patch[1]:
        near = [max(n // p, 1) * p for n, p in zip((rows, cols), patch, strict=True)]
        raise WeightsError(f"image size {rows}x{cols} is not a multiple of the weights' "
                           f"{patch[0]}x{patch[1]} patches: pass a multiple, e.g. "
                           f"{near[0] if near[0] == near[1] else f'{near[0]},{near[1]}'}")
    return rows, cols


@dataclasses.dataclass
class Rebuilt:
    """Weights rebuilt as a checkpoint of this toolkit would hold them, before it is written."""

    model: Any  # the VisionTransformer
    params: dict
    config: dict  # the run config: model, image size, normalisation, eval resize, dataset
    dataset_info: dict
    notes: list[str]
    source: str  # "checkpoint", "timm", "hf" or "vit_jax"
    has_head: bool  # False: head-less weights, given a stand-in zero head


def rebuild_weights(src: str, *, num_heads: int | None = None,
                    class_names_file: str | None = None, normalize: str | None = None,
                    gelu: str | None = None, use_ema: bool = False,
                    num_classes: int | None = None, image_size: Any = None,
                    require_head: bool = True) -> Rebuilt:
    """The model, params and run config that `convert_weights` writes for weights `read_weights`
    reads (nothing is written).

    A checkpoint of this toolkit keeps its run's model config, image size, normalisation,
    evaluation resize and class names. `gelu` ("erf" | "tanh") and `normalize` (a
    `preprocess.NORMALIZATIONS` name) override what the source says; defaults: the source's
    GELU (erf for timm / HF, tanh for vit_jax), "minus_one_to_one" normalisation (timm's
    DeiT-style models need "imagenet"). `num_heads` is for fused timm / HF attention whose width
    is no standard variant's; `class_names_file` has one class name per line. `num_classes`
    sizes the zero head given to head-less weights (DINOv2 backbones; required unless
    `require_head=False`, which gives them a stand-in head of 1 class); weights with a head keep
    theirs. `image_size` rebuilds the model for another input size, resampling the position
    embedding as fine-tuning's "auto" does (zoom for vit_jax / big_vision files, else
    bilinear). `use_ema` takes a checkpoint's EMA parameters.
    """
    import jax

    from vit import data
    from vit.model import init_params, saved_model_from_config
    from vit.pretrained import adapt_params, posemb_resampling

    if gelu is not None and gelu not in weight_sidecars.GELUS:
        raise ValueError(f"unknown gelu {gelu!r}; use one of {', '.join(weight_sidecars.GELUS)}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; use one of "
                         f"{', '.join(NORMALIZATIONS)}")
    weights, said = _read_source(src, normalize, use_ema)
    resampling = posemb_resampling("auto", weights)  # before a grid is inferred for them
    variant, model_config, trained_size, arch_notes = _model_config(weights, said, num_heads,
                                                                    gelu)
    image_size = _new_image_size(image_size, variant, model_config) or trained_size
    if model_config.get("rope") == "eva02" and model_config.get("rope_grid") is None:
        # the trained grid, kept when the size changes: the patches keep their angles
        model_config["rope_grid"] = tuple(weights.rope_grid or weights.grid)
    if image_size != trained_size and said.get("eval_resize"):  # the same crop at the new size
        said["eval_resize"] = round(said["eval_resize"] * min(image_size) / min(trained_size))
    eval_resize, resize_notes = weight_sidecars.stated_eval_resize(said, image_size)
    notes = list(weights.notes) + arch_notes + resize_notes
    if normalize is None and "normalize" not in said:
        notes.append("input normalisation assumed minus_one_to_one (0.5 / 0.5): the file does "
                     "not say; pass --normalize imagenet for DeiT-style timm models")
    normalize = normalize or said.get("normalize", "minus_one_to_one")
    has_head = "head/kernel" in weights
    num_classes, head_notes = _num_classes(weights, num_classes, class_names_file, require_head)
    notes += head_notes
    # A model trained with attention "cudnn" on a GPU converts (and runs) anywhere.
    model = saved_model_from_config({"variant": variant, **model_config},
                                    num_classes=num_classes, image_size=image_size)
    params, adapt_notes = adapt_params(weights, init_params(model, jax.random.PRNGKey(0)), model,
                                       keep_head=True if has_head else None,
                                       posemb_method=resampling)
    notes += [n for n in adapt_notes if n not in notes and not n.startswith("head initialised")]
    names = _class_names(class_names_file, said.get("class_names"), num_classes)
    config = data.default_config()
    config.dataset = ""  # weights from a file name no dataset: `vit eval --dataset` says which
    config.update(said.get("data", {}))
    config.image_size = json_image_size(image_size)
    config.pp.normalize = normalize
    config.pp.eval_resize = eval_resize
    config.model = {"variant": variant, **model_config}
    info = data.DatasetInfo(config.dataset or os.path.basename(src), num_classes, tuple(names),
                            (*image_size, 3), {})
    return Rebuilt(model, params, config.to_dict(), info.to_dict(), notes, weights.source,
                   has_head)


def convert_weights(src: str, dst: str, **rebuild_args: Any) -> tuple[str, list[str]]:
    """Write the checkpoint `rebuild_weights(src, **rebuild_args)` rebuilds into workdir `dst`
    (as its step 0): (its step directory, the notes on what was read and adapted)."""
    from vit.checkpoint import write_params

    rebuilt = rebuild_weights(src, **rebuild_args)
    path = write_params(dst, 0, rebuilt.params, rebuilt.config, rebuilt.dataset_info)
    return path, rebuilt.notes


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


def _out_files(loaded: Any, target: str) -> dict[str, Any]:
    """{file name: arrays or JSON payload} of `loaded` for `--to target`, all in memory."""
    from vit import weights_out

    names, kind = list(loaded.info.class_names), loaded.config.pp.normalize
    resize = loaded.config.pp.get("eval_resize")
    if target == "timm":
        state, config = weights_out.to_timm(loaded.params, loaded.model, names, kind, resize)
        return {"model.safetensors": state, "config.json": config}
    if target == "hf":
        state, config, preprocessor = weights_out.to_hf(loaded.params, loaded.model, names,
                                                        kind, resize)
        return {"model.safetensors": state, "config.json": config,
                "preprocessor_config.json": preprocessor}
    arrays, config = weights_out.to_npz(loaded.params, loaded.config.to_dict(), names)
    return {"model.npz": arrays, "config.json": config}


def _write_out_file(name: str, payload: Any, path: Path) -> None:
    """One `--to` file at `path`: safetensors, .npz or JSON by `name`."""
    if name.endswith(".safetensors"):
        _save_safetensors(payload, path)
    elif name.endswith(".npz"):
        with open(path, "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, **payload)
    else:
        path.write_text(json.dumps(payload, indent=2) + "\n")


def export_weights(checkpoint: str, target: str, out_dir: str, *, use_ema: bool = False
                   ) -> list[str]:
    """Write a checkpoint's params for timm, HF or as a vit_jax .npz in `out_dir`; the paths.

    Each file is written under a temporary name and renamed once all are written, the weights
    last: a failure leaves `out_dir` as it was (a directory this call made is removed again).
    """
    import jax

    from vit import weights_out
    from vit.evaluate import load_inference_model
    from vit.output_paths import new_directory

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
    files = _out_files(loaded, target)  # refusals (timm / HF: plain ViTs only) come here
    order = sorted(files, key=lambda name: name.endswith((".safetensors", ".npz")))
    with new_directory(out_dir) as out:
        staged = {name: out / f".{name}.partial" for name in order}
        try:
            for name in order:
                _write_out_file(name, files[name], staged[name])
            for name in order:  # the JSON first: weights never stand without their config
                os.replace(staged[name], out / name)
        finally:
            for path in staged.values():
                path.unlink(missing_ok=True)
    written = [out / name for name in EXPORTED_FILES[target]]
    return [str(p) for p in written]
