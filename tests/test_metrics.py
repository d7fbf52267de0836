"""Tests for vit.metrics: TensorBoard events through tf.summary (scalars, text, images) read
back with EventAccumulator, metrics.jsonl (one line per step, cleaned on resume), progress/ETA."""

import io
import json
import time

import numpy as np
import pytest
from event_files import event_steps
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from vit import metrics


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})  # 0: keep every event
    acc.Reload()
    return acc


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the tf.summary scalars (tensor events of the scalars plugin)."""
    acc = _events(logdir)
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in
                  acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]
            if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}


def _jsonl(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_and_jsonl_hold_the_scalars(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write_scalars(10, {"train/loss": 2.5, "lr": 0.001})
    writer.write_scalars(20, {"train/loss": 1.25})
    writer.close()
    events = _scalars(tmp_path / "tensorboard")
    assert events["train/loss"] == [(10, 2.5), (20, 1.25)]
    assert [s for s, _ in events["lr"]] == [10]
    assert events["lr"][0][1] == pytest.approx(0.001)
    assert _jsonl(tmp_path) == [
        {"step": 10, "train/loss": 2.5, "lr": 0.001}, {"step": 20, "train/loss": 1.25}]


def test_config_text_and_images_read_back_with_event_accumulator(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write_config(0, {"lr": 0.001, "model": {"variant": "Ti/4"}})
    pixels = np.zeros((12, 20, 3), np.uint8)
    pixels[:, :10, 0] = 255
    writer.write_images(8, {"eval/confusion_matrix": pixels, "eval/attention": pixels[:, ::-1]})
    writer.close()
    acc = _events(tmp_path / "tensorboard")
    plugins = {tag: acc.SummaryMetadata(tag).plugin_data.plugin_name
               for tag in acc.Tags()["tensors"]}
    assert plugins == {"config": "text", "eval/confusion_matrix": "images",
                       "eval/attention": "images"}
    text = tensor_util.make_ndarray(acc.Tensors("config")[0].tensor_proto).item().decode()
    assert '"variant": "Ti/4"' in text
    image = acc.Tensors("eval/confusion_matrix")[0]
    assert image.step == 8
    width, height, png = tensor_util.make_ndarray(image.tensor_proto)  # tf.summary.image's layout
    assert (int(width), int(height)) == (20, 12) and png.startswith(b"\x89PNG")


def test_one_jsonl_line_per_step_and_nan_is_valid_json(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write_scalars(4, {"train/loss": 3.0})
    writer.write_scalars(4, {"eval/top1": 0.5})  # same step: joins the line
    writer.write_scalars(8, {"train/loss": float("nan")})
    writer.close()
    assert _jsonl(tmp_path) == [{"step": 4, "train/loss": 3.0, "eval/top1": 0.5},
                                {"step": 8, "train/loss": "nan"}]


def test_resume_drops_the_steps_past_the_checkpoint_from_both_files(tmp_path):
    first = metrics.MetricWriter(str(tmp_path), start_step=0)
    for step in range(1, 8):  # killed at step 7; its last checkpoint was step 4
        first.write_scalars(step, {"train/loss": 1.0 / step})
    first.write_scalars(4, {"eval/top1": 0.25})
    first.flush()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # a line cut short by the kill
    del first  # never closed, as after SIGKILL
    second = metrics.MetricWriter(str(tmp_path), start_step=4)
    for step in range(5, 9):
        second.write_scalars(step, {"train/loss": 2.0 / step})
    second.close()
    records = _jsonl(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))  # each step once
    assert records[3] == {"step": 4, "train/loss": 0.25, "eval/top1": 0.25}
    assert records[5]["train/loss"] == pytest.approx(2.0 / 6)
    steps = event_steps(tmp_path / "tensorboard")
    assert steps["train/loss"] == list(range(1, 9)) and steps["eval/top1"] == [4]
    assert _scalars(tmp_path / "tensorboard")["train/loss"][5][1] == pytest.approx(2.0 / 6)


def test_a_resume_in_the_same_second_writes_a_file_that_sorts_after_the_old_one(tmp_path):
    """TensorBoard reads event files in name order and purges steps that a later-read file's
    lower steps orphan: the resumed writer's file must sort last even within one second."""
    old = metrics.MetricWriter(str(tmp_path / "old"), start_step=0)
    for step in range(1, 5):
        old.write_scalars(step, {"train/loss": 1.0 / step})
    old.close()
    (made,) = (tmp_path / "old" / "tensorboard").iterdir()
    logdir = tmp_path / "run" / "tensorboard"
    logdir.mkdir(parents=True)
    # another process's file of this second whose host name sorts after any real one
    made.rename(logdir / f"events.out.tfevents.{int(time.time())}.~host.99999.99.v2")
    resumed = metrics.MetricWriter(str(tmp_path / "run"), start_step=4)
    for step in range(5, 9):
        resumed.write_scalars(step, {"train/loss": 2.0 / step})
    resumed.close()
    assert event_steps(logdir)["train/loss"] == list(range(1, 9))
    assert [s for s, _ in _scalars(logdir)["train/loss"]] == list(range(1, 9))  # none purged


def test_wait_past_event_files_sleeps_only_within_the_newest_files_second(tmp_path):
    (tmp_path / "events.out.tfevents.1000.host.7.0.v2").write_bytes(b"")
    (tmp_path / "events.out.tfevents.0999.host.7.1.v2").write_bytes(b"")
    slept = []
    for now in (1000.25, 1001.0, 999.5, 1200.0):
        metrics.wait_past_event_files(tmp_path, clock=lambda now=now: now, sleep=slept.append)
    assert slept == [0.75]
    metrics.wait_past_event_files(tmp_path / "none", clock=lambda: 5.0, sleep=slept.append)
    assert slept == [0.75]


def test_fresh_start_clears_files_left_before_any_checkpoint(tmp_path):
    first = metrics.MetricWriter(str(tmp_path), start_step=0)
    first.write_config(0, {"lr": 1.0})
    first.write_scalars(1, {"loss": 3.0})
    first.close()
    second = metrics.MetricWriter(str(tmp_path), start_step=0)
    second.write_config(0, {"lr": 2.0})
    second.write_scalars(1, {"loss": 2.0})
    second.close()
    assert _jsonl(tmp_path) == [{"step": 1, "loss": 2.0}]
    steps = event_steps(tmp_path / "tensorboard")
    assert steps.pop("loss") == [1] and list(steps.values()) == [[0]]  # the config text once


def test_without_start_step_the_files_are_appended(tmp_path):
    for step in (1, 2):
        writer = metrics.MetricWriter(str(tmp_path))
        writer.write_scalars(step, {"loss": 1.0})
        writer.close()
    assert [r["step"] for r in _jsonl(tmp_path)] == [1, 2]


class RecordingTracker:
    def __init__(self):
        self.calls = []

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))

    def write_images(self, step, images):
        self.calls.append(("images", step, sorted(images)))

    def flush(self):
        self.calls.append(("flush",))

    def close(self, failed=False):
        self.calls.append(("close", failed))


def test_trackers_get_what_the_writer_gets_and_disabled_writes_nothing(tmp_path):
    tracker = RecordingTracker()
    writer = metrics.MetricWriter(str(tmp_path / "on"), trackers=[tracker])
    writer.write_scalars(3, {"loss": 1.5})
    writer.write_images(3, {"eval/attention": np.zeros((4, 4, 3), np.uint8)})
    writer.flush()
    writer.close()
    assert tracker.calls == [("scalars", 3, {"loss": 1.5}), ("images", 3, ["eval/attention"]),
                             ("flush",), ("close", False)]
    silent = RecordingTracker()
    writer = metrics.MetricWriter(str(tmp_path / "w"), enabled=False, trackers=[silent])
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((4, 4, 3), np.uint8)})
    writer.flush()
    writer.close()
    assert not (tmp_path / "w").exists() and silent.calls == []


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_rate_and_eta_math():
    clock = FakeClock()
    bar = metrics.ProgressBar(1000, start_step=200, batch_size=64, stream=io.StringIO(),
                              clock=clock)
    assert bar.eta_seconds(200) is None
    clock.now += 50.0  # 100 steps in 50 s -> 0.5 s/step, 700 steps left
    assert bar.eta_seconds(300) == pytest.approx(350.0)
    assert bar.rate(300) == pytest.approx(100 * 64 / 50)
    assert metrics.format_duration(350.0) == "0:05:50"
    assert metrics.format_duration(3 * 3600 + 7) == "3:00:07"


def test_progress_prints_lines_when_not_a_tty():
    clock, stream = FakeClock(), io.StringIO()
    bar = metrics.ProgressBar(10, batch_size=8, stream=stream, min_interval=5.0, clock=clock)
    for step in range(1, 11):
        clock.now += 1.0
        bar.update(step, loss=1.0 / step)
    bar.close()
    lines = stream.getvalue().splitlines()
    # step 1 (first), 6 (5 s later) and 10 (last step always prints)
    assert [line.split()[1] for line in lines] == ["1/10", "6/10", "10/10"]
    assert lines[-1] == ("step 10/10  [####################] 100%  8.0 img/s  ETA 0:00:00  "
                         "loss 0.1")
    assert "\r" not in stream.getvalue()


def test_read_jsonl_skips_a_cut_last_line_and_strict_names_a_bad_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n\n{"no_step": 2}\n'
                    '{"step": 3, "a": 3.0}\n{"step": 4, "a')
    expected = [{"step": 1, "a": 1.0}, {"step": 3, "a": 3.0}]
    assert metrics.read_jsonl(path) == expected
    assert metrics.read_jsonl(path, strict=True) == expected  # only the last line is cut
    path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    assert metrics.read_jsonl(path) == [{"step": 1}, {"step": 3}]
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        metrics.read_jsonl(path, strict=True)


def test_train_window_leaves_evaluations_out_of_the_throughput():
    now = [0.0]
    window = metrics.TrainWindow(clock=lambda: now[0])
    for _ in range(4):  # four steps of 1 s, an evaluation of 100 s after the third
        now[0] += 1.0
        window.steps += 1
        if window.steps == 3:
            with window.excluded():
                now[0] += 100.0
    assert window.rates(batch_size=8) == {"images_per_s": 8.0, "step_time_s": 1.0}
    window.reset()
    now[0] += 2.0
    window.steps += 1
    assert window.rates(batch_size=8) == {"images_per_s": 4.0, "step_time_s": 2.0}
