"""The robustness report's options as the command line writes them: corruptions, severities
and attack radii, parsed and checked with one-line errors."""

from __future__ import annotations

import fractions
import math

from vit import corruptions

DEFAULT_EPS = "2/255,4/255,8/255"


class RobustnessError(ValueError):
    """A bad option of the robustness report; the message names it and the fix."""


def parse_severities(text: str) -> tuple[int, ...]:
    """"1-5" -> (1, 2, 3, 4, 5); "1,3,5" -> (1, 3, 5); severities are 1 to 5 (0 would be the
    clean images, which the report gives on their own line, not inside the corruption means)."""
    try:
        if "-" in text:
            low, high = (int(x) for x in text.split("-"))
            values = tuple(range(low, high + 1))
        else:
            values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if 0 in values:
        raise RobustnessError(f"severity 0 in {text!r} is the clean images, whose accuracy the "
                              "report always gives; counted as a corruption it would inflate "
                              "the means and mCE: use severities 1 to 5, e.g. 1-5")
    if not values or any(v not in range(1, 6) for v in values):
        raise RobustnessError(f"bad severities {text!r}; use a range like 1-5 or a list like "
                              "1,3,5 of values 1 to 5")
    return values


def parse_corruptions(text: str) -> tuple[str, ...]:
    """"all", "none", family names (noise, blur, weather, digital) or corruption names."""
    if text.strip() == "none":
        return ()
    names: list[str] = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        if part == "all":
            names += corruptions.CORRUPTIONS
        elif part in corruptions.FAMILIES:
            names += corruptions.FAMILIES[part]
        elif part in corruptions.CORRUPTIONS:
            names.append(part)
        else:
            raise RobustnessError(
                f"unknown corruption {part!r}; use all, none, a family "
                f"({', '.join(corruptions.FAMILIES)}) or one of "
                f"{', '.join(corruptions.CORRUPTIONS)}")
    return tuple(dict.fromkeys(names))


def parse_eps(text: str, norm: str = "linf") -> tuple[tuple[str, float], ...]:
    """"2/255,4/255,0.03" -> (("2/255", 0.00784...), ...): labels and values, pixels in [0, 1];
    an L-inf radius is at most 1 (a pixel's range), an L2 radius any size (the whole image's)."""
    out = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        try:
            value = float(fractions.Fraction(part))
        except (ValueError, ZeroDivisionError, OverflowError):  # 1e400: no float
            value = -1.0
        if norm == "l2" and not 0 <= value < math.inf:
            raise RobustnessError(f"bad epsilon {part!r}; an L2 radius is a number >= 0 over the "
                                  "whole image in [0, 1] pixels, such as 0.5 or 3, comma-separated")
        if norm != "l2" and not 0 <= value <= 1:
            raise RobustnessError(f"bad epsilon {part!r}; use values in [0, 1] such as 8/255 or "
                                  "0.03, comma-separated")
        out.append((part, value))
    if not out:
        raise RobustnessError(f"no epsilon in {text!r}; give e.g. {DEFAULT_EPS}")
    return tuple(out)
