"""TensorFlow's import without its eager import of Keras.

The package uses TensorFlow for tf.data and image ops only. On import, TensorFlow loads
`keras.src.optimizers` (to register Keras optimizers for Keras SavedModels), and with it all of
Keras: about 3 s of every `vit` and `train.py` start (`import vit.trainer` 9.9-10.4 s with it,
6.2-7.3 s without, AMD EPYC Zen 3). `import_tensorflow()` imports TensorFlow with Keras's own
import refused for that time only (TensorFlow skips the optional load on ImportError), then
leaves the import system as it was: `import keras` and `tf.keras` afterwards load Keras as usual.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _RefusedLoader(importlib.abc.Loader):
    """Loads nothing: executing the module raises ImportError."""

    def exec_module(self, module: types.ModuleType) -> None:
        raise ImportError(f"{module.__name__} is not loaded while TensorFlow imports (vit)",
                          name=module.__name__)


class _KerasRefused(importlib.abc.MetaPathFinder):
    """Finds Keras where it is (TensorFlow reads its location), but refuses to execute it."""

    def find_spec(self, name: str, path=None, target=None):
        if name != "keras":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _RefusedLoader()
        return spec


def import_tensorflow() -> types.ModuleType:
    """`import tensorflow`, skipping its load of Keras unless Keras is imported already."""
    if "tensorflow" in sys.modules or "keras" in sys.modules:
        import tensorflow

        return tensorflow
    finder = _KerasRefused()
    sys.meta_path.insert(0, finder)
    try:
        import tensorflow
    finally:
        sys.meta_path.remove(finder)
    return tensorflow
