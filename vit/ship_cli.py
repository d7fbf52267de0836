"""`vit convert | export | quantize | average | prune`: ship a trained model (parsers, runners).

Thin: each runner calls one library function (vit/convert.py, vit/export.py, vit/quantize.py,
vit/average.py, vit/prune.py) and prints its summary; `vit.cli` adds these sub-commands to its
parser.
"""

from __future__ import annotations

import argparse
from typing import Any

from vit.cli_types import image_size, non_negative_int, positive_int
from vit.output_paths import check_directory, check_file, check_new_workdir, write_json


def _run_convert(args: argparse.Namespace) -> int:
    from vit import convert

    (check_directory if args.to else check_new_workdir)(args.dst, "DST")
    if args.to:
        reading = [flag for flag, value in (("--num-heads", args.num_heads),
                                            ("--num-classes", args.num_classes),
                                            ("--image-size", args.image_size),
                                            ("--class-names", args.class_names),
                                            ("--normalize", args.normalize),
                                            ("--gelu", args.gelu)) if value is not None]
        if reading:
            raise ValueError(f"{', '.join(reading)} describe weights read in, but --to writes "
                             "the checkpoint's own model, classes and preprocessing: drop them")
        for path in convert.export_weights(args.src, args.to, args.dst, use_ema=args.ema):
            print(f"wrote {path}")
        return 0
    path, notes = convert.convert_weights(
        args.src, args.dst, num_heads=args.num_heads, class_names_file=args.class_names,
        normalize=args.normalize, gelu=args.gelu, use_ema=args.ema, num_classes=args.num_classes,
        image_size=args.image_size)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}; evaluate it with: vit eval --checkpoint {path} --dataset NAME")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from vit.export import export

    check_directory(args.out, "--out")
    if args.json:
        check_file(args.json, "--json")
    result = export(args.checkpoint, args.format, args.out, images=args.images,
                    use_ema=args.ema, measure_speed=not args.no_speed)
    print(result.summary())
    if args.json:
        write_json(args.json, result.to_dict())
    return 0


def _run_quantize(args: argparse.Namespace) -> int:
    from vit.quantize import quantize_checkpoint

    check_new_workdir(args.out, "--out")
    print(quantize_checkpoint(args.checkpoint, args.out, use_ema=args.ema).summary())
    return 0


def _run_prune(args: argparse.Namespace) -> int:
    from vit.prune import prune_checkpoint

    check_new_workdir(args.out, "--out")
    result = prune_checkpoint(args.checkpoint, args.out, method=args.method,
                              sparsity=args.sparsity, finetune_steps=args.finetune_steps,
                              lr=args.lr, use_ema=args.ema, dataset=args.dataset,
                              data_dir=args.data_dir, distill_alpha=args.distill)
    print(result.summary())
    return 0


def _run_average(args: argparse.Namespace) -> int:
    from vit.average import average_checkpoints

    check_new_workdir(args.out, "--out")
    print(average_checkpoints(args.checkpoints, args.out, last=args.last,
                              use_ema=args.ema).summary())
    return 0


def add_commands(sub: Any) -> None:
    """Add convert, export, quantize, average and prune to `sub` (argparse sub-parsers)."""
    from vit.export import FORMATS
    from vit.preprocess import NORMALIZATIONS
    from vit.prune import METHODS
    from vit.weight_sidecars import GELUS
    from vit.weights_out import TARGETS

    cv = sub.add_parser("convert", help="weights in (timm / HF / .npz -> checkpoint) or out (--to)")
    cv.add_argument("src", help=".npz (vit_jax), .safetensors, .bin/.pth (timm/HF) or checkpoint")
    cv.add_argument("dst", help="output workdir (checkpoint in DST/checkpoints/0); with --to, "
                                "the directory for the weight files")
    cv.add_argument("--to", choices=TARGETS, help="write the checkpoint SRC as timm / HF "
                    "safetensors or a vit_jax .npz (each with its config.json)")
    cv.add_argument("--num-heads", type=positive_int, help="heads, when the weights cannot tell")
    cv.add_argument("--class-names", help="text file with one class name per line")
    cv.add_argument("--num-classes", type=positive_int, help="classes of the zero head given to "
                    "head-less weights (DINOv2 backbones)")
    cv.add_argument("--image-size", type=image_size, help="rebuild the model for this "
                    "input size, e.g. 224 or 224,320 (position embedding resampled)")
    cv.add_argument("--normalize", choices=tuple(NORMALIZATIONS),
                    help="the source's input normalisation (default: its config, else 0.5/0.5)")
    cv.add_argument("--gelu", choices=GELUS,
                    help="the source's GELU (default: erf for timm / HF, tanh for vit_jax)")
    cv.add_argument("--ema", action="store_true",
                    help="a checkpoint's EMA params (SRC a checkpoint with EMA)")
    cv.set_defaults(run=_run_convert)

    ex = sub.add_parser("export", help="StableHLO / SavedModel / TFLite / ONNX, verified")
    ex.add_argument("--checkpoint", required=True, help="a workdir, checkpoints/ or step dir")
    ex.add_argument("--format", required=True, choices=FORMATS)
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--images", nargs="+", metavar="IMAGE_OR_DIR",
                    help="images to verify on (default: the first 7 images of "
                    "the run's evaluation split, or 7 synthetic ones if it is not readable here)")
    ex.add_argument("--no-speed", action="store_true", help="skip the images/s measurement")
    ex.add_argument("--ema", action="store_true", help="use the EMA params")
    ex.add_argument("--json", help="also write the check to this JSON file")
    ex.set_defaults(run=_run_export)

    qu = sub.add_parser("quantize", help="int8 post-training quantisation of a checkpoint")
    qu.add_argument("--checkpoint", required=True, help="a workdir, checkpoints/ or step dir")
    qu.add_argument("--out", required=True, help="output workdir for the int8 checkpoint")
    qu.add_argument("--ema", action="store_true", help="quantise the EMA params")
    qu.set_defaults(run=_run_quantize)

    av = sub.add_parser("average", help="mean parameters of checkpoints: a run's last N, or a "
                        "model soup of fine-tuned runs")
    av.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                    help="workdirs, checkpoints/ or step dirs (each: its latest step)")
    av.add_argument("--out", required=True, help="output workdir for the averaged checkpoint")
    av.add_argument("--last", type=int, metavar="N",
                    help="average the last N checkpoints of the one run given")
    av.add_argument("--ema", action="store_true", help="average the EMA params")
    av.set_defaults(run=_run_average)

    pn = sub.add_parser("prune", help="structured or magnitude pruning, optional fine-tune")
    pn.add_argument("--checkpoint", required=True, help="a workdir, checkpoints/ or step dir")
    pn.add_argument("--out", required=True, help="output workdir for the pruned checkpoint")
    pn.add_argument("--method", choices=METHODS, default="structured")
    pn.add_argument("--sparsity", type=float, required=True, help="share removed, e.g. 0.5")
    pn.add_argument("--finetune-steps", type=non_negative_int, default=0,
                    help="steps of fine-tuning after")
    pn.add_argument("--lr", type=float, default=1e-4, help="peak fine-tuning learning rate "
                    "(warmup over the first tenth of the steps, then cosine decay)")
    pn.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                    help="share of the fine-tuning loss spent matching the unpruned model "
                    "(knowledge distillation, e.g. 0.5; default 0: labels only)")
    pn.add_argument("--ema", action="store_true", help="prune the EMA params")
    pn.add_argument("--dataset", help="fine-tune on this TFDS name or folder:/path (default: "
                    "the run's own; weights converted from a file have none)")
    pn.add_argument("--data-dir", help="TFDS data directory")
    pn.set_defaults(run=_run_prune)
