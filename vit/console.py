"""A quiet console: TensorFlow, absl and XLA start-up lines stay off the terminal unless asked.

TensorFlow's C++ runtime writes a few lines while it loads ("All log messages before
absl::InitializeLog() is called are written to STDERR", the oneDNN notice), straight to file
descriptor 2 and before any Python logging could filter them. `vit/__init__.py` first calls
`quiet_native_logs()` (TF_CPP_MIN_LOG_LEVEL=3 unless the environment sets it: before JAX's
import sets its own default of 1), so TensorFlow's and XLA's native info, warnings and errors
stay unprinted (a failing op reaches Python as an exception, which the entry points turn into
one line; a corrupt JPEG would otherwise log "Premature end of JPEG data" and a rendezvous
warning first), then imports the heavy libraries inside `quiet_native_output()`, which points
descriptor 2 at a temporary file for that time and keeps what was written.

The entry points (`vit ...`, `train.py`) take `--verbose`: `set_verbose(True)` prints the kept
start-up lines and logs at INFO. `VIT_VERBOSE=1` in the environment turns the capture off
altogether, so the lines appear as they happen and TensorFlow keeps its own log level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

VERBOSE_ENV = "VIT_VERBOSE"
_captured: list[str] = []  # what the native libraries wrote while they loaded
_verbose_flag: list[bool] = []  # set_verbose's choice, once an entry point made it


def verbose_from_env() -> bool:
    """True when VIT_VERBOSE is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_verbose() -> bool:
    """Whether the entry point asked for `--verbose` (or VIT_VERBOSE is set)."""
    return verbose_from_env() or any(_verbose_flag)


def quiet_native_logs() -> None:
    """TF_CPP_MIN_LOG_LEVEL=3 for TensorFlow and XLA unless it is set or VIT_VERBOSE asks for
    their logs; call it before JAX is imported (which sets 1 when unset)."""
    if not verbose_from_env():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Keep what C++ libraries write to stderr (fd 2) inside the block; replayed on an error.

    Does nothing with VIT_VERBOSE=1. Python's own `sys.stderr` writes are captured too, so
    the block should hold imports only.
    """
    if verbose_from_env():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (an embedded interpreter)
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace")
            _captured.append(text)
            if failed and text:  # the import failed: its native messages may say why
                sys.stderr.write(text)
                sys.stderr.flush()


def startup_output() -> str:
    """Everything the native libraries wrote to stderr while they were imported quietly."""
    return "".join(_captured)


def set_verbose(verbose: bool) -> None:
    """Entry points' `--verbose`: print the kept start-up lines and log at INFO; else WARNING.

    Quiet mode also keeps absl's Python logging (orbax, tensorflow_datasets) at WARNING, so a
    command prints its own output and, on a failure, its one-line error only.
    """
    from absl import logging as absl_logging

    verbose = verbose or verbose_from_env()
    _verbose_flag[:] = [verbose]
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    for name in ("absl", "orbax", "tensorflow", "jax", "wandb"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose and _captured:
        sys.stderr.write(startup_output())
        sys.stderr.flush()
        _captured.clear()
