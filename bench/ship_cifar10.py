"""Export, int8 and pruning figures of a trained CIFAR-10 checkpoint: prints ONE JSON line.

    .venv/bin/python bench/ship_cifar10.py CHECKPOINT OUT --what export
    .venv/bin/python bench/ship_cifar10.py CHECKPOINT OUT --what quantize [--split test]
    .venv/bin/python bench/ship_cifar10.py CHECKPOINT OUT --what prune --method structured \
        [--sparsities 0.25,0.5,0.75] [--finetune_steps 200] [--split test[:2000]] \
        [--distill 0,0.5,1]

export: every format (and the int8 checkpoint in the formats that take it), verified on 7
CIFAR-10 test images: size, max |logit diff|, images/s at batch 32. quantize: test top-1 of
the float checkpoint with float32 matmuls and with the matmul dtype it was trained with, and of
the int8 checkpoint (no TTA), parameter bytes, and images/s of the three bare jitted models at
batch 256, measured in interleaved rounds (median and every round). prune: top-1 at each
sparsity without and with the fine-tune (for each --distill share: 0 = labels only, else that
share of the loss matches the unpruned model).
The README's tables come from these lines (the CIFAR-10 hour recipe model, 2-core CPU).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CIFAR_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../shared/data/tfds"))
if not os.path.isdir(CIFAR_DIR):
    CIFAR_DIR = "/work/shared/data/tfds"


def _images(out: str) -> list[str]:
    """Seven CIFAR-10 test images as PNG files (the first seven of the test split)."""
    import tensorflow_datasets as tfds
    from PIL import Image

    folder = os.path.join(out, "images")
    os.makedirs(folder, exist_ok=True)
    split = tfds.load("cifar10", split="test[:7]", data_dir=CIFAR_DIR, download=False)
    paths = []
    for i, ex in enumerate(tfds.as_numpy(split)):
        paths.append(os.path.join(folder, f"{i}.png"))
        Image.fromarray(ex["image"]).save(paths[-1])
    return paths


def _loaded(checkpoint: str, matmul_dtype: str | None = None):
    """The checkpoint's inference model, its matmul operands set to `matmul_dtype` if given."""
    from vit.evaluate import load_inference_model

    loaded = load_inference_model(checkpoint)
    if matmul_dtype is not None:
        loaded.model = loaded.model.clone(matmul_dtype=matmul_dtype)
    return loaded


def _top1(checkpoint: str, split: str, matmul_dtype: str | None = None) -> float:
    from vit.evaluate import evaluate

    loaded = _loaded(checkpoint, matmul_dtype)
    loaded.config.data_dir = CIFAR_DIR
    return evaluate(loaded.model, loaded.params, loaded.config, split=split).top1


def _speed_fn(loaded, batch: int = 256):
    """A callable timing the bare jitted model (no input pipeline) at `batch`: images/s."""
    import jax

    params = jax.device_put(loaded.params)
    fn = jax.jit(lambda p, x: loaded.model.apply({"params": p}, x))
    x = jax.device_put(np.random.default_rng(0).standard_normal(
        (batch, *loaded.model.image_size, 3)).astype(np.float32))
    jax.block_until_ready(fn(params, x))

    def measure(seconds: float = 5.0) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            jax.block_until_ready(fn(params, x))
            done += batch
        return done / (time.perf_counter() - start)

    return measure


def export_table(checkpoint: str, out: str) -> dict:
    from vit.export import FORMATS, export
    from vit.quantize import quantize_checkpoint

    images, rows = _images(out), []
    int8 = quantize_checkpoint(checkpoint, os.path.join(out, "int8")).path
    for source, formats in ((checkpoint, FORMATS), (int8, ("stablehlo", "saved_model"))):
        for fmt in formats:
            name = fmt if source == checkpoint else f"{fmt} int8"
            try:
                r = export(source, fmt, os.path.join(out, name.replace(" ", "_")), images=images)
                rows.append({"format": name, "bytes": r.size_bytes,
                             "max_abs_diff": r.max_abs_diff, "images_per_s": r.images_per_s,
                             "jax_images_per_s": r.reference_images_per_s})
            except Exception as err:  # a format that fails is a row too
                rows.append({"format": name, "error": f"{type(err).__name__}: {err}"[:300]})
    return {"export": rows}


def quantize_figures(checkpoint: str, out: str, split: str, rounds: int = 5) -> dict:
    """Size, top-1 and interleaved images/s of the float32, as-trained and int8 models."""
    from vit.export import size_on_disk
    from vit.quantize import quantize_checkpoint

    result = quantize_checkpoint(checkpoint, os.path.join(out, "int8"))
    figures = {"float_param_bytes": result.float_bytes, "int8_param_bytes": result.int8_bytes,
               "int8_checkpoint_bytes": size_on_disk(os.path.dirname(result.path)),
               "trained_matmul_dtype": _loaded(checkpoint).model.matmul_dtype}
    variants = {"float32": (checkpoint, "float32"), "trained": (checkpoint, None),
                "int8": (result.path, None)}
    timers = {}
    for name, (path, matmul_dtype) in variants.items():
        figures[f"{name}_top1"] = _top1(path, split, matmul_dtype)
        timers[name] = _speed_fn(_loaded(path, matmul_dtype))
    speeds = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved, so a change in the machine's load hits all alike
        for name, measure in timers.items():
            speeds[name].append(measure())
    for name, runs in speeds.items():
        figures[f"{name}_images_per_s"] = float(np.median(runs))
        figures[f"{name}_images_per_s_runs"] = [round(r, 1) for r in runs]
    figures["top1_change_points"] = 100 * (figures["int8_top1"] - figures["float32_top1"])
    return figures


def prune_table(checkpoint: str, out: str, method: str, sparsities: list[float], steps: int,
                split: str, distill: list[float]) -> dict:
    from vit.prune import prune_checkpoint

    rows = []
    for s in sparsities:
        row = {"sparsity": s}
        tunes = [(0, 0.0)] + ([(steps, a) for a in distill] if s > 0 else [])
        for ft, alpha in tunes:
            start = time.perf_counter()
            r = prune_checkpoint(checkpoint, os.path.join(out, f"{method}-{s}-{ft}-{alpha}"),
                                 method=method, sparsity=s, finetune_steps=ft,
                                 distill_alpha=alpha)
            key = ("finetuned" + (f"_distill{alpha:g}" if alpha else "")) if ft else "pruned"
            row.update({f"{key}_top1": _top1(r.path, split), "removed": r.removed_fraction,
                        "mlp_dim": r.mlp_dim, f"{key}_seconds": time.perf_counter() - start})
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress: one row at a time
    return {"method": method, "finetune_steps": steps, "split": split, "rows": rows}


def main() -> None:
    """Parse the flags, run one measurement, print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--what", choices=("export", "quantize", "prune"), required=True)
    parser.add_argument("--split", default=None)
    parser.add_argument("--method", default="structured")
    parser.add_argument("--sparsities", default="0.25,0.5,0.75")
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--distill", default="0", help="teacher shares of the fine-tune loss")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.what == "export":
        result = export_table(args.checkpoint, args.out)
    elif args.what == "quantize":
        result = quantize_figures(args.checkpoint, args.out, args.split or "test")
    else:
        result = prune_table(args.checkpoint, args.out, args.method,
                             [float(s) for s in args.sparsities.split(",")],
                             args.finetune_steps, args.split or "test[:2000]",
                             [float(a) for a in args.distill.split(",")])
    print(json.dumps({"checkpoint": args.checkpoint, **result}))


if __name__ == "__main__":
    main()
