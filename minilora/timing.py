"""Timing things against each other on a busy machine: interleaved rounds, medians, paired ratios.

    times = interleaved({"base": lambda: base(idx), "merged": lambda: merged(idx)}, repeats=25)
    median(times["merged"]) / median(times["base"])      # or, steadier:
    paired_ratio(times["merged"], times["base"])         # the median of the per-round ratios

Every round runs each callable once, in an order rotated by one place each round, so a
neighbour's load, clock changes and the cost of going first hit every callable alike. The demo,
``minilora experiment latency`` and the benchmark harness (``benchmarks/``) all time this way.
"""

from __future__ import annotations

import statistics
import time

__all__ = ["interleaved", "median", "paired_ratio", "quartiles"]


def interleaved(fns: dict, repeats: int, warmup: int = 1, sync=None, before_round=None) -> dict:
    """{name: [seconds of each timed call]} for every callable of ``fns``, over ``repeats`` rounds.

    ``warmup`` untimed calls of each callable come first. ``sync()`` (e.g. waiting for the GPU)
    runs after each call, inside the timed span; ``before_round()`` (e.g. ``gc.collect``) runs
    before each round, untimed.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"interleaved: repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
            if sync is not None:
                sync()
    times = {name: [] for name in names}
    for i in range(repeats):
        if before_round is not None:
            before_round()
        shift = i % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs) -> float:
    return statistics.median(xs) if len(xs) else float("nan")


def quartiles(xs) -> tuple[float, float]:
    """(first, third) quartile; one sample is its own quartiles."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if len(xs) else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def paired_ratio(a, b) -> float:
    """The median over rounds of a's time / b's time in the same round (drift cancels within a round)."""
    return median([x / y for x, y in zip(a, b)])
