"""Where the command line writes, checked before any work is done: one line naming the fix.

A mistyped `--json` (a directory), an `--out` under a file, or an output workdir that already
holds another run's checkpoints would otherwise fail only after the evaluation, export or
fine-tuning had run, with a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the path and the fix."""


def blocking_ancestor(directory: Path) -> tuple[Path, str] | None:
    """(path, "file" or "unwritable") when `directory` cannot be made: its nearest existing
    ancestor (itself included) is a file, or a directory this process may not write to;
    None when `directory` exists as a directory or can be made."""
    for path in (directory, *directory.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            return path, "file"
        if path != directory and not os.access(path, os.W_OK | os.X_OK):
            return path, "unwritable"
        return None
    return None


def require_writable_run_folder(directory: Path, error: type[Exception] = OutputPathError
                                ) -> None:
    """`error` naming the fix when `directory`, a folder of a run, exists but this process may
    not write in it (a read-only file system, another user's)."""
    if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
        raise error(f"cannot write in {directory} (read-only, or not this user's): make it "
                    "writable, or pass another workdir")


def _check_folder(folder: Path, option: str, given: str) -> None:
    blocked = blocking_ancestor(folder)
    if blocked is None and folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        blocked = folder, "unwritable"  # the folder itself exists, read-only
    if blocked is None:
        return
    path, why = blocked
    if why == "file":
        raise OutputPathError(f"{option} {given}: {path} is a file, not a directory; give a path "
                              "under a directory")
    raise OutputPathError(f"{option} {given}: cannot write in {path}; give a path you can write to")


def check_file(given: str, option: str, suffix: str = ".json") -> None:
    """OutputPathError unless a file can be written at `given` (its folder may be made);
    `suffix` is the kind of file the example names."""
    path = Path(given).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{option} {given} is a directory; give a file name in it, e.g. "
                              f"{path / ('out' + suffix)}")
    _check_folder(path.absolute().parent, option, given)
    if path.is_file() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {given}: the file is read-only; give a path you can "
                              "write to")


def check_figure_file(given: str, option: str) -> None:
    """`check_file` for a figure: also an OutputPathError for an extension matplotlib cannot
    write (none: ".png" is added)."""
    from matplotlib.backend_bases import FigureCanvasBase

    check_file(given, option, ".png")
    ext = Path(given).suffix.lower().lstrip(".")
    if ext and ext not in FigureCanvasBase.get_supported_filetypes():
        raise OutputPathError(f"{option} {given}: matplotlib cannot write .{ext} files; use "
                              ".png, .pdf, .svg or .jpg")


def check_directory(given: str, option: str) -> None:
    """OutputPathError unless `given` is a directory or can be made."""
    path = Path(given).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {given} is a file; give a directory")
    _check_folder(path, option, given)


def check_new_workdir(given: str, option: str) -> None:
    """`check_directory`, and OutputPathError when `given` already holds checkpoints (another
    run's, or an earlier output): a new checkpoint there would mix with them."""
    check_directory(given, option)
    checkpoints = Path(given).expanduser() / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir()
                   if p.name.isdigit()) if checkpoints.is_dir() else []
    if steps:
        raise OutputPathError(f"{option} {given} already holds checkpoints (steps {steps}); write "
                              f"to a new directory, or remove {checkpoints} first")


@contextlib.contextmanager
def new_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Make directory `path` (and missing parents) for the body; if the body raises, remove the
    directories this call made, where they are empty again, so a failure leaves no new folder."""
    path = Path(path).expanduser()
    made = missing_folders(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        remove_empty(made)
        raise


def missing_folders(path: str | os.PathLike[str]) -> list[Path]:
    """`path` and its parents that do not exist yet, deepest first."""
    path = Path(path).expanduser().absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty: what a failed call made."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there) or gone: keep those above
            break


def make_parent(path: str) -> str:
    """Create the folder `path` is to be written in, if missing; `path`."""
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    os.makedirs(parent, exist_ok=True)
    return path


def _finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinite float inside it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str, payload: dict) -> None:
    """`payload` as indented strict JSON at `path` (NaN and inf as null), its folder made if
    missing."""
    with open(make_parent(path), "w") as f:
        json.dump(_finite_or_none(payload), f, indent=2, allow_nan=False)
        f.write("\n")
