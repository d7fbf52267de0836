"""XLA's matmuls against the BLAS's (`matmul_impl="xla"` / `"blas"`, vit/blas_gemm.py),
compiled in one process and called in turn, with float32 or (`--matmul-dtype bfloat16`)
bfloat16 operands.

B/16 inference (224 px, batch 16) and the Ti/4 train step (32 px, batch 128, AdamW), each
built twice, differing only in `matmul_impl`; a small model's loss and gradients under the two
are checked against each other first. One JSON line: each side's median images/s, the ratio
(blas / xla), the CPU, and the BLAS library.
Run: `.venv/bin/python bench/matmul_impl.py [--what infer,train] [--rounds 5]
[--matmul-dtype bfloat16]` (MKL from
`vit[mkl]`, which `make setup` installs on Intel CPUs, or `VIT_BLAS_LIB`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from machine import cpu_description
from model_throughput import make_train_step, step_inputs

import vit
from vit import blas_gemm

# Each workload: variant, image side, batch.
WORKLOADS = {"infer": ("B/16", 224, 16), "train": ("Ti/4", 32, 128)}


def inference_call(variant: str, size: int, batch: int, impl: str,
                   matmul_dtype: str = "float32") -> Callable[[], None]:
    """One compiled forward pass of `batch` images, ready to time."""
    model = vit.create_model(variant, num_classes=1000, image_size=size, matmul_impl=impl,
                             matmul_dtype=matmul_dtype)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
    return lambda: compiled(params, images).block_until_ready()


def train_call(variant: str, size: int, batch: int, impl: str,
               matmul_dtype: str = "float32") -> Callable[[], None]:
    """One compiled train step (`batch` images, AdamW), ready to time."""
    options = argparse.Namespace(variant=variant, image_size=size, batch=batch,
                                 matmul_dtype=matmul_dtype, matmul_impl=impl, remat="none",
                                 rope="none", elementwise_impl="auto")
    model, tx, params, opt_state, *inputs = step_inputs(options)
    compiled = make_train_step(model, tx).lower(params, opt_state, *inputs).compile()
    state = [params, opt_state]

    def run() -> None:
        state[0], state[1], loss = compiled(state[0], state[1], *inputs)
        loss.block_until_ready()

    return run


BUILDERS = {"infer": inference_call, "train": train_call}


def largest_difference(variant: str = "Ti/4", size: int = 32,
                       matmul_dtype: str = "float32") -> float:
    """The largest difference of a small model's loss and gradients under "blas" from "xla",
    relative to the largest magnitude among them (the key bias's gradient is zero but for
    rounding, so a per-array ratio would measure noise)."""
    models = [vit.create_model(variant, num_classes=10, image_size=size, depth=1,
                               matmul_impl=impl, matmul_dtype=matmul_dtype)
              for impl in ("xla", "blas")]
    params = vit.init_params(models[0], jax.random.PRNGKey(0))
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1),
                                                 params["head"]["kernel"].shape)
    images = jax.random.normal(jax.random.PRNGKey(2), (4, size, size, 3))
    xla, blas = (jax.tree.leaves(jax.jit(jax.value_and_grad(
        lambda p, m=m: jnp.sum(m.apply({"params": p}, images) ** 2)))(params)) for m in models)
    scale = max(float(jnp.abs(b).max()) for b in xla[1:])
    loss = float(jnp.abs(blas[0] - xla[0]) / jnp.abs(xla[0]))
    return max(loss, *(float(jnp.abs(a - b).max()) / scale for a, b in zip(blas[1:], xla[1:],
                                                                            strict=True)))


def measure(workloads: dict[str, tuple[str, int, int]], rounds: int, calls: int,
            matmul_dtype: str = "float32") -> dict[str, dict]:
    """Each workload's images/s under "xla" and "blas", called in turn round after round."""
    results = {}
    for name, (variant, size, batch) in workloads.items():
        sides = {impl: BUILDERS[name](variant, size, batch, impl, matmul_dtype)
                 for impl in ("xla", "blas")}
        for run in sides.values():
            run()
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(rounds):
            for side, run in sides.items():
                for _ in range(calls):
                    start = time.perf_counter()
                    run()
                    rates[side].append(batch / (time.perf_counter() - start))
        medians = {side: statistics.median(r) for side, r in rates.items()}
        results[name] = {"variant": variant, "image_size": size, "batch": batch,
                         "images_per_s": {s: round(m, 2) for s, m in medians.items()},
                         "blas_over_xla": round(medians["blas"] / medians["xla"], 3),
                         "runs": {s: [round(r, 2) for r in v] for s, v in rates.items()}}
    return results


def main() -> None:
    """Check, measure; print one JSON line (or one `error:` line, exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default="infer,train", help="infer, train or both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per side per round")
    parser.add_argument("--matmul-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the matmuls' operand dtype on both sides (model.matmul_dtype)")
    args = parser.parse_args()
    names = args.what.split(",")
    if any(n not in WORKLOADS for n in names):
        parser.exit(2, f"error: --what takes {', '.join(WORKLOADS)}, got {args.what!r}\n")
    reason = blas_gemm.unavailable_reason_for(args.matmul_dtype == "bfloat16")
    if reason is not None:
        parser.exit(2, f"error: {reason}\n")
    worst = largest_difference(matmul_dtype=args.matmul_dtype)
    print(json.dumps({"bench": "matmul_impl", "blas": str(blas_gemm.blas_library()),
                      "matmul_dtype": args.matmul_dtype, "rounds": args.rounds,
                      **cpu_description(), "max_relative_difference": worst,
                      **measure({n: WORKLOADS[n] for n in names}, args.rounds, args.calls,
                                args.matmul_dtype)}))


if __name__ == "__main__":
    sys.exit(main())
