"""Images/s and model FLOPs utilisation (MFU) of a config's real training step on this machine.

Runs the trainer's own step (vit/train_step.py: `make_train_step` pmapped over every local device
with the trainer's axis name and donated state, AdamW or the config's optimizer, EMA, mixup,
bfloat16 compute where the config asks for it) on a fixed random uint8 batch, `--steps` timed
steps after compiling and `--warmup` untimed ones, and prints one JSON line.

Model FLOPs per image are counted on the model's jaxpr (vit/flops.py: its matmuls and
convolutions, 3x the training forward pass), so MFU = model FLOPs per second over the peak,
whatever XLA fuses or rematerialises. The peak: `--peak_tflops` if given (per accelerator; on a
CPU, the machine's); else a GPU's or TPU's dense bfloat16 peak from the table below by
`device_kind`, times the devices; on a CPU, the 4096^2 matmul measured in this process in the
step's operand dtype (bfloat16 x bfloat16 -> float32 when the config computes in bfloat16): the
machine's, which every CPU device shares.

On a GPU (the issue's check: B/16 in bfloat16, target MFU >= 0.5):
    python bench/train_mfu.py configs/imagenet.py:B/16 --per_device_batch 256
On this CPU: python bench/train_mfu.py configs/cifar10.py:Ti/4 --steps 5

`--profile DIR` then traces `--profile_steps` more steps with the JAX profiler, keeps the trace
in DIR (for TensorBoard's profile plugin, or to read again later) and adds the step's op time
by category (matmuls, attention, elementwise; forward, backward, optimizer) and its top ops to
the line: bench/op_profile.py's summary, here on a GPU's kernels as well as on XLA:CPU's thunks.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_description  # noqa: E402
from model_throughput import matmul_peak_gflops  # noqa: E402
from op_profile import categories, summary, traced  # noqa: E402
from timing import median_seconds  # noqa: E402
from train_memory import load_config, num_classes_of  # noqa: E402

from vit import flops, parallel, train_step  # noqa: E402
from vit.model import init_params, model_from_config  # noqa: E402

# Dense bfloat16 TFLOP/s per device, from the vendors' data sheets (no sparsity). The first
# entry whose key is in jax's `device_kind` applies, so longer names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0),
)
TARGET_MFU = 0.5


def _computes_in_bfloat16(config: Any) -> bool:
    return "bfloat16" in (str(config.model.get("dtype")), str(config.model.get("matmul_dtype")))


def device_peak_tflops(device: Any, config: Any, given: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the figure comes from) for the step `config` runs."""
    if given is not None:
        return given, "--peak_tflops"
    if device.platform == "cpu":
        dtype = "bfloat16" if _computes_in_bfloat16(config) else "float32"
        return matmul_peak_gflops(matmul_dtype=dtype) / 1e3, f"measured 4096^2 {dtype} matmul"
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device.device_kind:
            return peak, f"data sheet, dense bfloat16, {key}"
    raise ValueError(f"no bfloat16 peak known for {device.device_kind!r}: pass --peak_tflops")


def measure(config: Any, *, per_device_batch: int | None = None, steps: int = 10,
            warmup: int = 2, peak_tflops: float | None = None, profile_dir: str | None = None,
            profile_steps: int = 3) -> dict[str, Any]:
    """Time `config`'s training step on every local device; images/s, TFLOP/s and MFU (and,
    with `profile_dir`, a traced profile of `profile_steps` more steps kept there)."""
    devices = jax.local_devices()
    n = len(devices)
    per_device = per_device_batch or config.batch_size // n
    if per_device < 1 or per_device % int(config.grad_accum_steps):
        raise ValueError(f"per-device batch {per_device} must be a positive multiple of "
                         f"grad_accum_steps={config.grad_accum_steps}: pass --per_device_batch")
    classes = num_classes_of(config)
    model = model_from_config(config.model, num_classes=classes, image_size=config.image_size)
    key = jax.random.PRNGKey(0)
    params = init_params(model, key)
    tx = train_step.train_optimizer(config, params)
    state = parallel.replicate(train_step.fresh_state(config, params, tx, key))
    rng = np.random.default_rng(0)
    batch = parallel.shard({
        "image": rng.integers(0, 256, (n, per_device, *model.image_size, 3), dtype=np.uint8),
        "label": rng.integers(0, classes, (n, per_device), dtype=np.int32)})
    start = time.perf_counter()
    step = jax.pmap(train_step.make_train_step(model, tx, config, classes),
                    axis_name=parallel.AXIS, donate_argnums=(0,)).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run() -> None:
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    for _ in range(warmup + 1):
        run()
    step_s = median_seconds(run, steps)
    profile = None
    if profile_dir is not None:
        events, wall_s = traced(run, profile_steps, profile_dir)
        profile = summary(events, categories(step.as_text()), profile_steps, wall_s)
    images_per_s = n * per_device / step_s
    flops_per_image = flops.train_flops_per_image(model)
    achieved = flops_per_image * images_per_s / 1e12
    peak, source = device_peak_tflops(devices[0], config, peak_tflops)
    memory = devices[0].memory_stats() or {}  # None on a CPU
    # One CPU device already uses every core: its measured peak is the whole machine's.
    total_peak = peak if devices[0].platform == "cpu" else peak * n
    return {
        "variant": config.model.variant, "image_size": config.image_size,
        "dtype": str(config.model.dtype),
        "matmul_dtype": str(config.model.get("matmul_dtype", "float32")),
        "attention_impl": model.attention_impl, "grad_accum_steps": int(config.grad_accum_steps),
        "platform": devices[0].platform, "device_kind": devices[0].device_kind, "devices": n,
        "per_device_batch": per_device, "compile_s": round(compile_s, 1),
        "step_ms": step_s * 1e3, "images_per_s": images_per_s,
        "model_flops_per_image": flops_per_image, "achieved_tflops_per_s": achieved,
        "peak_tflops_per_s": total_peak, "peak_source": source,
        "mfu": achieved / total_peak, "target_mfu": TARGET_MFU,
        "peak_device_gib": (round(memory["peak_bytes_in_use"] / 2**30, 2)
                            if "peak_bytes_in_use" in memory else None),
        **({"profile": profile} if profile is not None else {}),
    }


def override(config: Any, item: str) -> None:
    """Set the dotted config key of a "key=value" string, e.g. "model.remat=block"."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. model.remat=block")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    if leaf not in node:
        raise ValueError(f"--set {item!r}: the config has no key {key!r}")
    node[leaf] = value


def main() -> None:
    """Parse the command line, measure, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="config file and variant, e.g. configs/imagenet.py:B/16")
    parser.add_argument("--per_device_batch", type=int, default=None,
                        help="images per device per step (default: batch_size / devices)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. model.attention_impl=explicit "
                        "(repeatable; the value is read as a Python literal, else a string)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="one accelerator's peak TFLOP/s, on a CPU the whole machine's "
                        "(default: data sheet; measured on a CPU)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also trace --profile_steps steps into DIR and add their op "
                        "profile to the line")
    parser.add_argument("--profile_steps", type=int, default=3, help="steps traced by --profile")
    args = parser.parse_args()
    if args.per_device_batch is not None and args.per_device_batch < 1:
        parser.error(f"--per_device_batch must be >= 1, got {args.per_device_batch}")
    try:  # a missing or failing config file, an unknown variant or key: one line
        config = load_config(args.config)
        for item in args.set:
            override(config, item)
    except (OSError, ValueError, KeyError, AttributeError) as err:
        parser.error(f"{args.config}: {err}")
    result = measure(config, per_device_batch=args.per_device_batch,
                     steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops,
                     profile_dir=args.profile, profile_steps=args.profile_steps)
    print(json.dumps({"bench": "train_mfu", "config": args.config, "set": args.set, **result,
                      "machine": cpu_description(), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
