"""Pictures of an evaluation: the confusion matrix, per-class accuracy and an attention example.

`write_report(result, out_dir)` saves metrics.json, confusion_matrix.png and
per_class_accuracy.png (what `vit eval --plots DIR` writes). The trainer logs the same
confusion matrix and the attention rollout of the first few evaluation images to TensorBoard
and W&B at every evaluation, as RGB arrays (`eval_images`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vit import attention_maps, data, preprocess
from vit.evaluate import EvalResult
from vit.model import VisionTransformer
from vit.output_paths import write_json

METRICS_JSON = "metrics.json"
CONFUSION_PNG, PER_CLASS_PNG = "confusion_matrix.png", "per_class_accuracy.png"
MAX_LABELLED_CLASSES = 30  # more classes than this: no class names or counts on the axes
DPI = 100


def _canvas(fig: Figure) -> FigureCanvasAgg:
    return FigureCanvasAgg(fig)


@contextlib.contextmanager
def missing_glyphs_quiet() -> Iterator[None]:
    """Class names in a script the font lacks (CJK, ...) draw as boxes, without matplotlib's
    warning per missing glyph in the middle of a run's output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        yield


def figure_pixels(fig: Figure) -> np.ndarray:
    """Render a matplotlib figure to an [H, W, 3] uint8 array."""
    canvas = FigureCanvasAgg(fig)
    with missing_glyphs_quiet():
        canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_figure(confusion: np.ndarray | Sequence[Sequence[int]],
                     class_names: Sequence[str], *, title: str = "") -> Figure:
    """Rows: true class, columns: predicted; colour is the share of the row, text the count."""
    counts = np.asarray(confusion, np.int64)
    n = counts.shape[0]
    if counts.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"a confusion matrix of shape {counts.shape} does not fit "
                         f"{len(class_names)} class names; pass [classes, classes] counts")
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.nan_to_num(counts / counts.sum(axis=1, keepdims=True))
    side = float(np.clip(0.45 * n + 3.0, 6.0, 14.0))
    fig = Figure(figsize=(side + 1.2, side), dpi=DPI, layout="constrained")
    _canvas(fig)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion matrix")
    return fig


def per_class_figure(per_class: dict[str, float], *, top1: float | None = None,
                     title: str = "") -> Figure:
    """A bar per class (classes absent from the split are left out), overall top-1 dashed."""
    names = [name for name, acc in per_class.items() if not math.isnan(acc)]
    values = np.array([per_class[name] for name in names], np.float64)
    labelled = len(names) <= MAX_LABELLED_CLASSES
    height = float(np.clip(0.3 * len(names) + 1.5, 3.0, 12.0)) if labelled else 5.0
    fig = Figure(figsize=(8.0, height), dpi=DPI, layout="constrained")
    _canvas(fig)
    ax = fig.subplots()
    if labelled:
        ax.barh(range(len(names)), values, color="C0")
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        for i, value in enumerate(values):
            ax.text(min(value + 0.01, 0.92), i, f"{value:.1%}", va="center", fontsize=8)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("accuracy")
    else:  # too many classes for one bar each: their accuracies sorted, best first
        ax.plot(np.sort(values)[::-1], color="C0")
        ax.set_xlabel(f"classes, best first ({len(names)})")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0.0, 1.0)
    if top1 is not None:
        line = ax.axvline if labelled else ax.axhline
        line(top1, color="C3", linestyle="--", label=f"top-1 {top1:.1%}")
        ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "per-class accuracy")
    ax.grid(True, alpha=0.3, axis="x" if labelled else "y")
    return fig


def write_report(result: EvalResult, out_dir: str) -> list[str]:
    """Save metrics.json, confusion_matrix.png and per_class_accuracy.png in `out_dir`.

    Returns the paths written (what `vit eval --plots DIR` does).
    """
    names = list(result.per_class)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in (METRICS_JSON, CONFUSION_PNG, PER_CLASS_PNG)]
    write_json(paths[0], result.to_dict())
    summary = f"top-1 {result.top1:.1%} on {result.num_examples} images"
    with missing_glyphs_quiet():
        confusion_figure(result.confusion_matrix, names,
                         title=f"confusion matrix ({summary})").savefig(paths[1])
        per_class_figure(result.per_class, top1=result.top1,
                         title=f"per-class accuracy ({summary})").savefig(paths[2])
    return paths


def confusion_pixels(result: EvalResult, class_names: Sequence[str], title: str = "",
                     ) -> np.ndarray:
    """The confusion matrix figure of `result` as an [H, W, 3] uint8 array."""
    return figure_pixels(confusion_figure(result.confusion_matrix, class_names, title=title))


def eval_examples(config: Any, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `count` images of config.eval_split: model inputs, uint8 pictures, labels."""
    devices, processes = jax.local_device_count(), jax.process_count()
    batch_size = devices * processes * math.ceil(count / devices)
    batch = next(iter(data.eval_iterator(config, batch_size=batch_size)))
    pictures = batch["image"].reshape(-1, *batch["image"].shape[2:])  # uint8
    labels, mask = batch["label"].reshape(-1), batch["mask"].reshape(-1)
    pictures, labels = pictures[mask][:count], labels[mask][:count]
    images = np.asarray(preprocess.normalize_on_device(jnp.asarray(pictures), config.pp.normalize))
    return images, pictures, labels


@functools.lru_cache(maxsize=4)
def _logits_and_attention(model: VisionTransformer) -> Callable:
    """The jitted map (params, images) -> (logits, attention weights), compiled once."""
    return jax.jit(lambda p, x: model.apply({"params": p}, x, return_attention=True))


def attention_example(model: VisionTransformer, params: Any, images: np.ndarray,
                      pictures: np.ndarray, labels: np.ndarray,
                      class_names: Sequence[str]) -> np.ndarray:
    """One RGB array: each image over its attention rollout, titled "true -> predicted"."""
    logits, weights = _logits_and_attention(model)(params, jnp.asarray(images))
    predicted = np.asarray(jnp.argmax(logits, axis=-1))
    maps = attention_maps.to_grid(attention_maps.rollout(
        np.asarray(weights, np.float32), **attention_maps.token_layout(model)), model.grid)
    scale = attention_maps.display_scale(pictures.shape[1:3])
    fig = Figure(figsize=(2.2 * len(images), 4.6), dpi=DPI, layout="constrained")
    _canvas(fig)
    axes = fig.subplots(2, len(images), squeeze=False)
    for i, picture in enumerate(pictures):
        big = np.repeat(np.repeat(picture, scale, axis=0), scale, axis=1)
        heat = attention_maps.upsample(maps[i], big.shape[:2])
        truth, guess = class_names[int(labels[i])], class_names[int(predicted[i])]
        axes[0, i].imshow(big)
        axes[0, i].set_title(f"{truth} -> {guess}", fontsize=9,
                             color="black" if truth == guess else "C3")
        axes[1, i].imshow(attention_maps.overlay(big, heat))
        axes[1, i].set_title("attention rollout", fontsize=8)
        for ax in axes[:, i]:
            ax.set_axis_off()
    return figure_pixels(fig)


def eval_images(model: VisionTransformer, params: Any, config: Any, result: EvalResult,
                ) -> dict[str, np.ndarray]:
    """What the trainer logs at an evaluation: {"eval/confusion_matrix", "eval/attention"}.

    `params` are host (unreplicated) parameters; the attention example shows the first
    config.eval_images images of config.eval_split.
    """
    names = data.dataset_info(config).class_names
    title = f"confusion matrix, top-1 {result.top1:.1%} on {result.num_examples} images"
    images = {"eval/confusion_matrix": confusion_pixels(result, names, title)}
    inputs, pictures, labels = eval_examples(config, int(config.eval_images))
    if len(inputs):
        images["eval/attention"] = attention_example(model, params, inputs, pictures, labels,
                                                     names)
    return images
