"""Resuming with a changed config: what changed, and whether the checkpoint still fits.

A workdir's checkpoints carry the run config they were written with. On resume the trainer
compares it with the new config and the saved train-state structure (every array's path, shape
and dtype) with the one the new config builds:
- the structures differ (a model shape, the optimizer, EMA on/off, the trainable set,
  `skip_nonfinite` on/off...): `ConfigChangeError`, one line naming the changed keys that
  shape the state (given a way to build the structure, a key whose stored value alone builds
  another structure; other changes, say `lr`, are left out);
- they match: every changed key is allowed and returned, so the trainer can log it.
  `is_harmless` keys (length, logging, evaluation, checkpoint cadence, multi-host address,
  fine-tuning source, experiment tracking) are what a resume is expected to change; any other
  change (say `lr`) is allowed too, and logged as a warning. A changed `total_steps` is
  harmless, but stretches the schedule: `moved_learning_rate` says how the learning rate at the
  resumed step moves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

PyTree = Any

HARMLESS_KEYS = frozenset({
    "total_steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
    "eval_tta", "eval_split", "eval_batch_size", "data_dir", "manual_dir",
    "init_from", "init_keep_head", "init_keep_pre_logits", "init_posemb_method",
    "init_resize_patch", "distributed", "coordinator_address", "num_processes", "process_id",
    "eval_images", "wandb.enabled", "wandb.project", "wandb.entity", "wandb.name", "wandb.tags",
    "wandb.mode", "model.remat",
})
HARMLESS_PREFIXES = ("wandb.", "fewshot.")  # experiment tracking, the few-shot probe
_ABSENT = "<absent>"


class ConfigChangeError(ValueError):
    """The new config builds a train state that the workdir's checkpoint cannot fill."""


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"width": 32}} -> {"model.width": 32}, values as plain JSON types."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


def changed_keys(stored: dict, new: dict, defaults: dict | None = None
                 ) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (stored value, new value)} for every key whose value differs; a key the
    stored config lacks (written before the key existed) is unchanged at its `defaults` value."""
    old, now = flatten(_plain(stored)), flatten(_plain(new))
    default = flatten(_plain(defaults or {}))
    pairs = {key: (old.get(key, _ABSENT), now.get(key, _ABSENT)) for key in set(old) | set(now)}
    return {key: pair for key, pair in sorted(pairs.items()) if pair[0] != pair[1]
            and not (pair[0] == _ABSENT and key in default and pair[1] == default[key])}


def is_harmless(key: str) -> bool:
    """Whether a resume is expected to change `key` (logged at INFO rather than WARNING)."""
    return key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES)


def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def structure(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params/head/kernel": (shape, dtype)} for every array-like leaf of `tree`.

    Takes a train state, its abstract shapes, or orbax's checkpoint metadata tree (dicts and
    lists where the state has dataclasses and tuples: the paths come out the same).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(_key_name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
            for path, leaf in leaves if hasattr(leaf, "shape")}


def _short(value: Any) -> str:
    text = json.dumps(value) if value != _ABSENT else value
    return text if len(text) <= 40 else text[:37] + "..."


def _shapes_state(key: str, stored: Any, built: dict,
                  structure_with: Callable[[str, Any], dict]) -> bool:
    """Whether setting `key` back to its stored value changes the structure the config builds;
    True also when that cannot be built (the key is named rather than hidden)."""
    if stored == _ABSENT:
        return True
    try:
        return structure_with(key, stored) != built
    except Exception:  # any error building it: keep the key in the message
        return True


def check_resume(stored_config: dict, new_config: dict, saved: dict, built: dict,
                 where: str, structure_with: Callable[[str, Any], dict] | None = None
                 ) -> dict[str, tuple[Any, Any]]:
    """The config changes, after checking the saved structure equals the built one.

    `saved` / `built` are `structure(...)` of the checkpoint and of the new run's state;
    `where` names the checkpoint in the error; `structure_with(key, value)`, if given, is the
    structure the new config builds with one key set to `value`, so the error names only the
    keys that change the state. Raises ConfigChangeError (one line) on a mismatch.
    """
    from vit.config_schema import default_config

    changes = changed_keys(stored_config, new_config, default_config().to_dict())
    if saved == built:
        return changes
    culprits = {k: v for k, v in changes.items() if not is_harmless(k)}
    if structure_with is not None:
        culprits = {k: v for k, v in culprits.items()
                    if _shapes_state(k, v[0], built, structure_with)} or culprits
    fix = "resume with the stored values, or train in a new --workdir"
    if culprits:
        named = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in
                          ((k, *v) for k, v in list(culprits.items())[:5]))
        more = f" and {len(culprits) - 5} more" if len(culprits) > 5 else ""
        raise ConfigChangeError(f"the config changes the train state saved in {where}: "
                                f"{named}{more}; {fix}")
    paths = sorted(set(saved) ^ set(built)) or sorted(p for p in saved if saved[p] != built[p])
    first = paths[0]
    raise ConfigChangeError(
        f"the train state this code builds differs from the one saved in {where}, yet no key "
        f"that shapes it changed (first difference: {first} saved {saved.get(first)}, built "
        f"{built.get(first)}); {fix}")


_SCHEDULE_KEYS = ("lr", "warmup_steps", "total_steps", "schedule", "min_lr_ratio")


def moved_learning_rate(config: Any, saved: dict, step: int) -> str | None:
    """The warning when resuming at `step` with another total_steps than the `saved` run
    config's moves the learning rate the run continues at (a decay stretched or shrunk); else
    None (also when the saved schedule keys no longer build a schedule)."""
    import copy

    from vit.optim import learning_rate_schedule

    old = copy.deepcopy(config)
    with old.unlocked():
        old.update({k: saved[k] for k in _SCHEDULE_KEYS if k in saved})
    try:
        before, after = (float(learning_rate_schedule(c)(step)) for c in (old, config))
    except ValueError:  # a saved config of an older version, say: no warning is better
        return None
    if math.isclose(before, after, rel_tol=1e-6, abs_tol=1e-12):
        return None
    old_total_steps = old.total_steps
    return (f"total_steps {old_total_steps} -> {config.total_steps} moves the learning rate at "
            f"step {step} from {before:.4g} to {after:.4g}: the {config.schedule} decay now "
            "runs over the new length")
