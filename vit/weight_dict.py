"""`Weights`: a flat {name: array} dict of this toolkit's names, with what is known of where it
came from; `WeightsError`, the one-line error of weights that cannot be read or mapped."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

POSEMB = "Transformer/posembed_input/pos_embedding"


class WeightsError(ValueError):
    """Weights that cannot be read or mapped onto the model; the message names them and the fix."""


class Weights(dict):
    """A flat {"a/b/c": array} dict that also records its source format, reading notes and,
    where known, the patch grid (rows, cols) its position embedding was trained on, the class
    names of its head, the input normalisation (a `pp.normalize` name) it was trained with, the
    rotary position embedding (a `vit.rope.ROPE_KINDS` name) its attention needs, for
    "eva02", the grid its RoPE coordinates were scaled to (`rope_grid`) and, where a config.json
    beside flat timm / HF attention matrices states it, their number of heads."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str,
                 notes: list[str] | None = None, grid: tuple[int, int] | None = None,
                 class_names: tuple[str, ...] | None = None, normalize: str | None = None,
                 rope: str = "none", rope_grid: tuple[int, int] | None = None,
                 num_heads: int | None = None):
        super().__init__(arrays)
        self.source = source
        self.notes = list(notes or [])
        self.grid = grid
        self.class_names = class_names
        self.normalize = normalize
        self.rope = rope
        self.rope_grid = rope_grid
        self.num_heads = num_heads
