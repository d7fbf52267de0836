"""Checkpoints with orbax: save / restore the TrainState, resume, and load params for inference.

Layout: <workdir>/checkpoints/<step>/{state, metadata}. `state` is the whole TrainState pytree
(step, params, opt_state, ema_params, rng); `metadata` is JSON {"config", "dataset_info"}.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save keeps its last good checkpoint; the next `Checkpointer` deletes the half-written one.
Every failure (a save that cannot write, a finalized step whose files are damaged) is one
`CheckpointError` line naming the step, the path and the fix; nothing is deleted on an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
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


def _not_an_orbax_error(record: logging.LogRecord) -> bool:
    """Drops orbax's ERROR records (with tracebacks) unless absl logs at INFO (`--verbose`).

    While a Checkpointer is open, every orbax failure reaches the caller as one CheckpointError
    line; orbax's background threads would also log it with a traceback first.
    """
    return (record.levelno < logging.ERROR or "orbax" not in record.pathname
            or logging.getLogger("absl").isEnabledFor(logging.INFO))


_open_checkpointers: list[Checkpointer] = []  # while any is open, the filter above is on


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
        self._started: list[int] = []  # saves begun since the last wait()
        if not _open_checkpointers:
            logging.getLogger("absl").addFilter(_not_an_orbax_error)
        _open_checkpointers.append(self)

    def save(self, step: int, state: PyTree, *, config: dict, dataset_info: dict,
             force: bool = False) -> bool:
        """Save `state` at `step` if it is due (or `force`); True when a save was started.

        The write finishes in the background; a failure (here or in `wait` / `close`) raises
        CheckpointError and leaves the earlier checkpoints as they were.
        """
        metadata = _jsonable({"config": config, "dataset_info": dataset_info})
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                     _METADATA: ocp.args.JsonSave(metadata)})
        try:
            started = bool(self._manager.save(int(step), args=args, force=force))
        except Exception as err:  # orbax, tensorstore and the OS raise many types
            raise CheckpointError(self._save_failed(step, err)) from None
        if started:
            self._started.append(int(step))
        return started

    def _save_failed(self, step: int | None, err: BaseException) -> str:
        kept = _finalized_steps(self.directory)
        which = f"step {step}" if step is not None else "a checkpoint"
        return (f"cannot save {which} to {self.directory} ({_reason(err)}): free disk space or "
                f"make the directory writable, then rerun the same command to resume from "
                f"{f'step {kept[-1]}' if kept else 'the start'} (the checkpoints already saved "
                "are kept)")

    def latest_step(self) -> int | None:
        """The newest completed step, or None when there is none."""
        return self._manager.latest_step()

    def metadata(self, step: int) -> dict:
        """The JSON saved with `step`: {"config": ..., "dataset_info": ...}."""
        handler = ocp.JsonCheckpointHandler()
        try:
            return handler.restore(self.directory / str(step) / _METADATA)
        except Exception as err:  # orbax / json raise many types; one line for the user
            raise CheckpointError(self._damaged(step, err)) from None
        finally:
            handler.close()

    def saved_structure(self, step: int) -> PyTree:
        """Orbax's metadata tree of the state saved at `step`: shapes and dtypes, no values."""
        handler = ocp.StandardCheckpointHandler()
        try:
            return handler.metadata(self.directory / str(step) / _STATE).tree
        except Exception as err:
            raise CheckpointError(self._damaged(step, err)) from None
        finally:
            handler.close()

    def _damaged(self, step: int, err: BaseException) -> str:
        path = self.directory / str(step)
        earlier = [s for s in _finalized_steps(self.directory) if s < step]
        aside = self.directory.parent / f"damaged-step-{step}"
        then = (f"to resume from step {earlier[-1]}" if earlier
                else "to start the run again from step 0")
        return (f"the checkpoint of step {step} at {path} is damaged ({_reason(err)}): move it "
                f"out of the way (mv {path} {aside}) {then}")

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
            raise CheckpointError(self._damaged(step, err)) from None

    def wait(self) -> None:
        """Block until any background save has finished; CheckpointError if it failed."""
        started, self._started = self._started, []
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise CheckpointError(self._save_failed(started[-1] if started else None, err)
                                  ) from None
        if jax.process_index() != 0:  # the primary process writes; the others may not see it yet
            return
        done = _finalized_steps(self.directory)
        # A step is missing if it was not finalized and no later step replaced it (retention).
        lost = [s for s in started if s not in done and (not done or s > done[-1])]
        if lost:
            raise CheckpointError(self._save_failed(
                lost[0], RuntimeError("the save ended without its final rename")))

    def close(self) -> None:
        """Finish pending saves (CheckpointError if one failed) and release the manager.

        Always closes: orbax's background threads must not outlive the manager, or they print
        tracebacks ("Event loop is closed") when the interpreter exits.
        """
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):  # a failed save was reported by wait()
                self._manager.close()
            if self in _open_checkpointers:
                _open_checkpointers.remove(self)
                if not _open_checkpointers:
                    logging.getLogger("absl").removeFilter(_not_an_orbax_error)


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


def _reason(err: BaseException) -> str:
    """`Type: first line of the message`, at most 200 characters of it."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _finalized_steps(directory: Path) -> list[int]:
    """The steps with a complete (renamed) directory under `directory`, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / _STATE).exists())


def _unreadable(path: Path, err: BaseException) -> str:
    return (f"cannot read the checkpoint at {path} ({_reason(err)}); it may be incomplete or "
            "corrupt: pass an earlier step or another checkpoint")


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
    handler = ocp.StandardCheckpointHandler()
    try:
        tree_metadata = handler.metadata(step_dir / _STATE).tree
        wanted = {k: tree_metadata[k] for k in ("step", "params", "ema_params")
                  if tree_metadata.get(k) is not None}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                              wanted)
        reader = ocp.PyTreeCheckpointer()
        try:
            tree = reader.restore(step_dir / _STATE, args=ocp.args.PyTreeRestore(
                wanted, restore_args=restore_args, partial_restore=True))
        finally:
            reader.close()  # no background threads left to print tracebacks at exit
        metadata = ocp.JsonCheckpointHandler().restore(step_dir / _METADATA)
    except Exception as err:  # orbax / tensorstore / json raise many types; one line for the user
        raise CheckpointError(_unreadable(step_dir, err)) from None
    finally:
        handler.close()
    return CheckpointContents(step=step, params=tree["params"], ema_params=tree.get("ema_params"),
                              config=metadata.get("config", {}),
                              dataset_info=metadata.get("dataset_info", {}))
