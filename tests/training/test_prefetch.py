"""--num-workers' prefetcher: steps come out in order whatever order the workers finish in, at
most that many steps are prepared ahead, and 0 workers prepare each step when asked."""

from __future__ import annotations

import random
import threading
import time

import pytest

from megamoe.training.prefetch import StepPrefetcher


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_steps_in_order_and_at_most_workers_ahead(workers):
    lock, made, in_flight, most = threading.Lock(), [], [0], [0]
    delays = random.Random(0)

    def make(step):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            made.append(step)
            pause = delays.uniform(0, 0.01)
        time.sleep(pause)  # later steps often finish first
        with lock:
            in_flight[0] -= 1
        return ("batches", step)

    asked = []
    with StepPrefetcher(make, 3, 12, workers) as prefetch:
        for step in range(3, 13):
            asked.append(prefetch.get(step))
            if workers:  # never more than `workers` steps beyond the one handed out
                assert max(made) <= step + workers
    assert asked == [("batches", s) for s in range(3, 13)]
    assert sorted(made) == list(range(3, 13))  # each step prepared once
    assert most[0] <= max(1, workers)


def test_a_worker_error_reaches_the_loop_and_an_early_exit_stops_the_rest():
    def make(step):
        if step == 2:
            raise ValueError("token id 9 outside the vocabulary")
        return step

    with pytest.raises(ValueError, match="outside the vocabulary"):
        with StepPrefetcher(make, 1, 100, 2) as prefetch:
            assert prefetch.get(1) == 1
            prefetch.get(2)
