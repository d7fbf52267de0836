"""Tests for vit.checkpoint: exact resume, retention, template-free loading, errors."""

import asyncio
import errno
import os
import shutil
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore
from orbax.checkpoint._src.path import atomicity, temporary_paths

from vit import checkpoint, optim, save_errors


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    ema_params: dict | None
    rng: jax.Array


def _params(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"embedding": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
            "head": {"kernel": jax.random.normal(k2, (3, 2)), "bias": jnp.arange(2.0)}}


def _state(trainable: str = "all", ema: bool = True, steps: int = 1) -> TrainState:
    """A state after `steps` real AdamW updates, so the moments are non-trivial."""
    config = optim.default_config()
    config.trainable = trainable
    params = _params()
    tx = optim.make_optimizer(config, params)
    opt_state = tx.init(params)
    ema_params = params if ema else None
    for i in range(steps):
        grads = jax.tree_util.tree_map(lambda p, i=i: jnp.full_like(p, 0.1 * (i + 1)), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema:
            ema_params = optim.ema_update(ema_params, params, 0.9)
    return TrainState(jnp.int32(steps), params, opt_state, ema_params, jax.random.PRNGKey(7))


def _assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("trainable, ema", [("all", True), ("head", False)])
def test_save_restore_exact(tmp_path, trainable, ema):
    saved = _state(trainable, ema, steps=3)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.save(3, saved, config={"lr": 0.1}, dataset_info={"num_classes": 2})
    template = _state(trainable, ema, steps=0)
    restored = ckpt.restore(template)
    assert isinstance(restored, TrainState)
    _assert_tree_equal(restored, saved)
    assert ckpt.latest_step() == 3
    ckpt.close()


def test_max_to_keep_and_save_every(tmp_path):
    state = _state(steps=0)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, save_every=2)
    meta = dict(config={}, dataset_info={})
    assert [ckpt.save(s, state, **meta) for s in (2, 3, 4, 6)] == [True, False, True, True]
    assert ckpt.save(7, state, force=True, **meta)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [6, 7]
    ckpt.close()
    reopened = checkpoint.Checkpointer(str(tmp_path))
    assert reopened.latest_step() == 7
    reopened.close()


def test_orbax_leaves_the_preemption_sync_counter_to_the_trainer(tmp_path, monkeypatch):
    """JAX's sync point is agreed from one counter per process: orbax setting it to absolute
    steps would cross vit.preemption's count from the resumed step (a missed stop)."""
    from jax.experimental import multihost_utils

    counts = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        lambda step: counts.append(step) or False)
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=2)
    meta = dict(config={}, dataset_info={})
    assert [ckpt.save(s, _state(steps=0), **meta) for s in (2, 3)] == [True, False]
    ckpt.save(5, _state(steps=0), force=True, **meta)
    ckpt.close()
    reopened = checkpoint.Checkpointer(str(tmp_path))
    assert counts == [] and reopened.latest_step() == 5
    reopened.close()


def test_load_checkpoint_without_template(tmp_path):
    saved = _state(steps=2)
    config = {"model": {"variant": "Ti/16"}, "image_size": (32, 32), "lr": 0.001}
    info = {"num_classes": 2, "class_names": ["cat", "dog"]}
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(2, saved, config=config, dataset_info=info)
    ckpt.save(5, saved.replace(step=jnp.int32(5)), config=config, dataset_info=info)
    ckpt.close()
    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "5"):
        got = checkpoint.load_checkpoint(str(path))
        assert got.step == 5
        assert isinstance(got.params["head"]["kernel"], np.ndarray)
        _assert_tree_equal(got.params, jax.device_get(saved.params))
        _assert_tree_equal(got.ema_params, jax.device_get(saved.ema_params))
        assert got.config == {"model": {"variant": "Ti/16"}, "image_size": [32, 32], "lr": 0.001}
        assert got.dataset_info == info
    assert checkpoint.load_checkpoint(str(tmp_path), step=2).step == 2


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path):
    saved = _state(ema=False)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(1, saved, config={}, dataset_info={})
    ckpt.close()
    # What a SIGKILL during the save of step 2 leaves behind: orbax's unfinished temporary dir.
    shutil.copytree(tmp_path / "checkpoints" / "1", tmp_path / "checkpoints" /
                    "2.orbax-checkpoint-tmp-1234")
    assert checkpoint.load_checkpoint(str(tmp_path)).step == 1
    assert checkpoint.load_checkpoint(str(tmp_path)).ema_params is None
    reopened = checkpoint.Checkpointer(str(tmp_path))
    assert reopened.latest_step() == 1
    _assert_tree_equal(reopened.restore(_state(ema=False, steps=0)), saved)
    reopened.close()


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(str(tmp_path / "nope"))
    assert "does not exist" in _one_line(info) and "nope" in str(info.value)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(str(tmp_path))
    assert "no checkpoints in" in _one_line(info)
    weights = tmp_path / "model.npz"
    np.savez(weights, w=np.zeros(2))
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(str(weights))
    assert _one_line(info).startswith(f"{weights} is a file, not a checkpoint: ")
    assert f"vit convert {weights} DST" in str(info.value)
    # The workdir, its checkpoints/, or a folder above the workdir is a file.
    for workdir in (weights, tmp_path / "w", weights / "run" / "deeper"):
        (tmp_path / "w").mkdir(exist_ok=True)
        (tmp_path / "w" / "checkpoints").touch()
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.Checkpointer(str(workdir))
        bad = tmp_path / "w" / "checkpoints" if workdir == tmp_path / "w" else weights
        assert _one_line(info) == (f"{bad} is a file, not a directory: pass a workdir that is a "
                                   "directory or does not exist yet")
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() is None
    with pytest.raises(checkpoint.CheckpointError, match="available steps: none"):
        ckpt.restore(_state(steps=0))
    ckpt.close()


def test_corrupt_checkpoint_and_wrong_step(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(4, _state(), config={}, dataset_info={})
    ckpt.wait()
    with pytest.raises(checkpoint.CheckpointError, match=r"available steps: \[4\]"):
        checkpoint.load_checkpoint(str(tmp_path), step=9)
    with pytest.raises(checkpoint.CheckpointError, match=r"available steps: \[4\]"):
        ckpt.restore(_state(steps=0), step=9)
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file() and path.name != "commit_success.txt":
            path.write_bytes(b"garbage")
    step_dir = tmp_path.absolute() / "checkpoints" / "4"
    with pytest.raises(checkpoint.CheckpointError) as info:
        ckpt.restore(_state(steps=0))
    assert _one_line(info).startswith(f"the checkpoint of step 4 at {step_dir} is damaged (")
    assert str(info.value).endswith(  # no earlier step
        f"): move it out of the way (mv {step_dir} {tmp_path.absolute()}/damaged-step-4) to "
        "start the run again from step 0")
    with pytest.raises(checkpoint.CheckpointError) as loaded:  # what vit eval reads with
        checkpoint.load_checkpoint(str(tmp_path))
    reason = _one_line(loaded).split(" is damaged (", 1)[1].split("): move it", 1)[0]
    assert str(loaded.value) == (
        f"the checkpoint of step 4 at {step_dir} is damaged ({reason}): move it out of the way "
        f"(mv {step_dir} {tmp_path.absolute()}/damaged-step-4) to start the run again from "
        "step 0")
    ckpt.close()


def _fail_saving(monkeypatch, step: int, where: str, code: int) -> None:
    """Make orbax's `where` ("create": the temporary directory, "finalize": its rename) of
    `step`'s save raise the OSError of `code`, as the file system would."""
    real = getattr(atomicity.AtomicRenameTemporaryPath, where)

    async def faulty(self):
        if self.get_final().name == str(step):
            raise OSError(code, os.strerror(code), str(self.get()))
        return await real(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, where, faulty)


@pytest.mark.parametrize("where, code, fix", [
    ("create", errno.EACCES, "make {dir} writable by this user"),
    ("finalize", errno.ENOSPC, "free disk space where {dir} is")], ids=["denied", "full"])
def test_a_failed_save_names_its_step_once_and_the_earlier_one_restores(tmp_path, monkeypatch,
                                                                        where, code, fix):
    saved, meta = _state(ema=False), dict(config={}, dataset_info={})
    _fail_saving(monkeypatch, 3, where, code)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1)
    assert ckpt.save(1, saved, **meta) and ckpt.save(2, saved, **meta)  # 2 replaces 1
    directory = tmp_path.absolute() / "checkpoints"
    with pytest.raises(checkpoint.CheckpointError) as info:
        # Making the directory fails in save(3) itself; the rename fails in the background and
        # orbax raises it in the next save: either way the line names step 3 (not step 4, nor
        # step 1, which retention deleted).
        ckpt.save(3, saved, **meta)
        ckpt.save(4, saved, **meta)
    type_name = "PermissionError" if code == errno.EACCES else "OSError"
    assert _one_line(info) == (
        f"cannot save step 3 to {directory} ({type_name}: [Errno {code}] {os.strerror(code)}: "
        f"'{directory}/3.orbax-checkpoint-tmp'): {fix.format(dir=directory)}, then rerun the "
        "same command to resume from step 2 (the checkpoints already saved are kept)")
    ckpt.close()  # reported once: closing raises no second error over the first
    assert checkpoint.load_checkpoint(str(tmp_path)).step == 2
    reopened = checkpoint.Checkpointer(str(tmp_path))
    assert reopened.latest_step() == 2
    _assert_tree_equal(reopened.restore(_state(ema=False, steps=0)), saved)
    reopened.close()
    assert sorted(os.listdir(directory)) == ["2"]  # the half-written step 3 was cleaned up


# The error tensorstore raises when a write of a save finds the disk full (from a real one).
_TENSORSTORE_FULL = (
    'RESOURCE_EXHAUSTED: Error writing "params.w11/0.0" in OCDBT database at local file '
    '"{0}/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "{0}/d/fca0": Failed to '
    "write 2167952 bytes to file 4: No space left on device [os_error_code='28']")


def test_a_full_disk_reported_by_tensorstore_gets_the_disk_full_line_and_no_noise(
        tmp_path, monkeypatch):
    """One tensorstore write fails, another is still in flight: it completes after orbax's
    event loop has closed, and its callback's "Event loop is closed" is not reported."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    save_errors.drop_closed_loop_tracebacks()  # as train.py and the vit command do
    in_flight = []
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def faulty(self):
        if self.get_final().name == "2":
            loop = asyncio.get_running_loop()
            promise, future = tensorstore.Promise.new()
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(lambda: None))
            in_flight.append(promise)
            raise ValueError(_TENSORSTORE_FULL.format(self.get()))
        return await real(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", faulty)
    saved, meta = _state(ema=False), dict(config={}, dataset_info={})
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.save(1, saved, **meta) and ckpt.save(2, saved, **meta)
    with pytest.raises(checkpoint.CheckpointError) as info:
        ckpt.wait()
    ckpt.close()
    directory = tmp_path.absolute() / "checkpoints"
    assert _one_line(info) == (
        f"cannot save step 2 to {directory} (OSError: [Errno 28] No space left on device): "
        f"free disk space where {directory} is, then rerun the same command to resume from "
        "step 1 (the checkpoints already saved are kept)")
    in_flight[0].set_result(None)  # its callback runs here, after the loop closed
    other = RuntimeError("something else")

    class Broken:
        def __del__(self):
            raise other

    Broken()  # collected at once: Python reports what its __del__ raised
    assert [args.exc_value for args in unraisable] == [other]  # other reports pass on


def test_an_existing_checkpoints_directory_that_is_read_only_is_one_line(tmp_path,
                                                                         monkeypatch):
    directory = (tmp_path / "checkpoints").absolute()
    directory.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
        False if mode & os.W_OK and os.path.abspath(path) == str(directory)
        else real(path, mode, **kw)))  # as on a read-only file system, where root cannot write
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.Checkpointer(str(tmp_path))
    assert _one_line(info) == (f"cannot write in {directory} (read-only, or not this user's): "
                               "make it writable, or pass another workdir")


def test_opening_a_directory_removes_half_written_steps_before_it_returns(tmp_path, monkeypatch):
    saved, meta = _state(ema=False), dict(config={}, dataset_info={})
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(2, saved, **meta)
    ckpt.close()
    directory = tmp_path / "checkpoints"
    (directory / "3.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # a killed save
    real = temporary_paths.cleanup_temporary_paths

    async def slow(*args, **kwargs):  # orbax runs it in a background thread
        await asyncio.sleep(0.5)
        return await real(*args, **kwargs)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow)
    reopened = checkpoint.Checkpointer(str(tmp_path))
    assert sorted(os.listdir(directory)) == ["2"]
    assert reopened.latest_step() == 2
    reopened.close()


def test_saving_a_step_the_directory_already_holds_is_one_line_and_keeps_it(tmp_path):
    saved, meta = _state(ema=False), dict(config={}, dataset_info={})
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.save(5, saved, **meta)
    ckpt.close()
    again = checkpoint.Checkpointer(str(tmp_path))  # e.g. `vit quantize --out` an earlier output
    directory = tmp_path.absolute() / "checkpoints"
    with pytest.raises(checkpoint.CheckpointError) as info:
        again.save(5, _state(ema=False, steps=0), **meta, force=True)
    assert _one_line(info) == (
        f"cannot save step 5 to {directory}: it already holds a checkpoint of step 5; write to "
        f"another directory, or remove {directory}/5 to replace it")
    _assert_tree_equal(again.restore(_state(ema=False, steps=0)), saved)
    again.close()
