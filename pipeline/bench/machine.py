"""Machine measurements for the benchmark: memory bandwidth and other processes' CPU use."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Best-of-N large array copy, counting the bytes read and written (one thread)."""
    src = np.ones(megabytes * 1024 * 1024 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"bytes_per_s": 2 * src.nbytes / best, "method": f"numpy copy of {megabytes} MiB, best of {repeats}"}


def contention_sample() -> dict[str, float]:
    """Busy CPU seconds of the whole machine so far (from /proc/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return {"busy_s": (sum(fields[:8]) - idle) / tick}
