"""What the options choosing the CPU's custom calls (`matmul_impl`, `elementwise_impl`) share:
"auto"'s note where it falls back to XLA, and the one-line errors where the calls were asked
for and cannot run."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable


def auto_choice(option: str, custom: str, reason: str | None, logger: logging.Logger,
                xla_runs: str) -> str:
    """What "auto" is where the custom calls `custom` would be chosen: `custom` if `reason` is
    None, else "xla", said once per process at INFO level ("<option> 'auto' runs <xla_runs>
    here: <reason>")."""
    if reason is None:
        return custom
    _note_once(logger, f"{option} 'auto' runs {xla_runs} here: {reason}")
    return "xla"


@functools.cache
def _note_once(logger: logging.Logger, message: str) -> None:
    """Log `message` the first time it is given."""
    logger.info(message)


def asked_choice(option: str, custom: str, platform: str, unfit: str | None,
                 unavailable_reason: Callable[[], str | None]) -> str:
    """`custom`, asked for by name: a ValueError in one line naming the fix if `platform` is not
    the CPU, if the model is `unfit` ("<what the calls compute>, not <what it has>"), or if
    `unavailable_reason()` says why the calls cannot run here."""
    if platform != "cpu":
        raise ValueError(f"{option} '{custom}' runs on the CPU, not on {platform!r}: use 'auto' "
                         "or 'xla'")
    if unfit:
        raise ValueError(f"{option} '{custom}' computes {unfit}: use 'auto' or 'xla'")
    reason = unavailable_reason()
    if reason is not None:
        raise ValueError(f"{option} '{custom}' cannot run here: {reason}; or use 'auto' or 'xla'")
    return custom
