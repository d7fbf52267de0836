"""Tests for vit.metrics: TensorBoard events, JSONL lines (appending on resume), progress/ETA."""

import io
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vit import metrics


def _scalars(logdir):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_and_jsonl_hold_the_scalars(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write_scalars(10, {"train/loss": 2.5, "lr": 0.001})
    writer.write_scalars(20, {"train/loss": 1.25})
    writer.close()
    events = _scalars(tmp_path / "tensorboard")
    assert events["train/loss"] == [(10, 2.5), (20, 1.25)]
    assert [s for s, _ in events["lr"]] == [10]
    assert events["lr"][0][1] == pytest.approx(0.001)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "train/loss": 2.5, "lr": 0.001}, {"step": 20, "train/loss": 1.25}]


def test_jsonl_appends_on_resume_and_nan_is_valid_json(tmp_path):
    first = metrics.MetricWriter(str(tmp_path))
    first.write_scalars(1, {"loss": 3.0})
    first.close()
    second = metrics.MetricWriter(str(tmp_path))
    second.write_scalars(2, {"loss": float("nan")})
    second.flush()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": "nan"}]
    second.close()
    assert [s for s, _ in _scalars(tmp_path / "tensorboard")["loss"]] == [1, 2]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path / "w"), enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.flush()
    writer.close()
    assert not (tmp_path / "w").exists()


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
