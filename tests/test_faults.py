"""Faults a run survives (the README's fault table): preemption of one process of two or during
an evaluation, a kill or a failure during a save, a damaged checkpoint, a changed config, a
missing config file, non-finite updates (also in one process of two), resuming without the
fine-tuning source, re-running a finished run.

Where the subject is the command or the process (exit status, one `error:` line and no
traceback, signals, two processes, what is printed at exit) a run goes through `train.py` in a
subprocess, and faults are injected by a small driver (`_DRIVER`) that patches orbax, the data or
the evaluation, then runs train.py. Where the subject is the run (what it saves, logs, refuses,
resumes) it runs in this process (tests/in_process.py), faults patched with monkeypatch, and a
refusal is checked as the text train.py prints after `error: ` (`train_cli._one_line`).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import in_process
import jax
import jax_env
import numpy as np
import pytest
from flax import traverse_util
from orbax.checkpoint._src.path import atomicity

from vit import (
    checkpoint,
    config_changes,
    data,
    metrics,
    nonfinite,
    optim,
    parallel,
    preprocess,
    trainer,
)
from vit.preemption import EXIT_PREEMPTED, START_UP_LINE, PreemptionWatch

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("smoke_config", ROOT / "configs" / "smoke.py")
_SMOKE_MODULE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_SMOKE_MODULE)
DATA_DIR = str((ROOT.parent / "shared" / "data" / "tfds").resolve())
TRAIN = str(ROOT / "train.py")
SMOKE = f"--config={ROOT}/configs/smoke.py"  # 8 steps, checkpoints at 4 and 8

# train.py with one fault at step AT (arguments: MODE AT, then train.py's):
#   kill     SIGKILL in the last act of AT's save, orbax's rename of the finished temporary
#            directory (nothing runs after it);
#   tsfull   that rename fails with the ValueError tensorstore raises when a write of the save
#            finds the disk full, while another tensorstore write is still in flight: it
#            completes (at exit) after orbax's event loop has closed, as on a real full disk;
#   startterm  SIGTERM to this process in the dataset scan (before any state exists);
#   initterm   SIGTERM to this process while the parameters are initialised (a fresh run);
#   nan      process 1's training batch of step AT is all NaN (see nan_batches);
#   sigterm  SIGTERM to this process after the first batch of the evaluation after step AT;
#   slow     each training batch after the first comes AT ms late, and "fault: batch N" is
#            printed as batch N is asked for (batch 2: step 1, the first compile, is done).
# The faults of runs in this process (a failed or refused save, a full disk under metrics.jsonl,
# a failed evaluation) are monkeypatched by their tests (`_save_fails_at` for orbax's saves).
_DRIVER = f"""
import asyncio, atexit, os, signal, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import tensorstore
from orbax.checkpoint._src.path import atomicity
from vit import data, start_state, trainer
mode, at = sys.argv[1], int(sys.argv[2])
paths = atomicity.AtomicRenameTemporaryPath
finalize = paths.finalize
TENSORSTORE_FULL = ('RESOURCE_EXHAUSTED: Error writing "params.head.kernel/0.0" in OCDBT '
                    'database at local file "{{0}}/": Failed writing: "{{0}}/d/0": Failed to '
                    "write 2167952 bytes to file 4: No space left on device [os_error_code='28']")

def write_in_flight():
    loop = asyncio.get_running_loop()
    promise, future = tensorstore.Promise.new()
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(lambda: None))
    atexit.register(promise.set_result, None)

async def faulty_finalize(self):
    if self.get_final().name == str(at):
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "tsfull":
            write_in_flight()
            raise ValueError(TENSORSTORE_FULL.format(self.get()))
    return await finalize(self)

paths.finalize = faulty_finalize
if mode in ("startterm", "initterm"):
    module, name = ((data, "dataset_info") if mode == "startterm"
                    else (start_state, "initial_params"))
    real = getattr(module, name)

    def signalled(*args, **kwargs):
        print(f"fault: SIGTERM in {{name}}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    setattr(module, name, signalled)
if mode == "nan":
    from test_faults import nan_batches
    data.train_iterator = nan_batches(data.train_iterator, {{at}}, process=1)
if mode == "sigterm":
    evaluate, eval_iterator, evaluating = trainer._evaluate, data.eval_iterator, []

    def evaluate_noting_the_step(model, rstate, config, step, *args):
        evaluating[:] = [step]
        return evaluate(model, rstate, config, step, *args)

    def eval_batches(*args, **kwargs):
        for i, batch in enumerate(eval_iterator(*args, **kwargs)):
            yield batch
            if i == 0 and evaluating == [at]:
                print(f"fault: SIGTERM during the evaluation of step {{at}}", file=sys.stderr)
                os.kill(os.getpid(), signal.SIGTERM)

    trainer._evaluate, data.eval_iterator = evaluate_noting_the_step, eval_batches
if mode == "slow":
    import time
    train_iterator = data.train_iterator

    def slow_batches(*args, **kwargs):
        for i, batch in enumerate(train_iterator(*args, **kwargs)):
            print(f"fault: batch {{i + 1}}", file=sys.stderr, flush=True)
            if i:
                time.sleep(at / 1000)
            yield batch

    data.train_iterator = slow_batches
from vit.train_cli import main
main(["train.py", *sys.argv[3:]])
"""


def _env(devices: int = 1, fusion_emitters: bool | None = None) -> dict[str, str]:
    return jax_env.subprocess_env(devices, fusion_emitters, TFDS_DATA_DIR=DATA_DIR,
                                  PYTHONPATH=str(ROOT))


def _command(workdir: Path, *args: str, fault: tuple[str, int] | None = None) -> list[str]:
    """train.py on the smoke config in `workdir`, through `_DRIVER` when a fault is given."""
    prefix = [sys.executable, TRAIN] if fault is None else [
        sys.executable, "-c", _DRIVER, fault[0], str(fault[1])]
    return [*prefix, SMOKE, f"--workdir={workdir}", *args]


def _train(workdir: Path, *args: str, fault: tuple[str, int] | None = None
           ) -> subprocess.CompletedProcess:
    return subprocess.run(_command(workdir, *args, fault=fault), env=_env(),
                          capture_output=True, text=True, timeout=300)


def _error_line(run: subprocess.CompletedProcess) -> str:
    """The run's one `error:` line, after checking there is exactly one and no traceback."""
    assert run.returncode not in (0, EXIT_PREEMPTED), run.stdout[-2000:]
    assert "Traceback" not in run.stderr and "Event loop is closed" not in run.stderr, \
        run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-3000:]
    return errors[0]


def _params(workdir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(checkpoint.load_checkpoint(str(workdir), step).params,
                                      sep="/")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _steps(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _eval_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("eval")]


def _evals(result: trainer.TrainResult) -> dict[str, float]:
    """A run's final evaluation: the values train.py prints (as `eval/top1: 0.0977`)."""
    return {key: value for key, value in result.metrics.items() if key.startswith("eval")}


def _logged_steps(workdir: Path) -> list[int]:
    """The steps of metrics.jsonl, in file order."""
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]


def _one_line(err: BaseException) -> str:
    """What train.py prints after `error: ` for `err` (its ValueError/OSError/RuntimeError)."""
    from vit import train_cli  # defines train.py's absl flags: imported only where needed

    line = train_cli._one_line(err)
    assert "\n" not in line, line
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, trainer.TrainResult]:
    """An uninterrupted smoke run (in this process): 8 steps, checkpoints 4 and 8."""
    workdir = tmp_path_factory.mktemp("finished")
    result = in_process.train(workdir)
    assert int(result.state.step) == 8 and not result.preempted
    assert _steps(workdir) == ["4", "8"] and _evals(result) != {}
    return workdir, result


def _copy(finished, tmp_path: Path) -> Path:
    shutil.copytree(finished[0], tmp_path / "run")
    return tmp_path / "run"


def test_rerunning_a_finished_run_evaluates_it_and_logs_harmless_changes(finished, tmp_path,
                                                                        caplog):
    workdir = _copy(finished, tmp_path)
    with caplog.at_level("INFO", logger="vit"):
        again = in_process.train(workdir, "--config.log_every=2", "--config.lr=0.002")
    assert int(again.state.step) == 8 and not again.preempted
    assert _evals(again) == _evals(finished[1]) != {}
    assert "config.log_every changed since the checkpoint: 4 -> 2" in caplog.messages
    assert "config.lr changed since the checkpoint: 0.001 -> 0.002" in caplog.messages
    assert _steps(workdir) == ["4", "8"]


def test_damaged_latest_checkpoint_is_one_line_and_the_earlier_one_stays(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    for path in (workdir / "checkpoints" / "8" / "state").rglob("*"):
        if path.is_file() and path.name != "commit_success.txt":
            path.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError) as info:
        in_process.train(workdir, "--config.total_steps=12")
    line = f"error: {_one_line(info.value)}"  # as train.py prints it
    step_dir = workdir.absolute() / "checkpoints" / "8"
    assert line.startswith(f"error: the checkpoint of step 8 at {step_dir} is damaged")
    assert line.endswith(f"(mv {step_dir} {workdir.absolute()}/damaged-step-8) to resume from "
                         "step 4")
    reason = line.split(" is damaged (", 1)[1].split("): move it out of the way", 1)[0]
    evaluated = subprocess.run([sys.executable, "-m", "vit.cli", "eval", "--workdir",
                                str(workdir)], env=_env(), capture_output=True, text=True,
                               timeout=300)
    assert evaluated.returncode == 2
    # The same line as train.py's (the same reason too: the first file read is the same),
    # but naming the step a reader then reads instead of the step a run resumes from.
    assert _error_line(evaluated) == (
        f"error: the checkpoint of step 8 at {step_dir} is damaged ({reason}): move it out of "
        f"the way (mv {step_dir} {workdir.absolute()}/damaged-step-8) to read step 4")
    _assert_same(_params(workdir, 4), _params(finished[0], 4))
    shutil.move(step_dir, workdir / "damaged-step-8")  # the fix the line names
    assert checkpoint.load_checkpoint(str(workdir)).step == 4


def test_a_changed_lr_beside_a_state_changing_key_is_not_named(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    with pytest.raises(config_changes.ConfigChangeError) as info:
        in_process.train(workdir, "--config.lr=3e-3", "--config.ema_decay=0.9")
    assert _one_line(info.value) == (
        f"the config changes the train state saved in {workdir.absolute()}/checkpoints/8: "
        "ema_decay null -> 0.9; resume with the stored values, or train in a new --workdir")
    assert _steps(workdir) == ["4", "8"]


def test_changed_model_is_one_line_naming_the_keys(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    with pytest.raises(config_changes.ConfigChangeError) as info:
        in_process.train(workdir, "--config.model.width=64", "--config.total_steps=12")
    line = _one_line(info.value)
    assert line.startswith("the config changes the train state saved in ")
    assert "model.width 32 -> 64" in line and "total_steps" not in line
    assert _steps(workdir) == ["4", "8"]
    _assert_same(_params(workdir), _params(finished[0]))


def test_missing_config_file_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, TRAIN, "--config=configs/nope.py",
                          f"--workdir={tmp_path}"], env=_env(), capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert _error_line(run) == ("error: config file configs/nope.py does not exist: pass a file "
                                "of configs/ and its variant, e.g. "
                                "--config=configs/cifar10.py:short")


@pytest.mark.parametrize("source,expected", [
    ("def get_config(:\n", "error: config file {path}, line 1: invalid syntax; fix the file"),
    ("def get_config(variant=None):\n    return undefined_name\n",
     "error: config file {path} failed to load: NameError: name 'undefined_name' is not defined"),
    ("x = 1\n", "error: config file {path} has no get_config(): define get_config(variant=None) "
     "returning the run's ConfigDict, as configs/*.py do"),
])
def test_a_config_file_that_does_not_load_is_one_line(source, expected, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text(source)
    run = subprocess.run([sys.executable, TRAIN, f"--config={path}",
                          f"--workdir={tmp_path / 'run'}"], env=_env(), capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert _error_line(run) == expected.format(path=path)
    assert not (tmp_path / "run").exists()


def _per_device_32() -> int:
    return 32 // jax.device_count()


def test_a_full_token_tail_of_no_step_is_refused(tmp_path):
    config = _smoke_config(8)
    config.model.token_keep_ratio = 0.5
    config.full_tokens_fraction = 0.05  # 0.4 of a step
    with pytest.raises(ValueError, match=r"^config.full_tokens_fraction=0.05 of total_steps=8 "
                                         r"is not one step: raise it, or set 0 \(off\)$"):
        trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value,expected", [
    ("model.dtype", "float17", "unknown model dtype 'float17'; use one of float32, bfloat16, "
     "float16"),
    ("model.num_heads", 0, "model num_heads must be >= 1, got 0"),
    ("model.representation_size", 0, "model representation_size must be >= 1 or None (no "
     "pre-logits layer), got 0"),
    ("model.stem_channels", (), "model stem_channels must be positive conv widths, e.g. (32, "
     "64), or None for the default ones, got ()"),
    ("model.variant", "Ti/0", "unknown ViT variant 'Ti/0'"),
    ("image_size", 0, "config.image_size must be positive, got 0"),
    ("pp.eval_resize", 16, "config.pp.eval_resize=16 is smaller than image_size=32; the central "
     "crop needs eval_resize >= image_size"),
    ("pp.crop_padding", -1, "pp.crop_padding=-1 is negative; use 0 or more (0 = off)"),
    ("pp.randaugment_num_ops", -2, "pp.randaugment_num_ops=-2 is negative"),
    ("batch_size", 0, "config.batch_size must be >= 1, got 0"),
    ("eval_batch_size", -64, "config.eval_batch_size must be >= 1, got -64"),
    ("grad_accum_steps", 3, "config.grad_accum_steps=3 does not divide the per-device batch of "
     "{per_device} (config.batch_size=32 over"),
    ("label_smoothing", 2.0, "config.label_smoothing must be in [0, 1), got 2.0"),
    ("full_tokens_fraction", 1.5, "config.full_tokens_fraction must be in [0, 1] (0 = off), "
     "got 1.5"),
    ("full_tokens_fraction", 0.1, "config.full_tokens_fraction > 0 ends token dropping, which "
     "is off (model.token_keep_ratio=1): set model.token_keep_ratio < 1"),
    ("seed", 2**40, "config.seed must be an integer in [0, 2**31), got 1099511627776"),
    ("mixup_alpha", -1.0, "config.mixup_alpha must be a finite number >= 0 (0 = off), got -1.0"),
    ("b2", 1.0, "b2 must be in [0, 1), got 1.0"),
    ("seed", -1, "config.seed must be an integer in [0, 2**31), got -1"),
    ("process_id", 1, "process_id set, but the run is not multi-host: add --multihost "
     "(config.distributed=True) to join the other processes, or drop them to train alone"),
    ("lr", float("inf"), "lr must be a finite number > 0, got inf"),
    ("shuffle_buffer", -5, "config.shuffle_buffer must be an integer >= 1 (1 = no shuffling), "
     "got -5"),
    ("model.quant", "int8", "config.model.quant='int8' is for inference (`vit quantize` writes "
     "it): train with quant='none', then quantize the trained checkpoint"),
])
def test_a_bad_config_value_fails_at_start_up_in_one_line_writing_nothing(key, value, expected,
                                                                          tmp_path):
    config = _smoke_config(8)
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value
    with pytest.raises(ValueError) as info:
        trainer.train(config, str(tmp_path / "run"))
    message = str(info.value)
    assert "\n" not in message and message.startswith(expected.format(per_device=_per_device_32()))
    assert not (tmp_path / "run").exists()


def test_a_bad_model_option_on_the_command_line_is_one_line_writing_nothing(tmp_path):
    run = subprocess.run([sys.executable, TRAIN, SMOKE, f"--workdir={tmp_path / 'run'}",
                          "--config.model.representation_size=0"], env=_env(),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert _error_line(run) == ("error: model representation_size must be >= 1 or None (no "
                                "pre-logits layer), got 0")
    assert not (tmp_path / "run").exists()


def test_a_fine_tuning_config_without_init_from_refuses_to_train_from_scratch(tmp_path):
    config = _smoke_config(8, init_required=True)
    with pytest.raises(ValueError) as info:
        trainer.train(config, str(tmp_path / "run"))
    assert str(info.value) == (
        "this config fine-tunes (init_required=True) but no init_from was given: pass "
        "--init_from=WEIGHTS (a workdir, checkpoint, .npz or .safetensors), or "
        "--config.init_required=False to train from scratch")
    assert not list((tmp_path / "run").rglob("*/[0-9]*"))  # no step saved


def test_an_empty_step_directory_is_one_line_without_orbax_warnings(tmp_path):
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    run = _train(tmp_path)
    assert _error_line(run).startswith(f"error: the checkpoint of step 4 at "
                                       f"{tmp_path.absolute() / 'checkpoints' / '4'} is damaged")
    assert "Metadata file does not exist" not in run.stderr  # orbax's own warning, filtered


def test_a_workdir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError) as info:
        in_process.train(tmp_path / "notes.txt" / "run")
    assert _one_line(info.value) == (f"{tmp_path / 'notes.txt'} is a file, not a directory: "
                                     "pass a workdir that is a directory or does not exist yet")
    assert _tree(tmp_path) == {"notes.txt": b"x"}


@pytest.mark.parametrize("flag,expected", [
    ("--config=configs/cifar10.py:nope", "error: unknown cifar10 variant 'nope': use short, "
     "short-proxy, hour, hour-f32, hour-conv, Ti/4, S/4 or ablation-base"),
    ("--config=configs/smoke.py:big", "error: unknown smoke variant 'big': configs/smoke.py has "
     "none; use --config=configs/smoke.py"),
    ("--config.lr=fast", "error: flag --config.lr=fast: could not convert string to float: "
     "'fast'; see the config file for the valid keys"),
])
def test_bad_config_variant_or_override_is_one_line(flag, expected, tmp_path):
    args = [flag] if flag.startswith("--config=") else ["--config=configs/smoke.py", flag]
    run = subprocess.run([sys.executable, TRAIN, *args, f"--workdir={tmp_path / 'run'}"],
                         env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert _error_line(run) == expected
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/smoke.py", "--wandbb"], "error: unknown flag --wandbb (did you mean "
     "--wandb?); run with --helpfull for the flags"),
    (["--config=configs/smoke.py", "--workdir="], "error: --workdir is required: pass "
     "--workdir=DIR, the run's directory"),
    ([], "error: --config is required: pass a config file and its variant, e.g. "
     "--config=configs/cifar10.py:short"),
])
def test_a_bad_flag_of_train_py_is_one_line_without_the_config_file_hint(args, expected,
                                                                         tmp_path):
    workdir = [] if "--workdir=" in args else [f"--workdir={tmp_path / 'run'}"]
    run = subprocess.run([sys.executable, TRAIN, *workdir, *args], env=_env(),
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert _error_line(run) == expected
    assert not (tmp_path / "run").exists()


def _save_fails_at(monkeypatch, step: int, error: OSError, when: str = "finalize") -> None:
    """orbax's save of `step` fails with `error`: in its last act, the rename of the finished
    temporary directory (`when="finalize"`), or in its first, making that directory
    (`when="create"`; the error's filename is then that directory)."""
    paths = atomicity.AtomicRenameTemporaryPath
    real = getattr(paths, when)

    async def faulty(self):
        if self.get_final().name == str(step):
            if when == "create":
                error.filename = str(self.get())
            raise error
        return await real(self)

    monkeypatch.setattr(paths, when, faulty)


def test_failed_save_is_one_line_and_the_previous_checkpoint_stays(finished, tmp_path,
                                                                     monkeypatch):
    workdir = _copy(finished, tmp_path)
    _save_fails_at(monkeypatch, 12, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(checkpoint.CheckpointError) as info:
        in_process.train(workdir, "--config.total_steps=12")
    directory = workdir.absolute() / "checkpoints"
    assert _one_line(info.value) == (
        f"cannot save step 12 to {directory} (OSError: [Errno 28] No space left on "
        f"device): free disk space where {directory} is, then rerun the same command to resume "
        "from step 8 (the checkpoints already saved are kept)")
    assert _steps(workdir) == ["12.orbax-checkpoint-tmp", "4", "8"]  # written, not renamed
    assert checkpoint.load_checkpoint(str(workdir)).step == 8
    _assert_same(_params(workdir), _params(finished[0]))


def test_a_full_disk_reported_by_tensorstore_is_the_disk_full_line_alone(tmp_path):
    run = _train(tmp_path, fault=("tsfull", 8))
    directory = tmp_path.absolute() / "checkpoints"
    # _error_line also checks that the write in flight printed no "Event loop is closed".
    assert _error_line(run) == (
        f"error: cannot save step 8 to {directory} (OSError: [Errno 28] No space left on "
        f"device): free disk space where {directory} is, then rerun the same command to resume "
        "from step 4 (the checkpoints already saved are kept)")
    assert _steps(tmp_path) == ["4", "8.orbax-checkpoint-tmp"]


def test_a_full_disk_under_metrics_jsonl_is_one_line(tmp_path, monkeypatch):
    """Writing step 8's line of metrics.jsonl fails as on a full disk (ENOSPC)."""
    write_jsonl = metrics.MetricWriter._write_jsonl

    def full_jsonl(self, step, values):
        if step == 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._jsonl.name)
        return write_jsonl(self, step, values)

    monkeypatch.setattr(metrics.MetricWriter, "_write_jsonl", full_jsonl)
    with pytest.raises(OSError) as info:
        in_process.train(tmp_path)
    assert _one_line(info.value) == (
        f"cannot use {tmp_path / 'metrics.jsonl'} (OSError: [Errno 28] No space left on "
        "device): check that the path exists and is writable and that its disk has space, then "
        "rerun the same command")
    assert _steps(tmp_path) == ["4"]


def _tree(workdir: Path) -> dict[str, bytes | None]:
    """Every path under `workdir` with its bytes (None for a directory)."""
    return {str(p.relative_to(workdir)): None if p.is_dir() else p.read_bytes()
            for p in workdir.rglob("*")}


def _read_only(monkeypatch, path: Path) -> None:
    """os.access answers for `path` as on a read-only file system (where root cannot write
    either); a chmod would not stop root, who runs these tests in some places."""
    real = os.access

    def access(target, mode, **kwargs):
        if mode & os.W_OK and Path(target).absolute() == path.absolute():
            return False
        return real(target, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("blocked", ["jsonl_dir", "tensorboard_file", "read_only_workdir",
                                     "read_only_checkpoints"])
def test_an_output_path_that_cannot_be_written_fails_at_start_up_writing_nothing(
        blocked, finished, tmp_path, monkeypatch):
    workdir = _copy(finished, tmp_path).absolute()
    fix = "move it out of the way, or pass another workdir"
    read_only = "(read-only, or not this user's): make it writable, or pass another workdir"
    if blocked == "jsonl_dir":
        shutil.rmtree(workdir / "checkpoints")
        (workdir / "metrics.jsonl").unlink()
        (workdir / "metrics.jsonl").mkdir()
        expected = f"{workdir}/metrics.jsonl is a directory, not the run's metrics file: {fix}"
    elif blocked == "tensorboard_file":
        shutil.rmtree(workdir / "checkpoints")
        shutil.rmtree(workdir / "tensorboard")
        (workdir / "tensorboard").write_text("notes")
        expected = (f"{workdir}/tensorboard is a file, not the run's TensorBoard directory: "
                    f"{fix}")
    else:
        where = workdir if blocked == "read_only_workdir" else workdir / "checkpoints"
        _read_only(monkeypatch, where)
        expected = f"cannot write in {where} {read_only}"
    before = _tree(workdir)
    with pytest.raises(ValueError) as info:
        trainer.train(_smoke_config(12), str(workdir))
    assert str(info.value) == expected
    assert _tree(workdir) == before  # no checkpoints/ made, metrics.jsonl not rewritten


@pytest.mark.parametrize("mode,where", [("startterm", "dataset_info"),
                                        ("initterm", "initial_params")])
def test_sigterm_during_start_up_exits_75_in_one_line_leaving_no_file(mode, where, tmp_path):
    workdir = tmp_path / "run"
    run = _train(workdir, fault=(mode, 0))
    assert run.returncode == EXIT_PREEMPTED, run.stderr[-3000:]
    assert f"fault: SIGTERM in {where}\n" in run.stderr
    assert "Traceback" not in run.stderr and "error:" not in run.stderr, run.stderr[-3000:]
    assert run.stdout.splitlines() == [START_UP_LINE]
    # Before the dataset scan ends nothing is made; later, only the empty checkpoints/.
    assert (_tree(workdir) if workdir.exists() else None) == (
        None if mode == "startterm" else {"checkpoints": None})


def test_sigterm_while_train_py_imports_jax_exits_75_in_one_line(tmp_path):
    """The first seconds go to importing JAX and TensorFlow, before train_cli's handler."""
    proc = subprocess.Popen(_command(tmp_path / "run"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # `import signal` is done in milliseconds, `import vit` takes seconds
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert out.splitlines() == [START_UP_LINE] and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_permission_denied_on_a_mid_run_save_stops_there_and_the_earlier_ones_stay(
        finished, tmp_path, monkeypatch):
    workdir = _copy(finished, tmp_path)
    # Making step 12's temporary directory fails as in a directory this user may not write to.
    _save_fails_at(monkeypatch, 12, PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
                   when="create")
    with pytest.raises(checkpoint.CheckpointError) as info:
        in_process.train(workdir, "--config.total_steps=16")
    directory = workdir.absolute() / "checkpoints"
    assert _one_line(info.value) == (
        f"cannot save step 12 to {directory} (PermissionError: [Errno 13] Permission "
        f"denied: '{directory}/12.orbax-checkpoint-tmp'): make {directory} writable by this "
        "user, then rerun the same command to resume from step 8 (the checkpoints already "
        "saved are kept)")
    assert _logged_steps(workdir) == [4, 8, 12]  # it stopped at the failed save, mid-run
    assert _steps(workdir) == ["4", "8"]
    _assert_same(_params(workdir), _params(finished[0]))
    _assert_same(_params(workdir, 4), _params(finished[0], 4))


def test_kill_during_a_save_resumes_from_the_previous_step_bit_exact(finished, tmp_path,
                                                                     caplog):
    killed = _train(tmp_path, fault=("kill", 8))
    assert killed.returncode == -signal.SIGKILL
    # The kill came in the save of step 8, after its files were written and before the rename,
    # and after the run had logged step 8, past its checkpoint of step 4.
    assert _steps(tmp_path) == ["4", "8.orbax-checkpoint-tmp"]
    assert (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp" / "state").is_dir()
    assert _logged_steps(tmp_path) == [4, 8]
    with caplog.at_level("INFO", logger="vit"):  # the rerun, in this process
        resumed = in_process.train(tmp_path)
    assert int(resumed.state.step) == 8 and not resumed.preempted
    assert f"resumed from {tmp_path.absolute()}/checkpoints at step 4" in caplog.messages
    assert _steps(tmp_path) == ["4", "8"]  # the half-written directory is gone
    assert _logged_steps(tmp_path) == [4, 8]  # step 8 was logged again, not twice
    _assert_same(_params(tmp_path), _params(finished[0]))
    assert _evals(resumed) == _evals(finished[1])


def test_sigterm_during_an_evaluation_saves_that_step_and_resumes_exactly(finished, tmp_path,
                                                                          caplog):
    preempted = _train(tmp_path, "--config.eval_every=2", fault=("sigterm", 2))
    assert preempted.returncode == EXIT_PREEMPTED, preempted.stderr[-3000:]
    assert "fault: SIGTERM during the evaluation of step 2\n" in preempted.stderr
    assert preempted.stdout.splitlines()[-1] == (
        f"preempted at step 2: checkpoint saved; rerun the same command to resume (exit status "
        f"{EXIT_PREEMPTED})")
    # The evaluation ran to its end, then step 2 (no periodic checkpoint) was saved, finalized.
    assert _steps(tmp_path) == ["2"] and _logged_steps(tmp_path) == [2]
    assert checkpoint.load_checkpoint(str(tmp_path)).step == 2
    with caplog.at_level("INFO", logger="vit"):  # the rerun, in this process
        resumed = in_process.train(tmp_path, "--config.eval_every=2")
    assert int(resumed.state.step) == 8 and not resumed.preempted
    assert f"resumed from {tmp_path.absolute()}/checkpoints at step 2" in caplog.messages
    assert _logged_steps(tmp_path) == [2, 4, 6, 8]
    _assert_same(_params(tmp_path), _params(finished[0]))
    assert _evals(resumed) == _evals(finished[1])


def test_a_failed_evaluation_loses_no_training_and_the_rerun_resumes_exactly(
        finished, tmp_path, monkeypatch, caplog):
    evaluate = trainer._evaluate

    def failing_evaluate(model, rstate, config, step, *args):  # as an unreadable eval split
        if step == 4:
            raise data.DataError("fault: the eval split is unreadable after step 4")
        return evaluate(model, rstate, config, step, *args)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_evaluate", failing_evaluate)
        with pytest.raises(data.DataError) as info:
            in_process.train(tmp_path, "--config.eval_every=4")
    assert _one_line(info.value) == "fault: the eval split is unreadable after step 4"
    assert _steps(tmp_path) == ["4"]  # saved before the evaluation that failed
    assert checkpoint.load_checkpoint(str(tmp_path)).step == 4
    with caplog.at_level("INFO", logger="vit"):
        resumed = in_process.train(tmp_path, "--config.eval_every=4")
    assert int(resumed.state.step) == 8 and not resumed.preempted
    assert f"resumed from {tmp_path.absolute()}/checkpoints at step 4" in caplog.messages
    assert _steps(tmp_path) == ["4", "8"]
    _assert_same(_params(tmp_path), _params(finished[0]))


def _smoke_config(total_steps: int, **overrides):
    config = _SMOKE_MODULE.get_config()
    config.data_dir = DATA_DIR
    config.total_steps = total_steps
    config.update(overrides)
    return config


def test_resume_does_not_read_init_from_again_and_restores_the_sigterm_handler(finished,
                                                                                 tmp_path):
    source = _copy(finished, tmp_path)
    workdir = str(tmp_path / "tuned")
    before = signal.getsignal(signal.SIGTERM)
    trainer.train(_smoke_config(4, init_from=str(source)), workdir)
    assert signal.getsignal(signal.SIGTERM) is before
    shutil.rmtree(source)  # the weights are in the workdir's checkpoint now
    result = trainer.train(_smoke_config(8, init_from=str(source)), workdir)
    assert int(result.state.step) == 8 and not result.preempted
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_resume_between_two_log_steps_logs_what_an_uninterrupted_run_logs(finished, tmp_path,
                                                                           monkeypatch):
    """Logged every 4 steps, stopped (and saved) at step 6: the resumed run's step-8 window
    covers steps 5 to 8, as the uninterrupted run's does, and logs the same values. (The
    uninterrupted run is `finished`: where a run saves changes none of the values it logs.)"""
    straight, resumed = finished[0], tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(PreemptionWatch, "reached", lambda self, step: step == 6)
        stopped = trainer.train(_smoke_config(8, checkpoint_every=2), str(resumed))
    assert stopped.preempted and int(stopped.state.step) == 6
    trainer.train(_smoke_config(8, checkpoint_every=2), str(resumed))

    def logged(workdir: Path) -> list[dict]:  # the throughput is the time's, not the run's
        return [{k: v for k, v in r.items() if k not in ("train/images_per_s",
                                                          "train/step_time_s")}
                for r in metrics.read_jsonl(workdir / "metrics.jsonl")]

    assert [r["step"] for r in logged(resumed)] == [4, 8]
    assert logged(resumed) == logged(straight)


def nan_batches(train_iterator, steps: set[int], process: int | None = None):
    """`train_iterator` (data's) with the batches of `steps` all NaN, on `process` only if given.

    uint8 holds no NaN, so every batch comes as float32 model inputs (the train step takes a
    float batch as normalised already): the same floats the step makes of the uint8 pixels
    (`preprocess.normalization_table`), and one program on every process.
    `_DRIVER` imports it, so it must stay importable without pytest's fixtures.
    """

    def iterator(config, start_step=0, **kwargs):
        table = preprocess.normalization_table(config.pp.normalize)
        for step, batch in enumerate(train_iterator(config, start_step=start_step, **kwargs),
                                     start_step + 1):
            image = table[batch["image"], np.arange(3)]
            if step in steps and process in (None, jax.process_index()):
                image = np.full_like(image, np.nan)
            yield dict(batch, image=image)

    return iterator


def _nan_at(steps: set[int], monkeypatch) -> None:
    """Make the training batches of `steps` all NaN."""
    monkeypatch.setattr(trainer.data, "train_iterator", nan_batches(data.train_iterator, steps))


def test_one_nan_batch_is_skipped_and_counted(tmp_path, monkeypatch):
    config = _smoke_config(4, skip_nonfinite=2, log_every=1, checkpoint_every=1,
                           keep_checkpoints=4)
    _nan_at({3}, monkeypatch)
    result = trainer.train(config, str(tmp_path))
    assert result.metrics["train/skipped_steps"] == 1.0
    assert int(result.state.opt_state.total_notfinite) == 1
    assert int(result.state.opt_state.notfinite_count) == 0  # step 4 was finite again
    # The skipped step 3 left the parameters as step 2 had made them; step 4 trained on.
    _assert_same(_params(tmp_path, 3), _params(tmp_path, 2))
    assert not np.array_equal(_params(tmp_path, 4)["head/kernel"],
                              _params(tmp_path, 3)["head/kernel"])


def test_more_non_finite_updates_than_the_cap_stop_the_run(tmp_path, monkeypatch):
    config = _smoke_config(8, skip_nonfinite=2, log_every=8, checkpoint_every=4)
    _nan_at({3, 4, 5, 6, 7, 8}, monkeypatch)
    with pytest.raises(nonfinite.NonFiniteLossError,
                       match=r"3 non-finite updates in a row \(more than skip_nonfinite=2\) at "
                             r"step 5"):
        trainer.train(config, str(tmp_path))
    kept = checkpoint.load_checkpoint(str(tmp_path))
    assert kept.step == 4  # steps 3 and 4 skipped: the same parameters as after step 2
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(kept.params))


def test_skipped_update_leaves_params_and_optimizer_state_unchanged():
    config = _smoke_config(8, skip_nonfinite=1, ema_decay=0.9, warmup_steps=2)
    info = data.DatasetInfo("cifar10", 10, tuple("0123456789"), (32, 32, 3), {})
    model = trainer.build_model(config, info)
    params = trainer.initial_params(config, model, jax.random.PRNGKey(0))
    tx = nonfinite.wrap_optimizer(optim.make_optimizer(config, params), 1)
    state = trainer.create_train_state(params, tx, jax.random.PRNGKey(1), use_ema=True)
    step = jax.pmap(trainer.make_train_step(model, tx, config, 10), axis_name=parallel.AXIS)
    n = jax.local_device_count()
    batch = {"image": np.full((n, 2, 32, 32, 3), np.nan, np.float32),
             "label": np.zeros((n, 2), np.int32)}
    new, metrics = step(parallel.replicate(state), parallel.shard(batch))
    new = parallel.unreplicate(new)
    assert int(new.step) == 1 and float(metrics["skipped_steps"][0]) == 1.0
    for field in ("params", "ema_params"):
        _assert_same(traverse_util.flatten_dict(getattr(new, field)),
                     traverse_util.flatten_dict(getattr(state, field)))
    for a, b in zip(jax.tree_util.tree_leaves(new.opt_state.inner_state),
                    jax.tree_util.tree_leaves(state.opt_state.inner_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (int(new.opt_state.notfinite_count), int(new.opt_state.total_notfinite)) == (1, 1)
    # The next, finite update is the optimizer's first: it applies (and logs) lr(0), not lr(1).
    # So is the EMA's: its warm-up decay is that of update 0 (0.1), not of update 1 (0.18); an
    # EMA of zeros shows which, as lr(0) = 0 leaves the params where they are.
    batch["image"] = np.zeros_like(batch["image"])
    new = new.replace(ema_params=jax.tree_util.tree_map(np.zeros_like, new.ema_params))
    after, metrics = step(parallel.replicate(new), parallel.shard(batch))
    after = parallel.unreplicate(after)
    schedule = optim.learning_rate_schedule(config)
    assert float(schedule(0)) != float(schedule(1))
    assert float(metrics["lr"][0]) == pytest.approx(float(schedule(0)))
    want = optim.ema_update(new.ema_params, after.params, optim.ema_decay_at(0, 0.9))
    for a, b in zip(jax.tree_util.tree_leaves(after.ema_params), jax.tree_util.tree_leaves(want),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# --- two processes on 127.0.0.1, SIGTERM to one of them -------------------------------------

EXIT_WITHIN = 60.0  # seconds from the SIGTERM to both processes' exit, the first compile done

def _start_pair(workdir: Path, fault: tuple[str, int] | None = None) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    # XLA's default fusion emitters: the NaN fault feeds float batches, a program other than
    # the reference's uint8 one, which rounds alike only under them (tests/jax_env.py).
    return [subprocess.Popen(
        _command(workdir, "--multihost", f"--coordinator_address={addr}", "--num_processes=2",
                 f"--process_id={pid}", fault=fault),
        env=_env(devices=2, fusion_emitters=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
        for pid in range(2)]


class _Drain:
    """Reads a process's stdout and stderr in threads; `started` is set at a line holding
    `marker`."""

    def __init__(self, proc: subprocess.Popen, marker: str = "training steps"):
        self.proc, self.out, self.err, self.marker = proc, [], [], marker
        self.started = threading.Event()
        self._threads = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                         for s, sink in ((proc.stdout, self.out), (proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    def _read(self, stream, sink: list) -> None:
        for line in stream:
            sink.append(line)
            if self.marker in line:
                self.started.set()

    def finish(self) -> tuple[str, str]:
        for t in self._threads:
            t.join(timeout=30)
        return "".join(self.out), "".join(self.err)


def _run_pair(workdir: Path, sigterm_to: int | None = None, limit: float = 240.0,
              fault: tuple[str, int] | None = None) -> list[subprocess.CompletedProcess]:
    """Both processes' status and output; the test fails on a hang (the watchdog).

    With `sigterm_to`, the steps after the first come a second apart (the `slow` fault) and
    the signal goes to that process once both have finished step 1 (the first compile); both
    must then exit within EXIT_WITHIN seconds of it.
    """
    if sigterm_to is not None:
        fault = ("slow", 1000)
    procs = _start_pair(workdir, fault)
    drains = [_Drain(p, "fault: batch 2" if sigterm_to is not None else "training steps")
              for p in procs]
    signalled = None
    try:
        if sigterm_to is not None:
            for d in drains:
                assert d.started.wait(limit), "".join(d.err)[-3000:]
            procs[sigterm_to].send_signal(signal.SIGTERM)
            signalled, limit = time.monotonic(), 2 * EXIT_WITHIN  # beyond that: a hang
        deadline = time.monotonic() + limit
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pytest.fail(f"watchdog: the two processes did not exit within {limit:.0f} s: "
                    + "".join(drains[0].err)[-1500:] + "".join(drains[1].err)[-1500:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if signalled is not None:
        took = time.monotonic() - signalled
        assert took < EXIT_WITHIN, f"both processes exited {took:.0f} s after the SIGTERM"
    return [subprocess.CompletedProcess(p.args, p.returncode, *d.finish())
            for p, d in zip(procs, drains, strict=True)]


@pytest.fixture(scope="module")
def pair_reference(tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted two-process smoke run and its evaluation lines."""
    workdir = tmp_path_factory.mktemp("pair")
    results = _run_pair(workdir)
    for run in results:
        assert run.returncode == 0, run.stderr[-3000:]
    assert _eval_lines(results[0].stdout) == _eval_lines(results[1].stdout) != []
    return workdir, results[0].stdout


def _preempted_step(results: list[subprocess.CompletedProcess]) -> int:
    """The step both processes report, after checking they both exited as preempted."""
    said = []
    for run in results:
        assert run.returncode == EXIT_PREEMPTED, run.stderr[-3000:]
        said.append([line for line in run.stdout.splitlines()
                     if line.startswith("preempted at step")])
    assert said[0] == said[1] and len(said[0]) == 1, said
    return int(said[0][0].split()[3].rstrip(":"))


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(pair_reference, tmp_path):
    """SIGTERM to process 1 only, resume, SIGTERM to process 0 only, resume to the end."""
    first = _preempted_step(_run_pair(tmp_path, sigterm_to=1))
    assert _steps(tmp_path) == [str(first)] and first < 8  # one finalized checkpoint
    second = _preempted_step(_run_pair(tmp_path, sigterm_to=0))
    assert first < second < 8  # the resumed run was preempted too, at a step of its own
    assert _steps(tmp_path) == sorted([str(first), str(second)])

    resumed = _run_pair(tmp_path)
    for run in resumed:
        assert run.returncode == 0, run.stderr[-3000:]
    _assert_same(_params(tmp_path), _params(pair_reference[0]))
    assert _eval_lines(resumed[0].stdout) == _eval_lines(pair_reference[1])


def test_nan_in_one_of_two_processes_stops_both_at_one_step_with_one_message(pair_reference,
                                                                             tmp_path):
    """Only process 1's batch of step 6 is NaN; the loss and gradients are averaged over both."""
    lines = [_error_line(run) for run in _run_pair(tmp_path, fault=("nan", 6))]
    assert lines == 2 * [
        "error: loss became nan at step 6: lower the learning rate (lr) or the gradient-clipping "
        "norm (grad_clip_norm); the last good checkpoint is kept"]
    assert _steps(tmp_path) == ["4"]  # nothing saved after the NaN: step 8 was not
    _assert_same(_params(tmp_path), _params(pair_reference[0], 4))


def test_an_optional_key_is_set_back_to_none_from_the_command_line(tmp_path):
    """absl would parse "None" as the key's type (a float for ema_decay); train.py sets it."""
    in_process.train(tmp_path, "--config.ema_decay=0.5", "--config.total_steps=2")  # EMA on
    assert checkpoint.load_checkpoint(str(tmp_path)).ema_params is not None
    off = _train(tmp_path / "off", "--config.ema_decay=None", "--config.total_steps=2")
    assert off.returncode == 0, off.stderr[-2000:]
    contents = checkpoint.load_checkpoint(str(tmp_path / "off"))
    assert contents.ema_params is None and contents.config["ema_decay"] is None
    bad = _train(tmp_path / "bad", "--config.model.nope=None")
    assert _error_line(bad).startswith("error: flag --config.model.nope=None: the config has no "
                                       "key 'model.nope'")
    assert not (tmp_path / "bad").exists()


def test_none_for_a_key_that_needs_a_value_is_one_line(capsys):
    """What train.py does with --config.KEY=None, in this process: a key whose default is a
    value refuses None (validation would meet it as a TypeError), but for grad_clip_norm."""
    from vit import train_cli  # defines train.py's absl flags

    config = _smoke_config(2)
    for key, default in (("lr", "0.001"), ("pp", "a group of keys such as pp."),
                         ("log_every", "50")):
        with pytest.raises(SystemExit) as info:
            train_cli._set_to_none(config, key)
        assert info.value.code == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"error: flag --config.{key}=None: {key} needs a value (it is not "
                               "optional; its default is ") and default in line, line
        assert "\n" not in line and config[key] is not None
    train_cli._set_to_none(config, "grad_clip_norm")  # None beside its default: no clipping
    assert config.grad_clip_norm is None
    optim.make_optimizer(config, {"head": {"kernel": np.zeros((2, 2))}})
