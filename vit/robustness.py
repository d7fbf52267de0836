"""How robust is a checkpoint: common corruptions, adversarial attacks and calibration, one report.

`robustness_report(checkpoint, ...)` reads the evaluation split (the checkpoint's own dataset
and evaluation crop) and, per batch of uint8 pixels, measures
- the clean accuracy and the expected calibration error (vit/calibration.py);
- the accuracy under each corruption of vit/corruptions.py at each severity, generated on the fly
  with a fixed seed (each image corrupted at its own size, before the evaluation resize and crop,
  one pass over the split per corruption and severity), or read from a prepared TFDS
  `cifar10_corrupted` directory when there is one (`source="auto"`); the two agree at any model
  resolution, since the prepared images were corrupted at 32 px too; the mean corruption
  accuracy and per-family means; with a baseline checkpoint, the corruption error
  CE_c = sum_s E_{s,c} / sum_s E^baseline_{s,c} and its mean over corruptions, mCE (and the
  relative mCE, which first subtracts the clean errors), as defined by Hendrycks & Dietterich
  (2019);
- the robust accuracy under a white-box attack (vit/adversarial.py) for each epsilon. An example
  counts as robust at eps only if it is classified correctly clean and under the attacks at every
  listed eps' <= eps (a perturbation found in a smaller ball lies in the larger one), so robust
  accuracy never increases with eps.
Padding is masked out and the counts are added up over processes as in vit/evaluate.py, so every
example counts exactly once on any number of devices.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from vit import adversarial, calibration, corruptions, data, data_options, parallel
from vit.checkpoint import load_checkpoint
from vit.evaluate import InferenceModel, _eval_step, load_inference_model, sum_over_processes
from vit.robustness_options import (
    DEFAULT_EPS,
    RobustnessError,
    parse_corruptions,
    parse_eps,
    parse_severities,
)

log = logging.getLogger(__name__)
SOURCES = ("auto", "generate", "tfds")
__all__ = ["DEFAULT_EPS", "RobustnessError", "RobustnessReport", "parse_corruptions",
           "parse_eps", "parse_severities", "robustness_report"]


# ----------------------------------------------------------------------------- the report
@dataclasses.dataclass
class RobustnessReport:
    """Accuracies are shares of num_examples; corruption keys are names, then severities."""

    checkpoint: str
    split: str
    num_examples: int
    clean_accuracy: float
    ece: float
    calibration: list[list[float]]  # bin sums [3][bins] (vit/calibration.py)
    corruption_source: str  # "generated" | "tfds" | "none"
    corruptions: dict[str, dict[str, float]]
    mean_corruption_accuracy: float | None
    families: dict[str, float]
    attack: dict | None  # method, norm, steps, accuracy {eps label: robust accuracy}
    baseline: dict | None  # checkpoint, clean_accuracy, corruptions, ce, mce, relative_mce
    notes: list[str]
    seconds: float

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (NaN becomes None)."""
        def clean(x: Any) -> Any:
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean(dataclasses.asdict(self))

    def summary(self) -> str:
        """Human-readable lines: clean, corruptions, families, attack, notes."""
        lines = [f"{self.checkpoint}  split {self.split}  examples {self.num_examples}  "
                 f"{self.seconds:.0f} s",
                 f"clean accuracy {self.clean_accuracy:.4f}  ECE {self.ece:.4f}"]
        if self.corruptions:
            width = max(len(name) for name in self.corruptions)
            severities = list(next(iter(self.corruptions.values())))
            lines.append(f"corruptions ({self.corruption_source}), accuracy at severity "
                         f"{' '.join(severities)}, mean:")
            for name, by_severity in self.corruptions.items():
                values = " ".join(f"{v:.4f}" for v in by_severity.values())
                ce = ""
                if self.baseline:
                    ce = f"  CE {self.baseline['ce'][name]:.3f}"
                lines.append(f"  {name:<{width}}  {values}  mean "
                             f"{np.mean(list(by_severity.values())):.4f}{ce}")
            lines.append("families: " + "  ".join(f"{k} {v:.4f}" for k, v in self.families.items()))
            line = f"mean corruption accuracy {self.mean_corruption_accuracy:.4f}"
            if self.baseline:
                line += (f"  mCE {self.baseline['mce']:.4f}  relative mCE "
                         f"{self.baseline['relative_mce']:.4f}  (baseline "
                         f"{self.baseline['checkpoint']}, clean "
                         f"{self.baseline['clean_accuracy']:.4f})")
            lines.append(line)
        if self.attack:
            a = self.attack
            name = "fgsm" if a["method"] == "fgsm" else f"pgd-{a['steps']}"
            lines.append(f"{name} {a['norm']} robust accuracy: " + "  ".join(
                f"eps {k} {v:.4f}" for k, v in a["accuracy"].items()))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclasses.dataclass
class _Model:
    loaded: InferenceModel
    device_params: Any

    def correct(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(correct, confidence) per example of uint8 images [devices, per_device, H, W, 3]."""
        batch = parallel.shard({"image": images, "label": labels})  # normalised on the devices
        step = _eval_step(self.loaded.model, self.loaded.config.pp.normalize)
        out = jax.device_get(step(self.device_params, batch["image"], batch["label"]))
        return out["pred"] == labels, out["conf"]


def _tfds_dir(config: Any, name: str, severity: int) -> str:
    root = config.get("data_dir") or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets")
    return os.path.join(root, "cifar10_corrupted",
                        f"{corruptions.TFDS_NAMES.get(name, name)}_{severity}")


def _is_prepared(path: str) -> bool:
    """Whether a TFDS config directory holds a finished build: a version directory with its
    dataset_info.json (an interrupted `tfds build` leaves only `incomplete.*` directories)."""
    return bool(glob.glob(os.path.join(glob.escape(path), "[0-9]*", "dataset_info.json")))


def _of_the_test_split(split: str) -> bool:
    """Whether every '+'-joined part of `split` is (a slice of) "test", the one split that
    cifar10_corrupted holds."""
    return all(part.strip().split("[", 1)[0] == "test" for part in split.split("+"))


def _choose_source(source: str, config: Any, split: str, names: Sequence[str],
                   severities: Sequence[int]) -> str:
    if source not in SOURCES:
        raise RobustnessError(f"unknown corruption source {source!r}; use one of "
                              f"{', '.join(SOURCES)}")
    if not names:
        return "none"
    on_test = _of_the_test_split(split)
    if source == "tfds" and not on_test:
        raise RobustnessError(f"cifar10_corrupted holds the test split only, not {split!r}; "
                              "use --split test (or a slice of it) or --source generate")
    present = config.dataset == "cifar10" and 0 not in severities and on_test and all(
        _is_prepared(_tfds_dir(config, n, s)) for n in names for s in severities)
    if source == "tfds" and not present:
        raise RobustnessError(
            f"no prepared cifar10_corrupted for these corruptions and severities under "
            f"{os.path.dirname(_tfds_dir(config, names[0], 1))!r} (and the dataset must be "
            "cifar10); run `tfds build cifar10_corrupted` or use --source generate")
    return "tfds" if source == "tfds" or (source == "auto" and present) else "generate"


def _eps_pairs(eps: str | Sequence[float | tuple[str, float]], norm: str
               ) -> tuple[tuple[str, float], ...]:
    """`eps` as `parse_eps` pairs: a string is parsed, radii are labelled by their value."""
    if isinstance(eps, str):
        return parse_eps(eps, norm)
    if isinstance(eps, int | float):
        eps = [eps]
    labels = [e[0] if isinstance(e, tuple) else repr(float(e)) for e in eps]
    values = [e[1] if isinstance(e, tuple) else e for e in eps]
    checked = parse_eps(",".join(repr(float(v)) for v in values), norm)
    return tuple((label, value) for label, (_, value) in zip(labels, checked, strict=True))


def robustness_report(
    checkpoint: str, *, split: str | None = None,
    corruption_names: Sequence[str] = corruptions.CORRUPTIONS,
    severities: Sequence[int] = corruptions.SEVERITIES, attack: str | None = "pgd",
    eps: str | Sequence[float | tuple[str, float]] = DEFAULT_EPS, steps: int = 10,
    norm: str = "linf", baseline: str | None = None, batch_size: int | None = None,
    seed: int = 0, source: str = "auto", dataset: str | None = None, data_dir: str | None = None,
    use_ema: bool = False,
) -> RobustnessReport:
    """Corruption, adversarial and calibration metrics of a checkpoint over a whole split.

    The robust accuracy at each eps is cumulative by design: an example counts as robust at eps
    only if it is classified correctly clean and survives the attack run independently at every
    listed eps' <= eps (their flags are ANDed in increasing order of eps). Any perturbation found
    in a smaller ball lies in the larger one, so this is the attack's best result at eps over
    the listed radii, and it makes the reported accuracy non-increasing in eps by construction.
    The raw per-eps attack is not monotone by construction (one FGSM step of a larger eps can
    overshoot), so tests/test_adversarial.py checks its monotonicity on its own.

    Corrupted images come from `source`: "generate" (on the fly, with `seed`), "tfds" (the
    prepared configs `cifar10_corrupted/<tfds name>_<severity>` under the data directory, read
    with the same split) or "auto" (tfds when the dataset is cifar10 and every requested
    corruption and severity is prepared there and the split is the test split, else generate).
    `attack` None or "none": no attack; `eps` a string as `parse_eps` reads it, or radii (floats
    or (label, value) pairs). `dataset` reads another dataset whose labels are the head's classes
    (converted weights name none).
    """
    attack = None if attack == "none" else attack
    eps = _eps_pairs(eps, norm)
    if attack is not None:
        adversarial.check_attack(attack, norm, steps)
    if baseline is not None and not (corruption_names and severities):
        raise RobustnessError("a baseline is what the corruption errors are relative to (mCE), "
                              "and no corruption is asked for: drop the baseline, or ask for "
                              "corruptions")
    for name in corruption_names:
        for severity in severities:
            corruptions.check(name, severity)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RobustnessError(f"seed {seed!r} must be an integer >= 0 (it seeds the generated "
                              "corruptions)")
    start = time.perf_counter()
    main = load_inference_model(load_checkpoint(checkpoint), use_ema=use_ema)
    config = data_options.on_dataset(main.config, dataset, data_dir)
    split = split or config.eval_split
    config.train_split = config.eval_split = split  # the run's train split need not exist there
    if dataset is not None and (classes := data.dataset_info(config).num_classes
                                ) != main.info.num_classes:
        raise RobustnessError(f"dataset {dataset!r} has {classes} classes, the head of "
                              f"{checkpoint!r} {main.info.num_classes}: pass a dataset whose "
                              "labels are the head's classes")
    models = [_Model(main, parallel.replicate(main.params))]
    if baseline is not None:
        other = load_inference_model(load_checkpoint(baseline), use_ema=use_ema)
        sizes = ["x".join(map(str, m.model.image_size)) for m in (other, main)]
        if sizes[0] != sizes[1] or other.info.num_classes != main.info.num_classes:
            raise RobustnessError(
                f"baseline {baseline!r} takes {sizes[0]} px images and {other.info.num_classes} "
                f"classes but {checkpoint!r} {sizes[1]} px and {main.info.num_classes}; use a "
                "baseline trained on the same data and size")
        if tuple(other.info.class_names) != tuple(main.info.class_names):
            raise RobustnessError(
                f"baseline {baseline!r} names its classes otherwise than {checkpoint!r} (or in "
                "another order), so its errors would count other labels; use a baseline trained "
                "on the same dataset")
        models.append(_Model(other, parallel.replicate(other.params)))
    chosen = _choose_source(source, config, split, corruption_names, severities)
    shape = (len(models), len(corruption_names), len(severities))
    sums = {"clean": np.zeros(len(models)), "corrupt": np.zeros(shape),
            "attack": np.zeros(len(eps)), "calibration": np.zeros((3, calibration.NUM_BINS)),
            "examples": np.zeros(())}
    order = sorted(range(len(eps)), key=lambda i: eps[i][1])
    step = (adversarial.make_attack_step(main.model, config.pp.normalize, attack, norm, steps)
            if attack is not None else None)
    for batch in data.eval_iterator(config, split, batch_size=batch_size):
        images, labels, mask = batch["image"], batch["label"], batch["mask"]
        sums["examples"] += mask.sum()
        for m, model in enumerate(models):
            correct, confidence = model.correct(images, labels)
            sums["clean"][m] += (correct & mask).sum()
            if m == 0:
                clean_correct = correct
                sums["calibration"] += calibration.bin_sums(confidence[mask], correct[mask])
        if step is not None:
            robust = clean_correct.copy()
            on_device = parallel.shard({"image": images, "label": labels})
            for i in order:
                robust &= np.asarray(step(models[0].device_params, on_device["image"],
                                          on_device["label"], np.float32(eps[i][1])))
                sums["attack"][i] += (robust & mask).sum()
    if chosen == "tfds":
        _count_prepared(config, split, batch_size, models, corruption_names, severities, sums)
    elif chosen == "generate":
        _count_generated(config, split, batch_size, models, corruption_names, severities, seed,
                         sums)
    sums = sum_over_processes(sums)
    return _report(checkpoint, baseline, split, chosen, corruption_names, severities, attack,
                   norm, steps, eps, seed, sums, time.perf_counter() - start, config.dataset)


def _count_prepared(config: Any, split: str, batch_size: int | None, models: list[_Model],
                    names: Sequence[str], severities: Sequence[int], sums: dict) -> None:
    """Count correct predictions on the prepared cifar10_corrupted TFDS configs."""
    for c, name in enumerate(names):
        for s, severity in enumerate(severities):
            prepared = config.copy_and_resolve_references()
            prepared.dataset = f"cifar10_corrupted/{corruptions.TFDS_NAMES.get(name, name)}_" \
                               f"{severity}"
            for batch in data.eval_iterator(prepared, split, batch_size=batch_size):
                for m, model in enumerate(models):
                    hits = model.correct(batch["image"], batch["label"])[0] & batch["mask"]
                    sums["corrupt"][m, c, s] += hits.sum()


def _corrupting(name: str, severity: int, seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """The tf.data map corrupting one decoded image at its own size."""
    def corrupt(image: tf.Tensor) -> tf.Tensor:
        out = tf.numpy_function(lambda x: corruptions.corrupt(x, name, severity, seed), [image],
                                tf.uint8, stateful=False)
        out.set_shape(image.shape)
        return out

    return corrupt


def _count_generated(config: Any, split: str, batch_size: int | None, models: list[_Model],
                     names: Sequence[str], severities: Sequence[int], seed: int,
                     sums: dict) -> None:
    """Count correct predictions on images corrupted at their own size, before the evaluation
    resize and crop (as the prepared cifar10_corrupted images were), one pass per corruption
    and severity."""
    for c, name in enumerate(names):
        for s, severity in enumerate(severities):
            for batch in data.eval_iterator(config, split, batch_size=batch_size,
                                            before_crop=_corrupting(name, severity, seed)):
                for m, model in enumerate(models):
                    hits = model.correct(batch["image"], batch["label"])[0] & batch["mask"]
                    sums["corrupt"][m, c, s] += hits.sum()


def _report(checkpoint: str, baseline: str | None, split: str, source: str,
            names: Sequence[str], severities: Sequence[int], attack: str | None, norm: str,
            steps: int, eps: Sequence[tuple[str, float]], seed: int, sums: dict,
            seconds: float, dataset: str) -> RobustnessReport:
    total = float(sums["examples"])
    if total == 0:
        raise RobustnessError(f"split {split!r} holds no examples; choose a non-empty split")
    clean = sums["clean"] / total
    accuracy = sums["corrupt"] / total  # [model, corruption, severity]
    table = {name: {str(s): float(accuracy[0, c, i]) for i, s in enumerate(severities)}
             for c, name in enumerate(names)}
    families = {family: float(np.mean([accuracy[0, names.index(n)] for n in members]))
                for family, members in corruptions.FAMILIES.items()
                if all(n in names for n in members)}
    notes = []
    if source == "generate":
        notes.append(f"corruptions generated on the fly with the published CIFAR-10-C "
                     f"parameters, seed {seed}; motion blur and snow re-implement ImageMagick's "
                     "motion blur")
        if "frost" in names:
            notes.append(corruptions.FROST_NOTE)
        if not dataset.startswith("cifar"):
            notes.append(f"the CIFAR-10-C parameters are set for 32x32 images; {dataset!r}'s "
                         "images were corrupted at their own size before the evaluation crop, "
                         "so the severities are not ImageNet-C's")
    report_baseline = None
    if baseline is not None and names:
        error, base_error = 1 - accuracy[0], 1 - accuracy[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            ce = error.sum(1) / base_error.sum(1)
            relative = (error - (1 - clean[0])).sum(1) / (base_error - (1 - clean[1])).sum(1)
        report_baseline = {
            "checkpoint": baseline, "clean_accuracy": float(clean[1]),
            "corruptions": {name: {str(s): float(accuracy[1, c, i])
                                   for i, s in enumerate(severities)}
                            for c, name in enumerate(names)},
            "ce": {name: float(ce[c]) for c, name in enumerate(names)},
            "mce": float(np.mean(ce)), "relative_mce": float(np.mean(relative))}
    attack_report = None
    if attack is not None:
        attack_report = {"method": attack, "norm": norm, "steps": steps if attack == "pgd" else 1,
                         "eps": {label: value for label, value in eps},
                         "accuracy": {label: float(sums["attack"][i] / total)
                                      for i, (label, _) in enumerate(eps)}}
    return RobustnessReport(
        checkpoint=checkpoint, split=split, num_examples=int(total),
        clean_accuracy=float(clean[0]),
        ece=calibration.expected_calibration_error(sums["calibration"]),
        calibration=np.asarray(sums["calibration"]).tolist(), corruption_source=source,
        corruptions=table,
        mean_corruption_accuracy=float(accuracy[0].mean()) if names else None,
        families=families, attack=attack_report, baseline=report_baseline, notes=notes,
        seconds=seconds)
