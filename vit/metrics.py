"""Metric writers: metrics.jsonl and TensorBoard events in the workdir, trackers such as W&B;
a console progress bar.

`MetricWriter` writes every scalar to <workdir>/metrics.jsonl (one JSON line per step) and,
through the public `tf.summary` API, to <workdir>/tensorboard (scalars, the config as text,
images at evaluation steps); it hands the same to any extra tracker (`vit/wandb_logger.py`).
A resumed run passes the step it continues from: records past it, left by a run killed after
its last checkpoint, are dropped from both files first, so every step appears once.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2

from vit.output_paths import OutputPathError, require_writable_run_folder

TENSORBOARD_DIR = "tensorboard"
JSONL_FILE = "metrics.jsonl"
EVENT_FILE_PATTERN = "events.out.tfevents.*"
_EVENT_SECOND = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def check_output_paths(workdir: str) -> None:
    """OutputPathError unless the run's metrics.jsonl and tensorboard/ can be written in
    `workdir` (each may be missing); checked at start-up, before anything is written."""
    root = Path(workdir).absolute()
    jsonl, events = root / JSONL_FILE, root / TENSORBOARD_DIR
    fix = "move it out of the way, or pass another workdir"
    if jsonl.is_dir():
        raise OutputPathError(f"{jsonl} is a directory, not the run's metrics file: {fix}")
    if events.exists() and not events.is_dir():
        raise OutputPathError(f"{events} is a file, not the run's TensorBoard directory: {fix}")
    for path in (root, events):
        require_writable_run_folder(path)


class Tracker(Protocol):
    """An experiment tracker fed by MetricWriter (e.g. `vit.wandb_logger.WandbLogger`)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...
    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None: ...
    def flush(self) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class MetricWriter:
    """Writes scalars to <workdir>/metrics.jsonl and <workdir>/tensorboard, and to `trackers`.

    Pass `enabled=jax.process_index() == 0` so only one host writes; a disabled writer does
    nothing. `start_step` is the step a run starts or resumes from: records after it are
    removed from both files before anything is written (0: a fresh run, nothing is kept);
    None keeps the files as they are and appends.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, start_step: int | None = None,
                 trackers: Sequence[Tracker] = ()):
        self.enabled = enabled
        self._trackers = list(trackers) if enabled else []
        self._events = self._jsonl = None
        self._last: tuple[int, int, dict] | None = None  # (step, file offset, record)
        if enabled:
            root = Path(workdir)
            root.mkdir(parents=True, exist_ok=True)
            if start_step is not None:
                keep = start_step if start_step > 0 else -1  # a fresh run keeps step 0's too
                # a resume's first write at its step joins that step's line
                self._last = prune_jsonl(root / JSONL_FILE, keep)
                prune_event_files(root / TENSORBOARD_DIR, keep)
            wait_past_event_files(root / TENSORBOARD_DIR)
            self._events = tf.summary.create_file_writer(str(root / TENSORBOARD_DIR))
            self._jsonl = (root / JSONL_FILE).open("a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record `scalars` at `step` everywhere; a second call for one step joins its line."""
        if not self.enabled:
            return
        step = int(step)
        values = {name: float(value) for name, value in scalars.items()}
        with self._events.as_default():
            for name, value in values.items():
                tf.summary.scalar(name, value, step=step)
        self._write_jsonl(step, {k: _json_float(v) for k, v in values.items()})
        for tracker in self._trackers:
            tracker.write_scalars(step, values)

    def _write_jsonl(self, step: int, values: dict) -> None:
        """Append the step's line, or rewrite the last line when it holds the same step."""
        if self._last is not None and self._last[0] == step:
            _, offset, record = self._last
            record.update(values)
            self._jsonl.flush()
            self._jsonl.truncate(offset)
        else:
            self._jsonl.flush()
            offset, record = self._jsonl.tell(), {"step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._last = (step, offset, record)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Record RGB images ([H, W, 3] uint8, by name) at `step` in TensorBoard and trackers."""
        if not self.enabled:
            return
        with self._events.as_default():
            for name, pixels in images.items():
                tf.summary.image(name, np.asarray(pixels, np.uint8)[None], step=int(step))
        for tracker in self._trackers:
            tracker.write_images(int(step), images)

    def write_config(self, step: int, config: Mapping[str, Any]) -> None:
        """The run config as TensorBoard text (tag "config") at `step`."""
        if not self.enabled:
            return
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        markdown = "\n".join("    " + line for line in text.splitlines())  # a code block
        with self._events.as_default():
            tf.summary.text("config", markdown, step=int(step))

    def flush(self) -> None:
        """Push buffered records to disk (and to the trackers)."""
        if self.enabled and self._jsonl is not None:
            self._events.flush()
            self._jsonl.flush()
            for tracker in self._trackers:
                tracker.flush()

    def close(self, failed: bool = False) -> None:
        """Flush and close the files and the trackers (`failed`: the run stopped on an error)."""
        if self.enabled and self._jsonl is not None:
            self._events.close()
            self._jsonl.close()
            self._jsonl = None
            for tracker in self._trackers:
                tracker.close(failed)


def _json_float(value: float) -> float | str:
    """JSON has no NaN or infinity: write those as the strings "nan", "inf", "-inf"."""
    return value if math.isfinite(value) else str(value)


def has_scalars(workdir: str, step: int, prefix: str) -> bool:
    """Whether the workdir's metrics.jsonl records a scalar named `prefix`... at `step`."""
    path = Path(workdir) / JSONL_FILE
    if not path.exists():
        return False
    return any(int(record["step"]) == step and any(k.startswith(prefix) for k in record)
               for record in read_jsonl(path))


def read_jsonl(path: str | Path, strict: bool = False) -> list[dict]:
    """The step records of a metrics.jsonl; a line cut short by a killed run is skipped.

    strict=True raises ValueError for a line that is not JSON anywhere but at the end.
    """
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if strict and number < len(lines):  # only the last line may be cut short
                raise ValueError(f"{path} line {number} is not JSON") from None
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _replace_file(path: Path, write: Callable[[str], None]) -> None:
    """Write a new version of `path` beside it with `write(tmp_path)`, then swap it in."""
    tmp = path.with_name(f".{path.name}.tmp")  # a leading dot: not an event file name
    write(str(tmp))
    os.replace(tmp, path)


def prune_jsonl(path: Path, last_step: int) -> tuple[int, int, dict] | None:
    """Keep the records of steps <= `last_step`, one line per step (repeated steps merged);
    (step, byte offset, record) of the last line kept, None if none."""
    if not path.exists():
        return None
    by_step: dict[int, dict] = {}
    for record in read_jsonl(path):
        if int(record["step"]) <= last_step:
            by_step.setdefault(int(record["step"]), {}).update(record)
    lines = [json.dumps(by_step[step]) + "\n" for step in sorted(by_step)]

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)

    _replace_file(path, write)
    if not lines:
        return None
    last = max(by_step)
    return last, sum(len(line.encode("utf-8")) for line in lines[:-1]), by_step[last]


def _raw_events(path: str) -> Iterable[bytes]:
    """The serialized events of one file; a record cut short by a killed run ends it."""
    return RawEventFileLoader(path).Load()


def prune_event_files(logdir: Path, last_step: int) -> None:
    """Drop the summaries of steps > `last_step` from the event files in `logdir`.

    Files left with no summary at all are deleted; the others are rewritten when they change.
    """
    for path in sorted(glob.glob(str(logdir / EVENT_FILE_PATTERN))):
        kept, dropped, summaries = [], 0, 0
        for raw in _raw_events(path):
            event = event_pb2.Event.FromString(raw)
            if event.HasField("summary") and event.step > last_step:
                dropped += 1
                continue
            summaries += event.HasField("summary")
            kept.append(raw)
        if not summaries:
            os.remove(path)
        elif dropped:
            def write(tmp: str, kept: list[bytes] = kept) -> None:
                with tf.io.TFRecordWriter(tmp) as out:
                    for raw in kept:
                        out.write(raw)

            _replace_file(Path(path), write)


def wait_past_event_files(logdir: Path, clock: Callable[[], float] = time.time,
                          sleep: Callable[[float], None] = time.sleep) -> None:
    """Sleep until the wall-clock second is later than every event file's in `logdir`.

    Event files are named events.out.tfevents.<second>.<host>.<pid>.<counter>.v2, and
    TensorBoard reads them in name order: a new file of the same second could sort before the
    old one (counter 10 before 9, another pid), and TensorBoard would then purge the new steps
    as orphans when the old file's lower steps followed them.
    """
    seconds = [int(m.group(1)) for path in glob.glob(str(logdir / EVENT_FILE_PATTERN))
               if (m := _EVENT_SECOND.match(os.path.basename(path)))]
    newest = max(seconds, default=-1)
    now = clock()
    if int(now) == newest:  # a newest file from the future (another clock) is not waited for
        sleep(newest + 1 - now)


def format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainWindow:
    """Steps and training seconds since the last log, evaluations left out of the time."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.steps, self._start, self._excluded = 0, self._clock(), 0.0

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Leave the time spent inside out of the window (an evaluation)."""
        start = self._clock()
        try:
            yield
        finally:
            self._excluded += self._clock() - start

    def rates(self, batch_size: int) -> dict[str, float]:
        """{"images_per_s", "step_time_s"} over the window's training time."""
        seconds = max(self._clock() - self._start - self._excluded, 1e-9)
        return {"images_per_s": self.steps * batch_size / seconds,
                "step_time_s": seconds / max(self.steps, 1)}


class ProgressBar:
    """Console progress on stderr: step/total, a bar, images/s, ETA and the latest fields.

    On a terminal the line is redrawn in place; otherwise a plain line is printed at most every
    `min_interval` seconds (and at the last step), so logs stay readable.
    """

    WIDTH = 20

    def __init__(self, total_steps: int, start_step: int = 0, batch_size: int = 1, *,
                 stream: TextIO | None = None, min_interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total_steps, self.start_step, self.batch_size = total_steps, start_step, batch_size
        self.stream = stream or sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = (0.2 if self.is_tty else 10.0) if min_interval is None else min_interval
        self._clock = clock
        self._start = clock()
        self._last_print: float | None = None
        self._drawn = False

    def rate(self, step: int) -> float:
        """Images per second since the bar started."""
        elapsed = self._clock() - self._start
        return (step - self.start_step) * self.batch_size / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left at the average pace so far; None before the first step is done."""
        done, elapsed = step - self.start_step, self._clock() - self._start
        if done <= 0 or elapsed <= 0:
            return None
        return (self.total_steps - step) * elapsed / done

    def render(self, step: int, **fields: float) -> str:
        """The progress line for `step`."""
        frac = min(max(step / self.total_steps, 0.0), 1.0) if self.total_steps else 1.0
        filled = int(frac * self.WIDTH)
        eta = self.eta_seconds(step)
        parts = [f"step {step}/{self.total_steps}",
                 f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {frac:4.0%}",
                 f"{self.rate(step):.1f} img/s",
                 f"ETA {format_duration(eta) if eta is not None else '?'}"]
        parts += [f"{name} {value:.4g}" for name, value in fields.items()]
        return "  ".join(parts)

    def update(self, step: int, **fields: float) -> None:
        """Show progress at `step`, rate-limited; always shown at the last step."""
        now = self._clock()
        due = self._last_print is None or now - self._last_print >= self.min_interval
        if not due and step < self.total_steps:
            return
        self._last_print = now
        line = self.render(step, **{k: float(v) for k, v in fields.items()})
        if self.is_tty:
            self.stream.write("\r\033[K" + line)
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line on a terminal."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
