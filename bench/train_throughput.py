"""End-to-end training throughput vs. the bare train step, measured in the same process.

Trains ViT-Ti/4 (batch 128) on the shipped CIFAR-10 with the real loop: tf.data input, pmap
step, metric logging every 4 steps and a checkpoint every 4 steps. Its images/s over the steps
after the first logging window (compilation excluded) is divided by the bare jitted step's
images/s from bench/model_throughput.py. Prints one JSON line.
Run: `TFDS_DATA_DIR=../shared/data/tfds python bench/train_throughput.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_throughput import make_train_step  # noqa: E402

import vit  # noqa: E402
from vit import trainer  # noqa: E402
from vit.config_schema import default_config, model_config  # noqa: E402

BATCH, STEPS, WINDOW = 128, 32, 4  # 8 windows: the median is the steady state


def bare_images_per_s(warmup: int = 3, repeats: int = 7) -> float:
    """Images/s of the jitted Ti/4 step alone on a constant batch (median of `repeats`).

    The warm-up steps compile and let the host heap grow to its steady size (vit.host_memory).
    """
    model = vit.create_model("Ti/4", num_classes=10, image_size=32)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    state = [params, tx.init(params)]
    images = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 32, 32, 3))
    labels = jnp.arange(BATCH) % 10
    step = make_train_step(model, tx)

    def run() -> float:
        start = time.perf_counter()
        state[0], state[1], loss = step(state[0], state[1], images, labels, jax.random.PRNGKey(2))
        loss.block_until_ready()
        return time.perf_counter() - start

    for _ in range(warmup):
        run()
    return BATCH / statistics.median(run() for _ in range(repeats))


def end_to_end_images_per_s(workdir: str) -> float:
    """Images/s of the full training loop after its first logging window."""
    c = default_config()
    c.model = model_config("Ti/4")
    c.update(batch_size=BATCH, eval_batch_size=BATCH, eval_split="test[:128]", total_steps=STEPS,
             warmup_steps=2, log_every=WINDOW, checkpoint_every=WINDOW)
    c.pp.train_crop, c.pp.flip = "pad_crop", True
    if trainer.train(c, workdir).preempted:
        sys.exit("train_throughput.py: error: stopped by a signal before its last step; rerun it")
    lines = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    windows = [x["train/images_per_s"] for x in lines if "train/images_per_s" in x]
    return statistics.median(windows[1:])


def main() -> None:
    """Measure both and print one JSON line."""
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help
    bare = bare_images_per_s()
    with tempfile.TemporaryDirectory() as workdir:
        e2e = end_to_end_images_per_s(workdir)
    print(json.dumps({"bench": "train_throughput", "variant": "Ti/4", "batch": BATCH,
                      "bare_step_images_per_s": round(bare, 2),
                      "end_to_end_images_per_s": round(e2e, 2),
                      "ratio": round(e2e / bare, 3)}))


if __name__ == "__main__":
    main()
