"""The training step: the train state, the per-device update, the optimizer a run uses.

No TensorFlow and no input pipeline here: `make_train_step` takes batches of uint8 pixels (or
model-ready floats) and labels, so benchmarks (bench/train_mfu.py) run the trainer's own step
where only JAX is installed; vit/trainer.py runs it in the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from vit import adversarial, distill, erasing, losses, mix, nonfinite, optim, parallel
from vit.config_schema import full_token_steps
from vit.model import VisionTransformer
from vit.normalization import normalize_on_device

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds: resuming restores exactly this."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree | None
    rng: jax.Array


def create_train_state(params: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
                       use_ema: bool) -> TrainState:
    """A step-0 state around `params`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if use_ema else None, rng=rng)


def make_train_step(
    model: VisionTransformer, tx: optax.GradientTransformation, config: Any, num_classes: int,
    teacher: distill.Teacher | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """The per-device step (pmap it with axis_name=parallel.AXIS): mix, grad, pmean, update.

    batch["image"] holds uint8 pixels as data.train_iterator yields them, normalised here on
    the device (config.pp.normalize); a float batch is taken as model inputs already. With a
    `teacher` (vit/distill.py) the step takes its parameters as a third argument and the loss
    is config.distill's.
    """
    schedule = optim.learning_rate_schedule(config)
    skip_cap = int(config.get("skip_nonfinite") or 0)  # tx: see train_optimizer
    ema_decay = optim.ema_decay(config)
    accum = int(config.grad_accum_steps)
    adv = config.get("adv_train") or adversarial.default_config()
    loss_name = losses.check_loss(config.get("loss", losses.DEFAULT))
    erase_prob = erasing.check_prob(config.get("random_erase", 0.0))

    def grads_of(params, images, targets, attack_keys, rng, teacher_params):
        """Loss, logits and grads of one (micro-)batch. Its adversarial copy and its teacher's
        logits are made here, so that gradient accumulation bounds their memory too."""
        if adv.method != "none":  # adversarial training: the batch is perturbed, see adv_train
            images = adversarial.perturb_for_training(
                adv, config.pp.normalize, lambda x: model.apply(
                    {"params": params}, x, train=True, rngs={"dropout": rng}),
                images, targets, attack_keys, loss_name)
        taught = None if teacher is None else distill.teacher_logits(
            teacher, teacher_params, images, config.pp.normalize)

        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
            return distill.training_loss(logits, targets, taught, config.get("distill"),
                                         loss_name), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, logits, grads

    def accumulated_grads(params, images, targets, attack_keys, rng, teacher_params):
        """Splits the per-device batch into `accum` micro-batches and averages their grads."""
        split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
        micro = (*jax.tree_util.tree_map(split, (images, targets, attack_keys)),
                 jax.random.split(rng, accum))

        def body(carry, xs):
            loss, logits, grads = grads_of(params, *xs, teacher_params)
            return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), logits

        zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
        (loss, grads), logits = lax.scan(body, zeros, micro)
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
        return loss / accum, logits.reshape(-1, logits.shape[-1]), grads

    def step(state: TrainState, batch: dict, teacher_params: PyTree = None
             ) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        rng = jax.random.fold_in(rng, lax.axis_index(parallel.AXIS))
        # split's keys are fold_in(rng, 0) and (rng, 1): the other streams fold in 2 and up
        mix_rng, dropout_rng = jax.random.split(rng)
        labels = batch["label"]
        targets = mix.smooth_labels(labels, num_classes, float(config.label_smoothing))
        images = normalize_on_device(batch["image"], config.pp.normalize)
        if erase_prob > 0.0:  # its own key: a run without erasing draws what it always drew
            images = erasing.random_erase(jax.random.fold_in(rng, 2), images, erase_prob)
        images, targets = mix.mixup_cutmix(  # on the normalised floats
            mix_rng, images, targets, mixup_alpha=float(config.mixup_alpha),
            cutmix_alpha=float(config.cutmix_alpha))
        attack_keys = None if adv.method == "none" else jax.random.split(
            jax.random.fold_in(rng, 3), images.shape[0])
        if accum > 1:
            loss, logits, grads = accumulated_grads(state.params, images, targets, attack_keys,
                                                    dropout_rng, teacher_params)
        else:
            loss, logits, grads = grads_of(state.params, images, targets, attack_keys,
                                           dropout_rng, teacher_params)
        grads = lax.pmean(grads, parallel.AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = nonfinite.guard(opt_state, skip_cap, optax.apply_updates(state.params, updates),
                                 state.params)
        ema = state.ema_params
        if ema is not None:
            applied = nonfinite.applied_updates(state.opt_state, skip_cap, state.step)
            ema = nonfinite.guard(opt_state, skip_cap, optim.ema_update(
                ema, params, optim.ema_decay_at(applied, ema_decay)), ema)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        step_metrics = {
            "loss": loss,
            # Against the mixed targets' argmax: under mixup / cutmix, the dominant label.
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)),
            "grad_norm": optim.trained_grad_norm(grads, config.get("trainable", "all")),
            "lr": schedule(nonfinite.applied_updates(state.opt_state, skip_cap, state.step)),
            **nonfinite.skip_metrics(opt_state, skip_cap),
        }
        return new_state, lax.pmean(step_metrics, parallel.AXIS)

    return step


def full_tokens_from(config: Any) -> int:
    """The first step that trains with every patch token (`config.full_tokens_fraction`'s tail
    of total_steps); past total_steps when there is none."""
    total = int(config.total_steps)
    return total + 1 - full_token_steps(float(config.get("full_tokens_fraction", 0.0)), total)



def train_optimizer(config: Any, params: PyTree) -> optax.GradientTransformation:
    """The run's optimizer, wrapped for `config.skip_nonfinite` as `make_train_step` expects."""
    return nonfinite.wrap_optimizer(optim.make_optimizer(config, params),
                                    int(config.skip_nonfinite))


def fresh_state(config: Any, params: PyTree, tx: optax.GradientTransformation,
                rng: jax.Array) -> TrainState:
    """The step-0 state of a run: `params`, `tx`'s state, and EMA parameters if the config asks."""
    return create_train_state(params, tx, rng, use_ema=optim.ema_decay(config) is not None)
