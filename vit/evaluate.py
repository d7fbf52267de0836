"""Metrics over a whole split: top-1, top-5, mean loss, per-class accuracy, confusion matrix.

The model runs on all local devices with `jax.pmap`; every device returns per-example results
and the host reduces them in numpy with the padding mask, so each example of the split counts
exactly once and the counts are exact on any number of devices. Images cross to the devices as
uint8 and are normalised there. `evaluate_variants` evaluates several parameter sets (the
trainer's plain and EMA parameters) in one pass over the data, each on the same on-device
batch. Test-time augmentation (`tta="flip"`) averages the softmax probabilities of each image
and its horizontal flip. The expected calibration error (vit/calibration.py) comes with every
result.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vit import calibration, data, data_options, losses, parallel, preprocess
from vit.checkpoint import CheckpointContents, CheckpointError, load_checkpoint
from vit.config_schema import TTA_MODES
from vit.error_text import first_names
from vit.model import VisionTransformer, saved_model_from_config
from vit.model_options import pair
from vit.weight_formats import has_real_class_names

PyTree = Any
log = logging.getLogger(__name__)
TOP_K = 5


class EvalError(ValueError):
    """A model, checkpoint and dataset that do not fit together; the message says how to fix it."""


@dataclasses.dataclass
class EvalResult:
    """Metrics of one pass over a split. per_class is NaN for a class absent from the split."""

    top1: float
    top5: float
    loss: float
    num_examples: int
    per_class: dict[str, float]
    confusion_matrix: list[list[int]]  # [true class][predicted class]
    images_per_s: float
    tta: str = "none"  # the test-time augmentation the metrics were computed with
    ece: float = math.nan  # expected calibration error, NUM_BINS confidence bins
    calibration: list[list[float]] = dataclasses.field(default_factory=list)  # bin sums [3][bins]

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (NaN per-class accuracies become None)."""
        d = dataclasses.asdict(self)
        d["per_class"] = {k: None if math.isnan(v) else v for k, v in self.per_class.items()}
        d["ece"] = None if math.isnan(self.ece) else self.ece
        return d

    def summary(self) -> str:
        """Human-readable lines: headline metrics, then the per-class accuracies."""
        tta = f"  tta {self.tta}" if self.tta != "none" else ""
        lines = [f"top-1 {self.top1:.4f}  top-5 {self.top5:.4f}  loss {self.loss:.4f}  "
                 f"ECE {self.ece:.4f}  examples {self.num_examples}  "
                 f"{self.images_per_s:.1f} images/s{tta}",
                 "per-class accuracy:"]
        width = max((len(name) for name in self.per_class), default=0)
        lines += [f"  {name:<{width}}  {acc:.4f}" for name, acc in self.per_class.items()]
        return "\n".join(lines)


@dataclasses.dataclass
class InferenceModel:
    """A checkpoint made ready for inference: the model, its params, run config and dataset."""

    model: VisionTransformer
    params: PyTree
    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    step: int


def load_inference_model(
    checkpoint: str | os.PathLike | CheckpointContents, *, use_ema: bool = False
) -> InferenceModel:
    """Rebuild the model a checkpoint (path or loaded contents) was trained as, with its params."""
    contents = (load_checkpoint(os.fspath(checkpoint))
                if isinstance(checkpoint, str | os.PathLike) else checkpoint)
    for key in ("model", "image_size", "dataset"):
        if key not in contents.config:
            raise CheckpointError(f"checkpoint of step {contents.step} has no config[{key!r}]; "
                                  "it was not written by `vit train` or `vit convert`")
    if not contents.dataset_info:
        raise CheckpointError(f"checkpoint of step {contents.step} has no dataset_info; "
                              "it was not written by `vit train` or `vit convert`")
    try:
        pair(contents.config["image_size"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint of step {contents.step}: {err}; it was not written by "
                              "`vit train` or `vit convert`") from None
    params = contents.chosen_params(use_ema)
    config = ml_collections.ConfigDict(contents.config)
    info = data.DatasetInfo.from_dict(contents.dataset_info)
    model = saved_model_from_config(config.model.to_dict(), num_classes=info.num_classes,
                                    image_size=config.image_size)
    return InferenceModel(model, params, config, info, contents.step)


def check_tta(tta: str) -> None:
    """Raise a one-line EvalError (a ValueError) unless `tta` is one of TTA_MODES."""
    if tta not in TTA_MODES:
        raise EvalError(f"unknown test-time augmentation tta={tta!r}; "
                         f"valid values: {', '.join(TTA_MODES)}")


@functools.lru_cache(maxsize=16)
def _eval_step(model: VisionTransformer, normalization: str, tta: str = "none",
               loss_name: str = losses.DEFAULT) -> Callable:
    """The pmapped per-device step for `model`: per-example loss, prediction, top-5 hit and
    confidence (the predicted class's probability).

    Images are uint8 pixels, normalised on the device as `normalization` (a
    preprocess.NORMALIZATIONS name) says. With tta="flip" the class probabilities are the mean
    of those of the image and of its horizontal flip; prediction, top-5 and the loss
    (`loss_name` of vit/losses.py: -log p[label] for the softmax) all use that mean.
    """

    def step(params: PyTree, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        images = preprocess.normalize_on_device(images, normalization)
        views = [model.apply({"params": params}, images, train=False)]
        if tta == "flip":  # images are [batch, height, width, channels]: mirror the width
            views.append(model.apply({"params": params}, jnp.flip(images, axis=2), train=False))
        log_probs = losses.mean_log_softmax(views)
        scores = views[0] if len(views) == 1 else log_probs  # one view: logits rank as well
        loss = losses.label_loss(views, labels, loss_name)
        _, top = jax.lax.top_k(scores, min(TOP_K, scores.shape[-1]))
        return {"loss": loss, "pred": jnp.argmax(scores, axis=-1).astype(jnp.int32),
                "top5": jnp.any(top == labels[:, None], axis=-1),
                "conf": jnp.exp(jnp.max(log_probs, axis=-1))}

    return jax.pmap(step, axis_name=parallel.AXIS)


def _check_classes(model: VisionTransformer, info: data.DatasetInfo) -> None:
    if info.num_classes != model.num_classes:
        raise EvalError(f"dataset {info.name!r} has {info.num_classes} classes but the model's "
                        f"head has {model.num_classes}; evaluate on a dataset with the same "
                        "classes, or fine-tune the model on this one first")


def _labels_to_head(model: VisionTransformer, info: data.DatasetInfo,
                    head_classes: Sequence[str] | None
                    ) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """(the head's index of each dataset label, or None when they are the same; the result's
    class names): `head_classes` names the head's classes when the dataset holds some only."""
    if head_classes is None:
        _check_classes(model, info)
        return None, tuple(info.class_names)
    if len(head_classes) != model.num_classes:
        raise EvalError(f"head_classes names {len(head_classes)} classes but the model's head "
                        f"has {model.num_classes}; pass the head's own class names")
    lacking = [name for name in info.class_names if name not in head_classes]
    if lacking:
        raise EvalError(f"dataset {info.name!r} has classes the head lacks "
                        f"({first_names(lacking)}); leave them out with config.classes")
    return (np.array([list(head_classes).index(n) for n in info.class_names], np.int64),
            tuple(head_classes))


def sum_over_processes(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add up host-side sums over all processes (each saw its own part of the split)."""
    if jax.process_count() == 1:
        return sums
    gathered = multihost_utils.process_allgather(sums)
    return {key: np.asarray(value).sum(0) for key, value in gathered.items()}


def evaluate(
    model: VisionTransformer, params: PyTree, config: ml_collections.ConfigDict, *,
    split: str | None = None, batch_size: int | None = None, replicated: bool = False,
    tta: str = "none", head_classes: Sequence[str] | None = None,
) -> EvalResult:
    """One pass of `model` over a split (default config.eval_split) on all local devices.

    `batch_size` (global) defaults to config.eval_batch_size; `replicated=True` says `params`
    already carry the leading device axis (as in the trainer), else they are replicated here.
    `tta` is a test-time augmentation of TTA_MODES: "flip" averages the softmax of each image
    and of its horizontal flip (twice the compute); padding stays masked out either way.
    `head_classes`: see `evaluate_variants`.
    """
    return evaluate_variants(model, {"": params}, config, split=split, batch_size=batch_size,
                             replicated=replicated, tta=tta, head_classes=head_classes)[""]


def evaluate_variants(
    model: VisionTransformer, variants: Mapping[str, PyTree],
    config: ml_collections.ConfigDict, *, split: str | None = None,
    batch_size: int | None = None, replicated: bool = False, tta: str = "none",
    head_classes: Sequence[str] | None = None,
) -> dict[str, EvalResult]:
    """`evaluate` for several parameter sets of `model` (e.g. {"eval": p, "eval_ema": e}) in
    one pass over the split: each batch crosses to the devices once and every variant's step
    runs on it. Each result equals that of `evaluate` with its parameters alone; images_per_s
    is the pass's examples over its time (all variants together).

    `head_classes` (the head's class names) lets the dataset hold only some of them: its
    labels are matched to the head by name, and the classes it lacks have no examples.
    """
    check_tta(tta)
    if not variants:
        raise EvalError("evaluate_variants got no parameter sets; pass {name: params, ...}")
    # Only the evaluated split is checked: a run's train_split need not exist in another dataset.
    config = config.copy_and_resolve_references()
    config.train_split = config.eval_split = split or config.eval_split
    if data.split_size(config, config.eval_split) <= 0:
        raise EvalError(f"split {config.eval_split!r} of {config.dataset!r} holds no examples; "
                        "evaluate a split or slice with some (--split), e.g. 'test'")
    info = data.dataset_info(config)
    to_head, class_names = _labels_to_head(model, info, head_classes)
    step = _eval_step(model, config.pp.normalize, tta, config.get("loss", losses.DEFAULT))
    device_params = {name: params if replicated else parallel.replicate(params)
                     for name, params in variants.items()}
    n = model.num_classes
    sums = {name: {"confusion": np.zeros((n, n), np.int64),
                   "calibration": np.zeros((3, calibration.NUM_BINS)),
                   "sums": np.zeros(2, np.float64)}  # loss sum, top-5 hits
            for name in variants}
    pending = []
    start = time.perf_counter()
    for batch in data.eval_iterator(config, split, batch_size=batch_size):
        labels = batch["label"] if to_head is None else to_head[batch["label"]]
        on_device = parallel.shard({"image": batch["image"], "label": labels})
        outs = {name: step(params, on_device["image"], on_device["label"])
                for name, params in device_params.items()}
        pending.append((outs, labels, batch["mask"]))
    for outs, labels, mask in pending:
        for name, out in jax.device_get(outs).items():
            _add_batch(sums[name], out, labels, mask)
    totals = sum_over_processes({f"{name}/{key}": value for name, variant in sums.items()
                                 for key, value in variant.items()})
    elapsed = time.perf_counter() - start
    results = {}
    for name in variants:
        confusion, calibration_sums = totals[f"{name}/confusion"], totals[f"{name}/calibration"]
        loss_sum, top5_hits = totals[f"{name}/sums"]
        result = _result(confusion, float(loss_sum), int(top5_hits), class_names, elapsed, tta)
        result.ece = calibration.expected_calibration_error(calibration_sums)
        result.calibration = calibration_sums.tolist()
        results[name] = result
    return results


def _add_batch(sums: dict[str, np.ndarray], out: dict[str, np.ndarray], labels: np.ndarray,
               mask: np.ndarray) -> None:
    """Adds one batch's step output (padding masked out) to a variant's host sums."""
    pred = out["pred"][mask]
    np.add.at(sums["confusion"], (labels[mask], pred), 1)
    sums["sums"][0] += float(np.sum(out["loss"][mask], dtype=np.float64))
    sums["sums"][1] += int(np.sum(out["top5"][mask]))
    sums["calibration"] += calibration.bin_sums(out["conf"][mask], pred == labels[mask])


def _result(confusion: np.ndarray, loss_sum: float, top5_hits: int,
            class_names: tuple[str, ...], elapsed: float, tta: str) -> EvalResult:
    total = int(confusion.sum())
    if total == 0:
        raise EvalError("the split holds no examples; choose a non-empty split")
    per_class_total = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.diag(confusion) / per_class_total
    return EvalResult(
        top1=float(np.trace(confusion) / total), top5=top5_hits / total, loss=loss_sum / total,
        num_examples=total,
        per_class={name: float(acc) for name, acc in zip(class_names, per_class, strict=True)},
        confusion_matrix=confusion.tolist(), images_per_s=total / max(elapsed, 1e-9), tta=tta)


MATCH_CLASSES = ("names", "order")


def match_classes_by_name(config: ml_collections.ConfigDict, split: str,
                          wanted: tuple[str, ...]) -> list[int] | None:
    """The label ids in config.dataset of the classes of `wanted` (a checkpoint's class names,
    in its head's order) that it holds, for config.classes; None when they already line up or
    a side has no names.

    A dataset with more classes gives those of the head (its other examples are left out); one
    with only some of them is logged (their per-class figures stay empty); one with none of
    them is an EvalError.
    """
    full = config.copy_and_resolve_references()
    full.classes = None
    full.train_split = full.eval_split = split
    names = data.dataset_info(full).class_names
    if tuple(names) == tuple(wanted) or not (has_real_class_names(names)
                                             and has_real_class_names(wanted)):
        return None
    missing = [name for name in wanted if name not in names]
    if len(missing) == len(wanted):
        raise EvalError(f"dataset {config.dataset!r} has none of the checkpoint's classes "
                        f"({first_names(missing, 5)}); evaluate on a dataset with some of them, "
                        "or pass match_classes='order' (--match-classes order) to compare label "
                        "ids")
    if missing:
        log.warning("dataset %r has no class named %s: evaluating the %d of the checkpoint's %d "
                    "classes it holds", config.dataset, first_names(missing, 5),
                    len(wanted) - len(missing), len(wanted))
    return [names.index(name) for name in wanted if name in names]


def _classes_changed(config: ml_collections.ConfigDict, split: str | None,
                     trained: Sequence[str]) -> bool:
    """Whether the run's own dataset now names other classes than the checkpoint was trained
    on (a folder whose class folders changed); logged, since they are then matched by name."""
    probe = config.copy_and_resolve_references()
    probe.train_split = probe.eval_split = split or config.eval_split
    if data.split_size(probe, probe.eval_split) <= 0:
        return False  # `evaluate` names the empty split
    change = data.class_change(trained, data.dataset_info(probe).class_names)
    if change is None:
        return False
    log.warning("the classes of %r changed since the checkpoint was written (%s): matching "
                "them to the head by name", config.dataset, change)
    return True


def evaluate_checkpoint(
    path: str, *, split: str | None = None, dataset: str | None = None,
    data_dir: str | None = None, use_ema: bool = False, batch_size: int | None = None,
    step: int | None = None, tta: str = "none", match_classes: str = "names",
) -> EvalResult:
    """Evaluate a checkpoint (workdir, checkpoints dir or step dir) on its own or another dataset.

    By default the dataset, split and preprocessing are those the checkpoint was trained with;
    `tta` is passed on to `evaluate` ("none" or "flip"). On another `dataset`, classes are
    matched by name (`match_classes="names"`: the dataset's labels are renumbered into the
    head's order; a class of the head it lacks has no examples, a dataset with none of them is
    an error) or taken by label id ("order").
    """
    check_tta(tta)  # before loading anything
    if match_classes not in MATCH_CLASSES:
        raise EvalError(f"unknown match_classes={match_classes!r}; use one of "
                        f"{', '.join(MATCH_CLASSES)}")
    loaded = load_inference_model(load_checkpoint(path, step), use_ema=use_ema)
    config = data_options.on_dataset(loaded.config, dataset, data_dir)
    head_classes = None  # the dataset's labels are the head's
    if match_classes == "names" and (
            dataset is not None or _classes_changed(config, split, loaded.info.class_names)):
        config.classes = None  # the run's own subset named label ids of the old class list
        by_name = match_classes_by_name(config, split or config.eval_split,
                                        tuple(loaded.info.class_names))
        if by_name is not None:
            config.classes = by_name
            head_classes = loaded.info.class_names
    return evaluate(loaded.model, loaded.params, config, split=split, batch_size=batch_size,
                    tta=tta, head_classes=head_classes)
