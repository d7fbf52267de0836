"""Multi-head dot-product attention with vit_jax's parameter names, masks, and two kernels.

Parameters: `{query,key,value}/{kernel [width, heads, head_dim], bias [heads, head_dim]}` and
`out/{kernel [heads, head_dim, width], bias [width]}`, as the public vit_jax checkpoints; with
`qk_norm`, `query_norm` and `key_norm` LayerNorms of [head_dim] (timm's q_norm / k_norm).
Given RoPE tables (vit/rope.py), the queries and keys are rotated after the qk-norm, as timm's
Eva attention does.

`impl` picks how attention is computed: "explicit" (softmax of q.k in einsums on heads-first
[B, heads, T, dim] operands; the only one that returns the weights or applies attention
dropout), "fused" (`jax.nn.dot_product_attention`, XLA's own lowering) or "cudnn" (the same
call asking for cuDNN's flash attention: NVIDIA GPUs, bfloat16 or float16 compute). The
user-facing default "auto" is decided once, where the model is built (`vit.create_model` calls
`resolve_attention_impl`): explicit on CPU, where XLA:CPU runs it faster; cudnn on a GPU when the
model computes in half precision with a head size cuDNN takes, else explicit (on an H200, B/16 in
bfloat16 trained at 0.38 MFU with cudnn, 0.31 explicit, 0.29 fused); fused on TPU. The module
never looks at the backend. A boolean `mask` broadcastable
to [batch, heads, queries, keys] (True = attend) is honoured by both: masked keys get exactly
zero weight. The explicit kernel has its own gradient (`_attend`), autodiff's formulas with every
batched matmul contracting its left operand's last axis, which XLA:CPU runs faster. With
`matmul_impl="blas"` its forward pass, where nothing differentiates it (inference), runs as one
call of vit/blas_attention.cc; self-attention (no mask, qk-norm or RoPE) runs as one call in
training too, forward and gradient, reading q, k, v in place from the fused projection
(`_self_attend`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit import blas_gemm, int8
from vit.matmul import matmul as typed_matmul
from vit.rope import apply_rope

Dtype = Any
Array = jax.Array

ATTENTION_IMPLS = ("auto", "explicit", "fused", "cudnn")  # what a user may ask for
KERNELS = ("explicit", "fused", "cudnn")  # what a module runs: "auto" is resolved before
_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

_xavier = nn.initializers.xavier_uniform()


def _xavier_as_matrix(rows: int) -> Callable[..., Array]:
    """Xavier-uniform for a DenseGeneral kernel, computed on the [rows, -1] matrix it acts as."""

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        return _xavier(key, (rows, int(np.prod(shape)) // rows), dtype).reshape(shape)

    return init


class _DenseGeneralParams(nn.Module):
    """Holds a DenseGeneral kernel and bias under vit_jax's names; the caller does the matmul.

    With `quant="int8"` the kernel is int8 and a float32 `scale` per output channel (shaped like
    the bias) sits beside it (vit/int8.py); the call returns (kernel, bias, scale or None).
    """

    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]
    fan_in: int
    quant: str = "none"
    use_bias: bool = True  # False: no bias parameter, zeros (DINOv3's key projection)

    @nn.compact
    def __call__(self) -> tuple[Array, Array, Array | None]:
        scale = None
        if self.quant == "int8":
            kernel = int8.int8_param(self, self.kernel_shape)
            scale = self.param("scale", nn.initializers.ones, self.bias_shape)
        else:
            kernel = self.param("kernel", _xavier_as_matrix(self.fan_in), self.kernel_shape)
        bias = (self.param("bias", nn.initializers.zeros, self.bias_shape) if self.use_bias
                else jnp.zeros(self.bias_shape, jnp.float32))
        return kernel, bias, scale


def _heads_first(x: Array) -> Array:
    """Swap the token and head axes, [B, T, heads, dim] <-> [B, heads, T, dim]: batched matmuls
    over (batch, head) then run on contiguous [T, dim] blocks; XLA:CPU ran them 2-3x slower
    with the heads in the middle (README, *Speed on CPU: heads-first attention*)."""
    return x.transpose(0, 2, 1, 3)


def _query_scale(q: Array) -> Array:
    """1 / sqrt(head_dim) in q's dtype: what the queries are multiplied by before q.k."""
    return jnp.asarray(_query_scale_value(q.shape[-1], q.dtype), q.dtype)


def _query_scale_value(head_dim: int, dtype: Any) -> float:
    """`_query_scale` of heads of `head_dim` in `dtype`, as a Python float (a constant, also while
    tracing)."""
    return float(np.asarray(1.0 / np.sqrt(head_dim).astype(np.float32)).astype(dtype))


def _transposed(x: Array) -> Array:
    """x with its last two axes swapped in memory: left to itself, XLA folds the swap into the
    batched matmul, which XLA:CPU then runs contracting both operands' rows, about twice as slow
    as on a materialised copy (README, *Speed on CPU: attention's gradient*)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _bmm(a: Array, b: Array, impl: str = "xla", *, trans_a: bool = False, trans_b: bool = False,
         float32_sums: bool = True) -> Array:
    """Attention's two batched products: q-like @ q-like^T -> logits [B, heads, Tq, Tk] (trans_b)
    and logits @ q-like -> q-like (else; trans_a reads the logits transposed). For "xla", XLA's
    dot (float32 sums if `float32_sums`) on heads-first q-likes (q, k, v, their gradients)
    [B, heads, T, dim]; for "blas", the BLAS (vit/blas_gemm.py, float32 sums and result) on
    float32 or bfloat16 q-likes [B, T, heads, dim] as the projections lay them out, read in
    place: no transposes at all."""
    if impl == "blas":
        if trans_b:
            y = blas_gemm.batched_gemm(a, b, trans_a, trans_b)
            return y.reshape(a.shape[0], a.shape[2], *y.shape[1:])
        return blas_gemm.batched_gemm(a.reshape(-1, *a.shape[-2:]), b, trans_a, trans_b,
                                      heads_out=True)
    spec = "bhqd,bhkd->bhqk" if trans_b else "bhqk,bhkd->bhqd"
    return jnp.einsum(spec, _transposed(a) if trans_a else a, b,
                      preferred_element_type=jnp.float32 if float32_sums else None)


def _logits(q: Array, k: Array, mask: Array | None, impl: str = "xla") -> Array:
    """Scaled float32 logits [B, heads, Tq, Tk] of heads-first q, k; masked keys at the float32
    minimum."""
    # float32 out of the matmul itself: bfloat16 logits would be rounded before the softmax
    logits = _bmm(q * _query_scale(q), k, impl, trans_b=True)
    return logits if mask is None else jnp.where(mask, logits, jnp.finfo(jnp.float32).min)


def _exponentials(q: Array, k: Array, mask: Array | None,
                  impl: str = "xla") -> tuple[Array, Array]:
    """The softmax's numerators exp(logit - row max) [B, heads, Tq, Tk], exactly zero at masked
    keys, and their row sums [B, heads, Tq, 1] (1 for a query with every key masked, whose
    weights then stay zero)."""
    logits = _logits(q, k, mask, impl)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    e = e if mask is None else jnp.where(mask, e, 0.0)
    sums = jnp.sum(e, axis=-1, keepdims=True)
    return e, jnp.where(sums > 0, sums, 1.0)


def _softmax_weights(q: Array, k: Array, mask: Array | None) -> Array:
    """`attention_weights` of heads-first q, k."""
    e, sums = _exponentials(q, k, mask)
    return e / sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q: Array, k: Array, v: Array, mask: Array | None, impl: str = "xla") -> Array:
    """Softmax attention of q, k, v: heads-first [B, heads, T, dim] -> [B, heads, Tq, dim] for
    impl "xla"; [B, T, heads, dim] -> [B, Tq, heads, dim] for "blas" (`_bmm`). Where nothing
    differentiates it, "blas" without a mask runs as one fused call (`blas_gemm.attention`)."""
    if impl == "blas" and mask is None:
        flat = lambda x: x.reshape(*x.shape[:2], -1)
        return blas_gemm.attention(flat(q), flat(k), flat(v), heads=q.shape[2],
                                   head_dim=q.shape[3],
                                   scale=_query_scale_value(q.shape[3], q.dtype))
    return _attend_fwd(q, k, v, mask, impl)[0]


def _per_query(sums: Array, impl: str) -> Array:
    """Row sums [B, heads, Tq, 1] laid out as `impl`'s q-likes (`_bmm`)."""
    return jnp.swapaxes(sums, 1, 2) if impl == "blas" else sums


def _attend_fwd(q: Array, k: Array, v: Array, mask: Array | None,
                impl: str = "xla") -> tuple[Array, tuple]:
    """The output in flash attention's order: the unnormalised exponentials go through the second
    matmul and its [Tq, dim] rows are divided after, not the [Tq, Tk] weights before (B/16
    inference 1.02x on the Intel Xeon; README, *Speed on CPU: attention's gradient*). The
    weights are the backward pass's residual; inference never computes them."""
    e, sums = _exponentials(q, k, mask, impl)
    y = _bmm(e.astype(v.dtype), v, impl)
    return (y / _per_query(sums, impl)).astype(v.dtype), (q, k, v, e / sums)


def _attend_bwd(impl: str, res: tuple, dy: Array) -> tuple[Array, Array, Array, None]:
    """The softmax's gradient as autodiff writes it, with each batched matmul contracting its
    left operand's last axis; masked keys have zero weight, hence zero gradient."""
    q, k, v, weights = res
    scale = _query_scale(q)
    d_weights = _bmm(dy, v, impl, trans_b=True)
    d_logits = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
    dq = _bmm(d_logits.astype(q.dtype), k, impl, float32_sums=False) * scale
    dk = _bmm(d_logits.astype(k.dtype), q * scale, impl, trans_a=True, float32_sums=False)
    dv = _bmm(weights.astype(v.dtype), dy, impl, trans_a=True, float32_sums=False)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _split_heads(qkv: Array, heads: int) -> list[Array]:
    """q, k, v [B, T, heads, dim] of the fused projection's output [B, T, 3 * heads * dim]."""
    return [x.reshape(*x.shape[:-1], heads, -1) for x in jnp.split(qkv, 3, axis=-1)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _self_attend(product: Array, bias: Array, heads: int) -> Array:
    """`_attend` by "blas" without a mask of q, k, v = the fused projection's product [B, T, 3 *
    width] + its bias [3 * width] -> [B, T, heads, dim], in one call that adds the bias and reads
    q, k, v in place; under a gradient that call also keeps the weights, and the gradient is one
    call too (`blas_gemm.attention_grad`)."""
    return _self_attend_fwd(product, bias, heads, with_weights=False)


def _self_attend_fwd(product: Array, bias: Array, heads: int, *,
                     with_weights: bool = True) -> Array | tuple[Array, tuple]:
    width = product.shape[-1] // 3
    head_dim = width // heads
    out = blas_gemm.attention(product, product, product, heads=heads, head_dim=head_dim,
                              bias=bias, columns=(0, width, 2 * width),
                              scale=_query_scale_value(head_dim, product.dtype),
                              with_weights=with_weights)
    if not with_weights:
        return out
    y, weights = out
    return y, (product, bias, weights)


def _self_attend_bwd(heads: int, res: tuple, dy: Array) -> tuple[Array, Array]:
    product, bias, weights = res
    head_dim = product.shape[-1] // 3 // heads
    d_qkv = blas_gemm.attention_grad(product, bias, dy, weights, heads=heads, head_dim=head_dim,
                                     scale=_query_scale_value(head_dim, product.dtype))
    # The add's own transpose (its bias sum in the bias's dtype), as autodiff of the split gives
    _, add_vjp = jax.vjp(jnp.add, jnp.zeros_like(d_qkv), jnp.zeros_like(bias))
    return add_vjp(d_qkv)


_self_attend.defvjp(_self_attend_fwd, _self_attend_bwd)


def attention_weights(q: Array, k: Array, mask: Array | None = None) -> Array:
    """Softmax attention probabilities [B, heads, Tq, Tk] from q, k of shape [B, T, heads, dim].

    Keys where `mask` (broadcastable to [B, heads, Tq, Tk]) is False get exactly zero weight; a
    query whose keys are all masked gets all-zero weights.
    """
    return _softmax_weights(_heads_first(q), _heads_first(k), mask)


def cudnn_supports(dtype: Any, head_dim: int) -> bool:
    """Whether cuDNN flash attention takes heads of `head_dim` computed in `dtype`: bfloat16 or
    float16, head size a multiple of 8 up to 128."""
    return jnp.dtype(dtype) in _HALF_DTYPES and head_dim % 8 == 0 and 0 < head_dim <= 128


PLATFORMS = ("cpu", "gpu", "tpu")


def platform_name(platform: str | None) -> str:
    """`platform` ("cpu", "gpu" or "tpu"; "cuda" / "rocm" mean "gpu"; None: JAX's default
    backend), lower-cased; ValueError for anything else."""
    name = str(jax.default_backend() if platform is None else platform).lower()
    name = "gpu" if name in ("cuda", "rocm") else name
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; use one of {', '.join(PLATFORMS)} "
                         "(or None for JAX's default backend)")
    return name


def resolve_attention_impl(impl: str, platform: str | None = None, *, dtype: Any = jnp.float32,
                           head_dim: int = 64) -> str:
    """The kernel ("explicit", "fused" or "cudnn") that `impl` means on `platform` ("cpu", "gpu",
    "tpu") for a model computing in `dtype` with heads of `head_dim`.

    "auto" is explicit on CPU, cudnn on GPU where `cudnn_supports` (else explicit), fused on TPU;
    `platform=None` takes JAX's default backend. Called once, at model construction. Asking for
    "cudnn" where it cannot run is a ValueError naming the fix.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; use one of {ATTENTION_IMPLS}")
    platform = platform_name(platform)
    if impl == "cudnn":
        if platform != "gpu":
            raise ValueError(f"attention_impl 'cudnn' (cuDNN flash attention) runs on NVIDIA GPUs, "
                             f"not on {platform!r}: use 'auto' or 'explicit'")
        if not cudnn_supports(dtype, head_dim):
            raise ValueError(f"attention_impl 'cudnn' needs bfloat16 or float16 compute and a head "
                             f"size that is a multiple of 8 up to 128, not {jnp.dtype(dtype).name} "
                             f"with heads of {head_dim}: set model.dtype=bfloat16 or use 'auto'")
    if impl != "auto":
        return impl
    if platform == "cpu":
        return "explicit"
    if platform == "gpu":
        return "cudnn" if cudnn_supports(dtype, head_dim) else "explicit"
    return "fused"


def attention_impl_here(impl: str, platform: str | None = None) -> str:
    """`impl` as a saved model runs on `platform` (None: JAX's default backend): a model trained
    with "cudnn" runs "auto" off a GPU (the same attention, another kernel); else `impl`."""
    platform = platform_name(platform)
    return "auto" if impl == "cudnn" and platform != "gpu" else impl


def _kernel(impl: str, *, need_weights: bool) -> str:
    """The kernel a call runs: `impl`, or "explicit" when the weights (or dropout) are needed."""
    if impl not in KERNELS:
        hint = (" (resolve it where the model is built: vit.create_model does, or call "
                "vit.attention.resolve_attention_impl)" if impl == "auto" else "")
        raise ValueError(f"attention impl {impl!r} is not a kernel{hint}; use one of {KERNELS}")
    return "explicit" if need_weights else impl


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention; the query/key/value projections run as one fused matmul."""

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    impl: str = "explicit"  # | "fused" | "cudnn": a kernel, never "auto" (resolve_attention_impl)
    quant: str = "none"  # | "int8": int8 projections (vit/int8.py)
    matmul_dtype: str = "float32"  # | "bfloat16": projection operands (vit/matmul.py)
    qk_norm: bool = False  # LayerNorm over each head's query and key (query_norm, key_norm)
    key_bias: bool = True  # False: the key projection has no bias (DINOv3)
    norm_epsilon: float = 1e-6  # the qk-norm LayerNorms'
    rope: str = "none"  # how a call's RoPE tables rotate: "dinov3" or "eva02" (vit/rope.py)
    matmul_impl: str = "xla"  # | "blas": who computes the projections (vit/matmul.py) and
    # attention's batched products

    @nn.compact
    def __call__(
        self, x_q: Array, x_kv: Array | None = None, *, mask: Array | None = None,
        deterministic: bool = True, return_weights: bool = False,
        rope: tuple[Array, Array] | None = None,
    ) -> tuple[Array, Array | None]:
        """Attend from x_q to x_kv (default: x_q); `rope` = (sin, cos) tables [B or 1, tokens,
        head_dim] rotate self-attention's queries and keys."""
        width = x_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        heads, head_dim = self.num_heads, width // self.num_heads
        proj = {n: _DenseGeneralParams((width, heads, head_dim), (heads, head_dim), width,
                                       self.quant, n != "key" or self.key_bias, name=n)()
                for n in ("query", "key", "value")}
        out_k, out_b, out_s = _DenseGeneralParams((heads, head_dim, width), (width,), width,
                                                  self.quant, name="out")()

        def matmul(x: Array, kernel: Array, scale: Array | None) -> Array:
            if scale is None:
                return typed_matmul(x, kernel, self.matmul_dtype, self.dtype, self.matmul_impl)
            return int8.int8_matmul(x, kernel, scale).astype(self.dtype)

        use_dropout = self.dropout_rate > 0.0 and not deterministic
        core = _kernel(self.impl, need_weights=return_weights or use_dropout)
        # The explicit kernel's batched products by the BLAS, on q, k, v in place (`_bmm`).
        attend_impl = ("blas" if self.matmul_impl == "blas" and not (return_weights or use_dropout)
                       and jnp.dtype(self.dtype) in (jnp.float32, jnp.bfloat16) else "xla")
        heads_first = core == "explicit" and attend_impl == "xla"

        def fused_projection(x: Array, names: tuple[str, ...]) -> tuple[Array, Array]:
            """The projections `names` of x side by side, [B, T, len(names) * width], before
            their bias, and that bias."""
            kernel = jnp.concatenate([proj[n][0].reshape(width, -1) for n in names], axis=1)
            bias = jnp.concatenate([proj[n][1].reshape(-1) for n in names])
            scale = (None if self.quant != "int8" else
                     jnp.concatenate([proj[n][2].reshape(-1) for n in names]))
            return matmul(x, kernel, scale), bias.astype(self.dtype)

        def project(x: Array, names: tuple[str, ...]) -> list[Array]:
            """The projections `names` of x, [B, T, heads, dim] each; heads-first [B, heads, T,
            dim] for the explicit kernel on XLA's dots."""
            product, bias = fused_projection(x, names)
            y = product + bias
            parts = [p.reshape(*p.shape[:-1], heads, head_dim)
                     for p in jnp.split(y, len(names), axis=-1)]
            return [_heads_first(p) for p in parts] if heads_first else parts

        def attend_projected() -> tuple[Array, Array | None]:
            """The heads' outputs [B, Tq, heads, dim] from the projections, and the weights if
            asked for."""
            if x_kv is None:
                q, k, v = project(x_q, ("query", "key", "value"))
            else:
                (q,) = project(x_q, ("query",))
                k, v = project(x_kv, ("key", "value"))
            if self.qk_norm:  # over head_dim, the last axis in either layout
                norm = lambda name: nn.LayerNorm(self.norm_epsilon, self.dtype, name=name)
                q, k = norm("query_norm")(q), norm("key_norm")(k)
            if rope is not None:  # the tables' token axis against the layout's: [.., T, 1|H, ..]
                sin, cos = (t[:, None] if heads_first else t[:, :, None] for t in rope)
                q, k = apply_rope(q, sin, cos, self.rope), apply_rope(k, sin, cos, self.rope)

            weights = None
            if core == "explicit" and not (return_weights or use_dropout):
                y = _attend(q, k, v, mask, attend_impl)
                y = _heads_first(y) if heads_first else y
            elif core == "explicit":
                weights = _softmax_weights(q, k, mask)
                probs = weights
                if use_dropout:
                    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
                y = _heads_first(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v))
            else:
                full = (None if mask is None else
                        jnp.broadcast_to(mask, (q.shape[0], heads, q.shape[1], k.shape[1])))
                y = jax.nn.dot_product_attention(
                    q, k, v, mask=full, implementation="cudnn" if core == "cudnn" else None)
                if full is not None:  # a query with every key masked: zeros, as explicit gives
                    y = jnp.where(jnp.any(full, axis=-1).transpose(0, 2, 1)[..., None], y, 0.0)
            return y, weights

        # Self-attention by the BLAS with nothing between projection and attention: q, k, v read
        # in place from the fused projection (`_self_attend`).
        if (x_kv is None and attend_impl == "blas" and core == "explicit" and mask is None
                and not self.qk_norm and rope is None):
            weights = None
            y = _self_attend(*fused_projection(x_q, ("query", "key", "value")), heads)
        else:
            y, weights = attend_projected()
        y = matmul(y.reshape(*y.shape[:-2], width), out_k.reshape(width, width), out_s)
        return y + out_b.astype(self.dtype), weights
