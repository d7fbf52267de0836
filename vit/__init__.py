"""vit: Vision Transformer image classification on JAX."""

from vit.model import VARIANTS, VisionTransformer, count_params, create_model, init_params

__all__ = ["VARIANTS", "VisionTransformer", "count_params", "create_model", "init_params"]
