"""The TensorFlow formats of `vit export`: a SavedModel through jax2tf and the TFLite model
converted from it, with the runners that check them (vit/export.py verifies and records).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vit import console, preprocess
from vit.evaluate import InferenceModel
from vit.model_options import pair

LogitsFn = Callable[[Any, jax.Array], jax.Array]  # (params, float images) -> logits


def _tf_module(loaded: InferenceModel, fn: LogitsFn) -> Any:
    import tensorflow as tf
    from jax.experimental import jax2tf

    config = loaded.config
    size, kind = pair(config.image_size), config.pp.normalize

    def from_pixels(params, pixels):
        logits = fn(params, preprocess.normalize_on_device(pixels, kind))
        return logits, jax.nn.softmax(logits, axis=-1)

    converted = jax2tf.convert(from_pixels, polymorphic_shapes=[None, "(b, ...)"],
                               with_gradient=False)
    module = tf.Module()
    params = tf.nest.map_structure(lambda v: tf.Variable(v, trainable=False),
                                   jax.tree_util.tree_map(np.asarray, loaded.params))
    module.variables_list = tf.nest.flatten(params)  # tracked for saving; `params` stays a dict

    def outputs(pixels):
        logits, probs = converted(params, pixels)
        return {"logits": tf.identity(logits, "logits"),
                "probabilities": tf.identity(probs, "probabilities")}

    @tf.function(input_signature=[tf.TensorSpec([None, *size, 3], tf.uint8, "pixels")],
                 autograph=False)
    def pixels(pixels):
        return outputs(pixels)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, "images")],
                 autograph=False)
    def serving(images):
        cropped = tf.map_fn(lambda im: preprocess.eval_crop(im, config), images,
                            fn_output_signature=tf.TensorSpec([*size, 3], tf.uint8))
        return outputs(cropped)

    module.pixels, module.serving = pixels, serving
    return module


def write_saved_model(loaded: InferenceModel, fn: LogitsFn, path: Path) -> None:
    """The SavedModel of `fn` (params, float images -> logits) with the checkpoint's params as
    variables, and its `serving_default` and `pixels` signatures, at `path`."""
    import tensorflow as tf

    module = _tf_module(loaded, fn)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serving,
                                                       "pixels": module.pixels})


def saved_model_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [N, rows, cols, 3] -> logits through a written SavedModel's `pixels` signature."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures["pixels"]
    return lambda pixels: signature(pixels=tf.constant(pixels))["logits"].numpy()


def saved_model_on_files(directory: str | os.PathLike[str], images: Sequence[np.ndarray]
                         ) -> np.ndarray:
    """Logits of a written SavedModel's `serving_default` on uint8 images, one call per image."""
    import tensorflow as tf

    serving = tf.saved_model.load(str(Path(directory) / "saved_model"))
    serving = serving.signatures["serving_default"]
    return np.concatenate([serving(images=tf.constant(im[None]))["logits"].numpy()
                           for im in images])


def write_tflite(loaded: InferenceModel, fn: LogitsFn, path: Path) -> None:
    """The TFLite flatbuffer of the SavedModel's `pixels` signature (`write_saved_model`)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        write_saved_model(loaded, fn, Path(tmp) / "saved_model")
        converter = tf.lite.TFLiteConverter.from_saved_model(
            str(Path(tmp) / "saved_model"), signature_keys=["pixels"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                               tf.lite.OpsSet.SELECT_TF_OPS]
        path.write_bytes(converter.convert())


def tflite_runner(path: str | os.PathLike[str]) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [N, rows, cols, 3] -> logits with a TFLite interpreter (LiteRT's when installed)."""
    import warnings

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    # tf.lite.Interpreter warns that LiteRT replaces it; its XNNPACK delegate logs an INFO line
    # on stderr at the first call, made here on one blank image
    with warnings.catch_warnings(), console.quiet_native_output():
        warnings.simplefilter("ignore")
        runner = Interpreter(model_path=str(path)).get_signature_runner("pixels")
        shape = runner.get_input_details()["pixels"]["shape"]
        runner(pixels=np.zeros((1, *shape[1:]), np.uint8))
    return lambda pixels: runner(pixels=np.asarray(pixels, np.uint8))["logits"]
