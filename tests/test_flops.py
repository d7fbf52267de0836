"""vit/flops.py: matmul and convolution FLOPs counted on the jaxpr, checked against hand counts."""

import jax
import jax.numpy as jnp
from jax import lax

import vit
from vit import flops


def test_a_batched_dot_counts_two_flops_per_multiply_add():
    q = jax.ShapeDtypeStruct((5, 3, 7, 4), jnp.float32)  # [batch, heads, tokens, dim]
    count = flops.function_flops(lambda a, b: jnp.einsum("bhqd,bhkd->bhqk", a, b), q, q)
    assert count == 2 * 5 * 3 * 7 * 7 * 4


def test_a_grouped_strided_convolution_counts_its_window_per_output():
    x = jax.ShapeDtypeStruct((2, 9, 9, 6), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32)  # HWIO; 6 inputs in 2 groups of 3
    conv = lambda a, b: lax.conv_general_dilated(
        a, b, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
    assert flops.function_flops(conv, x, w) == 2 * (2 * 5 * 5 * 8) * (3 * 3 * 3)


def test_nested_jaxprs_scan_times_length_cond_largest_branch_remat_once():
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    one = 2 * 4 * 8 * 8

    def fn(x, w):
        y = jax.checkpoint(lambda a: a @ w)(x)
        y, _ = lax.scan(lambda c, _: (c @ w, None), y, None, length=3)
        y = lax.cond(y.sum() > 0, lambda a: a @ w @ w, lambda a: a, y)
        return jax.jit(lambda a: a @ w)(y)

    assert flops.function_flops(fn, x, w) == one * (1 + 3 + 2 + 1)


def _vit_forward_by_hand(tokens: int, patches: int, patch: int, width: int, depth: int,
                         mlp: int, classes: int) -> int:
    embed = 2 * patches * width * patch * patch * 3
    block = (2 * tokens * width * 3 * width  # fused q/k/v projection
             + 2 * 2 * tokens * tokens * width  # logits and the weighted sum, all heads
             + 2 * tokens * width * width  # out projection
             + 2 * 2 * tokens * width * mlp)  # the two MLP matmuls
    return embed + depth * block + 2 * width * classes


def test_a_vit_forward_and_train_step_match_the_hand_count():
    kw = dict(num_classes=10, image_size=32, width=32, depth=2, num_heads=2, mlp_dim=64)
    model = vit.create_model("Ti/8", **kw)
    by_hand = _vit_forward_by_hand(17, 16, 8, 32, 2, 64, 10)  # 16 patches + class token
    assert flops.forward_flops_per_image(model) == by_hand
    assert flops.train_flops_per_image(model) == 3 * by_hand
    fused = vit.create_model("Ti/8", attention_impl="fused", **kw)
    assert flops.forward_flops_per_image(fused) == by_hand  # counted as the explicit kernel
    bf16 = vit.create_model("Ti/8", matmul_dtype="bfloat16", **kw)  # matmuls in a custom_vjp
    assert flops.forward_flops_per_image(bf16) == by_hand


def test_token_dropping_counts_the_kept_tokens_in_training_only():
    model = vit.create_model("Ti/8", num_classes=10, image_size=32, width=32, depth=2,
                             num_heads=2, mlp_dim=64, token_keep_ratio=0.5)
    kept = _vit_forward_by_hand(9, 16, 8, 32, 2, 64, 10)  # 8 of 16 patches + class token
    assert flops.forward_flops_per_image(model, train=True) == kept
    assert flops.forward_flops_per_image(model) == _vit_forward_by_hand(17, 16, 8, 32, 2, 64, 10)
