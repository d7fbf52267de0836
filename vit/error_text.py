"""One-line error text: what a user sees of an exception raised deep inside a library."""

from __future__ import annotations

import re
from collections.abc import Sequence


def first_line(err: BaseException, *, with_type: bool = False, limit: int | None = None) -> str:
    """The first line of `err`'s message, cut to its first sentences within `limit` characters
    (if given) and prefixed by its type name when `with_type`; its type name when it is empty."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0]
    if limit is not None and len(line) > limit:
        cut = line.rfind(". ", 0, limit)
        line = line[:cut + 1] if cut > 0 else line[:limit - 3] + "..."
    return f"{type(err).__name__}: {line}" if with_type else line


_OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")


def device_memory_error(err: BaseException, fix: str) -> str | None:
    """The one line for an accelerator's out-of-memory error (XLA's RESOURCE_EXHAUSTED, whose
    text runs to pages of buffer assignment), naming `fix`; None for any other error."""
    if not isinstance(err, RuntimeError):
        return None
    text = str(err)
    if not any(mark in text for mark in _OUT_OF_MEMORY):
        return None
    return f"out of device memory ({first_line(err, limit=160)}): {fix}"


_TF_NODE = re.compile(r"\{\{function_node [^}]*\}\}\s*")
_TF_OP = re.compile(r"\s*\[\[\{\{node [^]]*\]\]|\s*\[Op:[^\]]*\].*$")


def tensorflow_message(message: str) -> str:
    """The first line of a TensorFlow op error's message without TF's node and op annotations
    ("{{function_node ...}}", "[Op:DecodeImage] name: ")."""
    lines = [line for line in message.strip().splitlines() if line.strip()] or [""]
    return _TF_OP.sub("", _TF_NODE.sub("", lines[0])).strip()


def first_names(names: Sequence[str], shown: int = 3) -> str:
    """The first `shown` names joined by commas, and "..." when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
