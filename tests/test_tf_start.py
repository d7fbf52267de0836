"""TensorFlow's import without Keras (vit/tf_start.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import jax_env
import pytest

from vit import tf_start


def test_the_finder_locates_keras_but_refuses_to_run_it():
    spec = tf_start._KerasRefused().find_spec("keras")
    assert spec.origin == importlib.util.find_spec("keras").origin  # TensorFlow reads it
    with pytest.raises(ImportError) as refused:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert refused.value.name == "keras"
    assert tf_start._KerasRefused().find_spec("keras.src.optimizers") is None
    assert tf_start._KerasRefused().find_spec("numpy") is None


def test_importing_vit_loads_no_keras_and_leaves_it_importable():
    code = (
        "import sys, vit\n"
        "assert 'tensorflow' in sys.modules and 'keras' not in sys.modules\n"
        "assert not any(type(f).__module__ == 'vit.tf_start' for f in sys.meta_path)\n"
        "import tensorflow as tf\n"
        "print(tf.keras.layers.Dense.__module__)\n"
        "import keras\n"
        "print(keras.__name__, 'keras' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=jax_env.subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["keras.src.layers.core.dense", "keras True"]
