"""The training loop: init, pmapped train step, periodic eval, checkpoints, metrics.

`train(config, workdir)` runs a whole job and returns the final metrics. It resumes from the
workdir's latest checkpoint when there is one, so re-running a preempted job continues it; the
faults it survives (preemption, damaged checkpoints, changed configs, failed saves, non-finite
losses) are listed in the README's fault table.
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
import optax
from jax import lax

from vit import (
    adversarial,
    checkpoint,
    config_changes,
    data,
    metrics,
    mix,
    nonfinite,
    optim,
    parallel,
    preprocess,
    wandb_logger,
)
from vit.config_schema import validate_config
from vit.console import is_verbose
from vit.model import VisionTransformer, init_params, model_from_config
from vit.nonfinite import NonFiniteLossError
from vit.preemption import PreemptionWatch

PyTree = Any
log = logging.getLogger(__name__)
__all__ = ["NonFiniteLossError", "TrainResult", "TrainState", "build_model", "create_train_state",
           "initial_params", "make_train_step", "train"]


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
    """The per-device step (pmap it with axis_name=parallel.AXIS): mix, grad, pmean, update.

    batch["image"] holds uint8 pixels as data.train_iterator yields them, normalised here on
    the device (config.pp.normalize); a float batch is taken as model inputs already.
    """
    schedule = optim.learning_rate_schedule(config)
    skip_cap = int(config.get("skip_nonfinite") or 0)  # tx: see train_optimizer
    ema_decay = optim.ema_decay(config)
    accum = int(config.grad_accum_steps)
    adv = config.get("adv_train") or adversarial.default_config()

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
        images = preprocess.normalize_on_device(batch["image"], config.pp.normalize)
        images, targets = mix.mixup_cutmix(  # on the normalised floats
            mix_rng, images, targets, mixup_alpha=float(config.mixup_alpha),
            cutmix_alpha=float(config.cutmix_alpha))
        if adv.method != "none":  # adversarial training: the batch is perturbed, see adv_train
            images = adversarial.perturb_for_training(
                adv, config.pp.normalize, lambda x: model.apply(
                    {"params": state.params}, x, train=True, rngs={"dropout": dropout_rng}),
                images, targets, jax.random.fold_in(rng, 1))
        if accum > 1:
            loss, logits, grads = accumulated_grads(state.params, images, targets, dropout_rng)
        else:
            loss, logits, grads = grads_of(state.params, images, targets, dropout_rng)
        grads = lax.pmean(grads, parallel.AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = nonfinite.guard(opt_state, skip_cap, optax.apply_updates(state.params, updates),
                                 state.params)
        ema = state.ema_params
        if ema is not None:
            ema = nonfinite.guard(opt_state, skip_cap, optim.ema_update(
                ema, params, optim.ema_decay_at(state.step, ema_decay)), ema)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        step_metrics = {
            "loss": loss,
            # Against the mixed targets' argmax: under mixup / cutmix, the dominant label.
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)),
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
            **nonfinite.skip_metrics(opt_state, skip_cap),
        }
        return new_state, lax.pmean(step_metrics, parallel.AXIS)

    return step


def build_model(config: Any, info: data.DatasetInfo) -> VisionTransformer:
    """The model a run's config describes, sized for the dataset's classes."""
    return model_from_config(config.model, num_classes=info.num_classes,
                             image_size=config.image_size)


def train_optimizer(config: Any, params: PyTree) -> optax.GradientTransformation:
    """The run's optimizer, wrapped for `config.skip_nonfinite` as `make_train_step` expects."""
    return nonfinite.wrap_optimizer(optim.make_optimizer(config, params),
                                    int(config.skip_nonfinite))


def fresh_state(config: Any, params: PyTree, tx: optax.GradientTransformation,
                rng: jax.Array) -> TrainState:
    """The step-0 state of a run: `params`, `tx`'s state, and EMA parameters if the config asks."""
    return create_train_state(params, tx, rng, use_ema=optim.ema_decay(config) is not None)


def initial_params(config: Any, model: VisionTransformer, rng: jax.Array,
                   read_init_from: bool = True) -> PyTree:
    """Fresh parameters, or `config.init_from` weights adapted to `model` (fine-tuning).

    `read_init_from=False` skips `init_from`: a resumed run's weights come from its checkpoint.
    """
    params = jax.jit(functools.partial(init_params, model))(rng)
    if not config.init_from or not read_init_from:
        return params
    from vit import pretrained  # only fine-tuning needs the weight readers

    params, notes = pretrained.load_pretrained(
        config.init_from, model, params, keep_head=config.init_keep_head,
        keep_pre_logits=config.init_keep_pre_logits,
        posemb_method=config.init_posemb_method, resize_patch=config.init_resize_patch)
    for note in notes:
        log.info("init_from %s: %s", config.init_from, note)
    return params


def train(config: Any, workdir: str) -> TrainResult:
    """Train (or resume) the run described by `config` in `workdir`.

    A resume restores the latest checkpoint after checking it against `config`
    (vit/config_changes.py) and does not read `init_from` again; a finished run is evaluated
    again. SIGTERM (agreed across processes when distributed, vit/preemption.py) saves the step
    reached and returns `preempted=True`; the SIGTERM handler in place before the call is in
    place after it.
    """
    validate_config(config)
    if wandb_logger.enabled(config):
        wandb_logger.require_wandb(config)  # at start-up: one line when wandb is missing
    if config.distributed:
        parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                        config.process_id)
    parallel.per_device_batch(config.batch_size)
    parallel.per_device_batch(config.eval_batch_size)
    info = data.dataset_info(config)
    model = build_model(config, info)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                   save_every=config.checkpoint_every)
    try:  # also on errors: finish the saves in flight and stop orbax's threads
        with PreemptionWatch(bool(config.distributed)) as watch:
            state, tx = _start_state(config, model, ckpt)
            if int(state.step) >= int(config.total_steps):
                log.info("%s holds a finished run (step %d, total_steps %d): evaluating it",
                         workdir, int(state.step), int(config.total_steps))
                scalars = _evaluate(model, parallel.replicate(state), config, int(state.step))
                return TrainResult(scalars, state)
            return _loop(config, workdir, model, info, tx, state, ckpt, watch)
    finally:
        ckpt.close()


def _start_state(config: Any, model: VisionTransformer, ckpt: checkpoint.Checkpointer
                 ) -> tuple[TrainState, optax.GradientTransformation]:
    """The optimizer and the step-0 state, or the state of the workdir's latest checkpoint."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    latest = ckpt.latest_step()
    params = initial_params(config, model, init_rng, read_init_from=latest is None)
    tx = train_optimizer(config, params)
    state = fresh_state(config, params, tx, state_rng)
    if latest is None:
        return state, tx
    changes = config_changes.check_resume(
        ckpt.metadata(latest).get("config", {}), config.to_dict(),
        config_changes.structure(ckpt.saved_structure(latest)), config_changes.structure(state),
        where=str(ckpt.directory / str(latest)))
    for key, (old, new) in changes.items():
        level = logging.INFO if config_changes.is_harmless(key) else logging.WARNING
        log.log(level, "config.%s changed since the checkpoint: %s -> %s", key, old, new)
    state = ckpt.restore(state, latest)
    log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    return state, tx


def _loop(config: Any, workdir: str, model: VisionTransformer, info: data.DatasetInfo,
          tx: optax.GradientTransformation, state: TrainState, ckpt: checkpoint.Checkpointer,
          watch: PreemptionWatch) -> TrainResult:
    """Steps from `state.step` to total_steps: log, evaluate, checkpoint, stop when preempted."""
    start, total = int(state.step), int(config.total_steps)
    meta = {"config": config.to_dict(), "dataset_info": info.to_dict()}
    writer = _metric_writer(config, workdir, start)
    progress = metrics.ProgressBar(total, start, config.batch_size)
    train_step = jax.pmap(make_train_step(model, tx, config, info.num_classes),
                          axis_name=parallel.AXIS, donate_argnums=(0,))
    batches = parallel.prefetch_to_device(data.train_iterator(config, start_step=start))
    rstate = parallel.replicate(state)
    recent = nonfinite.StepMetrics(int(config.skip_nonfinite))
    final: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0

    def host_state(step: int) -> TrainState:
        recent.check()  # never keep parameters that produced a non-finite loss
        state = parallel.unreplicate(rstate)  # already host numpy
        nonfinite.check_finite_params(state.params, step)
        return state

    preempted = False
    watch.start(start)
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
                progress.update(step, loss=scalars.get("train/loss", float("nan")))
                final.update(scalars)
                window_start, window_steps = time.perf_counter(), 0
            if (config.eval_every and step % config.eval_every == 0) or is_last:
                final.update(_evaluate(model, rstate, config, step, writer))
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if watch.reached(step) and not is_last:  # every process, every step
                ckpt.save(step, host_state(step), force=True, **meta)
                preempted = True
                log.warning("SIGTERM: saved step %d to %s; rerun the same command to resume",
                            step, ckpt.directory)
                break
            if step % config.checkpoint_every == 0 or is_last:
                ckpt.save(step, host_state(step), force=is_last, **meta)
    finally:
        progress.close()
        writer.close()
    return TrainResult(final, host_state(step), preempted)


def _evaluate(model: VisionTransformer, rstate: TrainState, config: Any, step: int,
              writer: metrics.MetricWriter | None = None) -> dict[str, float]:
    """Evaluate the current (and EMA) parameters on config.eval_split, in one pass over the data;
    log (and write) them."""
    from vit.evaluate import evaluate_variants

    variants = {"eval": rstate.params}
    if rstate.ema_params is not None:
        variants["eval_ema"] = rstate.ema_params
    results = evaluate_variants(model, variants, config, replicated=True, tta=config.eval_tta)
    scalars = {}
    for prefix, result in results.items():
        scalars.update({f"{prefix}/top1": result.top1, f"{prefix}/top5": result.top5,
                        f"{prefix}/loss": result.loss})
    if writer is not None:
        writer.write_scalars(step, scalars)
        if writer.enabled and int(config.eval_images) > 0:  # only process 0 draws them
            from vit import reports

            writer.write_images(step, reports.eval_images(
                model, parallel.unreplicate(rstate.params), config, results["eval"]))
        writer.flush()
    log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
    return scalars


def _metric_writer(config: Any, workdir: str, start: int) -> metrics.MetricWriter:
    """Process 0's writer (metrics.jsonl, TensorBoard, W&B when asked), cleared past `start`.

    A fresh run (start 0) also writes its config to TensorBoard as text.
    """
    if jax.process_index() != 0:
        return metrics.MetricWriter(workdir, enabled=False)
    trackers = []
    if wandb_logger.enabled(config):
        trackers.append(wandb_logger.WandbLogger(config, workdir, verbose=is_verbose()))
    writer = metrics.MetricWriter(workdir, start_step=start, trackers=trackers)
    if start == 0:
        writer.write_config(0, config.to_dict())
    return writer
