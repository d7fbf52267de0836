"""The classification loss a run trains with (`config.loss`), and its evaluation loss.

- "softmax_xent" (the default): cross-entropy of the softmax over the classes, as timm and
  the ViT papers' ImageNet-1k recipes train.
- "sigmoid_xent": one binary cross-entropy per class, summed over the classes: big_vision's
  `sigmoid_xent`, which its ImageNet-21k ViT / AugReg pretraining uses, and DeiT III's BCE
  up to the constant factor 1 / classes. Start the head's bias low
  (`model.head_bias_init`, e.g. -log(classes)) so that the first steps do not spend
  themselves pushing every negative class down.

Both take target distributions (smoothed, mixed: vit/mix.py). Predictions, top-k and the
probabilities that `vit predict`, the exports and calibration report are the softmax of the
logits under either loss; the evaluation's loss figure is the run's own loss.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

LOSSES = ("softmax_xent", "sigmoid_xent")
DEFAULT = "softmax_xent"


def check_loss(name: str) -> str:
    """`name` if it is one of LOSSES, else a one-line ValueError naming the choices."""
    if name not in LOSSES:
        raise ValueError(f"config.loss={name!r} is unknown; use one of {', '.join(LOSSES)}")
    return name


def per_example(logits: jax.Array, targets: jax.Array, name: str) -> jax.Array:
    """The loss `name` of each row of `logits` [..., classes] against the target
    distributions `targets` (same shape): [...]."""
    if check_loss(name) == "sigmoid_xent":
        return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)
    return optax.softmax_cross_entropy(logits, targets)


def _mean_of_views(log_probs: Sequence[jax.Array]) -> jax.Array:
    """log of the mean of the probabilities whose logs are `log_probs`, computed stably."""
    if len(log_probs) == 1:
        return log_probs[0]
    return functools.reduce(jnp.logaddexp, log_probs) - jnp.log(float(len(log_probs)))


def mean_log_softmax(views: Sequence[jax.Array]) -> jax.Array:
    """log of the mean over views of the softmax of each view's logits [batch, classes]."""
    return _mean_of_views([jax.nn.log_softmax(v) for v in views])


def label_loss(views: Sequence[jax.Array], labels: jax.Array, name: str) -> jax.Array:
    """The loss `name` of integer `labels` [batch] under the mean of the probabilities of one
    or more views' logits [batch, classes] (test-time augmentation): [batch]. One view gives
    `per_example` of the one-hot labels."""
    pick = lambda x: jnp.take_along_axis(x, labels[:, None], axis=-1)[:, 0]
    if check_loss(name) == "softmax_xent":
        return -pick(mean_log_softmax(views))
    log_yes = _mean_of_views([jax.nn.log_sigmoid(v) for v in views])
    log_no = _mean_of_views([jax.nn.log_sigmoid(-v) for v in views])
    return -(jnp.sum(log_no, axis=-1) + pick(log_yes) - pick(log_no))
