"""Metric writers: TensorBoard events and metrics.jsonl in the workdir; a console progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

TENSORBOARD_DIR = "tensorboard"
JSONL_FILE = "metrics.jsonl"


class MetricWriter:
    """Writes scalars to <workdir>/tensorboard (events) and <workdir>/metrics.jsonl (appending).

    Pass `enabled=jax.process_index() == 0` so only one host writes; a disabled writer does nothing.
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._events = self._jsonl = None
        if enabled:
            root = Path(workdir)
            root.mkdir(parents=True, exist_ok=True)
            self._events = EventFileWriter(str(root / TENSORBOARD_DIR))
            self._jsonl = (root / JSONL_FILE).open("a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Record `scalars` at `step` in both files."""
        if not self.enabled:
            return
        values = {name: float(value) for name, value in scalars.items()}
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=name, simple_value=value)
            for name, value in values.items()])
        self._events.add_event(event_pb2.Event(step=int(step), wall_time=time.time(),
                                               summary=summary))
        record = {"step": int(step), **{k: _json_float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        """Push buffered records to disk."""
        if self.enabled:
            self._events.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close both files."""
        if self.enabled and self._jsonl is not None:
            self._events.close()
            self._jsonl.close()
            self._jsonl = None


def _json_float(value: float) -> float | str:
    """JSON has no NaN or infinity: write those as the strings "nan", "inf", "-inf"."""
    return value if math.isfinite(value) else str(value)


def format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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
