"""What a checkpoint or weight file holds: model, parameters, compute, data, last evaluation.

`describe(path)` reads a training run's workdir (or its checkpoints/ or one step directory), or
any weight file `vit convert` reads (timm / HF `.safetensors`, vit_jax `.npz`, ...), which it
rebuilds as convert would without writing anything. `vit info PATH` prints the summary.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vit.weight_formats import flatten_params

_SHOWN_CLASSES = 8
_EVAL_KEYS = ("eval/top1", "eval/top5", "eval/loss", "eval_ema/top1", "eval_ema/top5")


@dataclasses.dataclass
class CheckpointInfo:
    """A checkpoint or weight file described; `summary()` is what `vit info` prints."""

    path: str
    source: str  # "checkpoint", or the weight file's naming: "timm", "hf", "vit_jax"
    step: int | None
    steps: list[int]  # a run's complete checkpoints (empty for a weight file)
    model: dict  # the model config: variant and overrides
    image_size: list[int]
    grid: list[int]
    params: int
    param_groups: dict[str, int]
    param_dtypes: list[str]
    gflops_per_image: float  # one image's forward pass, matmuls and convolutions
    num_classes: int
    class_names: list[str]
    dataset: str
    normalize: str
    eval_resize: int | None
    has_ema: bool
    last_eval: dict[str, float]  # the run's latest evaluation at or before this step
    notes: list[str]

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """The lines `vit info` prints."""
        where = (f"checkpoint, step {self.step}" if self.source == "checkpoint"
                 else f"{self.source} weights")
        if len(self.steps) > 1:
            where += f" (complete steps: {', '.join(map(str, self.steps))})"
        groups = ", ".join(f"{name} {count:,}" for name, count in self.param_groups.items())
        model = ", ".join(f"{k} {v}" for k, v in self.model.items() if k != "variant")
        names = ", ".join(self.class_names[:_SHOWN_CLASSES])
        if self.num_classes > _SHOWN_CLASSES:
            names += f", ... ({self.num_classes - _SHOWN_CLASSES} more)"
        classes = f"{self.num_classes} classes ({names})" if self.num_classes else "no head"
        lines = [
            f"{self.path}: {where}",
            f"model      {self.model.get('variant')}" + (f" ({model})" if model else ""),
            f"params     {self.params:,} ({groups}); {', '.join(self.param_dtypes)}"
            + ("; EMA params too" if self.has_ema else ""),
            f"compute    {self.gflops_per_image:.4g} GFLOPs per image (forward pass, "
            f"{'x'.join(map(str, self.image_size))} px, {'x'.join(map(str, self.grid))} "
            "patches)",
            f"data       {self.dataset or '(no dataset: pass --dataset to vit eval)'}: "
            f"{classes}; normalize {self.normalize}, eval resize "
            f"{self.eval_resize or 'none (straight to the image size)'}",
        ]
        if self.last_eval:
            step = int(self.last_eval.get("step", -1))
            scores = ", ".join(_score(k, v) for k, v in self.last_eval.items() if k != "step")
            lines.append(f"last eval  step {step}: {scores}")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def model_overrides(model: Mapping[str, Any]) -> dict[str, Any]:
    """The variant and the model options that differ from what the variant alone builds."""
    from vit.config_schema import model_config
    from vit.model import parse_variant

    variant = model["variant"]
    defaults = {**model_config(variant).to_dict(), **parse_variant(variant)[0]}
    return {"variant": variant, **{k: v for k, v in model.items()
                                   if k != "variant" and v is not None and v != defaults.get(k)}}


def _score(key: str, value: float) -> str:
    return f"{key} {value:.2%}" if "top" in key else f"{key} {value:.4g}"


def param_groups(params: Mapping[str, Any]) -> dict[str, int]:
    """Parameter counts by part of the model: stem and embedding, encoder blocks, position
    embedding and other tokens, head (with pre-logits and MAP head). The per-channel scales of
    int8 kernels (`vit quantize`) are not parameters of the model: not counted."""
    flat = flatten_params(params)
    int8_scales = {name.removesuffix("kernel") + "scale" for name, value in flat.items()
                   if name.endswith("/kernel") and np.asarray(value).dtype == np.int8}
    groups = {"embedding": 0, "blocks": 0, "tokens": 0, "head": 0}
    for name, value in flat.items():
        if name in int8_scales:
            continue
        size = int(np.prod(np.shape(value)))
        if "/encoderblock_" in name or name.startswith(("Transformer/encoder_norm", "fc_norm/")):
            groups["blocks"] += size
        elif name.startswith(("head/", "pre_logits/", "MAPHead_0/")):
            groups["head"] += size
        elif name == "cls" or name.startswith(("Transformer/posembed_input",
                                               "Transformer/registers")):
            groups["tokens"] += size
        else:  # the patch embedding, a conv stem or a ResNet trunk
            groups["embedding"] += size
    return {name: count for name, count in groups.items() if count}


def _workdir_of(path: str) -> Path | None:
    """The training run's workdir that holds the checkpoints at `path`: the folder around its
    checkpoints/ (a workdir with a metrics.jsonl); None for any other layout."""
    from vit.checkpoint import CHECKPOINT_DIR, checkpoints_dir

    root = checkpoints_dir(path)
    if root.name != CHECKPOINT_DIR or not (root.parent / "metrics.jsonl").is_file():
        return None
    return root.parent


def eval_at_step(workdir: Path | None, step: int) -> dict[str, float]:
    """The run's latest evaluation logged at or before `step` in its metrics.jsonl (values as
    floats, NaN included); {} if there is none."""
    from vit.metrics import read_jsonl

    if workdir is None:
        return {}
    found: dict[str, float] = {}
    for record in read_jsonl(workdir / "metrics.jsonl"):
        if "eval/top1" in record and int(record["step"]) <= step:
            found = {"step": int(record["step"]),
                     **{k: float(record[k]) for k in _EVAL_KEYS if k in record}}
    return found


def describe(path: str | os.PathLike[str], *, step: int | None = None,
             num_heads: int | None = None, normalize: str | None = None) -> CheckpointInfo:
    """Describe the checkpoint (a workdir, checkpoints/ or step dir; `step`: default the latest)
    or weight file at `path` (`num_heads`, `normalize`: what such a file may not say)."""
    from vit import checkpoint
    from vit.convert import rebuild_weights, weight_file_in
    from vit.evaluate import load_inference_model
    from vit.flops import forward_flops_per_image

    path = os.fspath(path)
    notes: list[str] = []
    is_run = os.path.isdir(path) and weight_file_in(path) is None
    if is_run:
        contents = checkpoint.load_checkpoint(path, step)
        loaded = load_inference_model(contents)  # checks it is a checkpoint of this toolkit
        config, params, step, model = contents.config, contents.params, contents.step, loaded.model
        names, num_classes = list(loaded.info.class_names), loaded.info.num_classes
        has_ema, source = contents.ema_params is not None, "checkpoint"
        steps = checkpoint.checkpoint_steps(path)
    else:
        if step is not None:
            raise ValueError(f"--step picks a checkpoint of a training run; {path} is a weight "
                             "file: drop --step")
        rebuilt = rebuild_weights(path, num_heads=num_heads, normalize=normalize,
                                  require_head=False)
        config, params, model = rebuilt.config, rebuilt.params, rebuilt.model
        names = list(rebuilt.dataset_info["class_names"]) if rebuilt.has_head else []
        num_classes = len(names)
        has_ema, source, steps, notes = False, rebuilt.source, [], rebuilt.notes
        if not rebuilt.has_head:  # the stand-in head rebuild_weights added is not the file's
            params = {k: v for k, v in params.items() if k != "head"}
            notes.append("no classification head in the weights (a backbone): vit convert "
                         "needs --num-classes")
    flat = flatten_params(params)
    groups = param_groups(flat)
    pp = config.get("pp") or {}
    return CheckpointInfo(
        path=path, source=source, step=step, steps=steps,
        model=model_overrides(dict(config["model"])),
        image_size=list(model.image_size), grid=list(model.grid),
        params=sum(groups.values()), param_groups=groups,
        param_dtypes=sorted({str(np.asarray(v).dtype) for v in flat.values()}),
        gflops_per_image=forward_flops_per_image(model) / 1e9,
        num_classes=num_classes, class_names=names,
        dataset=str(config.get("dataset") or ""), normalize=str(pp.get("normalize")),
        eval_resize=pp.get("eval_resize"), has_ema=has_ema,
        last_eval=eval_at_step(_workdir_of(path), step) if is_run else {}, notes=notes)
