"""The optax chain: learning-rate schedules, AdamW / SGD, clipping, weight-decay mask, EMA.

The chain is  clip_by_global_norm -> adamw | sgd (decoupled, masked weight decay)
-> layer-wise lr decay -> head-only freezing. Every option is a top-level key of the run
config; `default_config()` lists them with their defaults and missing keys fall back to them.

`weight_decay` is decoupled from the learning rate, as big_vision's `wd` and the values papers
quote: each step multiplies every kernel by (1 - weight_decay * lr_t / lr), where lr_t / lr is
the schedule's current share of its peak. It follows the schedule's shape (warmup, decay to
zero) but not its size, so changing `lr` leaves the decay unchanged. (optax.adamw's own
`weight_decay` is multiplied by lr_t: the same decay there is weight_decay / lr.)

`ema_decay` averages the parameters with a warm-up, min(ema_decay, (1 + t) / (10 + t)) at
step t, so that short runs do not evaluate mostly their initial weights.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
TRAINABLE = ("all", "head")

# Top-level parameter groups that train at the full rate under layer-wise lr decay.
_HEAD_GROUPS = ("pre_logits", "MAPHead_0", "head")
# Top-level parameter groups that count as the input layer (below block 0) under layer decay;
# a hybrid's ResNet trunk (vit/resnet.py: conv_root, gn_root, block1, block2, ...) is too.
_EMBED_GROUPS = ("stem", "embedding", "cls", "conv_root", "gn_root")
_TRUNK_STAGE = re.compile(r"block\d+")


class OptimizerConfigError(ValueError):
    """A bad optimiser or schedule option in the config."""


def default_config() -> ml_collections.ConfigDict:
    """The optimiser and schedule keys of a run config, with their defaults."""
    return ml_collections.ConfigDict(dict(
        optimizer="adamw",
        lr=1e-3,
        weight_decay=1e-4,
        b1=0.9,
        b2=0.999,
        momentum=0.9,
        nesterov=False,
        grad_clip_norm=1.0,  # 0 or None: no clipping (0 is what a command line can set)
        schedule="cosine",
        warmup_steps=0,
        total_steps=1000,
        min_lr_ratio=0.0,
        layer_decay=ml_collections.FieldReference(None, field_type=float),
        trainable="all",
        ema_decay=ml_collections.FieldReference(None, field_type=float),
    ))


def _options(config: Any) -> ml_collections.ConfigDict:
    """The optimiser keys of `config` (defaults filled in), validated."""
    values = default_config().to_dict()
    values.update({key: config[key] for key in values if key in config})
    opts = ml_collections.ConfigDict(values)
    _check_choice("optimizer", opts.optimizer, OPTIMIZERS)
    _check_choice("schedule", opts.schedule, SCHEDULES)
    _check_choice("trainable", opts.trainable, TRAINABLE)
    if opts.total_steps < 1:
        raise OptimizerConfigError(f"total_steps must be >= 1, got {opts.total_steps}")
    if not 0 <= opts.warmup_steps <= opts.total_steps:
        raise OptimizerConfigError(
            f"warmup_steps={opts.warmup_steps} must be in [0, total_steps={opts.total_steps}]: "
            "lower warmup_steps or raise total_steps")
    if not 0 < opts.lr < math.inf:
        raise OptimizerConfigError(f"lr must be a finite number > 0, got {opts.lr}")
    if not 0.0 <= opts.min_lr_ratio <= 1.0:
        raise OptimizerConfigError(f"min_lr_ratio must be in [0, 1], got {opts.min_lr_ratio}")
    if opts.min_lr_ratio > 0 and opts.schedule not in ("cosine", "linear"):
        raise OptimizerConfigError(
            f"min_lr_ratio={opts.min_lr_ratio} sets the floor of the cosine and linear decays; "
            f"schedule {opts.schedule!r} has none: set min_lr_ratio=0 or use one of those")
    if not 0 <= opts.weight_decay < math.inf:
        raise OptimizerConfigError(f"weight_decay must be a finite number >= 0, got "
                                   f"{opts.weight_decay}")
    if opts.grad_clip_norm is not None and not 0 <= opts.grad_clip_norm < math.inf:
        raise OptimizerConfigError(
            f"grad_clip_norm must be a finite number >= 0 (0 or None: no clipping), got "
            f"{opts.grad_clip_norm}")
    for key in ("b1", "b2", "momentum"):
        if not 0.0 <= opts[key] < 1.0:
            raise OptimizerConfigError(f"{key} must be in [0, 1), got {opts[key]} (at 1 Adam's "
                                       "bias correction divides by zero)" if key != "momentum"
                                       else f"momentum must be in [0, 1) (0 = none), got "
                                       f"{opts.momentum}")
    if opts.layer_decay is not None and not 0.0 < opts.layer_decay <= 1.0:
        raise OptimizerConfigError(
            f"layer_decay must be in (0, 1] or None (off), got {opts.layer_decay}")
    if opts.ema_decay is not None and not 0.0 <= opts.ema_decay < 1.0:
        raise OptimizerConfigError(
            f"ema_decay must be in [0, 1) or None (no EMA), got {opts.ema_decay}")
    return opts


def check_config(config: Any) -> None:
    """Raise a one-line OptimizerConfigError for a bad optimiser or schedule key of `config`."""
    _options(config)


def _check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise OptimizerConfigError(f"unknown {key} {value!r}; valid values: {', '.join(valid)}")


def learning_rate_schedule(config: Any) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then the `schedule` decay to the end."""
    opts = _options(config)
    peak, warmup, total = opts.lr, opts.warmup_steps, opts.total_steps
    floor = peak * opts.min_lr_ratio
    decay_steps = max(total - warmup, 1)

    def decay(step: jax.Array) -> jax.Array:
        t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if opts.schedule == "cosine":
            return floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        if opts.schedule == "linear":
            return peak + (floor - peak) * t
        if opts.schedule == "rsqrt":
            timescale = max(warmup, 1)
            return peak * jnp.sqrt(timescale / jnp.maximum(step, timescale))
        return jnp.full_like(t, peak)

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        ramp = peak * step / warmup if warmup else peak
        return jnp.where(step < warmup, ramp, decay(step))

    return schedule


def current_lr(config: Any, step: int) -> float:
    """The (base, undecayed-by-layer) learning rate at `step`, for logging."""
    return float(learning_rate_schedule(config)(step))


def _names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def weight_decay_mask(params: PyTree) -> PyTree:
    """True for kernels (patch embedding, Dense, attention); False for biases, norms, embeddings."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _names(p)[-1] == "kernel", params)


def _depth(params: PyTree) -> int:
    blocks = params.get("Transformer", {}) if hasattr(params, "get") else {}
    return sum(1 for name in blocks if name.startswith("encoderblock_"))


def _layer_multiplier(names: tuple[str, ...], depth: int, layer_decay: float) -> float:
    if (names[0] in _EMBED_GROUPS or _TRUNK_STAGE.fullmatch(names[0])
            or "posembed_input" in names or names[-1] == "registers"):
        return layer_decay ** (depth + 1)
    if names[0] == "Transformer" and names[1].startswith("encoderblock_"):
        return layer_decay ** (depth - int(names[1].removeprefix("encoderblock_")))
    return 1.0


def layer_decay_multipliers(params: PyTree, layer_decay: float) -> PyTree:
    """Per-parameter lr multipliers: block i of D gets decay**(D-i), embeddings decay**(D+1)."""
    depth = _depth(params)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: _layer_multiplier(_names(p), depth, layer_decay), params)


def _scale_by_layer_decay(layer_decay: float, depth: int) -> optax.GradientTransformation:
    """Multiplies each update by its layer's lr multiplier (stateless)."""

    def update(updates: PyTree, state: optax.EmptyState, params: PyTree = None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda p, u: u * _layer_multiplier(_names(p), depth, layer_decay), updates)
        return scaled, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _base_optimizer(opts: ml_collections.ConfigDict) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opts)
    # Scaled by lr_t below, so dividing by the peak lr makes the decay lr_t / lr * weight_decay.
    decay = optax.add_decayed_weights(opts.weight_decay / opts.lr, mask=weight_decay_mask)
    if opts.optimizer == "adamw":
        direction = [optax.scale_by_adam(b1=opts.b1, b2=opts.b2)]
    else:
        direction = [optax.trace(opts.momentum, opts.nesterov)] if opts.momentum else []
    return optax.chain(*direction, decay, optax.scale_by_learning_rate(schedule))


def _trainable_labels(params: PyTree, trainable: str) -> PyTree:
    def label(path: tuple[Any, ...], _: Any) -> str:
        return "train" if trainable == "all" or _names(path)[0] == "head" else "freeze"

    return jax.tree_util.tree_map_with_path(label, params)


def trained_grad_norm(grads: PyTree, trainable: str) -> jax.Array:
    """The global norm of the gradients that train (the head's alone under trainable='head'):
    the norm that grad_clip_norm clips."""
    return optax.global_norm(grads if trainable == "all" else grads["head"])


def make_optimizer(config: Any, params: PyTree) -> optax.GradientTransformation:
    """The full optax chain for `config`; `params` fixes the layer-decay depth and head labels."""
    opts = _options(config)
    chain = []
    if opts.grad_clip_norm:  # 0 and None turn clipping off
        chain.append(optax.clip_by_global_norm(opts.grad_clip_norm))
    chain.append(_base_optimizer(opts))
    if opts.layer_decay is not None and opts.layer_decay != 1.0:
        chain.append(_scale_by_layer_decay(opts.layer_decay, _depth(params)))
    tx = optax.chain(*chain)
    if opts.trainable == "all":
        return tx
    if "head" not in params:
        raise OptimizerConfigError(
            "trainable='head' needs a 'head' parameter group; use trainable='all'")
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                                 _trainable_labels(params, opts.trainable))


def ema_update(ema_params: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
    """Exponential moving average step: decay * ema + (1 - decay) * params, computed as
    ema + (1 - decay) * (params - ema), so a parameter that did not move keeps its EMA exactly
    (a frozen one under trainable='head', say)."""
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)


def ema_decay_at(step: jax.Array | int, decay: float) -> jax.Array:
    """The EMA decay used after update `step` (0-based): min(decay, (1 + step) / (10 + step))."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_decay(config: Any) -> float | None:
    """The validated `ema_decay` of `config` (None when EMA is off)."""
    return _options(config).ema_decay

