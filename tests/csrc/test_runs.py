"""The decode GEMVs' split of tasks among threads (csrc/threads.h Runs): contiguous runs, one a
thread, whose back halves a thread that is done takes from the others."""

from collections import Counter

import pytest

from xcompile import _C


@pytest.mark.parametrize("tasks", [0, 1, 7, 64, 1000, 2817])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("grain", [1, 10, 5000])
def test_every_task_runs_once(tasks, threads, grain):
    taken = _C.runs_taken(tasks, threads, grain)
    assert len(taken) == tasks
    assert all(t >= 0 for t in taken), Counter(taken)  # none missed (-1), none twice (-2)


def test_a_slow_thread_is_stolen_from_and_runs_stay_contiguous():
    """Thread 0 sleeps at each grain: thread 1 ends its half, then takes most of thread 0's. Each
    thread's tasks stay a few contiguous stretches (one linear weight stream each), not the
    alternating chunks of a dynamic schedule."""
    taken = _C.runs_taken(1000, 2, 10, 2000)
    counts = Counter(taken)
    # thread 0 takes at most 10 tasks a 2 ms: half the tasks would take it 100 ms, in which the
    # other, even on a loaded host, steals (a margin that holds where a fixed share did not)
    assert counts[1] > counts[0], counts
    # each steal takes a back half: about log2(500) steals, two ends each
    stretches = 1 + sum(a != b for a, b in zip(taken, taken[1:]))
    assert stretches < 30, stretches


def test_equal_threads_split_in_order():
    """Without stealing (one thread), the run is every task, in order: the split is contiguous."""
    assert _C.runs_taken(100, 1, 7) == [0] * 100
