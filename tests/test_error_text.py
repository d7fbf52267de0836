"""Tests for vit.error_text: the one line a user sees of a library's exception."""

import jax

from vit.error_text import device_memory_error, first_line, tensorflow_message

OUT_OF_MEMORY = jax.errors.JaxRuntimeError(
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9663676416 bytes.\n"
    "BufferAssignment OOM Debugging.\nBufferAssignment stats:\n" + "  allocation 0: ...\n" * 50)


def test_an_accelerators_out_of_memory_error_is_one_line_naming_the_fix():
    assert device_memory_error(OUT_OF_MEMORY, "lower the batch") == (
        "out of device memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
        "9663676416 bytes.): lower the batch")
    assert device_memory_error(RuntimeError("some other failure"), "x") is None
    assert device_memory_error(ValueError("Out of memory"), "x") is None  # not a runtime error


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
