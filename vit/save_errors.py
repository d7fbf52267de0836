"""What a failed checkpoint save reports: the OSError inside orbax's and tensorstore's errors,
and the tracebacks their background threads would print kept off the console (each failure
reaches the caller as one CheckpointError line)."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from typing import Any


def not_an_orbax_error(record: logging.LogRecord) -> bool:
    """Drops orbax's WARNING and ERROR records (tracebacks, "Metadata file does not exist")
    unless absl logs at INFO (`--verbose`).

    While a Checkpointer is open, every orbax failure reaches the caller as one CheckpointError
    line; orbax's background threads would also log it with a traceback first.
    """
    return (record.levelno < logging.WARNING or "orbax" not in record.pathname
            or logging.getLogger("absl").isEnabledFor(logging.INFO))


def _drop_closed_loop_noise(previous: Any) -> Any:
    """An unraisable-exception hook that drops "Event loop is closed" and passes the rest on.

    When one tensorstore write of a save fails, orbax's event loop closes while the other
    writes are in flight; as each finishes, tensorstore's callback finds the loop closed and
    Python prints a traceback for it. The failure itself reaches the caller as one line.
    """

    def hook(unraisable: Any) -> None:
        noise = (isinstance(unraisable.exc_value, RuntimeError)
                 and str(unraisable.exc_value) == "Event loop is closed")
        if not noise or logging.getLogger("absl").isEnabledFor(logging.INFO):
            previous(unraisable)

    hook.vit_closed_loop_filter = True
    return hook


def drop_closed_loop_tracebacks() -> None:
    """Install `_drop_closed_loop_noise` as the process's unraisable-exception hook, once, for
    the entry points that save checkpoints (tensorstore's writes outlive a manager)."""
    if not getattr(sys.unraisablehook, "vit_closed_loop_filter", False):
        sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)


_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")


def _tensorstore_os_error(err: BaseException) -> OSError | None:
    """The OSError a tensorstore ValueError reports ("... [os_error_code='28']"), if any."""
    text = str(err)
    code = _TENSORSTORE_ERRNO.search(text)
    if code:
        number = int(code.group(1))
    elif "RESOURCE_EXHAUSTED" in text or "No space left on device" in text:
        number = errno.ENOSPC
    else:
        return None
    return OSError(number, os.strerror(number))


def os_error_inside(err: BaseException | None) -> OSError | None:
    """The first OSError with an errno in `err`'s chain of causes (orbax may wrap it), or the
    one a tensorstore ValueError in the chain reports."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        if isinstance(err, ValueError) and (reported := _tensorstore_os_error(err)):
            return reported
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
