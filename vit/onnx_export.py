"""Write a ViT checkpoint as an ONNX graph, built op by op from its parameters.

Why this route: jax2tf now serialises only to StableHLO inside an `XlaCallModule` op, which
tf2onnx cannot read, and jax2onnx pins an older orbax-checkpoint than this package needs. The
ViT is a short list of standard ONNX ops (opset 20: Conv, LayerNormalization, MatMul, Softmax,
Gelu), so the graph is written here directly and checked against the JAX model with onnxruntime
by `vit.export`. Supported: patchify and conv stems (LayerNorm or GroupNorm), class token,
registers, learned, sin-cos or no position embeddings, DINOv3's and EVA-02's RoPE, CLIP's
pre-norm, token or GAP heads (fc_norm after the pooling too), pre-logits, qk-norm, tanh or exact
GELU, CLIP's quick GELU or SwiGLU (EVA-02's LayerNorm on its hidden units too), any LayerNorm
epsilon, attention without key biases. Not supported
(ExportError naming the alternative): MAP heads, ResNet hybrids, int8-quantised checkpoints.

Graph: pixels uint8 [N, rows, cols, 3] (the run's image_size) -> (logits float32
[N, classes], probabilities).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from vit import preprocess
from vit.encoder import posemb_sincos_2d
from vit.evaluate import InferenceModel
from vit.model_options import pair
from vit.rope import rope_tables
from vit.weight_formats import flatten_params

OPSET = 20
IR_VERSION = 10
_EPS = 1e-6  # flax LayerNorm and GroupNorm


class _Graph:
    """Accumulates nodes and initializers; every method returns its output's name."""

    def __init__(self) -> None:
        import onnx

        self.onnx = onnx
        self.nodes: list = []
        self.inits: list = []
        self._n = 0
        self.norm_epsilon = _EPS  # the encoder's LayerNorms (the model's norm_epsilon)

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: Any, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.asarray(values, np.int64), "i")

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def dense(self, x: str, kernel: np.ndarray, bias: np.ndarray | None) -> str:
        y = self.op("MatMul", x, self.const(kernel.astype(np.float32), "w"))
        return y if bias is None else self.op("Add", y, self.const(bias.astype(np.float32), "b"))

    def layer_norm(self, x: str, p: dict[str, np.ndarray], prefix: str,
                   epsilon: float | None = None) -> str:
        """LayerNorm over the last axis with the model's epsilon (`norm_epsilon`) unless given."""
        return self.op("LayerNormalization", x, self.const(p[f"{prefix}/scale"], "s"),
                       self.const(p[f"{prefix}/bias"], "b"), axis=-1,
                       epsilon=self.norm_epsilon if epsilon is None else epsilon)

    def group_norm(self, x: str, groups: int, scale: np.ndarray, bias: np.ndarray) -> str:
        """flax GroupNorm on NCHW x: statistics over (C / groups, H, W) of each group."""
        grouped = self.op("Reshape", x, self.ints(0, groups, -1))
        axes = self.ints(2)
        mean = self.op("ReduceMean", grouped, axes, keepdims=1)
        centred = self.op("Sub", grouped, mean)
        var = self.op("ReduceMean", self.op("Mul", centred, centred), axes, keepdims=1)
        std = self.op("Sqrt", self.op("Add", var, self.const(np.float32(_EPS))))
        normed = self.op("Reshape", self.op("Div", centred, std), self.op("Shape", x))
        shaped = lambda v: self.const(v.reshape(-1, 1, 1).astype(np.float32))
        return self.op("Add", self.op("Mul", normed, shaped(scale)), shaped(bias))


# One protobuf holds the graph with its weights: 2 GiB at most, less what the graph itself takes.
WEIGHT_BYTES_LIMIT = 2**31 - 2**26


def unsupported(loaded: InferenceModel) -> str | None:
    """What of the checkpoint's model this exporter cannot write ("a MAP head", ...), or None."""
    model = loaded.model
    weight_bytes = sum(4 * np.size(v) for v in flatten_params(loaded.params).values())
    if weight_bytes > WEIGHT_BYTES_LIMIT:  # ViT-H and larger: float32 weights inlined
        return (f"weights of {weight_bytes / 2**30:.2f} GiB (one ONNX protobuf holds at most "
                "2 GiB)")
    if model.classifier == "map":
        return "a MAP head"
    if model.resnet_layers is not None:
        return "a ResNet hybrid trunk"
    if model.quant != "none" or any(np.asarray(v).dtype == np.int8
                                    for v in flatten_params(loaded.params).values()):
        return "int8-quantised weights"
    return None


def refusal(loaded: InferenceModel) -> str | None:
    """The one-line ExportError message for a model `unsupported` names, or None."""
    why = unsupported(loaded)
    return why and (f"the onnx exporter does not support {why}; export this model with "
                    "--format saved_model or stablehlo instead")


def _stem(g: _Graph, x: str, model: Any, p: dict[str, np.ndarray]) -> str:
    """NHWC float images -> NCHW patch features of width `model.width`."""
    x = g.op("Transpose", x, perm=[0, 3, 1, 2])
    kernel = model.patch_size
    if model.stem == "conv":
        from vit import stems

        channels = model.stem_channels or stems.default_stem_channels(model.width,
                                                                      model.patch_size)
        strides = stems.conv_strides(len(channels), model.patch_size, model.stem_strides)
        for i, (c, s) in enumerate(zip(channels, strides, strict=True)):
            w = p[f"stem/conv_{i}/kernel"].transpose(3, 2, 0, 1)
            x = g.op("Conv", x, g.const(w, "conv"), strides=[s, s], pads=[1, 1, 1, 1])
            if model.stem_norm == "layernorm":
                x = g.op("Transpose", x, perm=[0, 2, 3, 1])
                x = g.layer_norm(x, p, f"stem/norm_{i}", _EPS)
                x = g.op("Transpose", x, perm=[0, 3, 1, 2])
            else:
                x = g.group_norm(x, math.gcd(32, c), p[f"stem/norm_{i}/scale"],
                                 p[f"stem/norm_{i}/bias"])
            x = g.op("Relu", x)
        kernel = (1, 1)
    w = p["embedding/kernel"].transpose(3, 2, 0, 1)
    return g.op("Conv", x, g.const(w, "embed"), g.const(p["embedding/bias"], "b"),
                kernel_shape=list(kernel), strides=list(kernel))


def _expand_token(g: _Graph, token: np.ndarray, batch: str) -> str:
    """A [1, k, D] parameter repeated over the batch: [N, k, D]."""
    shape = g.op("Concat", batch, g.ints(token.shape[1], token.shape[2]), axis=0)
    return g.op("Expand", g.const(token.astype(np.float32), "tok"), shape)


def _rotated(g: _Graph, y: str, rope: tuple[str, str, str], head_dim: int) -> str:
    """y [N, T, H, d] rotated by RoPE's (sin, cos) tables [T, 1, d] of its kind: y cos +
    rotate(y) sin, rotate pairing channel c with c + d / 2 (dinov3) or 2c with 2c + 1 (eva02)."""
    sin, cos, kind = rope
    if kind == "dinov3":
        half = head_dim // 2
        first = g.op("Slice", y, g.ints(0), g.ints(half), g.ints(-1))
        second = g.op("Slice", y, g.ints(half), g.ints(head_dim), g.ints(-1))
        rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    else:
        pairs = g.op("Reshape", y, g.ints(0, 0, 0, head_dim // 2, 2))
        even = g.op("Slice", pairs, g.ints(0), g.ints(1), g.ints(-1))
        odd = g.op("Slice", pairs, g.ints(1), g.ints(2), g.ints(-1))
        rotated = g.op("Reshape", g.op("Concat", g.op("Neg", odd), even, axis=-1),
                       g.ints(0, 0, 0, head_dim))
    return g.op("Add", g.op("Mul", y, cos), g.op("Mul", rotated, sin))


def _attention(g: _Graph, x: str, p: dict[str, np.ndarray], prefix: str, heads: int,
               rope: tuple[str, str, str] | None = None) -> str:
    width = p[f"{prefix}/query/kernel"].shape[0]
    head_dim = width // heads
    split = g.ints(0, -1, heads, head_dim)

    def project(name: str, perm: list[int]) -> str:
        bias = p.get(f"{prefix}/{name}/bias")  # none for key_bias=False
        y = g.dense(x, p[f"{prefix}/{name}/kernel"].reshape(width, width),
                    None if bias is None else bias.reshape(width))
        y = g.op("Reshape", y, split)  # [N, T, H, d]
        if f"{prefix}/{name}_norm/scale" in p:  # qk_norm: over each head's d
            y = g.layer_norm(y, p, f"{prefix}/{name}_norm")
        if rope is not None and name != "value":
            y = _rotated(g, y, rope, head_dim)
        return g.op("Transpose", y, perm=perm)

    q = project("query", [0, 2, 1, 3])  # [N, H, T, d]
    k = project("key", [0, 2, 3, 1])  # [N, H, d, T]
    v = project("value", [0, 2, 1, 3])
    q = g.op("Mul", q, g.const(np.float32(1.0 / np.sqrt(np.float32(head_dim)))))
    weights = g.op("Softmax", g.op("MatMul", q, k), axis=-1)
    y = g.op("Transpose", g.op("MatMul", weights, v), perm=[0, 2, 1, 3])
    y = g.op("Reshape", y, g.ints(0, -1, width))
    return g.dense(y, p[f"{prefix}/out/kernel"].reshape(width, width), p[f"{prefix}/out/bias"])


def _block(g: _Graph, x: str, p: dict[str, np.ndarray], i: int, model: Any,
           rope: tuple[str, str, str] | None) -> str:
    prefix = f"Transformer/encoderblock_{i}"

    def scaled(y: str, index: int) -> str:  # LayerScale_1 / _3, when the model has them
        name = f"{prefix}/LayerScale_{index}/scale"
        return g.op("Mul", y, g.const(p[name], "ls")) if name in p else y

    y = g.layer_norm(x, p, f"{prefix}/LayerNorm_0")
    x = g.op("Add", x, scaled(_attention(g, y, p, f"{prefix}/MultiHeadDotProductAttention_1",
                                         model.num_heads, rope), 1))
    y = g.layer_norm(x, p, f"{prefix}/LayerNorm_2")
    mlp = f"{prefix}/MlpBlock_3"
    y = g.dense(y, p[f"{mlp}/Dense_0/kernel"], p[f"{mlp}/Dense_0/bias"])
    if model.mlp_activation == "quick_gelu":
        y = g.op("Mul", y, g.op("Sigmoid", g.op("Mul", y, g.const(np.float32(1.702)))))
    elif model.mlp_activation == "swiglu":  # silu(first half) * second half
        h = model.mlp_dim
        gate = g.op("Slice", y, g.ints(0), g.ints(h), g.ints(-1))
        value = g.op("Slice", y, g.ints(h), g.ints(2 * h), g.ints(-1))
        y = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), value)
    else:
        y = g.op("Gelu", y, approximate="tanh" if model.mlp_activation == "gelu_tanh" else "none")
    if model.mlp_norm:
        y = g.layer_norm(y, p, f"{mlp}/hidden_norm")
    y = g.dense(y, p[f"{mlp}/Dense_1/kernel"], p[f"{mlp}/Dense_1/bias"])
    return g.op("Add", x, scaled(y, 3))


def build_onnx(loaded: InferenceModel) -> Any:
    """The `onnx.ModelProto` of a checkpoint's model, eval preprocessing's normalisation in it."""
    from vit.export import ExportError

    why = refusal(loaded)
    if why:
        raise ExportError(why)
    model = loaded.model
    p = {k: np.asarray(v) for k, v in flatten_params(loaded.params).items()}
    g = _Graph()
    g.norm_epsilon = float(model.norm_epsilon)
    onnx = g.onnx
    mean, std = preprocess.NORMALIZATIONS[loaded.config.pp.normalize]
    x = g.op("Div", g.op("Cast", "pixels", to=onnx.TensorProto.FLOAT), g.const(np.float32(255)))
    x = g.op("Div", g.op("Sub", x, g.const(np.float32(mean))), g.const(np.float32(std)))
    x = _stem(g, x, model, p)  # [N, D, h, w]
    x = g.op("Transpose", g.op("Reshape", x, g.ints(0, model.width, -1)), perm=[0, 2, 1])
    batch = g.op("Shape", x, start=0, end=1)
    prefix = 0
    if model.has_class_token:
        x = g.op("Concat", _expand_token(g, p["cls"], batch), x, axis=1)
        prefix = 1
    if model.posemb == "learn":
        pe = p["Transformer/posembed_input/pos_embedding"]
    elif model.posemb == "sincos2d":
        pe = np.pad(posemb_sincos_2d(*model.grid, model.width), ((0, 0), (prefix, 0), (0, 0)))
    if model.posemb != "none":
        x = g.op("Add", x, g.const(pe.astype(np.float32), "posemb"))
    rope = None
    if model.rope != "none":  # tables shared by every block, [T, 1 (heads), head_dim]
        tables = rope_tables(model.grid, model.width // model.num_heads,
                             prefix + model.num_registers, model.rope, model.rope_grid)
        rope = (*(g.const(t[:, None], "rope") for t in tables), model.rope)
    if model.num_registers:
        reg = _expand_token(g, p["Transformer/registers"], batch)
        head = g.op("Slice", x, g.ints(0), g.ints(prefix), g.ints(1))
        tail = g.op("Slice", x, g.ints(prefix), g.ints(2**62), g.ints(1))
        x = g.op("Concat", head, reg, tail, axis=1)
    if model.pre_norm:
        x = g.layer_norm(x, p, "Transformer/pre_norm")
    for i in range(model.depth):
        x = _block(g, x, p, i, model, rope)
    if not model.fc_norm:
        x = g.layer_norm(x, p, "Transformer/encoder_norm")
    if model.classifier == "token":
        x = g.op("Gather", x, g.const(np.int64(0)), axis=1)
    else:
        patches = g.op("Slice", x, g.ints(prefix + model.num_registers), g.ints(2**62), g.ints(1))
        x = g.op("ReduceMean", patches, g.ints(1), keepdims=0)
        if model.fc_norm:
            x = g.layer_norm(x, p, "fc_norm")
    if model.representation_size is not None:
        x = g.op("Tanh", g.dense(x, p["pre_logits/kernel"], p["pre_logits/bias"]))
    logits = g.op("Add", g.op("MatMul", x, g.const(p["head/kernel"], "head")),
                  g.const(p["head/bias"], "b"), out="logits")
    g.op("Softmax", logits, axis=-1, out="probabilities")
    helper = onnx.helper
    pixels = ["N", *pair(loaded.config.image_size), 3]
    graph = helper.make_graph(
        g.nodes, "vit",
        [helper.make_tensor_value_info("pixels", onnx.TensorProto.UINT8, pixels)],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", model.num_classes])
         for n in ("logits", "probabilities")],
        initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="vit")
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto


def write_onnx(loaded: InferenceModel, path: str | Path) -> Path:
    """Write the checkpoint's model to `path` (.onnx); returns the path."""
    import onnx

    path = Path(path)
    onnx.save(build_onnx(loaded), str(path))
    return path
