"""model/torch_threads.py: heavy torch work on a thread that ends, so that the engine thread owns
the process's only OpenMP team (the speed this buys is measured in bench/bench_serving.py)."""

import threading

import pytest

from raymoe.model.torch_threads import on_passing_thread


def test_runs_on_another_thread_that_has_ended():
    seen = []
    value = on_passing_thread(lambda: seen.append(threading.current_thread()) or 42)
    assert value == 42
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_its_error_is_raised_on_the_callers_thread():
    def fail():
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        on_passing_thread(fail)
