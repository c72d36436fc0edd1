"""Benchmarks that print numbers (tests never time anything): one module per layer measured.

``lrustream bench models|changelog|stream`` runs them (lrustream/cli.py); the README and the Makefile quote
their figures. They belong to the shell: they may import every layer, and nothing imports them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
