"""White-box adversarial attacks (FGSM, PGD; L-inf and L2) in pixel space, and adversarial training.

Attacks perturb pixels in [0, 1] and differentiate through the model's own normalisation
(`config.pp.normalize`), so an epsilon means the same whatever the preprocessing: 8/255 is eight
grey levels. Every iterate is projected back onto the epsilon ball and into [0, 1].

Evaluation (`make_attack_step`, pmapped over all local devices) is deterministic:
- "fgsm": one step of size eps from the clean image (Goodfellow et al. 2015; for L2 the step
  follows the normalised gradient).
- "pgd": PGD-k (Madry et al. 2018) whose first step is that FGSM step, followed by k-1 steps of
  2.5 eps / k, each projected. An example counts as robust only if every iterate, the clean image
  included, is classified correctly, so PGD is never weaker than FGSM and eps 0 gives the clean
  accuracy exactly.

Training (`perturb_for_training`, the `adv_train` config keys below) starts from a uniform random
point of the ball: "fgsm" is FGSM with a random start and step 1.25 eps ("Fast is better than
free", Wong et al. 2020); "pgd" is PGD-k with a random start. The perturbation is a pure function
of (params, batch, per-step rng), so a resumed run perturbs exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from vit import losses, parallel
from vit.data_options import NORMALIZATIONS

PyTree = Any
ATTACKS = ("fgsm", "pgd")
NORMS = ("linf", "l2")
TRAIN_METHODS = ("none", *ATTACKS)
_TINY = 1e-12


class AttackError(ValueError):
    """An unknown attack, norm or a bad epsilon / step setting; the message names the fix."""


def default_config() -> ml_collections.ConfigDict:
    """The `adv_train` block of a run config: adversarial training, off by default."""
    c = ml_collections.ConfigDict()
    c.method = "none"  # | "fgsm": random start + one step (Wong et al. 2020) | "pgd": PGD-k
    c.eps = 8 / 255  # radius of the perturbation ball, pixels in [0, 1]
    c.step_size = ml_collections.FieldReference(None, field_type=float)  # None: 1.25 eps for
    # fgsm, 2.5 eps / steps for pgd
    c.steps = 7  # pgd: iterations (each one forward and backward pass)
    c.norm = "linf"  # | "l2"
    return c


def check_attack(attack: str, norm: str, steps: int = 1) -> None:
    """Raise a one-line AttackError for an unknown attack or norm, or steps < 1."""
    if attack not in ATTACKS:
        raise AttackError(f"unknown attack {attack!r}; use one of {', '.join(ATTACKS)}")
    if norm not in NORMS:
        raise AttackError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    if int(steps) < 1:
        raise AttackError(f"attack steps must be >= 1, got {steps}")


def check_config(adv: ml_collections.ConfigDict) -> None:
    """The start-up check of config.adv_train: one-line AttackError naming the bad value."""
    if adv.method not in TRAIN_METHODS:
        raise AttackError(f"config.adv_train.method={adv.method!r} is unknown; use one of "
                          f"{', '.join(TRAIN_METHODS)}")
    if adv.method == "none":
        return
    check_attack(adv.method, adv.norm, adv.steps)
    if not float(adv.eps) > 0:
        raise AttackError(f"config.adv_train.eps must be > 0, got {adv.eps}; e.g. 8/255")
    if adv.step_size is not None and not float(adv.step_size) > 0:
        raise AttackError(f"config.adv_train.step_size must be > 0 or None, got {adv.step_size}")


# ----------------------------------------------------------------------------- pixel space
def _mean_std(kind: str) -> tuple[jax.Array, jax.Array]:
    mean, std = NORMALIZATIONS[kind]
    return jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)


def normalize(pixels: jax.Array, kind: str) -> jax.Array:
    """Pixels in [0, 1] -> model inputs, as vit.preprocess.normalize does for uint8 / 255."""
    mean, std = _mean_std(kind)
    return (pixels - mean) / std


def denormalize(images: jax.Array, kind: str) -> jax.Array:
    """Model inputs -> pixels in [0, 1] (the inverse of `normalize`)."""
    mean, std = _mean_std(kind)
    return images * std + mean


def _norms(x: jax.Array) -> jax.Array:
    """Per-example L2 norms, shaped to broadcast against x."""
    return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(1, x.ndim)), keepdims=True))


def _ascent(grad: jax.Array, norm: str) -> jax.Array:
    """The steepest-ascent direction of unit norm: sign for L-inf, normalised grad for L2."""
    return jnp.sign(grad) if norm == "linf" else grad / jnp.maximum(_norms(grad), _TINY)


def _project(delta: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
    if norm == "linf":
        return jnp.clip(delta, -eps, eps)
    return delta * jnp.minimum(1.0, eps / jnp.maximum(_norms(delta), _TINY))


def random_start(rng: jax.Array, shape: tuple[int, ...], eps: jax.Array, norm: str) -> jax.Array:
    """A uniform random point of the eps ball (L-inf: per pixel; L2: uniform in the ball)."""
    if norm == "linf":
        return jax.random.uniform(rng, shape, jnp.float32, -1.0, 1.0) * eps
    direction_rng, radius_rng = jax.random.split(rng)
    direction = jax.random.normal(direction_rng, shape, jnp.float32)
    direction /= jnp.maximum(_norms(direction), _TINY)
    dims = 1
    for d in shape[1:]:
        dims *= d
    radius = jax.random.uniform(radius_rng, (shape[0],) + (1,) * (len(shape) - 1)) ** (1 / dims)
    return direction * radius * eps


def random_starts(keys: jax.Array, shape: tuple[int, ...], eps: jax.Array, norm: str
                  ) -> jax.Array:
    """`random_start` per example, example i drawn from keys[i] alone: a batch split into
    micro-batches (config.grad_accum_steps) starts where the whole batch would."""
    return jax.vmap(lambda key: random_start(key, (1, *shape[1:]), eps, norm)[0])(keys)


def iterate(
    loss_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]], pixels: jax.Array,
    delta: jax.Array, eps: jax.Array, step_sizes: jax.Array, norm: str,
    labels: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Ascent steps on loss_fn(pixels) -> (summed loss, logits), one per entry of step_sizes.

    Returns the adversarial pixels and, when `labels` are given, whether every iterate (the
    start and the result included) was classified correctly (all True without labels).
    """
    grad_fn = jax.grad(lambda d: loss_fn(pixels + d), has_aux=True)
    # The valid range, widened to hold pixels already outside [0, 1] (random erasing's noise
    # boxes): clipping must never move a pixel further than the attack's own radius.
    low, high = jnp.minimum(pixels, 0.0), jnp.maximum(pixels, 1.0)

    def step(carry, size):
        delta, correct = carry
        grad, logits = grad_fn(delta)
        if labels is not None:
            correct &= jnp.argmax(logits, -1) == labels
        delta = _project(delta + size * _ascent(grad, norm), eps, norm)
        return (jnp.clip(pixels + delta, low, high) - pixels, correct), None

    correct = jnp.ones(pixels.shape[:1], bool)
    delta = jnp.clip(pixels + _project(delta, eps, norm), low, high) - pixels
    (delta, correct), _ = lax.scan(step, (delta, correct), step_sizes)
    adversarial = pixels + delta
    if labels is not None:
        correct &= jnp.argmax(loss_fn(adversarial)[1], -1) == labels
    return adversarial, correct


def eval_step_sizes(attack: str, eps: jax.Array, steps: int) -> jax.Array:
    """FGSM: [eps]; PGD-k: [eps, then k-1 times 2.5 eps / k] (its first step is FGSM's)."""
    if attack == "fgsm":
        return jnp.reshape(eps, (1,))
    rest = jnp.full((steps - 1,), 2.5 / steps, jnp.float32) * eps
    return jnp.concatenate([jnp.reshape(eps, (1,)), rest])


@functools.lru_cache(maxsize=16)
def make_attack_step(model: Any, normalization: str, attack: str, norm: str,
                     steps: int) -> Callable:
    """pmapped (params, uint8 images, labels, eps) -> bool per example: robust at eps.

    `eps` is a replicated scalar (pixels in [0, 1]), so every epsilon runs the same program.
    """
    check_attack(attack, norm, steps)

    def step(params: PyTree, images: jax.Array, labels: jax.Array, eps: jax.Array) -> jax.Array:
        pixels = images.astype(jnp.float32) / 255.0

        def loss_fn(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits = model.apply({"params": params}, normalize(x, normalization), train=False)
            log_probs = jax.nn.log_softmax(logits)
            loss = -jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
            return loss, logits

        start = jnp.zeros_like(pixels)
        sizes = eval_step_sizes(attack, eps, steps)
        return iterate(loss_fn, pixels, start, eps, sizes, norm, labels)[1]

    return jax.pmap(step, axis_name=parallel.AXIS, in_axes=(0, 0, 0, None))


def perturb_for_training(
    adv: ml_collections.ConfigDict, normalization: str,
    logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array, targets: jax.Array,
    example_keys: jax.Array, loss: str = losses.DEFAULT,
) -> jax.Array:
    """The adversarial copy of a normalised training batch (a no-op for method "none").

    `logits_fn` maps model inputs to logits; `targets` are (soft) label distributions;
    `example_keys` one PRNG key per example (its random start). The loss attacked is the
    training loss (`loss` of vit/losses.py), a sum over examples, so each example's
    perturbation depends on that example alone; no gradient flows through the perturbation.
    """
    if adv.method == "none":
        return images
    eps = jnp.float32(adv.eps)
    steps = 1 if adv.method == "fgsm" else int(adv.steps)
    default = 1.25 * adv.eps if adv.method == "fgsm" else 2.5 * adv.eps / steps
    size = float(adv.step_size if adv.step_size is not None else default)
    pixels = denormalize(images, normalization)

    def loss_fn(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = logits_fn(normalize(x, normalization))
        return jnp.sum(losses.per_example(logits, targets, loss)), logits

    start = random_starts(example_keys, pixels.shape, eps, adv.norm)
    sizes = jnp.full((steps,), size, jnp.float32)
    adversarial, _ = iterate(loss_fn, pixels, start, eps, sizes, adv.norm)
    return lax.stop_gradient(normalize(adversarial, normalization))
