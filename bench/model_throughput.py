"""Ti/4 on 32x32, batch 128, float32: compile time, train/infer images/s, FLOPs, share of peak.

Prints one JSON line with the CPU model and ISA. The machine's practical peak is the GFLOP/s of
a 4096x4096 matmul measured in the same process, with the step's matmul operands and kernel:
`--matmul-dtype bfloat16` (vit/matmul.py) measures a bfloat16 x bfloat16 -> float32 matmul,
`--matmul-impl` (default "auto": MKL's sgemm on an Intel CPU with `vit[mkl]`) the step's GEMM.
It also reports a train step's page faults (the median), which `vit.host_memory` removes
(`VIT_HOST_MALLOC=system` measures without it), and how many timed steps grew the host heap.
Run: `python bench/model_throughput.py [--variant Ti/4] [--batch 128] [--matmul-dtype bfloat16]
[--matmul-impl xla] [--rope dinov3|eva02]` (`--rope dinov3` drops the learned position
embedding, as DINOv3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from machine import cpu_description
from timing import median_seconds, timed_calls

import vit
from vit import matmul as vit_matmul
from vit.cli_types import image_size
from vit.elementwise import ELEMENTWISE_IMPLS
from vit.encoder import REMAT_POLICIES
from vit.model_options import pair
from vit.rope import ROPE_KINDS


def matmul_peak_gflops(n: int = 4096, repeats: int = 5, matmul_dtype: str = "float32",
                       impl: str = "xla") -> float:
    """GFLOP/s of a jitted n x n matmul with `matmul_dtype` operands by `impl` (vit/matmul.py):
    the practical peak."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    mm = jax.jit(lambda a, b: vit_matmul.matmul(a, b, matmul_dtype, jnp.float32, impl))
    mm(a, b).block_until_ready()
    return 2 * n**3 / median_seconds(lambda: mm(a, b).block_until_ready(), repeats) / 1e9


# A step that faults this many pages in (4 KiB each: 40 MB) grew the host heap: with the retained
# host memory, a step allocated its temporaries while the previous step's, which XLA releases
# just after the outputs are ready, were still held (README, *Speed on CPU: host memory*).
HEAP_GROWTH_FAULTS = 10_000


def make_train_step(model: vit.VisionTransformer, tx: optax.GradientTransformation) -> Callable:
    """A jitted step: cross-entropy forward, backward and optimizer update."""

    def step(params, opt_state, images, labels, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def add_step_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The flags that pick the measured step: variant, image size, batch, steps, matmul dtype
    and implementations."""
    parser.add_argument("--variant", default="Ti/4")
    parser.add_argument("--image-size", type=image_size, default=32,
                        help="32, or rows,cols for a rectangle, e.g. 24,40")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--matmul-dtype", default="float32", choices=vit_matmul.MATMUL_DTYPES)
    parser.add_argument("--matmul-impl", default="auto", choices=vit_matmul.MATMUL_IMPLS)
    parser.add_argument("--elementwise-impl", default="auto", choices=ELEMENTWISE_IMPLS)
    parser.add_argument("--remat", default="none", choices=tuple(REMAT_POLICIES))
    parser.add_argument("--rope", default="none", choices=ROPE_KINDS)


def step_inputs(args: argparse.Namespace) -> tuple:
    """(model, tx, params, opt_state, images, labels, rng) for the step the flags pick."""
    model = vit.create_model(args.variant, num_classes=10, image_size=args.image_size,
                             matmul_dtype=args.matmul_dtype, remat=args.remat, rope=args.rope,
                             matmul_impl=args.matmul_impl, elementwise_impl=args.elementwise_impl,
                             posemb="none" if args.rope == "dinov3" else "learn")
    params = vit.init_params(model, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    images = jax.random.normal(jax.random.PRNGKey(1), (args.batch, *pair(args.image_size), 3))
    labels = jnp.arange(args.batch) % 10
    return model, tx, params, tx.init(params), images, labels, jax.random.PRNGKey(2)


def main() -> None:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_step_arguments(parser, steps=10)
    args = parser.parse_args()
    model, tx, params, opt_state, images, labels, rng = step_inputs(args)

    step = make_train_step(model, tx)
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, images, labels, rng).compile()
    compile_s = time.perf_counter() - start
    # XLA counts no FLOPs in a custom call: with "blas" or "fused", the count is the same step's
    # on XLA's own ops.
    on_xla = model.clone(matmul_impl="xla", elementwise_impl="xla")
    counted = compiled if on_xla == model else make_train_step(on_xla, tx).lower(
        params, opt_state, images, labels, rng).compile()
    flops = float((counted.cost_analysis() or {}).get("flops", 0.0))

    state = [params, opt_state]

    def run_train() -> None:
        state[0], state[1], loss = compiled(state[0], state[1], images, labels, rng)
        loss.block_until_ready()

    for _ in range(3):  # the first steps grow the host heap to its steady size
        run_train()
    calls = timed_calls(run_train, args.steps)
    train_s = statistics.median(seconds for seconds, _ in calls)
    faults = [count for _, count in calls]

    infer = jax.jit(lambda p, x: model.apply({"params": p}, x))
    infer(state[0], images).block_until_ready()
    infer_s = median_seconds(lambda: infer(state[0], images).block_until_ready(), args.steps)

    peak = matmul_peak_gflops(matmul_dtype=args.matmul_dtype, impl=model.matmul_impl)
    achieved = flops / train_s / 1e9
    print(json.dumps({
        "bench": "model_throughput", "variant": args.variant, "image_size": args.image_size,
        "batch": args.batch, "dtype": "float32", "matmul_dtype": args.matmul_dtype,
        "matmul_impl": model.matmul_impl, "elementwise_impl": model.elementwise_impl,
        "remat": args.remat, "rope": args.rope,
        "devices": str(jax.devices()[0].platform), **cpu_description(),
        "compile_s": round(compile_s, 2),
        "train_images_per_s": round(args.batch / train_s, 1),
        "infer_images_per_s": round(args.batch / infer_s, 1),
        "train_flops_per_image": flops / args.batch,
        "train_gflops_per_s": round(achieved, 1),
        "matmul_peak_gflops_per_s": round(peak, 1),
        "train_fraction_of_peak": round(achieved / peak, 3),
        "page_faults_per_train_step": round(statistics.median(faults)),
        "heap_growth_steps": sum(f >= HEAP_GROWTH_FAULTS for f in faults),
        "host_memory_retained": vit.HOST_MEMORY_RETAINED,
    }))


if __name__ == "__main__":
    main()
