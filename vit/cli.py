"""The `vit` command: `vit train | eval | robustness | fewshot | predict | attention | plot | ...`.

`vit convert | export | quantize | average | prune` (shipping a trained model) live in
vit/ship_cli.py.

`vit train` forwards its flags to `vit.train_cli` (absl flags); the others use argparse. Every
failure the user can fix ends with exit status 2 (1 for failed inputs among several) and one
line `error: ...` on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from vit import ship_cli
from vit.checkpoint import CheckpointError
from vit.cli_types import non_negative_int, positive_int
from vit.error_text import device_memory_error, first_line
from vit.nonfinite import NonFiniteLossError
from vit.output_paths import check_directory, check_figure_file, check_file, write_json
from vit.preprocess import DataError
from vit.weight_formats import WeightsError

USAGE_ERROR, INPUT_ERROR = 2, 1
SIGPIPE_STATUS = 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe
_USER_ERRORS = (DataError, CheckpointError, WeightsError, ValueError, OSError,
                NonFiniteLossError)


def _check_outputs(args: argparse.Namespace) -> None:
    """The sub-command's output paths, checked before its work (vit/output_paths.py)."""
    if getattr(args, "json", None):
        check_file(args.json, "--json")
    if getattr(args, "reliability", None):
        check_figure_file(args.reliability, "--reliability")
    if getattr(args, "plots", None):
        check_directory(args.plots, "--plots")


def _run_eval(args: argparse.Namespace) -> int:
    from vit.evaluate import evaluate_checkpoint

    _check_outputs(args)
    result = evaluate_checkpoint(
        args.checkpoint or args.workdir, split=args.split, dataset=args.dataset,
        data_dir=args.data_dir, use_ema=args.ema, batch_size=args.batch_size, step=args.step,
        tta=args.tta, match_classes=args.match_classes)
    print(result.summary())
    if args.json:
        write_json(args.json, result.to_dict())
    if args.plots:
        from vit.reports import write_report

        print("wrote " + ", ".join(write_report(result, args.plots)))
    if args.reliability:
        from vit.calibration import reliability_diagram

        print(f"wrote {reliability_diagram(result.calibration, args.reliability)}")
    return 0


def _run_robustness(args: argparse.Namespace) -> int:
    from vit import robustness
    from vit.calibration import reliability_diagram

    _check_outputs(args)
    report = robustness.robustness_report(
        args.checkpoint, split=args.split,
        corruption_names=robustness.parse_corruptions(args.corruptions),
        severities=robustness.parse_severities(args.severities),
        attack=args.attack,
        eps=robustness.parse_eps(args.eps, args.norm), steps=args.steps, norm=args.norm,
        baseline=args.baseline, batch_size=args.batch_size, seed=args.seed, source=args.source,
        dataset=args.dataset, data_dir=args.data_dir, use_ema=args.ema)
    print(report.summary())
    if args.json:
        write_json(args.json, report.to_dict())
    if args.reliability:
        print(f"wrote {reliability_diagram(report.calibration, args.reliability)}")
    return 0


def _report_errors(errors: list[tuple[str, str]]) -> int:
    for _, message in errors:
        print(f"error: {message}", file=sys.stderr)
    return INPUT_ERROR if errors else 0


def _run_predict(args: argparse.Namespace) -> int:
    from vit.predict import predict

    _check_outputs(args)
    result = predict(args.checkpoint, args.inputs, top_k=args.top_k, use_ema=args.ema)
    if result.predictions:
        print(result.summary())
    if args.json:
        write_json(args.json, result.to_dict())
    return _report_errors(result.errors)


def _run_fewshot(args: argparse.Namespace) -> int:
    from vit.fewshot import fewshot_checkpoint

    _check_outputs(args)
    result = fewshot_checkpoint(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, step=args.step,
        use_ema=args.ema, train_split=args.train_split, test_split=args.test_split,
        shots=_counts(args.shots, "--shots"), seeds=args.seeds, batch_size=args.batch_size,
        **({} if args.l2_reg is None else {"l2_reg": args.l2_reg}))
    print(result.summary())
    if args.json:
        write_json(args.json, result.to_dict())
    return 0


def _counts(text: str, flag: str) -> list[int]:
    """'1,5,10' -> [1, 5, 10]; a one-line ValueError naming `flag` otherwise."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be comma-separated integers, e.g. 1,5,10,25"
                         ) from None


def _unique_stems(files: Sequence[str], taken: set[str]) -> list[str]:
    """Output names for `files`: each file's stem, with _2, _3, ... added where it would repeat
    a name in `taken` (a.png and a.jpg; a.png, a.jpg and a_2.png); adds them to `taken`."""
    stems: list[str] = []
    for path in files:
        stem = candidate = os.path.splitext(os.path.basename(path))[0]
        number = 1
        while candidate in taken:
            number += 1
            candidate = f"{stem}_{number}"
        taken.add(candidate)
        stems.append(candidate)
    return stems


def _run_attention(args: argparse.Namespace) -> int:
    import numpy as np

    from vit import attention_maps, preprocess
    from vit.evaluate import load_inference_model
    from vit.predict import BATCH, expand_paths, model_inputs, read_images

    check_directory(args.out, "--out")
    loaded = load_inference_model(args.checkpoint, use_ema=args.ema)
    found, errors = expand_paths(args.inputs)
    taken: set[str] = set()
    written = done = 0
    for lo in range(0, len(found), BATCH):  # a batch of images and their maps in memory
        files, images, unreadable = read_images(found[lo:lo + BATCH])
        errors += unreadable
        if not files:
            continue
        shown = np.stack([np.asarray(preprocess.eval_crop(im, loaded.config)) for im in images])
        written += len(attention_maps.write_attention_batch(
            loaded.model, loaded.params, model_inputs(images, loaded.config), shown, args.out,
            _unique_stems(files, taken), layer=args.layer, head=args.head))
        done += len(files)
    if done:
        print(f"wrote {written} files for {done} images to {args.out}")
    return _report_errors(errors)


def _run_info(args: argparse.Namespace) -> int:
    from vit.checkpoint_info import describe

    _check_outputs(args)
    info = describe(args.path, step=args.step, num_heads=args.num_heads,
                    normalize=args.normalize)
    print(info.summary())
    if args.json:
        write_json(args.json, info.to_dict())
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    from vit.plot import plot_runs

    check_figure_file(args.out, "--out")
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
    parser.add_argument("--verbose", action="store_true", help="also print TensorFlow / absl "
                        "start-up lines and INFO logs (or set VIT_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train a model (absl flags: --config=... --workdir=...)")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a whole split")
    where = ev.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="a training run's workdir: its latest checkpoint")
    where.add_argument("--checkpoint", help="a workdir, its checkpoints/ dir or one step dir")
    ev.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ev.add_argument("--dataset", help="another dataset with the same classes (TFDS or folder:)")
    ev.add_argument("--data-dir", help="TFDS data directory for --dataset")
    ev.add_argument("--match-classes", choices=("names", "order"), default="names",
                    help="on --dataset, match its classes to the checkpoint's by name "
                    "(relabelled into the head's order) or take its label ids as they are")
    ev.add_argument("--split", help="split to evaluate (default: the run's eval_split)")
    ev.add_argument("--ema", action="store_true", help="use the EMA params")
    ev.add_argument("--batch-size", type=positive_int, help="global eval batch size")
    ev.add_argument("--tta", choices=("none", "flip"), default="none",
                    help="test-time augmentation: flip = mean softmax of image and mirror image")
    ev.add_argument("--json", help="also write the metrics to this JSON file")
    ev.add_argument("--plots", metavar="DIR", help="also write metrics.json, "
                    "confusion_matrix.png and per_class_accuracy.png to DIR")
    ev.add_argument("--reliability", metavar="PNG", help="also draw the reliability diagram")
    ev.set_defaults(run=_run_eval)

    rb = sub.add_parser("robustness", help="accuracy under corruptions and attacks, calibration")
    rb.add_argument("--checkpoint", required=True, help="a workdir, checkpoints/ or step dir")
    rb.add_argument("--split", help="split (default: the run's eval_split), e.g. test[:1000]")
    rb.add_argument("--corruptions", default="all",
                    help="all, none, families (noise,blur,weather,digital) or names")
    rb.add_argument("--severities", default="1-5",
                    help="e.g. 1-5 or 1,3,5 (1 mildest, 5 strongest)")
    rb.add_argument("--attack", choices=("fgsm", "pgd", "none"), default="pgd")
    rb.add_argument("--eps", default="2/255,4/255,8/255",
                    help="attack radii, pixels in [0, 1] (L-inf at most 1; L2 any size)")
    rb.add_argument("--steps", type=int, default=10, help="PGD steps")
    rb.add_argument("--norm", choices=("linf", "l2"), default="linf")
    rb.add_argument("--baseline", help="checkpoint the corruption errors are relative to (mCE)")
    rb.add_argument("--source", choices=("auto", "generate", "tfds"), default="auto",
                    help="corrupted images: a prepared cifar10_corrupted if found, else made")
    rb.add_argument("--seed", type=non_negative_int, default=0,
                    help="seed of the generated corruptions")
    rb.add_argument("--dataset", help="another dataset whose labels are the head's classes, "
                    "in order (TFDS or folder:); needed for converted weights")
    rb.add_argument("--data-dir", help="TFDS data directory")
    rb.add_argument("--batch-size", type=positive_int, help="global batch size")
    rb.add_argument("--ema", action="store_true", help="use the EMA params")
    rb.add_argument("--json", help="also write the report to this JSON file")
    rb.add_argument("--reliability", metavar="PNG", help="also draw the reliability diagram")
    rb.set_defaults(run=_run_robustness)

    fs = sub.add_parser("fewshot", help="few-shot linear probe of a checkpoint's features")
    fs.add_argument("--checkpoint", required=True, help="a workdir, checkpoints/ or step dir")
    fs.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    fs.add_argument("--dataset", help="TFDS name or folder:/root (default: the run's dataset)")
    fs.add_argument("--data-dir", help="TFDS data directory")
    fs.add_argument("--train-split", default="train", help="where the shots are drawn from")
    fs.add_argument("--test-split", default="test", help="what the probe is scored on")
    fs.add_argument("--shots", default="1,5,10,25", help="examples per class, e.g. 1,5,10,25")
    fs.add_argument("--seeds", type=positive_int, default=3, help="draws of the shots")
    fs.add_argument("--l2-reg", type=float, help="ridge regularisation (default 1024)")
    fs.add_argument("--batch-size", type=positive_int, help="global batch size")
    fs.add_argument("--ema", action="store_true", help="use the EMA params")
    fs.add_argument("--json", help="also write the result to this JSON file")
    fs.set_defaults(run=_run_fewshot)

    pr = sub.add_parser("predict", help="classify image files or directories of images")
    pr.add_argument("--checkpoint", required=True, help="a workdir, checkpoints/ or step dir")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--top-k", type=positive_int, default=5, help="classes to show per image")
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

    ship_cli.add_commands(sub)  # convert, export, quantize, average, prune

    inf = sub.add_parser("info", help="what a checkpoint or weight file holds: model, params, "
                         "FLOPs, classes, last evaluation")
    inf.add_argument("path", metavar="PATH", help="a workdir, checkpoints/ or step dir, or a "
                     "weight file vit convert reads (.safetensors, .npz, .pth, a Hub folder)")
    inf.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    inf.add_argument("--num-heads", type=positive_int,
                     help="a weight file's heads, when it cannot tell (as vit convert)")
    inf.add_argument("--normalize", help="a weight file's input normalisation, when its "
                     "config.json names none this toolkit knows (as vit convert)")
    inf.add_argument("--json", help="also write the description to this JSON file")
    inf.set_defaults(run=_run_info)

    pl = sub.add_parser("plot", help="draw test top-1 and train loss vs minutes and steps (PNG)")
    pl.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="training runs' workdirs")
    pl.add_argument("--out", default="curves.png", help="output PNG (default: curves.png)")
    pl.add_argument("--labels", help="comma-separated legend labels, one per workdir")
    pl.set_defaults(run=_run_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vit` console script; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["train"]:  # `vit train` takes --verbose as one of its absl flags
        from vit import console

        console.set_verbose("--verbose" in argv)
        argv = [arg for arg in argv if arg != "--verbose"]
    if argv[:1] == ["train"]:
        from vit import train_cli

        train_cli.main(["vit train", *argv[1:]])
        return 0
    args = _parser().parse_args(argv)
    from vit.save_errors import drop_closed_loop_tracebacks

    drop_closed_loop_tracebacks()  # convert, quantize and prune save checkpoints
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader stopped early (`vit eval ... | head -1`)
        # Python's own flush at exit must not fail on the closed pipe again; a captured stdout
        # has no descriptor to replace.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_STATUS
    except _USER_ERRORS as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except RuntimeError as err:
        fix = ("lower --batch-size, or run on a device with more memory"
               if "batch_size" in vars(args) else
               "run on a device with more memory, or give fewer images at once")
        line = device_memory_error(err, fix)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
