"""`vit quantize`: post-training int8 quantisation of a checkpoint, runnable by eval / predict.

Every dense and attention projection (query / key / value / out of each attention, both MLP
layers, pre-logits and the classifier head) gets symmetric int8 weights per output channel and
a float32 scale beside them; its activations are quantised per token at run time and the
product is accumulated in int32 (vit/int8.py). The patch embedding, the conv stem, norms,
biases and position embeddings stay float32. The result is an ordinary checkpoint whose
`config.model.quant` is "int8", so `vit eval`, `vit predict` and `vit export --format stablehlo
| saved_model` (int8 kernels kept as int8, checked against the int8 model within
`vit.export.INT8_TOLERANCE` = 5e-2 or `INT8_RELATIVE` = 1% of the logits' range, whichever is
larger) run it unchanged. `tflite` and `onnx` refuse it in one line: their builtin matmuls do
not take an int8 x int8 -> int32 product of plain int8 tensors.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
from flax import traverse_util

from vit import int8
from vit.weight_formats import flatten_params

PyTree = Any
# Kernels quantised, and the axes their per-output-channel scale reduces over.
_QUANTISED = (
    (re.compile(r".*MultiHeadDotProductAttention_\d+/(query|key|value)/kernel"), (0,)),
    (re.compile(r".*MultiHeadDotProductAttention_\d+/out/kernel"), (0, 1)),
    (re.compile(r".*MlpBlock_\d+/Dense_\d+/kernel"), (0,)),
    (re.compile(r"(pre_logits|head)/kernel"), (0,)),
)


@dataclasses.dataclass
class QuantizeResult:
    """Where the int8 checkpoint went and what changed: kernels quantised, parameter bytes."""

    path: str
    num_kernels: int
    float_bytes: int
    int8_bytes: int

    def summary(self) -> str:
        """One line for the CLI."""
        return (f"wrote {self.path}: {self.num_kernels} kernels in int8, parameters "
                f"{self.float_bytes / 2**20:.2f} MiB -> {self.int8_bytes / 2**20:.2f} MiB")


def _axes_for(name: str) -> tuple[int, ...] | None:
    return next((axes for pattern, axes in _QUANTISED if pattern.fullmatch(name)), None)


def quantize_params(params: PyTree) -> tuple[PyTree, int]:
    """(params for a quant="int8" model, number of kernels quantised) from float params."""
    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    out, count = {}, 0
    for name, value in flat.items():
        axes = _axes_for(name)
        if axes is None:
            out[name] = value
            continue
        if value.dtype == np.int8:
            raise ValueError(f"{name} is already int8: quantize the float checkpoint instead")
        out[name], out[name.rsplit("/", 1)[0] + "/scale"] = int8.quantize_weight(value, axes)
        count += 1
    return traverse_util.unflatten_dict(out, sep="/"), count


def _nbytes(params: PyTree) -> int:
    return int(sum(np.asarray(v).nbytes for v in flatten_params(params).values()))


def quantize_checkpoint(src: str, dst: str, *, use_ema: bool = False) -> QuantizeResult:
    """Quantise checkpoint `src` (workdir, checkpoints or step dir) into workdir `dst`."""
    from vit.checkpoint import load_checkpoint, write_params

    contents = load_checkpoint(src)
    params = contents.chosen_params(use_ema)
    qparams, count = quantize_params(params)
    if count == 0:
        raise ValueError(f"no dense or attention kernels found in {src}: is it a ViT checkpoint?")
    config = dict(contents.config)
    config["model"] = {**config["model"], "quant": "int8"}
    path = write_params(dst, contents.step, qparams, config, contents.dataset_info)
    return QuantizeResult(path, count, _nbytes(params), _nbytes(qparams))
