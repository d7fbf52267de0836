"""Preemption: every process of a run learns of a SIGTERM and stops at the same step.

A scheduler that wants its machines back sends SIGTERM (to one process or to all). The trainer
asks `PreemptionWatch.reached(step)` after every step and, when it answers True, saves that
step and returns; `train.py` then exits with `EXIT_PREEMPTED` so the scheduler requeues it.

Two ways to learn of the signal, chosen by whether the run is distributed:
- distributed (`jax.distributed` initialised, any number of processes): JAX's preemption sync
  manager, which `jax.distributed.initialize` starts, catches SIGTERM itself and tells the
  other processes through the coordination service; `multihost_utils
  .reached_preemption_sync_point(step)` then turns True on every process at the same step (the
  fastest process's step + 1). Its handler is left in place.
- one process: a plain Python SIGTERM handler that records the signal, installed on entering
  the watch and replaced by the previous handler on leaving it (so a notebook that called
  `train()` dies on SIGTERM again afterwards).

Before the watch is entered (flag parsing, config checks, the dataset scan, the model build)
there is no state to save: `train.py` (vit/train_cli.py) installs `stop_at_start_up`, which
ends the run at once with `START_UP_LINE` and `EXIT_PREEMPTED`; those steps write no file.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any, NoReturn

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". A preempted run
# saved its state and exits with it; errors exit with 1 (2 for bad flags), success with 0.
EXIT_PREEMPTED = 75
START_UP_LINE = ("preempted during start-up, before the first step: nothing to save; rerun the "
                 f"same command (exit status {EXIT_PREEMPTED})")


class PreemptedAtStartUp(BaseException):
    """SIGTERM before training began. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way turns it into an error."""


def stop_at_start_up(signum: int, frame: FrameType | None) -> NoReturn:
    """A SIGTERM handler for start-up: raise PreemptedAtStartUp where the program is."""
    raise PreemptedAtStartUp


class PreemptionWatch:
    """Context manager answering "stop and save at this step?" once per training step."""

    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed or jax.process_count() > 1
        self._received: list[int] = []
        self._previous: Any = None
        self._installed = False
        self._first_step = 0

    def __enter__(self) -> PreemptionWatch:
        if self.distributed:
            return self
        previous = signal.getsignal(signal.SIGTERM)
        if previous is None:  # a handler not set from Python (JAX's own): keep it, use JAX's API
            self.distributed = True
        elif threading.current_thread() is not threading.main_thread():
            log.warning("train() runs outside the main thread: SIGTERM is not handled, so a "
                        "preempted run keeps only its periodic checkpoints")
        else:
            self._previous = previous
            signal.signal(signal.SIGTERM, self._record)
            self._installed = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _record(self, signum: int, frame: Any) -> None:
        self._received.append(signum)

    def start(self, step: int) -> None:
        """Record the step the loop starts after (the restored step; equal on every process).

        JAX's sync manager counts calls from 0 and agrees on (largest count seen) + 1, so the
        count passed is the number of steps this run has taken: a SIGTERM during start-up or
        the first compile stops the run after its first step, also when it resumed at step N.
        """
        self._first_step = step

    def reached(self, step: int) -> bool:
        """True when this step is the one to save and stop at; call it on every process."""
        if self.distributed:
            count = step - self._first_step
            return bool(multihost_utils.reached_preemption_sync_point(count))
        return bool(self._received)

    @property
    def signalled(self) -> bool:
        """Whether this process's own handler has seen SIGTERM (always False when distributed)."""
        return bool(self._received)
