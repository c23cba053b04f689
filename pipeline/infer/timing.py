"""The one timer of inference: milliseconds of a callable, what `auto`'s calibration ranks
backends by and what `samstream bench` prints."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(
    fn: Callable[[], object],
    *,
    device: torch.device | None = None,
    repeats: int = 1,
    warmup: int = 0,
) -> list[float]:
    """Milliseconds of each of `repeats` calls of `fn`, after `warmup` calls not timed.

    On a CUDA `device` each timed call starts and ends with the device synchronised, so the
    time is that of the work `fn` queues (host launch gaps included, as a caller sees them),
    not of its queueing."""
    cuda = device is not None and device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def median_ms(
    fn: Callable[[], object],
    *,
    device: torch.device | None = None,
    repeats: int = 1,
    warmup: int = 1,
) -> float:
    """The median of `time_ms` (one warm-up call by default: first calls allocate)."""
    return statistics.median(time_ms(fn, device=device, repeats=repeats, warmup=warmup))
