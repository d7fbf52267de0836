"""Tests for vit.preemption: the one-process SIGTERM watch and the handler it restores.

The two-process path (JAX's preemption sync point) runs end to end in tests/test_faults.py.
"""

import os
import signal
import threading

import pytest

from vit.preemption import (
    EXIT_PREEMPTED,
    START_UP_LINE,
    PreemptedAtStartUp,
    PreemptionWatch,
    stop_at_start_up,
)


def test_one_process_records_sigterm_and_restores_the_previous_handler():
    original = signal.getsignal(signal.SIGTERM)
    seen = []
    signal.signal(signal.SIGTERM, lambda *args: seen.append(args))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with PreemptionWatch(distributed=False) as watch:
            assert not watch.distributed and watch.reached(1) is False
            os.kill(os.getpid(), signal.SIGTERM)
            assert watch.reached(2) is True
        assert signal.getsignal(signal.SIGTERM) is previous
        assert seen == []  # the watch took the signal, not the previous handler
    finally:
        signal.signal(signal.SIGTERM, original)


def test_a_handler_installed_outside_python_is_left_alone(monkeypatch):
    installed = []
    monkeypatch.setattr(signal, "getsignal", lambda signum: None)  # e.g. JAX's own handler
    monkeypatch.setattr(signal, "signal", lambda *args: installed.append(args))
    with PreemptionWatch(distributed=False) as watch:
        assert watch.distributed  # asks JAX's sync point, False without jax.distributed
        watch.start(4)
        assert watch.reached(5) is False
    assert installed == []


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    answers = []

    def run() -> None:
        with PreemptionWatch(distributed=False) as watch:
            answers.append(watch.reached(1))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert answers == [False] and signal.getsignal(signal.SIGTERM) is before


def test_preempted_exit_status_is_ex_tempfail_not_an_error_status():
    assert EXIT_PREEMPTED == 75 and EXIT_PREEMPTED not in (0, 1, 2)


def test_sigterm_at_start_up_raises_past_except_exception_and_the_watch_takes_over():
    original = signal.signal(signal.SIGTERM, stop_at_start_up)
    try:
        with pytest.raises(PreemptedAtStartUp):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except Exception:  # what library code on the way may do: it must not stop it
                pytest.fail("caught as an error")
        with PreemptionWatch(distributed=False) as watch:  # from here on: recorded, not raised
            os.kill(os.getpid(), signal.SIGTERM)
            assert watch.signalled
        assert signal.getsignal(signal.SIGTERM) is stop_at_start_up
    finally:
        signal.signal(signal.SIGTERM, original)
    assert START_UP_LINE == ("preempted during start-up, before the first step: nothing to save; "
                             "rerun the same command (exit status 75)")
