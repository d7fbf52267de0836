"""vit: Vision Transformer image classification on JAX."""

import os

from vit.host_memory import retain_host_memory

HOST_MEMORY_RETAINED = retain_host_memory()  # first, before any other thread allocates
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data: keep it quiet

from vit.evaluate import evaluate  # noqa: E402  (after the allocator set-up above)
from vit.model import (  # noqa: E402
    VARIANTS,
    VisionTransformer,
    count_params,
    create_model,
    init_params,
    model_from_config,
)
from vit.predict import predict  # noqa: E402

__all__ = ["HOST_MEMORY_RETAINED", "VARIANTS", "VisionTransformer", "count_params", "create_model",
           "evaluate", "init_params", "model_from_config", "predict"]
