"""Few-shot linear evaluation: how well a checkpoint's features tell a dataset's classes apart
from k labelled examples per class (the protocol of big_vision's fewshot_lsr evaluator).

Features are the head's input (the pooled token, after `pre_logits` where there is one) of
each image's evaluation crop, computed once per split. For each seed, k examples per class are
drawn from the train split; a ridge regression of the +-1 one-hot targets on the features
(standardised by those k-shot examples' mean and std, with a constant feature of 100 as an
almost unregularised bias) is fitted in float64, and its argmax is scored on the whole test
split. The head itself is never used, so the dataset may have other classes than the model.

Training runs it at every evaluation when `config.fewshot.shots` is set (`default_config`).
Importing this module needs no TensorFlow (config_schema reads its config block); reading the
images does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vit import data_options, parallel
from vit.model import VisionTransformer
from vit.normalization import normalize_on_device

if TYPE_CHECKING:
    from vit.checkpoint import CheckpointContents

PyTree = Any
SHOTS = (1, 5, 10, 25)
L2_REG = 2.0**10  # big_vision's default for whitened features
BIAS_FEATURE = 100.0


class FewshotError(ValueError):
    """A few-shot evaluation that cannot run as asked (too few examples of a class, ...)."""


def default_config() -> ml_collections.ConfigDict:
    """`config.fewshot`: the few-shot probe run at each evaluation of a training run."""
    c = ml_collections.ConfigDict()
    c.shots = ()  # examples per class, e.g. (1, 5, 10, 25); () = off
    c.seeds = 1  # draws of the shots, each scored
    c.l2_reg = L2_REG
    c.dataset = ml_collections.FieldReference(None, field_type=str)  # None: the run's dataset
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.train_split = "train"  # where the shots are drawn from: a slice is faster
    c.test_split = "test"
    return c


def check_config(fs: ml_collections.ConfigDict) -> None:
    """FewshotError (one line) for a bad `config.fewshot` block."""
    if fs.shots:
        check_shots(fs.shots, int(fs.seeds), float(fs.l2_reg))


@dataclasses.dataclass
class FewshotResult:
    """accuracy: {shots: [test accuracy per seed]}."""

    dataset: str
    train_split: str
    test_split: str
    num_classes: int
    feature_dim: int
    l2_reg: float
    accuracy: dict[int, list[float]]
    seconds: float

    def mean(self, shots: int) -> float:
        """The mean test accuracy over the seeds at `shots` examples per class."""
        return float(np.mean(self.accuracy[shots]))

    def to_dict(self) -> dict:
        """A JSON-serialisable dict, with the per-shot means."""
        out = dataclasses.asdict(self)
        out["accuracy"] = {str(k): v for k, v in self.accuracy.items()}
        out["mean_accuracy"] = {str(k): self.mean(k) for k in self.accuracy}
        return out

    def summary(self) -> str:
        """One line per shot count: mean accuracy and its range over the seeds."""
        head = (f"few-shot linear probe on {self.dataset} ({self.num_classes} classes, "
                f"{self.feature_dim}-d features; train {self.train_split!r}, test "
                f"{self.test_split!r}, l2 {self.l2_reg:g}, {self.seconds:.1f} s)")
        lines = [f"{k:>3}-shot  {self.mean(k):.2%}  (seeds: "
                 + ", ".join(f"{a:.2%}" for a in v) + ")" for k, v in self.accuracy.items()]
        return "\n".join([head, *lines])


def head_input(model: VisionTransformer, params: PyTree, images: jax.Array) -> jax.Array:
    """The features `model` feeds its classification head, [batch, dim] float32."""
    captured = []

    def capture(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.module.scope.path == ("head",) and context.method_name == "__call__":
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        model.apply({"params": params}, images, train=False)
    return captured[0].astype(np.float32)


@functools.lru_cache(maxsize=8)
def _features_step(model: VisionTransformer, normalization: str) -> Callable:
    def step(params: PyTree, images: jax.Array) -> jax.Array:
        return head_input(model, params, normalize_on_device(images, normalization))

    return jax.pmap(step, axis_name=parallel.AXIS)


def split_features(model: VisionTransformer, params: PyTree, config: ml_collections.ConfigDict,
                   split: str, *, batch_size: int | None = None,
                   replicated: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, dim] float32, labels [N]) of every example of `split`, in the split's
    order, on every process."""
    feats, labels = variant_features(model, {"": params}, config, split,
                                     batch_size=batch_size, replicated=replicated)
    return feats[""], labels


def variant_features(model: VisionTransformer, variants: Mapping[str, PyTree],
                     config: ml_collections.ConfigDict, split: str, *,
                     batch_size: int | None = None, replicated: bool = False
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`split_features` for several parameter sets of `model` in one pass over the split:
    ({name: features [N, dim]}, labels [N])."""
    from vit import data

    step = _features_step(model, config.pp.normalize)
    device_params = {name: params if replicated else parallel.replicate(params)
                     for name, params in variants.items()}
    feats: dict[str, list] = {name: [] for name in variants}
    labels, masks, in_flight = [], [], []
    for batch in data.eval_iterator(config, split, batch_size=batch_size):
        images = parallel.shard({"image": batch["image"]})["image"]
        in_flight.append({name: step(params, images) for name, params in device_params.items()})
        if len(in_flight) > 1:  # one batch behind: the devices hold two batches' features
            for name, out in in_flight.pop(0).items():
                feats[name].append(_host_rows(out))
        labels.append(batch["label"].reshape(-1))
        masks.append(batch["mask"].reshape(-1))
    for outs in in_flight:
        for name, out in outs.items():
            feats[name].append(_host_rows(out))
    parts = {**{f"features/{name}": np.concatenate(f) for name, f in feats.items()},
             "labels": np.concatenate(labels), "mask": np.concatenate(masks)}
    if jax.process_count() > 1:  # every process saw its own part, padded to the same length
        parts = {k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in
                 multihost_utils.process_allgather(parts).items()}
    keep = parts["mask"].astype(bool)
    return {name: parts[f"features/{name}"][keep] for name in variants}, parts["labels"][keep]


def _host_rows(features: jax.Array) -> np.ndarray:
    """[devices, per_device, dim] device features as host rows [devices * per_device, dim]."""
    return np.asarray(jax.device_get(features)).reshape(-1, features.shape[-1])


def sample_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of each class, drawn with `seed`; FewshotError naming a
    class with fewer examples."""
    rng = np.random.default_rng(seed)
    picked = []
    for cls in range(num_classes):
        where = np.flatnonzero(labels == cls)
        if len(where) < shots:
            raise FewshotError(f"class {cls} has {len(where)} example(s) in the train split, "
                               f"fewer than {shots} shots: use a larger train split or fewer "
                               "shots")
        picked.append(rng.permutation(where)[:shots])
    return np.concatenate(picked)


def ridge_weights(x: np.ndarray, y: np.ndarray, num_classes: int, l2_reg: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights [dim + 1, classes], mean, std) of the ridge regression of +-1 one-hot targets
    on standardised features with a bias feature, solved in float64."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-5
    z = _with_bias((x - mean) / std)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    n, d = z.shape
    if n >= d:  # (z'z + l2 I)^-1 z'y
        w = np.linalg.solve(z.T @ z + l2_reg * np.eye(d), z.T @ targets)
    else:  # the same, as z' (z z' + l2 I)^-1 y: an n x n system
        w = z.T @ np.linalg.solve(z @ z.T + l2_reg * np.eye(n), targets)
    return w, mean, std


def _with_bias(z: np.ndarray) -> np.ndarray:
    return np.concatenate([z, np.full((len(z), 1), BIAS_FEATURE)], axis=1)


def ridge_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                   num_classes: int, l2_reg: float = L2_REG) -> float:
    """Test accuracy of the ridge classifier fitted on (features, labels) `train`."""
    w, mean, std = ridge_weights(*train, num_classes, l2_reg)
    x, y = test
    scores = _with_bias((np.asarray(x, np.float64) - mean) / std) @ w
    return float(np.mean(np.argmax(scores, axis=1) == y))


def check_shots(shots: Sequence[int], seeds: int, l2_reg: float) -> tuple[int, ...]:
    """`shots` as a sorted tuple; FewshotError for a count < 1, no seed or a bad l2_reg."""
    shots = tuple(sorted({int(k) for k in shots}))
    if not shots or shots[0] < 1:
        raise FewshotError(f"shots must be counts >= 1, got {list(shots)}: e.g. 1,5,10,25")
    if seeds < 1:
        raise FewshotError(f"seeds must be >= 1, got {seeds}")
    if not np.isfinite(l2_reg) or l2_reg <= 0:
        raise FewshotError(f"l2_reg must be a positive number, got {l2_reg}")
    return shots


def fewshot(model: VisionTransformer, params: PyTree, config: ml_collections.ConfigDict, *,
            train_split: str = "train", test_split: str = "test", shots: Sequence[int] = SHOTS,
            seeds: int = 3, l2_reg: float = L2_REG, batch_size: int | None = None,
            replicated: bool = False) -> FewshotResult:
    """Few-shot accuracy of `model`'s features on config.dataset (its classes, not the head's).

    For each seed s in range(seeds) and k in `shots`, k examples per class of `train_split`
    fit a ridge classifier scored on all of `test_split`.
    """
    return fewshot_variants(model, {"": params}, config, train_split=train_split,
                            test_split=test_split, shots=shots, seeds=seeds, l2_reg=l2_reg,
                            batch_size=batch_size, replicated=replicated)[""]


def check_splits(config: ml_collections.ConfigDict, splits: Mapping[str, str]) -> None:
    """A one-line FewshotError unless each split {what it is: split} of config.dataset holds
    examples (an unknown dataset or split is the DataError of `data.split_size`)."""
    from vit import data

    for name, split in splits.items():
        if data.split_size(config, split) <= 0:
            raise FewshotError(f"{name} {split!r} of {config.dataset!r} holds no examples: use "
                               "a split or slice with some, e.g. 'train[:10000]'")


def fewshot_variants(model: VisionTransformer, variants: Mapping[str, PyTree],
                     config: ml_collections.ConfigDict, *, train_split: str = "train",
                     test_split: str = "test", shots: Sequence[int] = SHOTS, seeds: int = 3,
                     l2_reg: float = L2_REG, batch_size: int | None = None,
                     replicated: bool = False) -> dict[str, FewshotResult]:
    """`fewshot` for several parameter sets of `model` (e.g. {"fewshot": p, "fewshot_ema": e})
    in one pass over each split; each result equals that of `fewshot` with its parameters
    alone, and they share the shots drawn."""
    from vit import data

    shots = check_shots(shots, seeds, l2_reg)
    start = time.perf_counter()
    config = config.copy_and_resolve_references()
    config.train_split, config.eval_split = train_split, test_split
    check_splits(config, {"train split": train_split, "test split": test_split})
    num_classes = data.dataset_info(config).num_classes
    train_x, train_y = variant_features(model, variants, config, train_split,
                                        batch_size=batch_size, replicated=replicated)
    test_x, test_y = variant_features(model, variants, config, test_split,
                                      batch_size=batch_size, replicated=replicated)
    accuracy: dict[str, dict[int, list[float]]] = {
        name: {k: [] for k in shots} for name in variants}
    for seed in range(seeds):
        for k in shots:
            idx = sample_shots(train_y, num_classes, k, seed)
            for name in variants:
                accuracy[name][k].append(ridge_accuracy(
                    (train_x[name][idx], train_y[idx]), (test_x[name], test_y), num_classes,
                    l2_reg))
    seconds = time.perf_counter() - start
    return {name: FewshotResult(config.dataset, train_split, test_split, num_classes,
                                int(train_x[name].shape[1]), float(l2_reg), accuracy[name],
                                seconds)
            for name in variants}


def fewshot_checkpoint(checkpoint: str | os.PathLike | CheckpointContents, *,
                       dataset: str | None = None, data_dir: str | None = None,
                       step: int | None = None, use_ema: bool = False, **kwargs: Any
                       ) -> FewshotResult:
    """`fewshot` on a checkpoint's features; `dataset` (TFDS name or folder:, all of its
    classes) defaults to the one it was trained on (its classes). Other keywords go to
    `fewshot`."""
    from vit.checkpoint import load_checkpoint
    from vit.evaluate import load_inference_model

    contents = (load_checkpoint(os.fspath(checkpoint), step)
                if isinstance(checkpoint, str | os.PathLike) else checkpoint)
    loaded = load_inference_model(contents, use_ema=use_ema)
    config = data_options.on_dataset(loaded.config, dataset, data_dir)
    return fewshot(loaded.model, loaded.params, config, **kwargs)


def run_probe_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config a run's probe (config.fewshot) reads: config.fewshot.dataset (all of its
    classes, from fewshot.data_dir, else the run's data_dir) or the run's own dataset."""
    fs = config.fewshot
    return data_options.on_dataset(config.copy_and_resolve_references(), fs.dataset or None,
                                   (fs.data_dir or None) if fs.dataset else None)


def check_run_probe(config: ml_collections.ConfigDict) -> None:
    """At a run's start-up: a one-line error unless its probe's dataset and both its splits
    hold examples, the train split at least classes x the most shots (a class short of shots
    is found at the first evaluation)."""
    from vit import data

    fs = config.fewshot
    probe = run_probe_config(config)
    probe.train_split, probe.eval_split = fs.train_split, fs.test_split  # not the run's splits
    try:
        check_splits(probe, {
            f"config.fewshot.{key}": fs[key] for key in ("train_split", "test_split")})
        info = data.dataset_info(probe)
    except data_options.DataError as err:
        raise data_options.DataError(f"config.fewshot: {err}") from None
    classes, size = info.num_classes, info.split_sizes[fs.train_split]
    most = max(check_shots(fs.shots, int(fs.seeds), float(fs.l2_reg)))
    if size < classes * most:
        raise FewshotError(f"config.fewshot.train_split {fs.train_split!r} holds {size} examples, "
                           f"fewer than {classes} classes x {most} shots: use a larger split or "
                           "fewer shots")


def run_probe(model: VisionTransformer, variants: Mapping[str, PyTree],
              config: ml_collections.ConfigDict) -> dict[str, float]:
    """{"NAME/{k}shot": mean accuracy} of the probe config.fewshot asks for, for each of the
    replicated parameter sets {NAME: params}, in one pass over each split."""
    fs = config.fewshot
    results = fewshot_variants(
        model, variants, run_probe_config(config), train_split=fs.train_split,
        test_split=fs.test_split, shots=fs.shots, seeds=int(fs.seeds), l2_reg=float(fs.l2_reg),
        replicated=True)
    return {f"{name}/{k}shot": result.mean(k) for name, result in results.items()
            for k in result.accuracy}
