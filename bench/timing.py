"""Timing shared by the bench scripts (wall clock, or a given clock such as time.thread_time)."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int, warmup: int, clock=time.perf_counter) -> float:
    """Median seconds of fn() by `clock` (default: wall) over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)
