"""Export a checkpoint to StableHLO, TensorFlow SavedModel, TFLite or ONNX, verified on write.

Every export is run right after it is written on a few images at batch sizes 1 and 7, and
its logits are compared with the JAX model's on the same images preprocessed as `vit predict`
does. The images are the files the caller names, else the first 7 examples of the run's own
evaluation split, else (the dataset is not readable on this machine) 7 synthetic random
images, which `verified_on` then says, with the reason. The artefact is written into a staging
directory inside `out_dir` and moved into place only once it passed: a difference above
`tolerance_for` (float32: `TOLERANCE`; int8: a bound of its rounding) raises `ExportError`, and that
or any other failure while writing leaves `out_dir` as it was (an earlier export there is kept,
nothing half-written is added, and a directory this call made is removed again).
What each format takes:

- `stablehlo`: `model.stablehlo`, a serialized `jax.export.Exported` with a symbolic batch
  dimension: float32 [N, rows, cols, 3] images preprocessed as in evaluation -> logits. Load it with
  `load_stablehlo(dir)`; no model code is needed.
- `saved_model`: a SavedModel through `jax2tf` (params as variables). Signatures:
  `serving_default` takes uint8 images [N, H, W, 3] of any batch and size and applies the
  evaluation preprocessing itself (resize / crop, normalise); `pixels` takes uint8
  [N, rows, cols, 3] images already at the model's size. Both return {"logits", "probabilities"}.
- `tflite`: `model.tflite`, converted from that SavedModel's `pixels` signature (TFLite has no
  antialiased resize among its builtin ops, so resizing stays with the caller). Float
  checkpoints only: TFLite's builtin matmuls take int8 only as TFLite's own quantised types,
  not as the int8 x int8 -> int32 `dot_general` of a `vit quantize` checkpoint, so an int8
  checkpoint is refused with one line (export it as `saved_model` or `stablehlo`).
- `onnx`: `model.onnx`, built from the params by `vit.onnx_export` (uint8 [N, rows, cols, 3] ->
  logits, probabilities), checked with onnxruntime; needs the `onnx` extra. Not for MAP
  heads, ResNet hybrids or int8 checkpoints (refused with one line before anything is written).

(rows, cols) is the run's image_size (an int: a square). Each directory also gets
`export.json`: for each format exported there, its input contract, image size (an int for a
square, else [rows, cols]), class names and check ({format: {...}}).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit import preprocess, tf_export
from vit.error_text import first_line
from vit.evaluate import InferenceModel, load_inference_model
from vit.model_options import json_image_size, pair
from vit.output_paths import new_directory

FORMATS = ("stablehlo", "saved_model", "tflite", "onnx")
TOLERANCE = 1e-4
# float32 runtimes sum in other orders: random-weight B/16 and L/16 at 224 px (logits spanning
# about 60) drift by 5e-5 in ONNX Runtime and TensorFlow, so larger logits get this share of
# their range, or TOLERANCE if that is larger; a wrong op moves them by a good part of it.
FLOAT_RELATIVE = 1e-5
# int8 rounds each token's activations to a 127-step grid: where another compiler (TensorFlow's
# XLA for a SavedModel) or another batch size differs by one ulp before a rounding, one step
# flips, moving a logit by about 1e-2 on the CIFAR-10 recipe model and by more on a model with
# larger logits. So the bound is this, or INT8_RELATIVE of the logits' range if that is larger;
# a real mismatch (a wrong scale or kernel) moves logits by a good part of their range.
INT8_TOLERANCE = 5e-2
INT8_RELATIVE = 1e-2
VERIFY_BATCHES = (1, 7)
SPEED_BATCH = 32
NUM_CHECK_IMAGES = 7


class ExportError(ValueError):
    """An export that cannot be written or does not reproduce the model; says what to do."""


@dataclasses.dataclass
class ExportResult:
    """What was written and how well it matches: max |logit diff| over batches 1 and 7."""

    format: str
    path: str
    size_bytes: int
    max_abs_diff: float
    images_per_s: float | None  # None: not measured (measure_speed=False, --no-speed)
    reference_images_per_s: float | None
    verified_on: str

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: format, path, size, difference and speed."""
        speed = ("speed not measured" if self.images_per_s is None else
                 f"{self.images_per_s:.1f} images/s (JAX: {self.reference_images_per_s:.1f})")
        return (f"{self.format}: {self.path} ({self.size_bytes / 2**20:.2f} MiB), max |logit diff| "
                f"{self.max_abs_diff:.2e} at batch sizes {VERIFY_BATCHES} on {self.verified_on}, "
                f"{speed}")


def _require(module: str, fmt: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"--format {fmt} needs the {module!r} package: pip install -e "
                          "'.[onnx]'") from None


def size_on_disk(path: str | os.PathLike[str]) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# The model as a pure function, and the images it is checked on.


def logits_fn(loaded: InferenceModel) -> tf_export.LogitsFn:
    """(params, float32 images) -> logits in float32 with a portable attention kernel.

    A model trained in bfloat16 (`dtype`) or with bfloat16 matmuls (`matmul_dtype`) is exported
    in float32: ONNX, TFLite and most runtimes have no bfloat16 x bfloat16 -> float32 matmul.
    """
    model = loaded.model.clone(attention_impl="explicit", matmul_dtype="float32", matmul_impl="xla",
                               elementwise_impl="xla", dtype=jnp.float32)
    return lambda params, images: model.apply({"params": params}, images, train=False)


def eval_split_images(config: Any, count: int = NUM_CHECK_IMAGES
                      ) -> tuple[list[np.ndarray], str]:
    """(the first `count` images of the run's evaluation split, uint8 as stored, not cropped;
    what they are), or ([], why not) when the run's dataset cannot be read on this machine."""
    import tensorflow as tf

    from vit.preprocess import DataError
    from vit.sources import open_source

    try:
        records = open_source(config).read(config.eval_split).take(count)
        images = [np.asarray(preprocess.decode(r["encoded"])) for r in records]
    except (DataError, tf.errors.OpError, OSError) as err:
        return [], first_line(err)
    if not images:
        return [], f"split {config.eval_split!r} of {config.dataset!r} is empty"
    return images, f"{len(images)} images of {config.dataset} {config.eval_split}"


def synthetic_images(size: int | Sequence[int], count: int = NUM_CHECK_IMAGES
                     ) -> list[np.ndarray]:
    """`count` uint8 images of random pixels, some larger than `size` (an int or (rows, cols);
    seeded: reproducible)."""
    rng = np.random.default_rng(0)
    rows, cols = pair(size)
    shapes = [(rows, cols), (rows + 9, cols + 3), (rows * 2, cols)]
    return [rng.integers(0, 256, (*shapes[i % 3], 3), np.uint8) for i in range(count)]


def check_images(loaded: InferenceModel, paths: Sequence[str] | None
                 ) -> tuple[list[np.ndarray], str]:
    """(uint8 images to check exports on, what they are): the readable files of `paths`, else
    the run's first evaluation images, else synthetic ones (the description says why)."""
    from vit.predict import expand_paths, read_images

    if paths:
        files, errors = expand_paths(paths)
        files, images, unreadable = read_images(files)
        if errors or unreadable or not images:
            bad = (errors + unreadable)[:1]
            raise ExportError(bad[0][1] if bad else "no images to check the export on: pass "
                              "image files or directories with --images")
        return images, f"{len(images)} image file{'s' * (len(images) > 1)}"
    images, what = eval_split_images(loaded.config)
    if images:
        return images, what
    return (synthetic_images(loaded.config.image_size),
            f"{NUM_CHECK_IMAGES} synthetic images (no evaluation images: {what})")


def crops(images: Sequence[np.ndarray], config: Any) -> np.ndarray:
    """Each image resized / cropped as evaluation does, still uint8: [N, rows, cols, 3]."""
    return np.stack([np.asarray(preprocess.eval_crop(im, config)) for im in images])


def _batch_of(x: np.ndarray, n: int) -> np.ndarray:
    return np.resize(x, (n, *x.shape[1:])) if len(x) != n else x


def _speed(run: Callable[[np.ndarray], Any], batch: np.ndarray, seconds: float = 1.0) -> float:
    """Images per second of `run` on `batch`, after one warm-up call, over about `seconds`."""
    run(batch)
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < seconds:
        jax.block_until_ready(run(batch))
        done += len(batch)
    return done / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Writers: each returns the artefact's path and a function uint8 crops [N, rows, cols, 3] ->
# logits.


def _export_stablehlo(loaded: InferenceModel, out: Path) -> tuple[Path, Callable]:
    fn, params = logits_fn(loaded), loaded.params
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *pair(loaded.config.image_size), 3), jnp.float32)
    exported = jax.export.export(jax.jit(lambda x: fn(params, x)))(spec)
    path = out / "model.stablehlo"
    path.write_bytes(exported.serialize())
    call = load_stablehlo(out)
    kind = loaded.config.pp.normalize
    return path, lambda pixels: np.asarray(call(preprocess.normalize_on_device(pixels, kind)))


def load_stablehlo(directory: str | os.PathLike[str]) -> Callable[[jax.Array], jax.Array]:
    """The exported model of `directory`/model.stablehlo: float32 [N, rows, cols, 3] -> logits."""
    path = Path(directory) / "model.stablehlo"
    if not path.is_file():
        raise ExportError(f"no model.stablehlo in {directory}: write one with "
                          "vit export --format stablehlo")
    return jax.export.deserialize(bytearray(path.read_bytes())).call


def _export_saved_model(loaded: InferenceModel, out: Path) -> tuple[Path, Callable]:
    path = out / "saved_model"
    tf_export.write_saved_model(loaded, logits_fn(loaded), path)
    # The crops go to `pixels`; `serving_default`, which crops itself, is checked on the files.
    return path, tf_export.saved_model_runner(path)


def _export_tflite(loaded: InferenceModel, out: Path) -> tuple[Path, Callable]:
    path = out / "model.tflite"
    tf_export.write_tflite(loaded, logits_fn(loaded), path)
    return path, tf_export.tflite_runner(path)


def refusal(loaded: InferenceModel, fmt: str) -> str | None:
    """Why format `fmt` cannot hold the checkpoint's model (one line), or None when it can."""
    if fmt == "onnx":
        from vit import onnx_export

        return onnx_export.refusal(loaded)
    if fmt == "tflite" and loaded.model.quant != "none":
        return ("--format tflite cannot hold an int8 checkpoint (TFLite's builtin matmuls take "
                "int8 only as its own quantised types, not as an int8 x int8 -> int32 "
                "dot_general); export it with --format saved_model or stablehlo, or export the "
                "float checkpoint to tflite")
    return None


def _export_onnx(loaded: InferenceModel, out: Path) -> tuple[Path, Callable]:
    _require("onnx", "onnx")
    ort = _require("onnxruntime", "onnx")
    from vit import onnx_export

    path = out / "model.onnx"
    onnx_export.write_onnx(loaded, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path, lambda pixels: session.run(["logits"], {"pixels": np.asarray(pixels)})[0]


_WRITERS = {"stablehlo": _export_stablehlo, "saved_model": _export_saved_model,
            "tflite": _export_tflite, "onnx": _export_onnx}
_INPUTS = {
    "stablehlo": "float32 [N, rows, cols, 3] preprocessed as in evaluation -> logits",
    "saved_model": "serving_default: uint8 [N, H, W, 3] any size; pixels: uint8 "
                   "[N, rows, cols, 3]",
    "tflite": "signature pixels: uint8 [N, rows, cols, 3] resized as in evaluation",
    "onnx": "pixels: uint8 [N, rows, cols, 3] resized as in evaluation",
}


def _max_diff(fmt: str, run: Callable, staged_dir: Path, loaded: InferenceModel,
              pictures: Sequence[np.ndarray], model: Callable[[np.ndarray], np.ndarray],
              reference: np.ndarray) -> float:
    """Max |logit diff| of the written export against the JAX `model` on the same batches, at
    every VERIFY_BATCHES; the per-file SavedModel check against `reference` (all at once)."""
    from vit.predict import model_inputs

    pixels, inputs = crops(pictures, loaded.config), model_inputs(pictures, loaded.config)
    diffs = []  # np.max over them keeps a NaN, where Python's max would drop it
    for n in VERIFY_BATCHES:
        for lo in range(0, len(pixels), n):
            got = np.asarray(run(_batch_of(pixels[lo:lo + n], n)))
            want = model(_batch_of(inputs[lo:lo + n], n))
            diffs.append(np.max(np.abs(got - want)))
    if fmt == "saved_model":  # also the uint8 images at their own sizes, one per call
        got = tf_export.saved_model_on_files(staged_dir, pictures)
        diffs.append(np.max(np.abs(got - reference)))
    return float(np.max(diffs))


def tolerance_for(loaded: InferenceModel, reference: np.ndarray) -> float:
    """The largest |logit diff| an export of `loaded` may show: the larger of TOLERANCE and
    FLOAT_RELATIVE of the `reference` logits' range for float models; for int8 the larger of
    INT8_TOLERANCE and INT8_RELATIVE of it."""
    spread = float(np.ptp(reference))
    if loaded.model.quant == "none":
        return max(TOLERANCE, FLOAT_RELATIVE * spread)
    return max(INT8_TOLERANCE, INT8_RELATIVE * spread)


def _move_into_place(staged: Path, path: Path) -> None:
    """Replace `path` (a file or directory, if any) with `staged`, a sibling of it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.replace(staged, path)


def export(
    checkpoint: str | InferenceModel, fmt: str, out_dir: str | os.PathLike[str], *,
    images: Sequence[str] | None = None, use_ema: bool = False, measure_speed: bool = True,
) -> ExportResult:
    """Write `checkpoint` (a path or a loaded model) in format `fmt` to `out_dir` and verify it.

    `images` are image files or directories to check on (default: the run's first evaluation
    images, else synthetic ones; see `check_images`). Raises ExportError, leaving `out_dir` as
    it was, if the format cannot hold the model or the export's logits differ from the model's
    by more than `tolerance_for` allows (TOLERANCE; for an int8 checkpoint a bound of int8's
    rounding).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    loaded = (checkpoint if isinstance(checkpoint, InferenceModel)
              else load_inference_model(checkpoint, use_ema=use_ema))
    why = refusal(loaded, fmt)
    if why:
        raise ExportError(why)
    pictures, verified_on = check_images(loaded, images)

    from vit.predict import model_inputs

    fn = jax.jit(logits_fn(loaded))
    reference = np.asarray(fn(loaded.params, model_inputs(pictures, loaded.config)))
    out = Path(out_dir)
    with new_directory(out):  # a failure removes the folders this call made
        staging = Path(tempfile.mkdtemp(prefix=f".{fmt}-staging-", dir=out))
        try:
            staged, run = _WRITERS[fmt](loaded, staging)
            diff = _max_diff(fmt, run, staging, loaded, pictures,
                             lambda x: np.asarray(fn(loaded.params, x)), reference)
            tolerance = tolerance_for(loaded, reference)
            if not diff <= tolerance:
                raise ExportError(f"the {fmt} export differs from the model by {diff:.3g} "
                                  f"(> {tolerance:.3g}) in its logits on {verified_on}, so it was "
                                  f"not written to {out}; report the model config that caused it")
            speed = ref_speed = None
            if measure_speed:
                batch = _batch_of(crops(pictures, loaded.config), SPEED_BATCH)
                speed = _speed(run, batch)
                kind, params = loaded.config.pp.normalize, jax.device_put(loaded.params)
                ref_speed = _speed(lambda p: fn(params, preprocess.normalize_on_device(p, kind)),
                                   batch)
            path = out / staged.name
            _move_into_place(staged, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    result = ExportResult(fmt, str(path), size_on_disk(path), diff, speed, ref_speed, verified_on)
    meta = {"format": fmt, "input": _INPUTS[fmt],
            "image_size": json_image_size(loaded.config.image_size),
            "normalize": loaded.config.pp.normalize,
            "eval_resize": loaded.config.pp.get("eval_resize"), "use_ema": use_ema,
            "class_names": list(loaded.info.class_names), "step": loaded.step,
            "checkpoint": None if isinstance(checkpoint, InferenceModel) else str(checkpoint),
            "check": result.to_dict()}
    _record_export(out / "export.json", fmt, meta)
    return result


def _record_export(path: Path, fmt: str, meta: dict) -> None:
    """Set `fmt`'s entry of the {format: metadata} file `path`, keeping the other formats'."""
    exports = {}
    if path.exists():
        try:
            exports = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            exports = None
        if isinstance(exports, dict) and isinstance(exports.get("format"), str):
            exports = {exports["format"]: exports}  # one export's metadata, as first written
        if not isinstance(exports, dict):
            kept, n = path.with_name(path.name + ".unreadable"), 1
            while kept.exists():  # an earlier one kept too: never overwritten unread
                n += 1
                kept = path.with_name(f"{path.name}.unreadable.{n}")
            os.replace(path, kept)
            logging.getLogger("vit").warning("%s was no {format: metadata} JSON: moved to %s, "
                                             "a new one started", path, kept)
            exports = {}
    exports[fmt] = meta
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(exports, indent=2) + "\n")
    os.replace(staged, path)
