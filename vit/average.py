"""Average checkpoints' parameters: the last N of one run (timm's `avg_checkpoints.py`), or
fine-tuned runs of one model (a uniform model soup, Wortsman et al. 2022).

Every checkpoint must hold the same model (the run config's `model` block, but for the keys of
TRAINING_ONLY_MODEL_KEYS such as drop_path_rate or remat, and the image size) and the same
classes; the output is a checkpoint of the mean parameters (float64 sums, stored in
the parameters' dtype) that `vit eval`, `predict`, `export` and the rest read like any other,
with the first checkpoint's run config and the newest step among them. int8 checkpoints are
refused: average the float checkpoints, then quantize.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from vit.checkpoint import CheckpointContents, checkpoint_steps, load_checkpoint, write_params
from vit.error_text import first_names

# Model keys that change how a model trains, not its parameters (the average keeps the first's).
TRAINING_ONLY_MODEL_KEYS = frozenset({
    "remat", "attention_impl", "dropout_rate", "attention_dropout_rate", "drop_path_rate",
    "token_keep_ratio", "dtype", "matmul_dtype", "matmul_impl", "elementwise_impl"})


class AverageError(ValueError):
    """Checkpoints that cannot be averaged (another model, other classes, int8, ...)."""


@dataclasses.dataclass
class AverageResult:
    """Where the averaged checkpoint went and what went into it."""

    path: str
    sources: list[str]  # "<checkpoint dir>@<step>" of each averaged checkpoint

    def summary(self) -> str:
        """One line for the console."""
        return (f"averaged {len(self.sources)} checkpoints ({', '.join(self.sources)}) -> "
                f"{self.path}")


def _chosen(paths: Sequence[str], last: int | None) -> list[tuple[str, int | None]]:
    """(path, step) pairs: each path's latest step, or the `last` steps of the one path."""
    if last is None:
        if len(paths) < 2:
            raise AverageError("give two or more checkpoints to average, or one run with "
                               "--last N (its last N checkpoints)")
        return [(p, None) for p in paths]
    if len(paths) != 1 or last < 2:
        raise AverageError(f"--last N takes one run and N >= 2, got {len(paths)} path(s) and "
                           f"N={last}")
    steps = checkpoint_steps(paths[0])
    if len(steps) < last:
        raise AverageError(f"{paths[0]} holds {len(steps)} checkpoint(s) ({steps}), fewer than "
                           f"--last {last}: lower N or keep more (config.keep_checkpoints)")
    return [(paths[0], step) for step in steps[-last:]]


def _model_keys(contents: CheckpointContents) -> dict:
    model = contents.config.get("model") or {}
    return {k: v for k, v in model.items() if k not in TRAINING_ONLY_MODEL_KEYS}


def _check_same_model(first: CheckpointContents, other: CheckpointContents, where: str) -> None:
    ours, theirs = _model_keys(first), _model_keys(other)
    changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if changed:
        diffs = ", ".join(f"model.{k}={theirs.get(k)!r} against {ours.get(k)!r}" for k in changed)
        raise AverageError(f"{where} holds another model ({diffs}): average checkpoints of one "
                           "model")
    if first.config.get("image_size") != other.config.get("image_size"):
        raise AverageError(f"{where} holds another image size ({other.config.get('image_size')} "
                           f"against {first.config.get('image_size')}): average checkpoints of "
                           "one model")
    for what, key in (("input normalisation", "normalize"), ("evaluation resize", "eval_resize")):
        ours, theirs = ((c.config.get("pp") or {}).get(key) for c in (first, other))
        if ours != theirs:
            raise AverageError(f"{where} was trained with another {what} (pp.{key}={theirs!r} "
                               f"against {ours!r}): the average would be run with the first's; "
                               "average checkpoints trained alike")
    names = (first.dataset_info.get("class_names"), other.dataset_info.get("class_names"))
    if names[0] != names[1]:
        raise AverageError(f"{where} has other classes ({first_names(names[1] or [])} against "
                           f"{first_names(names[0] or [])}): average checkpoints of one head")


def average_checkpoints(paths: Sequence[str], out: str, *, last: int | None = None,
                        use_ema: bool = False) -> AverageResult:
    """Write the mean parameters (or EMA parameters) of the checkpoints `paths` name (each a
    workdir, checkpoints or step dir: its latest step), or of the `last` N of one run, to
    workdir `out`."""
    chosen = _chosen(paths, last)
    first, total, sources, steps = None, None, [], []
    for path, step in chosen:
        contents = load_checkpoint(path, step)
        where = f"{path}@{contents.step}"
        steps.append(contents.step)
        if contents.config.get("model", {}).get("quant", "none") != "none":
            raise AverageError(f"{where} is an int8 checkpoint: average the float checkpoints, "
                               "then quantize the result")
        params = contents.chosen_params(use_ema)
        if first is None:
            first = contents
            total = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
        else:
            _check_same_model(first, contents, where)
            if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(total):
                raise AverageError(f"{where} holds other parameters than {sources[0]}: average "
                                   "checkpoints of one model")
            total = jax.tree_util.tree_map(lambda t, x: t + np.asarray(x, np.float64), total,
                                           params)
        sources.append(where)
    mean = jax.tree_util.tree_map(
        lambda t, x: (t / len(chosen)).astype(np.asarray(x).dtype), total,
        first.chosen_params(use_ema))
    path = write_params(out, max(steps), mean, first.config, first.dataset_info)
    return AverageResult(path, sources)
