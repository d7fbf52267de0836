"""The training loop: init, pmapped train step, periodic eval, checkpoints, metrics.

`train(config, workdir)` runs a whole job and returns the final metrics. It resumes from the
workdir's latest checkpoint when there is one, so re-running a preempted job continues it; the
faults it survives (preemption, damaged checkpoints, changed configs, failed saves, non-finite
losses) are listed in the README's fault table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import jax
import optax

from vit import (
    checkpoint,
    data,
    distill,
    fewshot,
    metrics,
    nonfinite,
    parallel,
    sources,
    wandb_logger,
)
from vit.config_schema import ConfigError, run_fingerprint, validate_config
from vit.console import is_verbose
from vit.error_text import first_names
from vit.model import VisionTransformer
from vit.nonfinite import NonFiniteLossError
from vit.output_paths import OutputPathError, missing_folders, remove_empty
from vit.preemption import PreemptionWatch
from vit.start_state import build_model, initial_params, start_state
from vit.train_step import (
    TrainState,
    create_train_state,
    fresh_state,
    full_tokens_from,
    make_train_step,
    train_optimizer,
)

PyTree = Any
log = logging.getLogger(__name__)
__all__ = ["NonFiniteLossError", "TrainResult", "TrainState", "build_model", "create_train_state",
           "fresh_state", "initial_params", "make_train_step", "train", "train_optimizer"]


_LOG_WINDOW = "log_window"  # checkpoint metadata: the metrics logged since the last log step


@dataclasses.dataclass
class TrainResult:
    """What a finished (or preempted) run returns: final metrics and the host train state.

    `before_first_step`: SIGTERM came during start-up, so the run stopped without a step.
    """

    metrics: dict[str, float]
    state: TrainState
    preempted: bool = False
    before_first_step: bool = False


def train(config: Any, workdir: str) -> TrainResult:
    """Train (or resume) the run described by `config` in `workdir`.

    A resume restores the latest checkpoint after checking it against `config`
    (vit/config_changes.py) and does not read `init_from` again; a finished run is evaluated
    again. SIGTERM (agreed across processes when distributed, vit/preemption.py) saves the step
    reached and returns `preempted=True`; one during the restore returns `before_first_step=True`
    too, before any step, having nothing new to save. One during the config checks, the dataset
    scan or the model build goes to the SIGTERM handler in place before the call (train.py's
    ends the run at once), which is in place again after the call.
    """
    validate_config(config)
    config.dataset = sources.absolute_dataset(config.dataset)  # the checkpoint names a folder
    if (config.get("fewshot") or {}).get("dataset"):  # that `vit eval` finds from anywhere
        config.fewshot.dataset = sources.absolute_dataset(config.fewshot.dataset)
    if (config.get("distill") or {}).get("teacher"):  # a resume from elsewhere reads it again
        config.distill.teacher = os.path.abspath(config.distill.teacher)
    if wandb_logger.enabled(config):
        wandb_logger.require_wandb(config)  # at start-up: one line when wandb is missing
    if config.distributed:
        parallel.initialize_distributed(config.coordinator_address, config.num_processes,
                                        config.process_id)
        parallel.require_same_on_every_process("config", run_fingerprint(config))
    per_device = parallel.per_device_batch(config.batch_size, "config.batch_size")
    parallel.per_device_batch(config.eval_batch_size, "config.eval_batch_size")
    if per_device % int(config.grad_accum_steps):
        raise ConfigError(
            f"config.grad_accum_steps={config.grad_accum_steps} does not divide the per-device "
            f"batch of {per_device} (config.batch_size={config.batch_size} over "
            f"{jax.device_count()} device(s)): use a divisor of {per_device}")
    unwritable = None  # checked by the process that writes metrics, before anything is written
    if jax.process_index() == 0:
        try:
            metrics.check_output_paths(workdir)
        except OutputPathError as err:
            unwritable = err
    if parallel.on_any_process(unwritable is not None):  # every process stops alike
        raise unwritable or OutputPathError(
            f"process 0 cannot write the run's metrics files in {workdir}: see its error")
    if config.distributed and config.get("download"):
        _prepare_dataset_in_turn(config)
    info = data.dataset_info(config)
    if config.distributed:  # each process scans the folder / opens TFDS on its own
        parallel.require_same_on_every_process(
            "dataset (its classes and split sizes)", json.dumps(info.to_dict(), sort_keys=True),
            f"give every process the same copy of {config.dataset!r} (a missed class folder or "
            "file, another TFDS version under its data_dir)")
    if info.num_classes < 2:
        raise data.DataError(
            f"dataset {config.dataset!r} has {info.num_classes} class "
            f"({first_names(info.class_names, 3)}): a classifier needs at least 2; add class "
            "folders (root/<split>/<class>/) or choose more classes")
    if (config.get("fewshot") or {}).get("shots"):  # found at start-up, not mid-run
        fewshot.check_run_probe(config)
    model = build_model(config, info)
    made = missing_folders(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))
    try:
        with PreemptionWatch(bool(config.distributed)) as watch:
            return _train_watched(config, workdir, model, info, watch)
    except BaseException:  # a bad init_from, say: no empty folder left where nothing was written
        remove_empty(made)
        raise


def _prepare_dataset_in_turn(config: Any) -> None:
    """download=True on several processes: process 0 prepares what it does not find while the
    others wait; they then prepare only what they still do not find (a data_dir on a disk of
    their own), so a shared data_dir is written once. Process 0's failure stops every process."""
    failed = None
    if jax.process_index() == 0:
        try:
            data.dataset_info(config)
        except Exception as err:  # noqa: BLE001 - raised below, once every process knows
            failed = err
    if parallel.on_any_process(failed is not None):  # also the barrier the others wait at
        raise failed or data.DataError(
            f"process 0 could not prepare {config.dataset!r}: see its error")


def _train_watched(config: Any, workdir: str, model: VisionTransformer, info: data.DatasetInfo,
                   watch: PreemptionWatch) -> TrainResult:
    """`train` once the SIGTERM watch is on: open the checkpoints, restore or start, train."""
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                   save_every=config.checkpoint_every)
    try:  # also on errors: finish the saves in flight and stop orbax's threads
        state, tx = start_state(config, model, info, ckpt)
        if watch.signalled:  # SIGTERM during start-up: no step taken, nothing new to save
            return TrainResult({}, state, preempted=True, before_first_step=True)
        if int(state.step) >= int(config.total_steps):
            log.info("%s holds a finished run (step %d, total_steps %d): evaluating it",
                     workdir, int(state.step), int(config.total_steps))
            step = int(state.step)
            writer = None  # the run's own final evaluation is recorded already, unless killed
            if _evaluation_missing(workdir, step):
                writer = _metric_writer(config, workdir, step)
            try:
                scalars = _evaluate(model, parallel.replicate(state), config, step, writer)
            finally:
                if writer is not None:
                    writer.close(failed=sys.exc_info()[0] is not None)
            return TrainResult(scalars, state)
        teacher = distill.load_teacher(config, info.class_names)  # only where steps remain
        return _loop(config, workdir, model, info, tx, state, ckpt, watch, teacher)
    finally:
        ckpt.close()


def _loop(config: Any, workdir: str, model: VisionTransformer, info: data.DatasetInfo,
          tx: optax.GradientTransformation, state: TrainState, ckpt: checkpoint.Checkpointer,
          watch: PreemptionWatch, teacher: distill.Teacher | None = None) -> TrainResult:
    """Steps from `state.step` to total_steps: log, evaluate, checkpoint, stop when preempted."""
    start, total = int(state.step), int(config.total_steps)
    meta = {"config": config.to_dict(), "dataset_info": info.to_dict()}
    writer = _metric_writer(config, workdir, start)
    progress = metrics.ProgressBar(total, start, config.batch_size)

    def pmapped_step(step_model: VisionTransformer) -> Callable:
        """The train step of `step_model` (the run's model, or it with every token kept)."""
        return jax.pmap(make_train_step(step_model, tx, config, info.num_classes, teacher),
                        axis_name=parallel.AXIS, donate_argnums=(0,))

    train_step = pmapped_step(model)
    full_from = full_tokens_from(config)  # then the same parameters, every patch token kept
    frozen = () if teacher is None else (parallel.replicate(teacher.params),)
    batches = parallel.prefetch_to_device(data.train_iterator(config, start_step=start))
    rstate = parallel.replicate(state)
    recent = nonfinite.StepMetrics(int(config.skip_nonfinite))
    if start:  # the steps between the checkpoint's last log step and itself
        recent.restore_window(ckpt.metadata(start).get(_LOG_WINDOW))
    final: dict[str, float] = {}
    shown: dict[str, float] = {}  # the progress line's loss and lr: the latest logged ones
    window = metrics.TrainWindow()

    def host_state(step: int) -> TrainState:
        recent.check()  # never keep parameters that produced a non-finite loss
        state = parallel.unreplicate(rstate)  # already host numpy
        nonfinite.check_finite_params(state.params, step)
        return state

    def save(step: int, force: bool) -> bool:
        state = host_state(step)
        return ckpt.save(step, state, force=force, extra={_LOG_WINDOW: recent.window_state()},
                         **meta)

    last_saved = start

    def save_and_raise(err: ValueError, done: int) -> NoReturn:
        """A bad input file (or too few few-shot examples) mid-run: save step `done` (trained,
        not yet saved) first, when one process runs alone (a save is collective), then stop
        with the error."""
        if done > last_saved and jax.process_count() == 1:
            save(done, force=True)
            raise data.DataError(f"{err} (step {done} was saved first: rerun to resume)") from None
        raise err

    preempted = False
    watch.start(start)
    log.info("training steps %d to %d in %s", start + 1, total, workdir)
    step = start
    try:
        if start and config.eval_every and start % config.eval_every == 0 \
                and _evaluation_missing(workdir, start):
            # killed while evaluating the step it had just saved: that evaluation, then the steps
            with window.excluded():
                final.update(_evaluate(model, rstate, config, start, writer))
        for step in range(start + 1, total + 1):  # noqa: B007 (step is used after the loop)
            try:
                batch = next(batches)
            except data.DataError as err:
                save_and_raise(err, step - 1)
            if step == max(full_from, start + 1) and full_from <= total:
                log.info("steps %d to %d train with every patch token (full_tokens_fraction)",
                         step, total)
                train_step = pmapped_step(model.clone(token_keep_ratio=1.0))
            rstate, step_metrics = train_step(rstate, batch, *frozen)
            recent.add(step, step_metrics)
            window.steps += 1
            is_last = step == total
            if step % config.log_every == 0 or is_last:
                scalars = recent.window_means()
                scalars.update(window.rates(config.batch_size))
                scalars = {f"train/{k}": v for k, v in scalars.items()}
                writer.write_scalars(step, scalars)
                writer.flush()
                shown = {k: scalars[f"train/{k}"] for k in ("loss", "lr")
                         if f"train/{k}" in scalars}
                final.update(scalars)
                window.reset()
            progress.update(step, **shown)  # every step: it prints when its interval is up
            # Saved before evaluating: an evaluation that fails loses no training.
            saved = False
            if step % config.checkpoint_every == 0 or is_last:
                saved = save(step, force=is_last)
                last_saved = step if saved else last_saved
            if (config.eval_every and step % config.eval_every == 0) or is_last:
                with window.excluded():  # evaluation time is not training throughput
                    try:
                        final.update(_evaluate(model, rstate, config, step, writer))
                    except (data.DataError, fewshot.FewshotError) as err:
                        save_and_raise(err, step)
            if watch.reached(step) and not is_last:  # every process, every step
                if not saved:
                    save(step, force=True)
                preempted = True
                log.warning("SIGTERM: saved step %d to %s; rerun the same command to resume",
                            step, ckpt.directory)
                break
    finally:
        progress.close()
        writer.close(failed=sys.exc_info()[0] is not None)
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
    if (config.get("fewshot") or {}).get("shots"):  # eval -> fewshot, eval_ema -> fewshot_ema
        scalars.update(fewshot.run_probe(model, {name.replace("eval", "fewshot"): params
                                        for name, params in variants.items()}, config))
    if writer is not None:
        writer.write_scalars(step, scalars)
        if writer.enabled and int(config.eval_images) > 0:  # only process 0 draws them
            from vit import reports

            writer.write_images(step, reports.eval_images(
                model, parallel.unreplicate(rstate.params), config, results["eval"]))
        writer.flush()
    log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
    return scalars


def _evaluation_missing(workdir: str, step: int) -> bool:
    """Whether metrics.jsonl lacks the evaluation of `step` (process 0's file decides for all)."""
    missing = jax.process_index() == 0 and not metrics.has_scalars(workdir, step, "eval/")
    return parallel.on_any_process(missing)


def _metric_writer(config: Any, workdir: str, start: int) -> metrics.MetricWriter:
    """Process 0's writer (metrics.jsonl, TensorBoard, W&B when asked), cleared past `start`.

    A fresh run (start 0) also writes its config to TensorBoard as text.
    """
    if jax.process_index() != 0:
        return metrics.MetricWriter(workdir, enabled=False)
    trackers = []
    if wandb_logger.enabled(config):
        trackers.append(wandb_logger.WandbLogger(config, workdir, start_step=start,
                                                 verbose=is_verbose()))
    writer = metrics.MetricWriter(workdir, start_step=start, trackers=trackers)
    if start == 0:
        writer.write_config(0, config.to_dict())
    return writer
