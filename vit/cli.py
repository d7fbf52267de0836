"""The `vit` command: `vit train | eval | predict | attention | convert | plot`.

`vit train` forwards its flags to `vit.train_cli` (absl flags); the others use argparse. Every
failure the user can fix ends with exit status 2 (1 for failed inputs among several) and one
line `error: ...` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from vit.checkpoint import CheckpointError
from vit.preprocess import DataError
from vit.weight_formats import WeightsError

USAGE_ERROR, INPUT_ERROR = 2, 1
_USER_ERRORS = (DataError, CheckpointError, WeightsError, ValueError, FileNotFoundError)


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def _run_eval(args: argparse.Namespace) -> int:
    from vit.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint or args.workdir, split=args.split, dataset=args.dataset,
        data_dir=args.data_dir, use_ema=args.ema, batch_size=args.batch_size, step=args.step,
        tta=args.tta)
    print(result.summary())
    if args.json:
        _write_json(args.json, result.to_dict())
    return 0


def _report_errors(errors: list[tuple[str, str]]) -> int:
    for _, message in errors:
        print(f"error: {message}", file=sys.stderr)
    return INPUT_ERROR if errors else 0


def _run_predict(args: argparse.Namespace) -> int:
    from vit.predict import predict

    result = predict(args.checkpoint, args.inputs, top_k=args.top_k, use_ema=args.ema)
    if result.predictions:
        print(result.summary())
    if args.json:
        _write_json(args.json, result.to_dict())
    return _report_errors(result.errors)


def _unique_stems(files: Sequence[str]) -> list[str]:
    stems, seen = [], {}
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def _run_attention(args: argparse.Namespace) -> int:
    import numpy as np

    from vit import attention_maps, preprocess
    from vit.evaluate import load_inference_model
    from vit.predict import expand_paths, model_inputs, read_images

    loaded = load_inference_model(args.checkpoint, use_ema=args.ema)
    files, errors = expand_paths(args.inputs)
    files, images, unreadable = read_images(files)
    errors += unreadable
    if files:
        shown = np.stack([np.asarray(preprocess.eval_crop(im, loaded.config)) for im in images])
        paths = attention_maps.write_attention_batch(
            loaded.model, loaded.params, model_inputs(images, loaded.config), shown, args.out,
            _unique_stems(files), layer=args.layer, head=args.head)
        print(f"wrote {len(paths)} files for {len(files)} images to {args.out}")
    return _report_errors(errors)


def _architecture(weights: dict, num_heads: int | None) -> tuple[str, dict]:
    """The variant string and overrides that rebuild the model `weights` (vit naming) came from."""
    from vit.model import VARIANTS
    from vit.weight_formats import POSEMB

    if "embedding/kernel" not in weights or "head/kernel" not in weights:
        raise WeightsError("the weights have no embedding/kernel or head/kernel, so the model "
                           "cannot be inferred; fine-tune from them with configs/finetune.py")
    patch, _, _, width = weights["embedding/kernel"].shape
    depth = len({k.split("/")[1] for k in weights if k.startswith("Transformer/encoderblock_")})
    block = "Transformer/encoderblock_0/"
    query = weights[block + "MultiHeadDotProductAttention_1/query/kernel"]
    heads = query.shape[1] if query.ndim == 3 else num_heads
    heads = heads or next((v["num_heads"] for v in VARIANTS.values() if v["width"] == width), None)
    if heads is None:
        raise WeightsError(f"cannot tell the number of heads of width-{width} weights; "
                           "pass --num-heads")
    classifier = ("token" if "cls" in weights else
                  "map" if any(k.startswith("MAPHead_0/") for k in weights) else "gap")
    overrides = dict(width=int(width), depth=depth, num_heads=int(heads),
                     mlp_dim=int(weights[block + "MlpBlock_3/Dense_0/kernel"].shape[1]),
                     classifier=classifier, posemb="learn" if POSEMB in weights else "sincos2d")
    if "pre_logits/kernel" in weights:
        overrides["representation_size"] = int(weights["pre_logits/kernel"].shape[1])
    return f"Ti/{patch}", overrides


def _image_size(weights: dict, patch: int, classifier: str) -> int:
    from vit.weight_formats import POSEMB

    if POSEMB not in weights:
        raise WeightsError("weights without a learned position embedding do not tell the image "
                           "size; fine-tune from them with configs/finetune.py instead")
    tokens = weights[POSEMB].shape[1] - (classifier == "token")
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise WeightsError(f"the position embedding has {tokens} patch tokens, not a square "
                           "grid; fine-tune from these weights with configs/finetune.py")
    return side * patch


def convert(src: str, dst: str, *, num_heads: int | None = None,
            class_names_file: str | None = None) -> str:
    """Turn any weights `read_weights` reads into a checkpoint in workdir `dst`; returns its dir."""
    import jax

    from vit import data
    from vit.checkpoint import Checkpointer
    from vit.model import create_model, init_params
    from vit.pretrained import adapt_params
    from vit.weight_formats import read_weights

    weights = read_weights(src)
    variant, overrides = _architecture(weights, num_heads)
    num_classes = int(weights["head/kernel"].shape[-1])
    patch = int(variant.split("/")[1])
    image_size = _image_size(weights, patch, overrides["classifier"])
    model = create_model(variant, num_classes=num_classes, image_size=image_size, **overrides)
    params, _ = adapt_params(weights, init_params(model, jax.random.PRNGKey(0)), model,
                             keep_head=True)
    names = [f"class_{i}" for i in range(num_classes)]
    if class_names_file:
        with open(class_names_file) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != num_classes:
            raise ValueError(f"{class_names_file!r} lists {len(names)} class names but the head "
                             f"has {num_classes} classes; give one name per line for each")
    config = data.default_config()
    config.dataset = os.path.basename(os.path.normpath(src))
    config.image_size = image_size
    config.model = {"variant": variant, **overrides}
    info = data.DatasetInfo(config.dataset, num_classes, tuple(names),
                            (image_size, image_size, 3), {})
    checkpointer = Checkpointer(dst)
    checkpointer.save(0, {"step": 0, "params": params}, config=config.to_dict(),
                      dataset_info=info.to_dict(), force=True)
    checkpointer.close()
    return str(checkpointer.directory / "0")


def _run_convert(args: argparse.Namespace) -> int:
    path = convert(args.src, args.dst, num_heads=args.num_heads,
                   class_names_file=args.class_names)
    print(f"wrote {path}; evaluate it with: vit eval --checkpoint {path} --dataset NAME")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from vit.plot import plot_runs

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    path = plot_runs(args.workdirs, args.out, labels=labels)
    print(f"wrote {path} ({len(args.workdirs)} run{'s' if len(args.workdirs) > 1 else ''})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with usage mistakes reported as one line."""

    def error(self, message: str) -> None:
        """Print `error: <prog>: message` and exit with status 2."""
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train a model (absl flags: --config=... --workdir=...)")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a whole split")
    where = ev.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="a training run's workdir: its latest checkpoint")
    where.add_argument("--checkpoint", help="a workdir, its checkpoints/ dir or one step dir")
    ev.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ev.add_argument("--dataset", help="another dataset with the same classes (TFDS or folder:)")
    ev.add_argument("--data-dir", help="TFDS data directory for --dataset")
    ev.add_argument("--split", help="split to evaluate (default: the run's eval_split)")
    ev.add_argument("--ema", action="store_true", help="use the EMA params")
    ev.add_argument("--batch-size", type=int, help="global eval batch size")
    ev.add_argument("--tta", choices=("none", "flip"), default="none",
                    help="test-time augmentation: flip = mean softmax of image and mirror image")
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    ev.set_defaults(run=_run_eval)

    pr = sub.add_parser("predict", help="classify image files or directories of images")
    pr.add_argument("--checkpoint", required=True, help="a workdir, checkpoints/ or step dir")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    pr.add_argument("--ema", action="store_true", help="use the EMA params")
    pr.add_argument("--json", help="also write the predictions to this JSON file")
    pr.set_defaults(run=_run_predict)

    at = sub.add_parser("attention", help="write attention maps and rollout for images")
    at.add_argument("--checkpoint", required=True, help="a workdir, checkpoints/ or step dir")
    at.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    at.add_argument("--out", required=True, help="output directory")
    at.add_argument("--layer", type=int, help="only this layer in the per-layer grid")
    at.add_argument("--head", type=int, help="only this head (default: mean of heads)")
    at.add_argument("--ema", action="store_true", help="use the EMA params")
    at.set_defaults(run=_run_attention)

    cv = sub.add_parser("convert", help="pretrained weights -> a checkpoint of this toolkit")
    cv.add_argument("src", help=".npz (vit_jax), .safetensors, .bin/.pth (timm/HF) or checkpoint")
    cv.add_argument("dst", help="output workdir; the checkpoint goes to DST/checkpoints/0")
    cv.add_argument("--num-heads", type=int, help="heads, when the weights cannot tell")
    cv.add_argument("--class-names", help="text file with one class name per line")
    cv.set_defaults(run=_run_convert)

    pl = sub.add_parser("plot", help="draw test top-1 and train loss vs minutes and steps (PNG)")
    pl.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="training runs' workdirs")
    pl.add_argument("--out", default="curves.png", help="output PNG (default: curves.png)")
    pl.add_argument("--labels", help="comma-separated legend labels, one per workdir")
    pl.set_defaults(run=_run_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vit` console script; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from vit import train_cli

        train_cli.main(["vit train", *argv[1:]])
        return 0
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except _USER_ERRORS as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
