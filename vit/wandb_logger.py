"""Weights & Biases logging of a training run: the config, every scalar, evaluation images.

Turned on by `config.wandb.enabled = True` or `train.py --wandb`; the other `config.wandb` keys
below pick the project, entity, run name, tags and mode. The run's files go to
<workdir>/wandb/ and its id to <workdir>/wandb_run_id, so re-running the same command on the
same workdir (a resume) continues the same W&B run; a run that starts from step 0 (nothing to
resume: a first run, or a rerun after a stop before the first checkpoint) starts a new W&B run
with a new id, as it starts metrics.jsonl afresh. Only process 0 logs (the trainer makes one
logger there). `wandb` is an optional dependency: `pip install -e ".[wandb]"`; asking for W&B
without it fails at start-up with one line.

Every row carries the training step as `step`, the x-axis of every chart (W&B's own `_step`
only counts rows), so a point can land at a step W&B has passed: the evaluation that a resume
runs again for its restored step, when the run was stopped during it. A resumed run replays
the steps after its last checkpoint; training resumes exactly, so W&B keeps the values it
already has for those steps and the logger skips them (a resume that changes a key, such as
`lr`, leaves W&B the old run's values there; metrics.jsonl and TensorBoard hold the new ones).
A run stopped by an error is marked failed in W&B.
"""

from __future__ import annotations

import logging
import re
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections
import numpy as np

from vit.error_text import first_line

RUN_ID_FILE = "wandb_run_id"
STEP = "step"  # the training step: every chart's x-axis
MODES = ("online", "offline", "disabled")
log = logging.getLogger(__name__)


class WandbError(ValueError):
    """W&B was asked for but cannot run; the message says how to fix it."""


def default_config() -> ml_collections.ConfigDict:
    """`config.wandb`: the W&B keys with their defaults."""
    c = ml_collections.ConfigDict()
    c.enabled = False  # log to W&B (also `train.py --wandb`); needs `pip install -e ".[wandb]"`
    c.project = "vit"
    c.entity = ml_collections.FieldReference(None, field_type=str)  # None: your default entity
    c.name = ml_collections.FieldReference(None, field_type=str)  # None: the workdir's name
    c.tags = ()  # e.g. ("cifar10", "baseline")
    c.mode = ml_collections.FieldReference(None, field_type=str)  # online | offline | disabled;
    # None: the WANDB_MODE environment variable, else online
    return c


def enabled(config: Any) -> bool:
    """Whether the run config asks for W&B."""
    return bool(config.get("wandb", {}).get("enabled", False))


def require_wandb(config: Any) -> ModuleType:
    """The `wandb` module, after checking `config.wandb`; one-line WandbError otherwise."""
    mode = config.wandb.mode
    if mode is not None and mode not in MODES:
        raise WandbError(f"config.wandb.mode={mode!r} is unknown; use one of {', '.join(MODES)}")
    try:
        import wandb
    except ImportError:
        raise WandbError('W&B logging (config.wandb.enabled or --wandb) needs the wandb package: '
                         'pip install -e ".[wandb]", or turn W&B off') from None
    return wandb


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def run_id(workdir: str, *, new: bool = False) -> str:
    """The W&B run id of `workdir`: the stored one (unless `new`), else a new one stored for
    later resumes."""
    path = Path(workdir) / RUN_ID_FILE
    if path.exists() and not new:
        stored = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9_-]+", stored):
            return stored
        log.warning("ignoring the malformed W&B run id in %s", path)
    new = _new_run_id()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new + "\n")
    return new


class WandbLogger:
    """One W&B run per workdir, fed by `vit.metrics.MetricWriter` (a metrics.Tracker)."""

    def __init__(self, config: Any, workdir: str, *, start_step: int = 0, verbose: bool = False):
        wandb = require_wandb(config)
        self._wandb = wandb
        c = config.wandb
        workdir_path = Path(workdir).absolute()
        self.run_id = run_id(str(workdir_path), new=start_step == 0)
        self._start_step = start_step
        settings = wandb.Settings(console="off", silent=not verbose)
        try:
            self._run = wandb.init(
                project=c.project, entity=c.entity, name=c.name or workdir_path.name,
                tags=list(c.tags) or None, mode=c.mode, dir=str(workdir_path), id=self.run_id,
                resume="allow", config=config.to_dict(), allow_val_change=True,
                settings=settings)
        except Exception as err:  # wandb raises many types (login, network, usage)
            raise WandbError(f"cannot start the W&B run {self.run_id} ({first_line(err)}); run "
                             "`wandb login`, or set config.wandb.mode='offline'") from None
        self._run.define_metric(STEP)
        self._run.define_metric("*", step_metric=STEP)
        last = self._run.summary.get(STEP)  # a resumed online run has history; offline: none
        self._first_new_step = int(last) + 1 if last is not None else int(self._run.step or 0)
        where = self._run.dir if self._run.offline or self._run.disabled else self._run.url
        log.info("W&B run %s: %s", self.run_id, where)

    def _due(self, step: int) -> bool:
        """New steps, and the restored step itself: only its evaluation run again is logged
        there (the loop logs the steps after it)."""
        return step >= self._first_new_step or step == self._start_step > 0

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log scalars at `step`."""
        if self._due(step):
            self._run.log({**scalars, STEP: step})

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Log RGB images ([H, W, 3] uint8, by name) at `step`."""
        if self._due(step):
            self._run.log({**{name: self._wandb.Image(np.asarray(pixels, np.uint8))
                              for name, pixels in images.items()}, STEP: step})

    def flush(self) -> None:
        """Nothing to do: the W&B service writes in the background."""

    def close(self, failed: bool = False) -> None:
        """Finish the run (its last step is committed), marked failed when `failed`."""
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None
