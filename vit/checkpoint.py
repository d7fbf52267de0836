"""Checkpoints with orbax: save / restore the TrainState, resume, and load params for inference.

Layout: <workdir>/checkpoints/<step>/{state, metadata}. `state` is the whole TrainState pytree
(step, params, opt_state, ema_params, rng); `metadata` is JSON {"config", "dataset_info"}.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save keeps its last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
CHECKPOINT_DIR = "checkpoints"
_STATE, _METADATA = "state", "metadata"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or unreadable."""


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON types (tuples become lists, unknown objects their str)."""
    return json.loads(json.dumps(value, default=str))


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves the train state every `save_every` steps in <workdir>/checkpoints, keeps a few."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, save_every: int | None = None):
        if save_every is not None and save_every < 1:
            raise CheckpointError(f"save_every must be >= 1 or None, got {save_every}")
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every or 1,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                           _METADATA: ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: PyTree, *, config: dict, dataset_info: dict,
             force: bool = False) -> bool:
        """Save `state` at `step` if it is due (or `force`); True when a save was started."""
        metadata = _jsonable({"config": config, "dataset_info": dataset_info})
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                     _METADATA: ocp.args.JsonSave(metadata)})
        return bool(self._manager.save(int(step), args=args, force=force))

    def latest_step(self) -> int | None:
        """The newest completed step, or None when there is none."""
        return self._manager.latest_step()

    def restore(self, state_template: PyTree, step: int | None = None) -> PyTree:
        """The saved state with `state_template`'s structure, shapes and shardings."""
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available steps: "
                f"{list(self._manager.all_steps()) or 'none'}")
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(_abstract(state_template))})
        try:
            return self._manager.restore(step, args=args)[_STATE]
        except Exception as err:  # orbax raises many types; the user needs one line
            raise CheckpointError(_unreadable(self.directory / str(step), err)) from None

    def wait(self) -> None:
        """Block until any background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.close()


@dataclasses.dataclass
class CheckpointContents:
    """What inference and fine-tuning need from a checkpoint: host numpy params and metadata."""

    step: int
    params: PyTree
    ema_params: PyTree | None
    config: dict
    dataset_info: dict

    def chosen_params(self, use_ema: bool = False) -> PyTree:
        """The EMA parameters when `use_ema` (an error if the run kept none), else the params."""
        if not use_ema:
            return self.params
        if self.ema_params is None:
            raise CheckpointError(f"checkpoint of step {self.step} holds no EMA params: drop "
                                  "--ema / use_ema, or train with ema_decay set")
        return self.ema_params


def _unreadable(path: Path, err: BaseException) -> str:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return (f"cannot read the checkpoint at {path} ({type(err).__name__}: {reason}); it may be "
            "incomplete or corrupt: pass an earlier step or another checkpoint")


def _locate(path: str, step: int | None) -> tuple[Path, int]:
    """The checkpoints directory and the step to read for a workdir, checkpoints or step dir."""
    root = Path(path).absolute()
    if not root.exists():
        raise CheckpointError(f"checkpoint path {root} does not exist: pass a workdir, its "
                              f"{CHECKPOINT_DIR}/ directory or one step directory")
    if (root / CHECKPOINT_DIR).is_dir():
        root = root / CHECKPOINT_DIR
    elif root.name.isdigit() and (root / _STATE).exists():
        if step is not None and step != int(root.name):
            raise CheckpointError(f"{root} holds step {root.name}, not step {step}")
        return root.parent, int(root.name)
    steps = sorted(int(p.name) for p in root.iterdir()
                   if p.name.isdigit() and (p / _STATE).exists())
    if not steps:
        raise CheckpointError(f"no checkpoints in {root}: train first (vit train --workdir ...) or "
                              "point to a directory that holds <step>/state")
    if step is None:
        return root, steps[-1]
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {root}; available steps: {steps}")
    return root, step


def load_checkpoint(path: str, step: int | None = None) -> CheckpointContents:
    """Read params, EMA params and metadata from a checkpoint without a state template."""
    root, step = _locate(path, step)
    step_dir = root / str(step)
    try:
        handler = ocp.StandardCheckpointHandler()
        tree_metadata = handler.metadata(step_dir / _STATE).tree
        wanted = {k: tree_metadata[k] for k in ("step", "params", "ema_params")
                  if tree_metadata.get(k) is not None}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                              wanted)
        tree = ocp.PyTreeCheckpointer().restore(
            step_dir / _STATE,
            args=ocp.args.PyTreeRestore(wanted, restore_args=restore_args, partial_restore=True))
        metadata = ocp.JsonCheckpointHandler().restore(step_dir / _METADATA)
    except Exception as err:  # orbax / tensorstore / json raise many types; one line for the user
        raise CheckpointError(_unreadable(step_dir, err)) from None
    return CheckpointContents(step=step, params=tree["params"], ema_params=tree.get("ema_params"),
                              config=metadata.get("config", {}),
                              dataset_info=metadata.get("dataset_info", {}))


def install_sigterm_handler() -> Callable[[], bool]:
    """Record SIGTERM instead of dying; returns a poll "was SIGTERM received?" for the loop."""
    received = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, handler)
    return lambda: bool(received)
