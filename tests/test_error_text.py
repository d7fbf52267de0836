"""Tests for vit.error_text: the one line a user sees of a library's exception."""

from vit.error_text import first_line, tensorflow_message


def test_first_line_of_a_multi_line_message():
    assert first_line(ValueError("bad value\n  at deep/inside.py:12")) == "bad value"
    assert first_line(OSError("disk full\nmore"), with_type=True) == "OSError: disk full"


def test_empty_message_gives_the_type_name():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("  \n"), with_type=True) == "RuntimeError"


def test_a_long_line_is_cut_at_a_sentence_within_the_limit():
    err = ValueError("First part. Second part is longer. " + "x" * 100)
    assert first_line(err, limit=50) == "First part. Second part is longer."
    assert first_line(err) == str(err)  # no limit: the whole first line


def test_a_long_line_without_a_sentence_end_is_cut_with_an_ellipsis():
    line = first_line(ValueError("y" * 300), limit=20)
    assert line == "y" * 17 + "..." and len(line) == 20


def test_tensorflow_message_drops_the_node_and_op_annotations():
    raw = ("{{function_node __wrapped__IteratorGetNext_output_types_2_device_/job:localhost/"
           "replica:0/task:0/device:CPU:0}} truncated record at 0' failed with Read less bytes "
           "than requested\n\t [[{{node IteratorGetNext}}]] [Op:IteratorGetNext] name: ")
    assert tensorflow_message(raw) == ("truncated record at 0' failed with Read less bytes than "
                                       "requested")
    assert tensorflow_message("Unknown image file format. [Op:DecodeImage] name: ") == (
        "Unknown image file format.")
    assert tensorflow_message("plain text") == "plain text" and tensorflow_message("") == ""
