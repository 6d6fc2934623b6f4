"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternating_medians(fns: dict[str, Callable[[], object]], *, min_rounds: int, max_rounds: int,
                        budget_s: float = 0.0, block: int = 1,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation so that on a shared machine
    every function sees the same load, cache contention and clock: after one warm-up call each,
    every round runs each function ``block`` times in a row (the order rotates between rounds).
    With ``block > 1`` the first call of a block is dropped, so each function is timed with its own
    operands warm in cache (that call pays for the other functions' evictions).  Rounds continue
    past ``min_rounds`` while ``budget_s`` lasts, up to ``max_rounds``."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            for rep in range(block):
                t0 = clock()
                fns[name]()
                if rep or block == 1:
                    times[name].append(clock() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}
