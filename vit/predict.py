"""Classify image files with a checkpoint: top-k class names and probabilities per file.

Inputs are JPEG/PNG files of any size, or directories, which expand to the image files directly
inside them (one level, sorted by name; sub-directories are not entered; hidden names such as
macOS's ._x.png AppleDouble files are skipped, as folder datasets skip them). Each image is
preprocessed exactly as evaluation does (`preprocess.eval_image` with the checkpoint's config).
A file that cannot be read is reported in `errors`; the others are still predicted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit import preprocess
from vit.checkpoint import CheckpointContents
from vit.evaluate import load_inference_model
from vit.image_folders import IMAGE_EXTENSIONS, is_image_name
from vit.model import VisionTransformer
from vit.preprocess import DataError

BATCH = 32


@dataclasses.dataclass
class PredictResult:
    """predictions: [{"file": path, "top_k": [(class_name, probability), ...]}], best first;
    errors: [(path, one-line message)] for inputs that could not be classified."""

    predictions: list[dict]
    errors: list[tuple[str, str]]

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return {"predictions": [{"file": p["file"], "top_k": [list(t) for t in p["top_k"]]}
                                for p in self.predictions],
                "errors": [{"file": f, "message": m} for f, m in self.errors]}

    def summary(self) -> str:
        """One line per file: the file, then `class probability` pairs."""
        return "\n".join(
            f"{p['file']}: " + ", ".join(f"{name} {prob:.4f}" for name, prob in p["top_k"])
            for p in self.predictions)


def _broken_link(path: str) -> str:
    return f"{path!r} is a link to {os.readlink(path)!r}, which does not exist; fix or remove it"


def expand_paths(paths: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files named directly, plus the visible image files directly inside named directories.

    Returns (files, errors) where errors name missing paths and directories without images.
    """
    files, errors = [], []
    for path in paths:
        if os.path.isdir(path):
            named = sorted(os.path.join(path, f) for f in os.listdir(path) if is_image_name(f))
            found = [f for f in named if os.path.isfile(f)]
            broken = [f for f in named if os.path.islink(f) and not os.path.exists(f)]
            errors += [(f, _broken_link(f)) for f in broken]
            if not found and not broken:
                errors.append((path, f"directory {path!r} holds no "
                                     f"{'/'.join(IMAGE_EXTENSIONS)} files; pass image files or "
                                     "a directory that has some"))
            files += found
        elif os.path.exists(path):
            files.append(path)
        elif os.path.islink(path):
            errors.append((path, _broken_link(path)))
        else:
            errors.append((path, f"{path!r} does not exist; check the path"))
    return files, errors


def read_images(
    files: Sequence[str],
) -> tuple[list[str], list[np.ndarray], list[tuple[str, str]]]:
    """Decode each file to uint8 RGB; returns (readable files, their images, errors)."""
    good, images, errors = [], [], []
    for path in files:
        try:
            images.append(preprocess.decode_image_file(path))
            good.append(path)
        except DataError as err:
            errors.append((path, str(err)))
    return good, images, errors


def model_inputs(images: Sequence[np.ndarray], config) -> np.ndarray:
    """Preprocess decoded uint8 images as evaluation does: float32 [N, H, W, 3]."""
    return np.stack([np.asarray(preprocess.eval_image(im, config)) for im in images])


@functools.lru_cache(maxsize=16)
def _probabilities_fn(model: VisionTransformer) -> Callable:
    return jax.jit(lambda params, x: jax.nn.softmax(model.apply({"params": params}, x), axis=-1))


def probabilities(model: VisionTransformer, params, inputs: np.ndarray) -> np.ndarray:
    """Class probabilities [N, num_classes] for preprocessed inputs, in fixed-size batches."""
    fn = _probabilities_fn(model)
    out = []
    for lo in range(0, len(inputs), BATCH):
        chunk = inputs[lo:lo + BATCH]
        padded = np.pad(chunk, [(0, BATCH - len(chunk))] + [(0, 0)] * (chunk.ndim - 1))
        out.append(np.asarray(fn(params, jnp.asarray(padded)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


def predict(
    checkpoint_or_contents: str | os.PathLike | CheckpointContents,
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, top_k: int = 5,
    use_ema: bool = False,
) -> PredictResult:
    """Top-k (class name, probability) for every image file in `paths` (files or directories;
    one path alone, or a list)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    loaded = load_inference_model(checkpoint_or_contents, use_ema=use_ema)
    one = isinstance(paths, str | os.PathLike)
    found, errors = expand_paths([os.fspath(p) for p in ([paths] if one else paths)])
    files, chunks = [], []
    for lo in range(0, len(found), BATCH):  # a batch of full-size images in memory at a time
        good, images, unreadable = read_images(found[lo:lo + BATCH])
        errors += unreadable
        if good:
            files += good
            chunks.append(probabilities(loaded.model, loaded.params,
                                        model_inputs(images, loaded.config)))
    if not files:
        return PredictResult([], errors)
    probs = np.concatenate(chunks)
    if not np.isfinite(probs).all():
        raise ValueError(f"the model gives non-finite probabilities for {files[0]!r} and others "
                         "although its parameters are finite: its logits overflow float32; use "
                         "a checkpoint from before its weights grew this large")
    k = min(top_k, loaded.model.num_classes)
    best = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    names = loaded.info.class_names
    predictions = [{"file": f, "top_k": [(names[c], float(p[c])) for c in row]}
                   for f, p, row in zip(files, probs, best, strict=True)]
    return PredictResult(predictions, errors)
