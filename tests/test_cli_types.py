"""The argparse types of the `vit` sub-commands: exact values, and one usage line for bad ones."""

import argparse

import pytest

from vit.cli_types import image_size, non_negative_int, positive_int


def test_counts_parse_exactly_in_their_range():
    assert positive_int("1") == 1 and positive_int("64") == 64
    assert non_negative_int("0") == 0 and non_negative_int("7") == 7


@pytest.mark.parametrize("parse, text, message", [
    (positive_int, "0", "must be a positive integer, got 0"),
    (positive_int, "-2", "must be a positive integer, got -2"),
    (positive_int, "two", "must be a positive integer, got 'two'"),
    (positive_int, "1.5", "must be a positive integer, got '1.5'"),
    (non_negative_int, "-1", "must be 0 or more, got -1"),
    (non_negative_int, "x", "must be 0 or more, got 'x'"),
    (image_size, "big", "must be an int or rows,cols, got 'big'"),
    (image_size, "0", "must be positive, got '0'"),
    (image_size, "24,0", "must be positive, got '24,0'"),
])
def test_bad_values_are_argument_type_errors_naming_the_value(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert str(info.value) == message


def test_image_size_is_a_side_or_rows_and_cols():
    assert image_size("224") == 224
    assert image_size("24,40") == [24, 40]
    assert image_size("32,32") == 32  # a square is written as its side, as in config.json
