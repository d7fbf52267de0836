"""Reading the trainer's TensorBoard event files back in tests, below TensorBoard's purging."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader


def event_steps(logdir: Path) -> dict[str, list[int]]:
    """{tag: steps} of every summary in the event files, in file order, nothing purged."""
    found: dict[str, list[int]] = {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(event.step)
    return found
