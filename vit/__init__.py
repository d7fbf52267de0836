"""vit: Vision Transformer image classification on JAX."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data: keep it quiet

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

__all__ = ["VARIANTS", "VisionTransformer", "count_params", "create_model", "evaluate",
           "init_params", "model_from_config", "predict"]
