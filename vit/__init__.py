"""vit: Vision Transformer image classification on JAX."""

from vit.host_memory import retain_host_memory

HOST_MEMORY_RETAINED = retain_host_memory()  # first, before any other thread allocates

from vit.console import quiet_native_output  # noqa: E402  (after the allocator set-up above)

with quiet_native_output():  # TensorFlow only feeds data: keep its start-up lines (vit/console.py)
    from vit.evaluate import evaluate
    from vit.model import (
        VARIANTS,
        VisionTransformer,
        count_params,
        create_model,
        init_params,
        model_from_config,
    )
    from vit.predict import predict

__all__ = ["HOST_MEMORY_RETAINED", "VARIANTS", "VisionTransformer", "count_params", "create_model",
           "evaluate", "init_params", "model_from_config", "predict"]
