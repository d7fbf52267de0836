"""Train and inference images/s of each family member: plain, conv stem, token dropping, and
bfloat16 matmul operands (`matmul_dtype`, vit/matmul.py).

Prints one JSON line: for each member, train-step and inference images/s (median over --steps
after a warm-up, from the second of two rounds over all members) and the train speed-up over
the plain patchify model. The base model is the
CIFAR-10 recipe's (Ti/4 at width 128, depth 4, 32 px, batch 128, float32).
Run: `python bench/family_throughput.py [--steps 10] [--batch 128]`.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax
from machine import cpu_description
from model_throughput import make_train_step
from timing import median_seconds

import vit

BASE = dict(width=128, depth=4, num_heads=4, mlp_dim=384, classifier="gap")
MEMBERS: dict[str, dict] = {
    "patchify": {},
    "conv_stem": dict(stem="conv", stem_norm="groupnorm"),
    "deep_conv_stem": dict(stem="conv", stem_channels=(32, 64, 64, 128),
                           stem_strides=(1, 2, 1, 2)),
    "token_keep_0.75": dict(token_keep_ratio=0.75),
    "token_keep_0.5": dict(token_keep_ratio=0.5),
    "conv_stem_token_keep_0.5": dict(stem="conv", stem_norm="groupnorm", token_keep_ratio=0.5),
    "bf16_matmul": dict(matmul_dtype="bfloat16"),
    "token_keep_0.5_bf16_matmul": dict(token_keep_ratio=0.5, matmul_dtype="bfloat16"),
    "conv_stem_token_keep_0.5_bf16_matmul": dict(stem="conv", stem_norm="groupnorm",
                                                 token_keep_ratio=0.5, matmul_dtype="bfloat16"),
}


def measure(options: dict, batch: int, steps: int) -> dict[str, float]:
    """Train-step and inference images/s of one model configuration."""
    model = vit.create_model("Ti/4", num_classes=10, image_size=32, **BASE, **options)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-3)
    state = [params, tx.init(params)]
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, 32, 32, 3))
    labels = jnp.arange(batch) % 10
    step = make_train_step(model, tx)

    def run_train() -> None:
        state[0], state[1], loss = step(state[0], state[1], images, labels,
                                        jax.random.PRNGKey(2))
        loss.block_until_ready()

    for _ in range(10):  # compile, then let the host heap reach its steady size
        run_train()
    train_s = median_seconds(run_train, steps)
    infer = jax.jit(lambda p, x: model.apply({"params": p}, x))
    infer(state[0], images).block_until_ready()
    infer_s = median_seconds(lambda: infer(state[0], images).block_until_ready(), steps)
    return {"params": vit.count_params(model), "train_images_per_s": round(batch / train_s, 1),
            "infer_images_per_s": round(batch / infer_s, 1)}


def main() -> None:
    """Measure every member and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    # Two rounds, keeping the second: the first member measured otherwise pays for the
    # process warming up (heap growth, thread pools) and looks slower than it is.
    for _ in range(2):
        results = {name: measure(options, args.batch, args.steps)
                   for name, options in MEMBERS.items()}
    plain = results["patchify"]["train_images_per_s"]
    for r in results.values():
        r["train_speedup_vs_patchify"] = round(r["train_images_per_s"] / plain, 2)
    print(json.dumps({"bench": "family_throughput", "batch": args.batch, "image_size": 32,
                      "devices": str(jax.devices()[0].platform), **cpu_description(),
                      "members": results}))


if __name__ == "__main__":
    main()
