"""Pixel normalisation on the device: uint8 images to the model's float inputs (no TensorFlow).

`normalization_table(kind)` holds what `vit.preprocess.normalize` (the host's TensorFlow op)
makes of each uint8 value per channel, computed here in float32 NumPy with the same operations
in the same order, so the two agree bit for bit (tested).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vit.data_options import NORMALIZATIONS, DataError


@functools.lru_cache(maxsize=len(NORMALIZATIONS))
def normalization_table(kind: str) -> np.ndarray:
    """float32 [256, 3]: what `normalize` makes of each uint8 value in each channel."""
    if kind not in NORMALIZATIONS:
        raise DataError(f"pp.normalize={kind!r} is unknown; use one of {sorted(NORMALIZATIONS)}")
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[kind])
    values = np.repeat(np.arange(256, dtype=np.float32)[:, None], 3, axis=1)
    table = (values / np.float32(255.0) - mean) / std
    table.flags.writeable = False
    return table


def normalize_on_device(images: jax.Array, kind: str) -> jax.Array:
    """uint8 images [..., 3] -> float32 model inputs in JAX, bit for bit what `normalize` gives.

    A lookup in `normalization_table`: XLA turns `x / c` into `x * (1 / c)`, so recomputing the
    formula under jit would differ in the last bit. Floating-point images are taken as model
    inputs already and returned unchanged (tests feed NaN batches that way).
    """
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if images.dtype != jnp.uint8:
        raise DataError(f"normalize_on_device needs uint8 (or already normalised float) images, "
                        f"got {images.dtype}; pass the pixels the input pipeline yields")
    table = jnp.asarray(normalization_table(kind))
    return table[images.astype(jnp.int32), jnp.arange(3)]
