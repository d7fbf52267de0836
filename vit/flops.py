"""Model FLOPs: the multiply-adds of a model's matmuls and convolutions, counted on its jaxpr.

2 x M x N x K per `dot_general` and 2 x outputs x (input features per group x kernel window)
per convolution, through nested jaxprs (jit, remat, custom gradients; a scan counts its body
`length` times, a cond its largest branch). Elementwise work is not counted. These are the
"model FLOPs" of model FLOPs utilisation (MFU; Chowdhery et al., PaLM, 2022): what the model
needs, whatever a backend fuses, rematerialises or hides in a fused kernel. A training step
costs 3x the forward pass: the backward pass runs two matmuls per forward matmul.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp

from vit.model import VisionTransformer, init_params

TRAIN_FORWARD_RATIO = 3  # forward + backward (input and weight gradients) per forward matmul


def _dot_flops(eqn: Any) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn: Any) -> int:
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial..)
    kernel = eqn.invars[1].aval.shape
    window = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
    return 2 * math.prod(eqn.outvars[0].aval.shape) * window


def jaxpr_flops(jaxpr: jex.Jaxpr | jex.ClosedJaxpr) -> int:
    """Matmul and convolution FLOPs of `jaxpr`, nested jaxprs included."""
    if isinstance(jaxpr, jex.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
        else:
            inner = sum(jaxpr_flops(sub) for sub in jex.jaxprs_in_params(eqn.params))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def function_flops(fn: Any, *args: Any) -> int:
    """Matmul and convolution FLOPs of one call `fn(*args)`; args may be jax.ShapeDtypeStruct."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def forward_flops_per_image(model: VisionTransformer, *, train: bool = False) -> int:
    """Model FLOPs of one image's forward pass; `train=True` counts what training runs (token
    dropping keeps fewer tokens). Attention is counted as the explicit kernel computes it (a
    fused kernel does the same matmuls, out of the jaxpr's sight)."""
    model = model.clone(attention_impl="explicit", matmul_impl="xla", elementwise_impl="xla")
    key = jax.random.PRNGKey(0)
    params = jax.eval_shape(lambda: init_params(model, key))
    image = jax.ShapeDtypeStruct((1, *model.image_size, 3), jnp.float32)
    forward = lambda p, x: model.apply({"params": p}, x, train=train, rngs={"dropout": key})
    return function_flops(forward, params, image)


def train_flops_per_image(model: VisionTransformer) -> int:
    """Model FLOPs of one image in a training step: 3x its training forward pass."""
    return TRAIN_FORWARD_RATIO * forward_flops_per_image(model, train=True)
