"""The training loop: init, pmapped train step, periodic eval, checkpoints, metrics.

`train(config, workdir)` runs a whole job and returns the final metrics. It resumes from the
workdir's latest checkpoint when there is one, so re-running a preempted job continues it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from vit import checkpoint, data, metrics, mix, optim, parallel
from vit.config_schema import validate_config
from vit.model import VisionTransformer, init_params, model_from_config

PyTree = Any
log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss (or the parameters) became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds: resuming restores exactly this."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree | None
    rng: jax.Array


@dataclasses.dataclass
class TrainResult:
    """What a finished (or preempted) run returns: final metrics and the host train state."""

    metrics: dict[str, float]
    state: TrainState
    preempted: bool = False


def create_train_state(params: PyTree, tx: optax.GradientTransformation, rng: jax.Array,
                       use_ema: bool) -> TrainState:
    """A step-0 state around `params`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if use_ema else None, rng=rng)


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_train_step(
    model: VisionTransformer, tx: optax.GradientTransformation, config: Any, num_classes: int
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The per-device step (pmap it with axis_name=parallel.AXIS): mix, grad, pmean, update."""
    schedule = optim.learning_rate_schedule(config)
    ema_decay = optim.ema_decay(config)
    accum = int(config.grad_accum_steps)

    def grads_of(params, images, targets, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
            return _cross_entropy(logits, targets), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, logits, grads

    def accumulated_grads(params, images, targets, rng):
        """Splits the per-device batch into `accum` micro-batches and averages their grads."""
        split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
        micro = (split(images), split(targets), jax.random.split(rng, accum))

        def body(carry, xs):
            loss, logits, grads = grads_of(params, *xs)
            return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), logits

        zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
        (loss, grads), logits = lax.scan(body, zeros, micro)
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
        return loss / accum, logits.reshape(-1, logits.shape[-1]), grads

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        rng = jax.random.fold_in(rng, lax.axis_index(parallel.AXIS))
        mix_rng, dropout_rng = jax.random.split(rng)
        labels = batch["label"]
        targets = mix.smooth_labels(labels, num_classes, float(config.label_smoothing))
        images, targets = mix.mixup_cutmix(
            mix_rng, batch["image"], targets, mixup_alpha=float(config.mixup_alpha),
            cutmix_alpha=float(config.cutmix_alpha))
        if accum > 1:
            loss, logits, grads = accumulated_grads(state.params, images, targets, dropout_rng)
        else:
            loss, logits, grads = grads_of(state.params, images, targets, dropout_rng)
        grads = lax.pmean(grads, parallel.AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optim.ema_update(ema, params, optim.ema_decay_at(state.step, ema_decay))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        step_metrics = {
            "loss": loss,
            # Against the mixed targets' argmax: under mixup / cutmix, the dominant label.
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)),
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
        }
        return new_state, lax.pmean(step_metrics, parallel.AXIS)

    return step


def build_model(config: Any, info: data.DatasetInfo) -> VisionTransformer:
    """The model a run's config describes, sized for the dataset's classes."""
    return model_from_config(config.model, num_classes=info.num_classes,
                             image_size=config.image_size)


def initial_params(config: Any, model: VisionTransformer, rng: jax.Array) -> PyTree:
    """Fresh parameters, or `config.init_from` weights adapted to `model` (fine-tuning)."""
    params = jax.jit(functools.partial(init_params, model))(rng)
    if not config.init_from:
        return params
    from vit import pretrained  # only fine-tuning needs the weight readers

    params, notes = pretrained.load_pretrained(
        config.init_from, model, params, keep_head=config.init_keep_head,
        keep_pre_logits=config.init_keep_pre_logits,
        posemb_method=config.init_posemb_method, resize_patch=config.init_resize_patch)
    for note in notes:
        log.info("init_from %s: %s", config.init_from, note)
    return params


class _StepMetrics:
    """Device metrics of recent steps, fetched to the host (and checked) only when asked."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, dict]] = []
        self._fetched: list[dict[str, float]] = []

    def add(self, step: int, device_metrics: dict) -> None:
        self._pending.append((step, device_metrics))

    def check(self) -> None:
        """Fetch the pending steps; NonFiniteLossError names the first step with a bad loss."""
        for step, values in jax.device_get(self._pending):
            loss = float(values["loss"][0])
            if not np.isfinite(loss):
                raise _non_finite(f"loss became {loss}", step)
            self._fetched.append({k: float(v[0]) for k, v in values.items()})
        self._pending = []

    def window_means(self) -> dict[str, float]:
        """Check, then average every metric over the steps since the last call."""
        self.check()
        means = {k: float(np.mean([m[k] for m in self._fetched])) for k in self._fetched[0]}
        self._fetched = []
        return means


def _non_finite(what: str, step: int) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{what} at step {step}: lower the learning rate (lr) or enable gradient clipping "
        "(grad_clip_norm); the last good checkpoint is kept")


def _check_finite_params(params: PyTree, step: int) -> None:
    if not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params)):
        raise _non_finite("parameters became non-finite", step)


def train(config: Any, workdir: str) -> TrainResult:
    """Train (or resume) the run described by `config` in `workdir`."""
    validate_config(config)
    if config.distributed:
        parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                        config.process_id)
    parallel.per_device_batch(config.batch_size)
    parallel.per_device_batch(config.eval_batch_size)
    info = data.dataset_info(config)
    model = build_model(config, info)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    params = initial_params(config, model, init_rng)
    tx = optim.make_optimizer(config, params)
    state = create_train_state(params, tx, state_rng, use_ema=optim.ema_decay(config) is not None)

    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                   save_every=config.checkpoint_every)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    start, total = int(state.step), int(config.total_steps)
    meta = {"config": config.to_dict(), "dataset_info": info.to_dict()}

    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
    progress = metrics.ProgressBar(total, start, config.batch_size)
    sigterm_received = checkpoint.install_sigterm_handler()
    train_step = jax.pmap(make_train_step(model, tx, config, info.num_classes),
                          axis_name=parallel.AXIS, donate_argnums=(0,))
    batches = parallel.prefetch_to_device(data.train_iterator(config, start_step=start))
    rstate = parallel.replicate(state)
    recent = _StepMetrics()
    final: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0

    def host_state(step: int) -> TrainState:
        recent.check()  # never keep parameters that produced a non-finite loss
        state = parallel.unreplicate(rstate)  # already host numpy
        _check_finite_params(state.params, step)
        return state

    preempted = False

    log.info("training steps %d to %d in %s", start + 1, total, workdir)
    step = start
    try:
        for step in range(start + 1, total + 1):  # noqa: B007 (step is used after the loop)
            rstate, step_metrics = train_step(rstate, next(batches))
            recent.add(step, step_metrics)
            window_steps += 1
            is_last = step == total
            if step % config.log_every == 0 or is_last:
                scalars = recent.window_means()
                elapsed = time.perf_counter() - window_start
                scalars["images_per_s"] = window_steps * config.batch_size / elapsed
                scalars["step_time_s"] = elapsed / window_steps
                scalars = {f"train/{k}": v for k, v in scalars.items()}
                writer.write_scalars(step, scalars)
                writer.flush()
                progress.update(step, loss=scalars["train/loss"])
                final.update(scalars)
                window_start, window_steps = time.perf_counter(), 0
            if (config.eval_every and step % config.eval_every == 0) or is_last:
                final.update(_evaluate(model, rstate, config, step, writer))
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if sigterm_received():
                ckpt.save(step, host_state(step), force=True, **meta)
                preempted = True
                log.warning("SIGTERM: saved step %d to %s; rerun the same command to resume",
                            step, ckpt.directory)
                break
            if step % config.checkpoint_every == 0 or is_last:
                ckpt.save(step, host_state(step), force=is_last, **meta)
    finally:  # also on errors: finish the saves in flight so no checkpoint is left half-written
        ckpt.wait()
        ckpt.close()
        progress.close()
        writer.close()
    return TrainResult(final, host_state(step), preempted)


def _evaluate(model: VisionTransformer, rstate: TrainState, config: Any, step: int,
              writer: metrics.MetricWriter) -> dict[str, float]:
    """Evaluate the current (and EMA) parameters on config.eval_split; log and return them."""
    from vit.evaluate import evaluate

    variants = {"eval": rstate.params}
    if rstate.ema_params is not None:
        variants["eval_ema"] = rstate.ema_params
    scalars = {}
    for prefix, params in variants.items():
        result = evaluate(model, params, config, replicated=True, tta=config.eval_tta)
        scalars.update({f"{prefix}/top1": result.top1, f"{prefix}/top5": result.top5,
                        f"{prefix}/loss": result.loss})
    writer.write_scalars(step, scalars)
    writer.flush()
    log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
    return scalars
