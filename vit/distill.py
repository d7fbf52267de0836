"""Knowledge distillation: train a (smaller, pruned) student on a trained teacher's outputs.

`config.distill.teacher` names a checkpoint of this toolkit (a workdir, its checkpoints/ or a
step; `vit convert` makes one of timm / HF / vit_jax weights). Each train step runs the teacher
on the student's own batch (after mixup / cutmix and any adversarial perturbation, mapped to
the teacher's normalisation and resized to its image size) and the loss becomes

    (1 - alpha) * LOSS(targets, student) + alpha * T^2 * CE(softmax(teacher / T), student / T)

for mode "soft" (Hinton et al. 2015; at T = 1 big_vision's function matching; the cross-entropy
differs from the KL divergence by the teacher's entropy, a constant, so the gradients are the
KL's), or, for mode "hard" (DeiT), LOSS with the teacher's argmax as a one-hot target in the
second term and no temperature. LOSS is the run's `config.loss` (vit/losses.py). The teacher
is frozen: its parameters are replicated once and never saved with the student. No TensorFlow
here (the train step imports this); `load_teacher` reads a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit import losses
from vit.data_options import NORMALIZATIONS
from vit.model import VisionTransformer

PyTree = Any
MODES = ("soft", "hard")


class DistillError(ValueError):
    """A distillation that cannot run as configured (a teacher of other classes, ...)."""


def default_config() -> ml_collections.ConfigDict:
    """`config.distill`: off until `teacher` names a checkpoint."""
    c = ml_collections.ConfigDict()
    c.teacher = ml_collections.FieldReference(None, field_type=str)  # a checkpoint; None = off
    c.alpha = 0.5  # weight of the teacher's term; 1 - alpha stays on the labels
    c.temperature = 1.0  # "soft" only
    c.mode = "soft"  # | "hard": the teacher's argmax as a label (DeiT)
    c.use_ema = False  # the teacher checkpoint's EMA parameters
    return c


def check_config(distill: ml_collections.ConfigDict) -> None:
    """DistillError (one line) for a bad `config.distill` block."""
    if distill.mode not in MODES:
        raise DistillError(f"mode={distill.mode!r} is unknown; use one of {', '.join(MODES)}")
    if not 0.0 <= float(distill.alpha) <= 1.0:
        raise DistillError(f"alpha must be in [0, 1] (the teacher's share of the loss), got "
                           f"{distill.alpha}")
    if not (math.isfinite(float(distill.temperature)) and float(distill.temperature) > 0):
        raise DistillError(f"temperature must be a positive number, got {distill.temperature}")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen model and what it expects: its own image size and normalisation."""

    model: VisionTransformer
    params: PyTree
    normalize: str


def load_teacher(config: Any, class_names: Sequence[str]) -> Teacher | None:
    """The teacher `config.distill` names (None when distillation is off); a one-line
    DistillError for a checkpoint that cannot be read or whose head has other classes than
    `class_names` (the student's: their number, or their names where both sides name them)."""
    from vit.checkpoint import CheckpointError  # reads checkpoints: TensorFlow-side
    from vit.error_text import first_names
    from vit.evaluate import load_inference_model
    from vit.weight_formats import has_real_class_names

    distill = config.get("distill")
    if distill is None or not distill.teacher:
        return None
    try:
        loaded = load_inference_model(distill.teacher, use_ema=bool(distill.use_ema))
    except CheckpointError as err:
        raise DistillError(f"config.distill.teacher: {err}") from None
    theirs, ours = tuple(loaded.info.class_names), tuple(class_names)
    if len(theirs) != len(ours):
        raise DistillError(f"teacher {distill.teacher!r} has {len(theirs)} classes but the "
                           f"student's dataset has {len(ours)}: distil from a teacher trained "
                           "on the same classes")
    if theirs != ours and has_real_class_names(theirs) and has_real_class_names(ours):
        raise DistillError(f"teacher {distill.teacher!r} was trained on other classes "
                           f"({first_names(theirs)}) than the student's ({first_names(ours)}): "
                           "distil from a teacher of the same classes, in the same order")
    return Teacher(loaded.model, loaded.params, str(loaded.config.pp.normalize))


def renormalize(images: jax.Array, source: str, target: str) -> jax.Array:
    """Float images normalised as `source` -> the same pixels normalised as `target`."""
    if source == target:
        return images
    (m0, s0), (m1, s1) = (map(jnp.asarray, NORMALIZATIONS[k]) for k in (source, target))
    return ((images * s0 + m0) - m1) / s1


def teacher_logits(teacher: Teacher, params: PyTree, images: jax.Array,
                   student_normalize: str) -> jax.Array:
    """The teacher's float32 logits (no gradient) for the student's normalised `images`."""
    x = renormalize(images, student_normalize, teacher.normalize)
    height, width = teacher.model.image_size
    if x.shape[1:3] != (height, width):
        x = jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear")
    logits = teacher.model.apply({"params": params}, x, train=False)
    return jax.lax.stop_gradient(logits.astype(jnp.float32))


def distillation_loss(logits: jax.Array, targets: jax.Array, teacher: jax.Array,
                      distill: ml_collections.ConfigDict, loss: str = losses.DEFAULT
                      ) -> jax.Array:
    """The mean per-example loss of the module docstring; `targets` are the (smoothed, mixed)
    label distributions, `loss` the run's LOSS."""
    alpha = float(distill.alpha)
    labels = losses.per_example(logits, targets, loss)
    if distill.mode == "hard":
        hard = jax.nn.one_hot(jnp.argmax(teacher, -1), teacher.shape[-1])
        taught = losses.per_example(logits, hard, loss)
    else:
        t = float(distill.temperature)
        taught = t * t * optax.softmax_cross_entropy(logits / t, jax.nn.softmax(teacher / t))
    return ((1.0 - alpha) * labels + alpha * taught).mean()


def training_loss(logits: jax.Array, targets: jax.Array, teacher: jax.Array | None,
                  distill: ml_collections.ConfigDict, loss: str = losses.DEFAULT) -> jax.Array:
    """The mean loss of a train step: the run's `loss` (vit/losses.py) on `targets`, or with
    the teacher's logits `distillation_loss`."""
    if teacher is None:
        return losses.per_example(logits, targets, loss).mean()
    return distillation_loss(logits, targets, teacher, distill, loss)
