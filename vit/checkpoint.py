"""Checkpoints with orbax: save / restore the TrainState, resume, and load params for inference.

Layout: <workdir>/checkpoints/<step>/{state, metadata}. `state` is the whole TrainState pytree
(step, params, opt_state, ema_params, rng); `metadata` is JSON {"config", "dataset_info"}.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save keeps its last good checkpoint; the next `Checkpointer` deletes the half-written one.
Every failure (a save that cannot write, a finalized step whose files are damaged) is one
`CheckpointError` line naming the step, the path and the fix; nothing is deleted on an error.
A background save that fails is reported at the next `save`, `wait` or `close`, naming the step
that failed (not the one being saved), and reported once. Tensorstore's errors (a ValueError such
as "RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']") are read as the OSError
they carry, so a full disk gets the disk-full fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vit.error_text import first_line, first_names
from vit.nonfinite import non_finite_names
from vit.output_paths import blocking_ancestor, require_writable_run_folder
from vit.save_errors import not_an_orbax_error, os_error_inside

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


_open_checkpointers: list[Checkpointer] = []  # while any is open, the filter above is on


def _check_creatable(directory: Path) -> None:
    """A CheckpointError unless `directory` is a writable directory or can be made."""
    require_writable_run_folder(directory, CheckpointError)
    blocked = blocking_ancestor(directory)
    if blocked is None:
        return
    path, why = blocked
    if why == "file":
        raise CheckpointError(f"{path} is a file, not a directory: pass a workdir that is a "
                              "directory or does not exist yet")
    raise CheckpointError(f"cannot create {directory}: {path} is not writable; pass a workdir "
                          "you can write to")


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, kept out of JAX's preemption sync: vit.preemption alone counts steps
    there. Orbax would pass absolute steps (and an older one from its finalize thread) to the
    counter the trainer advances from the resumed step, so the stop step could be missed."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpointer:
    """Saves the train state every `save_every` steps in <workdir>/checkpoints, keeps a few."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, save_every: int | None = None):
        if save_every is not None and save_every < 1:
            raise CheckpointError(f"save_every must be >= 1 or None, got {save_every}")
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        _check_creatable(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every or 1,
            cleanup_tmp_directories=True,
            # The step directory is made inside save(): a failure to make it (no permission)
            # raises there, instead of leaving orbax's writer threads waiting for it for minutes.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        if not _open_checkpointers:  # on before orbax reads the directory, which can warn
            logging.getLogger("absl").addFilter(not_an_orbax_error)
        _open_checkpointers.append(self)
        try:
            self._manager = _Manager(
                self.directory, options=options,
                item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                               _METADATA: ocp.JsonCheckpointHandler()})
        except OSError as err:
            self._forget()
            raise CheckpointError(f"cannot create {self.directory}: {err.strerror or err}; pass "
                                  "a workdir you can write to") from None
        except Exception:
            self._forget()
            raise
        # Orbax removes half-written steps in a background thread that only its next save
        # awaits; waiting here means an opened directory holds finished steps only, and no
        # cleanup thread outlives a Checkpointer that is closed without saving.
        self._manager._maybe_await_cleanup_tmp_directory()
        self._started: list[int] = []  # saves begun since the last wait()
        self._failed = False  # a failed save was reported: close() does not report it again

    def _forget(self) -> None:
        """Leave the open Checkpointers; the last one out turns orbax's log filter off."""
        if self in _open_checkpointers:
            _open_checkpointers.remove(self)
            if not _open_checkpointers:
                logging.getLogger("absl").removeFilter(not_an_orbax_error)

    def save(self, step: int, state: PyTree, *, config: dict, dataset_info: dict,
             force: bool = False, extra: Mapping[str, Any] | None = None) -> bool:
        """Save `state` at `step` if it is due (or `force`); True when a save was started.

        `extra` adds JSON keys to the metadata beside config and dataset_info. The write
        finishes in the background; a failure (here or in `wait` / `close`) raises
        CheckpointError and leaves the earlier checkpoints as they were.
        """
        if int(step) in _finalized_steps(self.directory):
            raise CheckpointError(
                f"cannot save step {step} to {self.directory}: it already holds a checkpoint of "
                f"step {step}; write to another directory, or remove {self.directory / str(step)}"
                " to replace it")
        metadata = _jsonable({**(extra or {}), "config": config, "dataset_info": dataset_info})
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                     _METADATA: ocp.args.JsonSave(metadata)})
        try:
            started = bool(self._manager.save(int(step), args=args, force=force))
        except Exception as err:  # orbax, tensorstore and the OS raise many types
            # orbax waits for the previous background save first and raises its error here.
            raise self._save_failed(self._unfinished(int(step)), err) from None
        if started:
            self._started.append(int(step))
        return started

    def _unfinished(self, fallback: int | None) -> int | None:
        """The first save begun since the last wait() that left no finalized step directory.

        A step missing because retention deleted it after a later step was finalized does not
        count; `fallback` when every save finished.
        """
        done = _finalized_steps(self.directory)
        return next((s for s in self._started if s not in done and (not done or s > done[-1])),
                    fallback)

    def _save_failed(self, step: int | None, err: BaseException) -> CheckpointError:
        """The one-line error for a failed save of `step`; later calls do not report it again."""
        self._started, self._failed = [], True
        kept = _finalized_steps(self.directory)
        which = f"step {step}" if step is not None else "a checkpoint"
        cause = os_error_inside(err) or err
        code = getattr(cause, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free disk space where {self.directory} is"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"make {self.directory} writable by this user"
        else:
            fix = "free disk space or make the directory writable"
        reason = first_line(cause, with_type=True, limit=200)
        return CheckpointError(
            f"cannot save {which} to {self.directory} ({reason}): {fix}, then rerun the "
            f"same command to resume from {f'step {kept[-1]}' if kept else 'the start'} (the "
            "checkpoints already saved are kept)")

    def latest_step(self) -> int | None:
        """The newest completed step, or None when there is none."""
        return self._manager.latest_step()

    def metadata(self, step: int) -> dict:
        """The JSON saved with `step`: {"config": ..., "dataset_info": ...}."""
        handler = ocp.JsonCheckpointHandler()
        try:
            return handler.restore(self.directory / str(step) / _METADATA)
        except Exception as err:  # orbax / json raise many types; one line for the user
            raise CheckpointError(_damaged(self.directory, step, err)) from None
        finally:
            handler.close()

    def saved_structure(self, step: int) -> PyTree:
        """Orbax's metadata tree of the state saved at `step`: shapes and dtypes, no values."""
        handler = ocp.StandardCheckpointHandler()
        try:
            return handler.metadata(self.directory / str(step) / _STATE).tree
        except Exception as err:
            raise CheckpointError(_damaged(self.directory, step, err)) from None
        finally:
            handler.close()

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
            raise CheckpointError(_damaged(self.directory, step, err)) from None

    def wait(self) -> None:
        """Block until any background save has finished; CheckpointError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise self._save_failed(self._unfinished(None), err) from None
        # The primary process writes; the others may not see its directories yet.
        lost = self._unfinished(None) if jax.process_index() == 0 else None
        self._started = []
        if lost is not None:
            raise self._save_failed(lost, RuntimeError("the save ended without its final rename"))

    def close(self) -> None:
        """Finish pending saves (CheckpointError if one failed) and release the manager.

        Always closes: orbax's background threads must not outlive the manager, or they print
        tracebacks ("Event loop is closed") when the interpreter exits. A failed save already
        reported (by `save` or `wait`) is not reported again, so it is the error the caller sees.
        """
        try:
            if self._started or not self._failed:  # saves begun since the failure: wait for them
                self.wait()
        finally:
            with contextlib.suppress(Exception):  # a failed save was reported by wait()
                self._manager.close()
            self._forget()


@dataclasses.dataclass
class CheckpointContents:
    """What inference and fine-tuning need from a checkpoint: host numpy params and metadata."""

    step: int
    params: PyTree
    ema_params: PyTree | None
    config: dict
    dataset_info: dict

    def chosen_params(self, use_ema: bool = False) -> PyTree:
        """The EMA parameters when `use_ema` (an error if the run kept none), else the params;
        an error if they hold a NaN or an infinity."""
        if use_ema and self.ema_params is None:
            raise CheckpointError(f"checkpoint of step {self.step} holds no EMA params: drop "
                                  "--ema / use_ema, or train with ema_decay set")
        params = self.ema_params if use_ema else self.params
        broken = non_finite_names(params)
        if broken:
            raise CheckpointError(f"checkpoint of step {self.step} holds NaN or inf in "
                                  f"{first_names(broken)}: its weights diverged before they were "
                                  "saved; use an earlier checkpoint")
        return params


def write_params(workdir: str, step: int, params: PyTree, config: dict, dataset_info: dict
                 ) -> str:
    """Save `params` alone (no optimizer state) as step `step` of `workdir`, with the run
    config and dataset info inference reads; the step directory's path."""
    checkpointer = Checkpointer(workdir)
    try:
        checkpointer.save(step, {"step": step, "params": params}, config=config,
                          dataset_info=dataset_info, force=True)
    finally:
        checkpointer.close()
    return str(checkpointer.directory / str(step))


def checkpoints_dir(path: str) -> Path:
    """The directory holding the step directories of a workdir, checkpoints/ or step dir."""
    return _locate(path, None)[0]


def checkpoint_steps(path: str) -> list[int]:
    """The steps with a complete checkpoint in a workdir (or its checkpoints dir), ascending."""
    return _finalized_steps(checkpoints_dir(path))


def _finalized_steps(directory: Path) -> list[int]:
    """The steps with a complete (renamed) directory under `directory`, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / _STATE).exists())


def _damaged(directory: Path, step: int, err: BaseException, *, resume: bool = True) -> str:
    """The one line for a finalized step under `directory` whose files do not read back.

    It names the step, its path and the fix: move the step aside (nothing is deleted), after
    which the step before it is the latest; `resume` says a run resumes from it, else that a
    reader (`vit eval`, `load_checkpoint`) reads it.
    """
    path = directory / str(step)
    earlier = [s for s in _finalized_steps(directory) if s < step]
    aside = directory.parent / f"damaged-step-{step}"
    if not earlier:
        then = "to start the run again from step 0"
    else:
        then = f"to resume from step {earlier[-1]}" if resume else f"to read step {earlier[-1]}"
    reason = first_line(err, with_type=True, limit=200)
    return (f"the checkpoint of step {step} at {path} is damaged ({reason}): move it out "
            f"of the way (mv {path} {aside}) {then}")


def _locate(path: str, step: int | None) -> tuple[Path, int]:
    """The checkpoints directory and the step to read for a workdir, checkpoints or step dir."""
    root = Path(path).absolute()
    if not root.exists():
        raise CheckpointError(f"checkpoint path {root} does not exist: pass a workdir, its "
                              f"{CHECKPOINT_DIR}/ directory or one step directory")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file, not a checkpoint: pass a workdir, its "
                              f"{CHECKPOINT_DIR}/ directory or one step directory; to use a "
                              ".npz, .safetensors or .pth file, convert it first (vit convert "
                              f"{root} DST) and pass DST")
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
        raise CheckpointError(_damaged(root, step, err, resume=False)) from None
    finally:
        handler.close()
    return CheckpointContents(step=step, params=tree["params"], ema_params=tree.get("ema_params"),
                              config=metadata.get("config", {}),
                              dataset_info=metadata.get("dataset_info", {}))
