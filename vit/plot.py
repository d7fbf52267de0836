"""`vit plot`: learning curves of one or more training runs, drawn from their workdirs as a PNG.

The values come from <workdir>/metrics.jsonl. That file has no timestamps, but `MetricWriter`
writes every value also as a TensorBoard event that carries its wall-clock time, so the times
are read from <workdir>/tensorboard and matched to the records by (step, metric name): a
record's time is that of its latest value. A record's own "time" key (seconds since the
epoch), if a writer adds one, is used first. A run
without either (e.g. its tensorboard/ folder was not copied) is drawn against steps only.
Records superseded by a resumed run (a step that comes again later) are dropped, as in
TensorBoard; minutes count from the run's first record and include any time it was stopped.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
from collections.abc import Sequence

import numpy as np

from vit.metrics import JSONL_FILE, TENSORBOARD_DIR, read_jsonl
from vit.output_paths import make_parent

log = logging.getLogger(__name__)

TRAIN_LOSS, EVAL_TOP1, EVAL_EMA_TOP1 = "train/loss", "eval/top1", "eval_ema/top1"
FIGSIZE, DPI = (12.0, 8.0), 100  # the PNG is 1200 x 800 pixels


class PlotError(ValueError):
    """A workdir that cannot be plotted; the message says why in one line."""


@dataclasses.dataclass
class Curve:
    """One metric of one run: values by step and, when known, by wall-clock minutes."""

    steps: np.ndarray  # int, increasing
    values: np.ndarray  # float
    minutes: np.ndarray | None  # since the run's first record; None: no wall-clock times


@dataclasses.dataclass
class RunCurves:
    """The plotted metrics of one workdir (only those it recorded)."""

    workdir: str
    curves: dict[str, Curve]
    has_wall_clock: bool


def _read_jsonl(workdir: str) -> list[dict]:
    if not os.path.isdir(workdir):
        raise PlotError(f"workdir {workdir!r} is a file, not a workdir of `vit train`"
                        if os.path.exists(workdir) else f"workdir {workdir!r} does not exist")
    path = os.path.join(workdir, JSONL_FILE)
    if not os.path.isfile(path):
        raise PlotError(f"no {JSONL_FILE} in {workdir!r}: is it a workdir of `vit train`?")
    try:
        return read_jsonl(path, strict=True)
    except ValueError as e:
        raise PlotError(str(e)) from None


def _event_times(workdir: str) -> dict[tuple[int, str], collections.deque[float]]:
    """Wall times of the TensorBoard events of `workdir`, oldest first, by (step, tag)."""
    files = glob.glob(os.path.join(workdir, TENSORBOARD_DIR, "events.out.tfevents.*"))
    if not files:
        return {}
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found = []
    for path in files:
        try:
            for event in EventFileLoader(path).Load():
                if event.HasField("summary"):  # one tag per event, or several in older runs
                    found += [(event.wall_time, event.step, v.tag) for v in event.summary.value]
        except Exception as e:  # noqa: BLE001 - an unreadable events file only costs the times
            log.warning("skipping unreadable TensorBoard file %s: %s", path, e)
    times: dict[tuple[int, str], collections.deque[float]] = {}
    for wall_time, step, tag in sorted(found, key=lambda x: x[0]):
        times.setdefault((step, tag), collections.deque()).append(wall_time)
    return times


def _record_times(workdir: str, records: list[dict]) -> list[float | None]:
    """Each record's wall-clock time (its "time" key, else its TensorBoard events'), or None."""
    events = None
    out: list[float | None] = []
    for record in records:
        if isinstance(record.get("time"), int | float):
            out.append(float(record["time"]))
            continue
        if events is None:
            events = _event_times(workdir)
        queues = [events.get((record["step"], tag)) for tag in sorted(set(record) - {"step"})]
        found = [queue.popleft() for queue in queues if queue]
        out.append(max(found) if found and len(found) == len(queues) else None)
    return out


def _curve(points: list[tuple[int, float, float | None]], start: float | None) -> Curve:
    """A curve from (step, value, time) in file order; a step seen again drops the older tail."""
    kept: list[tuple[int, float, float | None]] = []
    for point in points:
        while kept and kept[-1][0] >= point[0]:
            kept.pop()
        kept.append(point)
    steps = np.array([p[0] for p in kept], np.int64)
    values = np.array([p[1] for p in kept], np.float64)
    minutes = None
    if start is not None and kept and all(p[2] is not None for p in kept):
        minutes = np.array([(p[2] - start) / 60.0 for p in kept], np.float64)
    return Curve(steps, values, minutes)


def load_run(workdir: str) -> RunCurves:
    """Read the train loss and eval top-1 (plain and EMA) curves of one training workdir."""
    records = _read_jsonl(workdir)
    times = _record_times(workdir, records)
    known = [t for t in times if t is not None]
    start = min(known) if known else None
    curves = {}
    for name in (TRAIN_LOSS, EVAL_TOP1, EVAL_EMA_TOP1):
        points = [(int(r["step"]), float(r[name]), t) for r, t in zip(records, times, strict=True)
                  if name in r]
        if points:
            curves[name] = _curve(points, start)
    if TRAIN_LOSS not in curves and EVAL_TOP1 not in curves:
        raise PlotError(f"{os.path.join(workdir, JSONL_FILE)} holds no {TRAIN_LOSS} or "
                        f"{EVAL_TOP1} records yet")
    has_wall_clock = bool(curves) and all(c.minutes is not None for c in curves.values())
    return RunCurves(workdir, curves, has_wall_clock)


def _default_labels(workdirs: Sequence[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(w)) or w for w in workdirs]
    return [n if names.count(n) == 1 else os.path.normpath(w) for n, w in zip(names, workdirs,
                                                                            strict=True)]


def plot_runs(workdirs: Sequence[str], out_png: str,
              labels: Sequence[str] | None = None) -> str:
    """Draw eval top-1 and train loss against minutes and steps for `workdirs`; the figure's path
    (".png" added to a name without an extension, else the format the extension names)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not workdirs:
        raise PlotError("give at least one workdir to plot")
    if labels is None:
        labels = _default_labels(workdirs)
    if len(labels) != len(workdirs):
        raise PlotError(f"got {len(labels)} labels for {len(workdirs)} workdirs; "
                        "give one label per workdir")
    runs = [load_run(w) for w in workdirs]  # every error before anything is drawn

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [(axes[0, 0], EVAL_TOP1, "minutes"), (axes[0, 1], EVAL_TOP1, "step"),
              (axes[1, 0], TRAIN_LOSS, "minutes"), (axes[1, 1], TRAIN_LOSS, "step")]
    for ax, metric, x_axis in panels:
        missing = []
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            shown = [(metric, "-", label)]
            if metric == EVAL_TOP1:
                shown.append((EVAL_EMA_TOP1, "--", f"{label} (EMA)"))
            for name, style, name_label in shown:
                curve = run.curves.get(name)
                if curve is None:
                    continue
                x = curve.steps if x_axis == "step" else curve.minutes
                if x is None:
                    missing.append(label)
                    continue
                ax.plot(x, curve.values, style, color=f"C{i % 10}", label=name_label,
                        marker="o" if name != TRAIN_LOSS else None, markersize=3)
        ax.set_xlabel("wall-clock minutes" if x_axis == "minutes" else "step")
        ax.set_ylabel("test top-1" if metric == EVAL_TOP1 else "train loss")
        ax.set_title(f"{'test top-1' if metric == EVAL_TOP1 else 'train loss'} vs {x_axis}")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        notes = []
        if missing:
            notes.append("no wall-clock times: " + ", ".join(dict.fromkeys(missing)))
        if not ax.lines and not missing:
            notes.append(f"no {metric} records")
        if notes:  # centred on an empty panel, else at the bottom
            ax.text(0.5, 0.5 if not ax.lines else 0.03, "\n".join(notes), ha="center",
                    va="center" if not ax.lines else "bottom", transform=ax.transAxes,
                    fontsize="small", color="gray")
    for run, label in zip(runs, labels, strict=True):
        if not run.has_wall_clock:
            log.warning("%s: no wall-clock times in %s; drawn against steps only", label,
                        run.workdir)
    if not os.path.splitext(out_png)[1]:
        out_png += ".png"  # else the format its extension names
    fig.savefig(make_parent(out_png))
    return out_png

