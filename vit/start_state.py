"""What a run starts from: fresh or fine-tuned (`init_from`) parameters and the optimizer, or
the workdir's latest checkpoint, checked against the run's config and dataset first."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from vit import checkpoint, config_changes, data
from vit.config_schema import ConfigError
from vit.model import VisionTransformer, init_params, model_from_config
from vit.train_step import TrainState, fresh_state, train_optimizer

PyTree = Any
log = logging.getLogger(__name__)


def build_model(config: Any, info: data.DatasetInfo) -> VisionTransformer:
    """The model a run's config describes, sized for the dataset's classes."""
    return model_from_config(config.model, num_classes=info.num_classes,
                             image_size=config.image_size)


def initial_params(config: Any, model: VisionTransformer, rng: jax.Array,
                   read_init_from: bool = True,
                   class_names: tuple[str, ...] | None = None) -> PyTree:
    """Fresh parameters, or `config.init_from` weights adapted to `model` (fine-tuning; a head
    trained on other `class_names` than the run's is re-initialised unless init_keep_head).

    `read_init_from=False` skips `init_from`: a resumed run's weights come from its checkpoint.
    """
    params = jax.jit(functools.partial(init_params, model))(rng)
    if not config.init_from or not read_init_from:
        return params
    from vit import pretrained  # only fine-tuning needs the weight readers

    fresh = params
    params, notes = pretrained.load_pretrained(
        config.init_from, model, params, keep_head=config.init_keep_head,
        keep_pre_logits=config.init_keep_pre_logits,
        posemb_method=config.init_posemb_method, resize_patch=config.init_resize_patch,
        class_names=class_names, normalize=config.pp.normalize)
    if config.get("trainable") == "head" and "pre_logits" in params and all(
            np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params["pre_logits"]),
                                                 jax.tree_util.tree_leaves(fresh["pre_logits"]),
                                                 strict=True)):
        raise ConfigError("trainable='head' trains the head alone, but the pre_logits layer is "
                          "freshly initialised, so it would stay random: keep the source's "
                          "(--config.init_keep_pre_logits=True), build the model without it (no "
                          "model.representation_size), or set trainable=all")
    for note in notes:
        level = logging.WARNING if note.startswith("the weights learned on") else logging.INFO
        log.log(level, "init_from %s: %s", config.init_from, note)
    return params


def start_state(config: Any, model: VisionTransformer, info: data.DatasetInfo,
                 ckpt: checkpoint.Checkpointer) -> tuple[TrainState, optax.GradientTransformation]:
    """The optimizer and the step-0 state, or the state of the workdir's latest checkpoint."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    latest = ckpt.latest_step()
    if latest is None and config.get("init_required") and not config.init_from:
        raise ConfigError("this config fine-tunes (init_required=True) but no init_from was "
                          "given: pass --init_from=WEIGHTS (a workdir, checkpoint, .npz or "
                          ".safetensors), or --config.init_required=False to train from scratch")
    params = initial_params(config, model, init_rng, read_init_from=latest is None,
                            class_names=info.class_names)
    tx = train_optimizer(config, params)
    state = fresh_state(config, params, tx, state_rng)
    if latest is None:
        return state, tx
    _check_same_classes(ckpt.metadata(latest).get("dataset_info") or {}, info, config, latest)
    changes = config_changes.check_resume(
        ckpt.metadata(latest).get("config", {}), config.to_dict(),
        config_changes.structure(ckpt.saved_structure(latest)), config_changes.structure(state),
        where=str(ckpt.directory / str(latest)), structure_with=_structure_with(config, info))
    for key, (old, new) in changes.items():
        level = logging.INFO if config_changes.is_harmless(key) else logging.WARNING
        log.log(level, "config.%s changed since the checkpoint: %s -> %s", key, old, new)
    if "total_steps" in changes:
        moved = config_changes.moved_learning_rate(
            config, ckpt.metadata(latest).get("config", {}), latest)
        if moved:
            log.warning(moved)
    state = ckpt.restore(state, latest)
    log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    return state, tx


def _check_same_classes(saved: dict, info: data.DatasetInfo, config: Any, step: int) -> None:
    """A one-line DataError when the dataset's classes differ from those the checkpoint of
    `step` was trained on (a renamed, added or removed class folder): label ids would change
    meaning mid-run."""
    before = saved.get("class_names")
    change = data.class_change(before, info.class_names) if before else None
    if change is None:
        return
    raise data.DataError(
        f"the classes of {config.dataset!r} changed since checkpoint {step} ({change}), so the "
        "head's label ids would change meaning; restore the dataset's classes to resume, or "
        "fine-tune on the new ones in a new workdir with --config.init_from=<this workdir>")


def _structure_with(config: Any, info: data.DatasetInfo) -> Callable[[str, Any], dict]:
    """(dotted key, value) -> the train-state structure `config` builds with that one value;
    shapes only (jax.eval_shape), nothing is initialised."""

    def build(key: str, value: Any) -> dict:
        changed = copy.deepcopy(config)
        *parents, leaf = key.split(".")
        node = changed
        for name in parents:
            node = node[name]
        with changed.unlocked(), changed.ignore_type():
            node[leaf] = value
        model = build_model(changed, info)

        def make() -> TrainState:
            params = init_params(model, jax.random.PRNGKey(0))
            return fresh_state(changed, params, train_optimizer(changed, params),
                               jax.random.PRNGKey(0))

        return config_changes.structure(jax.eval_shape(make))

    return build
