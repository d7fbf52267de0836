"""Our side of bench/vs_timm.py: one workload, one dtype, in a fresh process; one JSON line.

Runs as a user would: `import vit` (its host-memory setting, `VIT_HOST_MALLOC`, applies), the
model's default GEMM (`matmul_impl="auto"`: MKL's sgemm on an Intel CPU with `vit[mkl]`), the
train step and the matmul peak from bench/model_throughput.py. `bfloat16` means
`matmul_dtype="bfloat16"` (vit/matmul.py): bfloat16 operands, float32 sums and activations.
Run: `python bench/vit_worker.py train float32 --batch 128 --size 32 --steps 10 --warmup 3`.
"""

from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import optax
from model_throughput import make_train_step, matmul_peak_gflops
from timing import median_seconds, worker_arguments

import vit
from vit.matmul import resolve_matmul_impl

# Each workload's model: the CIFAR-10 recipe's Ti/4 for training, B/16 for inference.
MODELS = {"train": dict(variant="Ti/4", num_classes=10), "infer": dict(variant="B/16",
                                                                       num_classes=1000)}


def train_images_per_s(model: vit.VisionTransformer, batch: int, steps: int,
                       warmup: int) -> float:
    """Images/s of forward + cross-entropy + backward + AdamW: median of `steps` after
    compiling and `warmup` untimed steps."""
    params = vit.init_params(model, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    state = [params, tx.init(params)]
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, *model.image_size, 3))
    labels = jnp.arange(batch) % model.num_classes
    step, rng = make_train_step(model, tx), jax.random.PRNGKey(2)

    def run() -> None:
        state[0], state[1], loss = step(state[0], state[1], images, labels, rng)
        loss.block_until_ready()

    for _ in range(1 + warmup):  # compile, then let the host heap reach its steady size
        run()
    return batch / median_seconds(run, steps)


def infer_images_per_s(model: vit.VisionTransformer, batch: int, steps: int,
                       warmup: int) -> float:
    """Images/s of a jitted forward pass: median of `steps` after compiling and `warmup`."""
    params = vit.init_params(model, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, *model.image_size, 3))
    infer = jax.jit(lambda p, x: model.apply({"params": p}, x))
    for _ in range(1 + warmup):
        infer(params, images).block_until_ready()
    return batch / median_seconds(lambda: infer(params, images).block_until_ready(), steps)


def environment() -> dict[str, object]:
    """Versions and the process settings a reader needs to reproduce this side."""
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "platform": jax.devices()[0].platform,
            "vit_host_malloc": os.environ.get("VIT_HOST_MALLOC", "auto (unset)"),
            "host_memory_retained": vit.HOST_MEMORY_RETAINED,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def measure(workload: str, dtype: str, batch: int, size: int, steps: int,
            warmup: int) -> dict[str, object]:
    """One figure: {"value", "unit"} (and "params" for a model); `size` is the image side,
    or the matmul's n."""
    if workload == "matmul":
        # The GEMM a model of this dtype computes with here (vit/matmul.py: "auto").
        impl = resolve_matmul_impl("auto", jax.devices()[0].platform, matmul_dtype=dtype)
        return {"value": matmul_peak_gflops(size, steps, dtype, impl), "unit": "GFLOP/s",
                "matmul_impl": impl}
    spec = MODELS[workload]
    model = vit.create_model(spec["variant"], num_classes=spec["num_classes"], image_size=size,
                             matmul_dtype=dtype)
    timed = train_images_per_s if workload == "train" else infer_images_per_s
    return {"value": timed(model, batch, steps, warmup), "unit": "images/s",
            "model": spec["variant"], "params": vit.count_params(model),
            "matmul_impl": model.matmul_impl, "elementwise_impl": model.elementwise_impl}


def main() -> None:
    """Measure one workload and print one JSON line."""
    args = worker_arguments(__doc__)
    result = measure(args.workload, args.dtype, args.batch, args.size, args.steps, args.warmup)
    print(json.dumps({**result, "env": environment()}))


if __name__ == "__main__":
    main()
