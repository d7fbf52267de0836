"""The training loop end to end: CLI runs on the shipped CIFAR-10, multi-device parity,
multi-host, exact resume after SIGTERM / SIGKILL, NaN handling, TensorBoard events."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import in_process
import jax
import jax_env
import numpy as np
import pytest
from event_files import event_steps
from flax import traverse_util
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from vit import checkpoint, config_schema, data, metrics, optim, parallel, preprocess, trainer
from vit.distill import Teacher
from vit.model import init_params, model_from_config
from vit.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = str((ROOT.parent / "shared" / "data" / "tfds").resolve())
STEPS = 24  # checkpoints every 4 (the smoke config's): three kept, a SIGKILL lands between


def _env(devices: int = 1) -> dict[str, str]:
    return jax_env.subprocess_env(devices, TFDS_DATA_DIR=DATA_DIR, PYTHONPATH=str(ROOT))


def _train_cmd(workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/smoke.py",
            f"--workdir={workdir}", f"--config.total_steps={STEPS}", *overrides]


def _run(workdir: Path, *overrides: str, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(_train_cmd(workdir, *overrides), env=_env(devices), capture_output=True,
                          text=True, timeout=300)


def _train_here(workdir: Path, *overrides: str) -> trainer.TrainResult:
    """`_run`'s training in this process (tests/in_process.py); it must end as train.py's exit
    status 0 does: no exception, not preempted."""
    result = in_process.train(workdir, f"--config.total_steps={STEPS}", *overrides)
    assert not result.preempted and not result.before_first_step
    return result


def _params(workdir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    contents = checkpoint.load_checkpoint(str(workdir), step)
    return traverse_util.flatten_dict(contents.params, sep="/")


def _assert_same_params(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if tolerance and name.endswith("key/bias"):
            # Softmax ignores the key bias, so its exact gradient is zero and Adam turns float
            # noise into tiny updates that no two summation orders share: check it stays tiny.
            assert np.abs(a[name]).max() < 1e-3 and np.abs(b[name]).max() < 1e-3
        elif tolerance:
            np.testing.assert_allclose(a[name], b[name], err_msg=name, **tolerance)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _eval_lines(workdir: Path) -> list[dict]:
    """The eval values of each step that has them (a step's train values share its line)."""
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k == "step" or k.startswith("eval")}
            for x in lines if "eval/top1" in x]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """An uninterrupted STEPS-step train.py run, logging every step, checkpointing every 4."""
    workdir = tmp_path_factory.mktemp("straight")
    done = _run(workdir, "--config.log_every=1", "--config.eval_images=4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eval/top1:" in done.stdout
    return workdir


def test_run_writes_checkpoints_metrics_and_tensorboard(straight_run):
    assert sorted(int(p.name) for p in (straight_run / "checkpoints").iterdir()) == [
        STEPS - 8, STEPS - 4, STEPS]
    contents = checkpoint.load_checkpoint(str(straight_run))
    assert contents.step == STEPS
    assert contents.config["model"]["variant"] == "Ti/8"
    assert contents.dataset_info["class_names"][0] == "airplane"
    lines = [json.loads(x) for x in (straight_run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in lines if "train/loss" in x]
    assert train_steps == list(range(1, STEPS + 1))
    # tf.summary writes tensor events: scalars, the config as text, images at evaluations
    events = EventAccumulator(str(straight_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"train/loss", "train/accuracy", "train/lr", "train/grad_norm", "train/images_per_s",
            "eval/top1", "eval/top5", "eval/loss", "config", "eval/confusion_matrix",
            "eval/attention"} <= tags
    losses = events.Tensors("train/loss")
    assert [e.step for e in losses] == train_steps
    np.testing.assert_allclose([float(tensor_util.make_ndarray(e.tensor_proto)) for e in losses],
                               [x["train/loss"] for x in lines if "train/loss" in x], rtol=1e-6)
    assert events.Tensors("eval/top1")[-1].step == STEPS
    assert [e.step for e in events.Tensors("eval/attention")] == [STEPS]


def test_resume_after_sigterm_is_exact(straight_run, tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path, "--config.log_every=1"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    while not seen or "training steps 1 to" not in seen[-1]:  # the handler is installed
        seen.append(proc.stderr.readline())
        assert seen[-1], "training ended before it started: " + "".join(seen[-20:])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    stopped_at = checkpoint.load_checkpoint(str(tmp_path)).step
    assert stopped_at < STEPS, "the run finished before SIGTERM arrived"
    assert f"preempted at step {stopped_at}" in out

    _train_here(tmp_path, "--config.log_every=1")  # the resume, in this process
    _assert_same_params(_params(tmp_path), _params(straight_run))
    assert _eval_lines(tmp_path)[-1] == _eval_lines(straight_run)[-1]


def _logged_steps(workdir: Path) -> list[int]:
    """Steps of the complete lines of a (possibly still written) metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_resume_after_sigkill_between_saves_is_exact(straight_run, tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path, "--config.log_every=1"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def logged_past_the_checkpoints() -> bool:
        saved = [int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit()]
        logged = _logged_steps(tmp_path)
        return bool(saved and logged) and logged[-1] > max(saved)

    while not logged_past_the_checkpoints():
        assert proc.poll() is None, "the run ended before it logged a step past a checkpoint"
        os.sched_yield()
    proc.kill()
    proc.wait(timeout=60)
    latest = checkpoint.load_checkpoint(str(tmp_path)).step
    assert latest < STEPS
    # The scenario really happened: the killed run had logged steps its checkpoint lacks.
    assert _logged_steps(tmp_path)[-1] > latest

    _train_here(tmp_path, "--config.log_every=1")  # the resume, in this process
    _assert_same_params(_params(tmp_path), _params(straight_run))
    assert _eval_lines(tmp_path)[-1] == _eval_lines(straight_run)[-1]
    # Each step once in metrics.jsonl and once per tag in the event files: the steps the killed
    # run logged past its last checkpoint were replaced, not repeated.
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    for tag, tag_steps in event_steps(tmp_path / "tensorboard").items():
        assert len(tag_steps) == len(set(tag_steps)), tag


def _drop_evaluation(workdir: Path, step: int) -> None:
    """Make `workdir` look killed while evaluating `step`: its later lines, checkpoints and
    summaries gone, and step's line without the eval values."""
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    kept = [{k: v for k, v in x.items() if not (x["step"] == step and k.startswith("eval"))}
            for x in lines if x["step"] <= step]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept))
    for saved in (workdir / "checkpoints").iterdir():
        if saved.name.isdigit() and int(saved.name) > step:
            shutil.rmtree(saved)
    metrics.prune_event_files(workdir / "tensorboard", step - 1)


def test_an_evaluation_killed_after_its_save_is_run_again_on_resume(tmp_path):
    """A run SIGKILLed while evaluating a step it had just saved resumes by evaluating that step
    (it would otherwise start at the next and never record it), and a finished run killed in its
    final evaluation records it on the rerun; each step once in metrics.jsonl, values exact."""
    every = ("--config.total_steps=8", "--config.eval_every=4", "--config.log_every=1")
    done = in_process.train(tmp_path / "straight", *every)  # the runs in this process
    assert not done.preempted
    straight = _eval_lines(tmp_path / "straight")
    assert [x["step"] for x in straight] == [4, 8]
    for step in (4, 8):
        workdir = tmp_path / f"killed_at_{step}"
        shutil.copytree(tmp_path / "straight", workdir)
        _drop_evaluation(workdir, step)
        assert [x["step"] for x in _eval_lines(workdir)] == [4] * (step == 8)
        resumed = in_process.train(workdir, *every)
        assert not resumed.preempted
        assert _eval_lines(workdir) == straight
        assert _logged_steps(workdir) == list(range(1, 9))
        for tag, tag_steps in event_steps(workdir / "tensorboard").items():
            assert len(tag_steps) == len(set(tag_steps)), tag
    again = in_process.train(tmp_path / "straight", *every)  # recorded already: nothing written
    assert not again.preempted and _eval_lines(tmp_path / "straight") == straight


def test_four_devices_match_one_device_with_the_same_global_batch(straight_run, tmp_path):
    four = _run(tmp_path, "--config.log_every=1", devices=4)
    assert four.returncode == 0, four.stderr[-2000:]
    _assert_same_params(_params(tmp_path), _params(straight_run), rtol=2e-4, atol=2e-6)


_MULTIHOST_DRIVER = """
import hashlib, sys
import numpy as np, jax
from flax import traverse_util
sys.argv = sys.argv[:1]
from configs.smoke import get_config
from vit import trainer
config = get_config()
config.total_steps = 6
config.distributed = True
config.coordinator_address, config.num_processes, config.process_id = "{addr}", 2, {pid}
result = trainer.train(config, "{workdir}")
flat = traverse_util.flatten_dict(result.state.params, sep="/")
digest = hashlib.sha256(b"".join(np.asarray(flat[k]).tobytes() for k in sorted(flat)))
# To a file: Gloo's C++ logging shares stdout and has landed inside a line written there.
with open("{workdir}/result-{pid}", "w") as out:
    out.write(f"RESULT {{jax.process_count()}} {{jax.device_count()}} {{digest.hexdigest()}} "
              f"{{round(result.metrics['eval/top1'], 6)}}")
"""


def test_two_processes_train_together_and_agree(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [subprocess.Popen(
        [sys.executable, "-c", _MULTIHOST_DRIVER.format(addr=addr, pid=pid, workdir=tmp_path)],
        env=_env(devices=2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    results = [(tmp_path / f"result-{pid}").read_text() for pid in range(2)]
    assert results[0] == results[1]
    assert results[0].split()[1:3] == ["2", "4"]
    assert checkpoint.load_checkpoint(str(tmp_path)).step == 6


_MISMATCH_DRIVER = """
import sys
sys.argv = sys.argv[:1]
from configs.smoke import get_config
from vit import parallel, trainer
{patch}
config = get_config()
config.total_steps = {steps}
config.distributed = True
config.coordinator_address, config.num_processes, config.process_id = "{addr}", 2, {pid}
try:
    trainer.train(config, "{workdir}")
except parallel.ParallelError as err:
    sys.stdout.write(f"ERROR {{err}}\\n")
"""


def test_two_processes_with_different_configs_stop_at_start_in_one_line(tmp_path):
    """Different total_steps used to hang both processes at the shorter run's end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [subprocess.Popen(
        [sys.executable, "-c", _MISMATCH_DRIVER.format(addr=addr, pid=pid, workdir=tmp_path,
                                                       steps=4 + 4 * pid, patch="")],
        env=_env(devices=1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for out in outputs:
        assert ("ERROR process 1's config differs from process 0's: start every process with "
                "the same config file and --config flags") in out, out[-2000:]
    assert not (tmp_path / "checkpoints").exists()


_ONE_EXAMPLE_SHORT = """
import dataclasses
from vit import data
_read = data.dataset_info
def _one_short(config):
    info = _read(config)
    return dataclasses.replace(info, split_sizes={**info.split_sizes,
                                                  "train": info.split_sizes["train"] - 1})
data.dataset_info = _one_short
"""


def test_two_processes_that_see_different_datasets_stop_at_start_in_one_line(tmp_path):
    """Process 1's copy of the data lacks an example: its parts and eval batches would differ."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [subprocess.Popen(
        [sys.executable, "-c", _MISMATCH_DRIVER.format(
            addr=addr, pid=pid, workdir=tmp_path, steps=4,
            patch=_ONE_EXAMPLE_SHORT if pid else "")],
        env=_env(devices=1), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for out, err in outputs:
        assert ("ERROR process 1's dataset (its classes and split sizes) differs from process "
                "0's: give every process the same copy of ") in out, (out + err)[-3000:]
    assert not (tmp_path / "checkpoints").exists()


_PREPARED_HERE = """
import os
import numpy as np
import tensorflow_datasets as tfds

class TinyToPrepare(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({{
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=2)}}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        if {fail}:
            raise ConnectionError("no network here")
        with open(os.path.join("{log}", "prepared-by-{pid}"), "w"):  # who prepared it
            pass
        return {{"train": self._generate_examples(16), "test": self._generate_examples(8)}}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {{"image": np.full((32, 32, 3), 8 * i, np.uint8), "label": i % 2}}
"""


@pytest.mark.parametrize("data_dirs", ["shared", "own", "process 0 fails"])
def test_two_processes_with_download_prepare_a_shared_data_dir_once(tmp_path, data_dirs):
    """download=True: process 0 prepares while process 1 waits, which then finds a shared
    data_dir prepared (before, both prepared it at once and the run hung) or prepares its own;
    when process 0 cannot prepare, both stop."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    log = tmp_path / "log"
    log.mkdir()
    driver = _MISMATCH_DRIVER.replace("config.total_steps", "config.dataset = 'tiny_to_prepare'\n"
                                      "config.train_split, config.eval_split = 'train', 'test'\n"
                                      "config.download, config.eval_batch_size = True, 8\n"
                                      "config.total_steps")
    procs = []
    for pid in range(2):
        env = _env(devices=1)
        env["TFDS_DATA_DIR"] = str(tmp_path / ("tfds" if data_dirs != "own" else f"tfds-{pid}"))
        patch = _PREPARED_HERE.format(log=log, pid=pid, fail=data_dirs == "process 0 fails")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", driver.format(addr=addr, pid=pid, workdir=tmp_path / "run",
                                                 steps=2, patch=patch)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=180) for p in procs]
    prepared = sorted(p.name for p in log.iterdir())
    if data_dirs == "process 0 fails":
        assert [p.returncode for p in procs] == [1, 1] and prepared == []
        assert "DataError: could not prepare 'tiny_to_prepare': no network here" in outputs[0][1]
        assert ("DataError: process 0 could not prepare 'tiny_to_prepare': see its error"
                in outputs[1][1]), outputs[1][1][-3000:]
        return
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and "ERROR" not in out, (out + err)[-3000:]
    assert prepared == (["prepared-by-0"] if data_dirs == "shared" else
                        ["prepared-by-0", "prepared-by-1"])
    assert checkpoint.load_checkpoint(str(tmp_path / "run")).step == 2


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    """In this process: train.py prints the exception's `_one_line` as its `error:` line and
    exits 1 for these classes (the printing itself: test_faults.py's NaN in one of two
    processes)."""
    from vit.train_cli import _one_line

    with pytest.raises((ValueError, OSError, RuntimeError)) as failed:
        in_process.train(tmp_path, f"--config.total_steps={STEPS}", "--config.lr=1e38",
                         "--config.warmup_steps=4", "--config.schedule=constant",
                         "--config.checkpoint_every=1", "--config.log_every=1")
    error = _one_line(failed.value)
    assert "\n" not in error and ("non-finite" in error or "loss became" in error)
    assert "lower the learning rate" in error
    bad_step = int(error.split(" at step ")[1].split(":")[0])
    good = checkpoint.load_checkpoint(str(tmp_path))
    assert good.step < bad_step
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(good.params))


def test_unknown_config_key_fails_at_start_up(tmp_path):
    failed = _run(tmp_path, "--config.lrr=0.1")
    assert failed.returncode != 0
    assert "lrr" in failed.stderr
    assert not (tmp_path / "checkpoints").exists()
    config = config_schema.default_config()
    config.pp.flipp = True
    with pytest.raises(config_schema.ConfigError, match="unknown config key 'pp.flipp'.*'flip'"):
        config_schema.validate_config(config)


@pytest.mark.parametrize("extra", ["plain", "pgd", "distill"])
def test_gradient_accumulation_matches_one_big_batch(extra):
    """4 micro-batches give the update of the whole batch, with the adversarial attack
    (adv_train: per-example random starts) and the teacher's logits made per micro-batch.
    The attack is L2 PGD: an L-inf step takes the sign of each pixel's gradient, and where a
    gradient is near zero the micro-batches' other summation order can flip it."""
    config = config_schema.default_config()
    config.update(total_steps=10, warmup_steps=0, schedule="constant", lr=1e-2)
    model = model_from_config({"variant": "Ti/8", "width": 32, "depth": 1,
                               "num_heads": 2, "mlp_dim": 64}, num_classes=10, image_size=16)
    params = init_params(model, jax.random.PRNGKey(0))
    params["head"]["kernel"] = np.full(params["head"]["kernel"].shape, 0.01, np.float32)
    teacher = None
    if extra == "pgd":
        config.adv_train.update(method="pgd", steps=2, norm="l2", eps=0.5)
    elif extra == "distill":
        teacher_params = init_params(model, jax.random.PRNGKey(7))
        teacher = Teacher(model, teacher_params, config.pp.normalize)
    batch = {"image": np.random.default_rng(0).normal(size=(1, 8, 16, 16, 3)).astype(np.float32),
             "label": np.arange(8, dtype=np.int32).reshape(1, 8)}
    results = []
    for accum in (1, 4):
        config.grad_accum_steps = accum
        tx = optim.make_optimizer(config, params)
        state = trainer.create_train_state(params, tx, jax.random.PRNGKey(1), use_ema=False)
        step = jax.pmap(trainer.make_train_step(model, tx, config, 10, teacher),
                        axis_name=parallel.AXIS)
        args = () if teacher is None else (parallel.replicate(teacher.params),)
        new_state, metrics = step(parallel.replicate(state), parallel.shard(batch), *args)
        results.append((parallel.unreplicate(new_state.params), float(metrics["loss"][0])))
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(results[0][0]),
                    jax.tree_util.tree_leaves(results[1][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.fusion_emitters
@pytest.mark.parametrize("adv", ["none", "fgsm"])
def test_train_step_on_uint8_batches_equals_the_old_host_normalised_path(adv):
    """data.train_iterator yields uint8 pixels and the step normalises them on the device: three
    steps give bit for bit the state and metrics of three steps fed the float32 batches the host
    pipeline used to yield (preprocess.normalize), mixup / cutmix on the normalised floats and
    adversarial training included."""
    config = config_schema.default_config()
    config.update(data_dir=DATA_DIR, train_split="train[:64]", shuffle_buffer=64, batch_size=8,
                  total_steps=10, warmup_steps=0, schedule="constant", lr=1e-2,
                  label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.9)
    config.pp.normalize = "cifar10"
    config.adv_train.method = adv
    model = model_from_config({"variant": "Ti/8", "width": 32, "depth": 1, "num_heads": 2,
                               "mlp_dim": 64}, num_classes=10, image_size=32)
    params = init_params(model, jax.random.PRNGKey(0))
    tx = optim.make_optimizer(config, params)
    start = trainer.create_train_state(params, tx, jax.random.PRNGKey(1), use_ema=True)
    it = data.train_iterator(config, num_devices=jax.local_device_count())
    pixels = [next(it) for _ in range(3)]
    assert all(b["image"].dtype == np.uint8 for b in pixels)
    floats = [dict(b, image=preprocess.normalize(b["image"], "cifar10").numpy()) for b in pixels]
    step = jax.pmap(trainer.make_train_step(model, tx, config, 10), axis_name=parallel.AXIS)

    def run(batches):
        state, history = parallel.replicate(start), []
        for batch in batches:
            state, metrics = step(state, parallel.shard(batch))
            history.append(jax.device_get(metrics))
        return jax.device_get(parallel.unreplicate(state)), history

    (new, new_metrics), (old, old_metrics) = run(pixels), run(floats)
    for a, b in zip(jax.tree_util.tree_leaves((new, new_metrics)),
                    jax.tree_util.tree_leaves((old, old_metrics)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(new.params["head"]["kernel"], start.params["head"]["kernel"])


def test_resume_is_exact_with_conv_stem_and_token_dropping(tmp_path, caplog):
    """Token dropping draws from the per-step rng, so a resumed run drops the same tokens."""
    extra = ("--config.model.stem=conv", "--config.model.token_keep_ratio=0.5",
             "--config.schedule=constant", "--config.checkpoint_every=100")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    in_process.train(straight, *extra, "--config.total_steps=12")
    in_process.train(resumed, *extra, "--config.total_steps=8")
    assert checkpoint.load_checkpoint(str(resumed)).step == 8
    in_process.train(resumed, *extra, "--config.total_steps=12")
    _assert_same_params(_params(resumed), _params(straight))
    assert _eval_lines(resumed)[-1] == _eval_lines(straight)[-1]

    # full_tokens_fraction: the last third keeps every token, which is the run above resumed at
    # step 8 with token dropping off.
    tail, by_hand = tmp_path / "tail", tmp_path / "by_hand"
    with caplog.at_level("INFO", logger="vit"):
        in_process.train(tail, *extra, "--config.total_steps=12",
                         "--config.full_tokens_fraction=0.34")
    assert "steps 9 to 12 train with every patch token" in caplog.text
    shutil.copytree(resumed / "checkpoints" / "8", by_hand / "checkpoints" / "8")
    in_process.train(by_hand, *extra, "--config.total_steps=12",
                     "--config.model.token_keep_ratio=1.0")
    _assert_same_params(_params(tail), _params(by_hand))
    assert not np.array_equal(_params(tail)["head/kernel"], _params(straight)["head/kernel"])


def _smoke_config():
    spec = importlib.util.spec_from_file_location("smoke_config", ROOT / "configs" / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data_dir = DATA_DIR
    return config


def test_progress_is_offered_every_step_and_lr_is_the_rate_of_the_logged_step(tmp_path,
                                                                               monkeypatch):
    """The bar decides when to print (every 10 s in a log file), so the loop offers it every
    step, with the loss and lr last logged; train/lr is the rate the logged step applied, not
    the window's mean."""
    offered = []

    class Recording(metrics.ProgressBar):
        def update(self, step: int, **fields: float) -> None:
            offered.append((step, fields))

    monkeypatch.setattr(metrics, "ProgressBar", Recording)
    config = _smoke_config()  # 8 steps, logged every 4
    trainer.train(config, str(tmp_path))
    # Compiled, as the train step runs it (op by op, jnp.cos rounds differently).
    schedule = jax.jit(optim.learning_rate_schedule(config))
    records = {r["step"]: r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")}
    # The update that ends at step 4 is the one taken from state.step 3: schedule(3).
    assert [records[4]["train/lr"], records[8]["train/lr"]] == [
        float(schedule(np.int32(3))), float(schedule(np.int32(7)))]
    shown = {s: {"loss": records[s]["train/loss"], "lr": records[s]["train/lr"]} for s in (4, 8)}
    assert offered == ([(s, {}) for s in (1, 2, 3)] + [(s, shown[4]) for s in (4, 5, 6, 7)]
                       + [(8, shown[8])])
