"""vit: Vision Transformer image classification on JAX."""

from vit.console import quiet_native_logs

quiet_native_logs()  # before JAX's import sets its own default

from vit.host_memory import retain_host_memory  # noqa: E402

HOST_MEMORY_RETAINED = retain_host_memory()  # first, before any other thread allocates

from vit.console import quiet_native_output  # noqa: E402  (after the allocator set-up above)
from vit.model import (  # noqa: E402
    VARIANTS,
    VisionTransformer,
    count_params,
    create_model,
    init_params,
    model_from_config,
)
from vit.tf_start import import_tensorflow  # noqa: E402

_INPUT_PIPELINE_MISSING = None
try:
    with quiet_native_output():  # TensorFlow only feeds data: keep its start-up lines quiet
        import_tensorflow()  # before any module imports it: without loading Keras
        from vit.evaluate import evaluate
        from vit.predict import predict
except ModuleNotFoundError as err:
    # Where only JAX is installed (an accelerator image, say), the model, the configs and the
    # train step (vit/train_step.py) still import; reading data needs TensorFlow.
    if err.name not in ("tensorflow", "tensorflow_datasets"):
        raise
    _INPUT_PIPELINE_MISSING = err.name


def __getattr__(name: str):
    if name in ("evaluate", "predict") and _INPUT_PIPELINE_MISSING:
        raise ImportError(f"vit.{name} reads images, which needs {_INPUT_PIPELINE_MISSING}: "
                          "install the package with its dependencies (pip install -e .)")
    raise AttributeError(f"module 'vit' has no attribute {name!r}")


__all__ = ["HOST_MEMORY_RETAINED", "VARIANTS", "VisionTransformer", "count_params", "create_model",
           "evaluate", "init_params", "model_from_config", "predict"]
