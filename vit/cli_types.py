"""argparse types shared by the `vit` sub-commands and the benchmarks: a bad value is a usage
error naming the flag, before anything is loaded."""

from __future__ import annotations

import argparse

from vit.model_options import json_image_size, pair


def _int_at_least(text: str, low: int, wanted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0, "0 or more")


def image_size(text: str) -> int | list[int]:
    """An image size: '32' -> 32, '24,40' -> [24, 40] (rows, cols)."""
    try:
        size = json_image_size([int(v) for v in text.split(",")] if "," in text else int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int or rows,cols, got {text!r}") from None
    if min(pair(size)) < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return size
