"""Arrival profiles of serverless invocations: when (seconds from the start) each invocation begins."""

from __future__ import annotations

import random
from dataclasses import dataclass

PROFILES = ("steady", "spike", "sawtooth", "cold-start")


@dataclass(frozen=True)
class Shape:
    """The knobs every profile reads (each uses the ones that make sense for it)."""

    invocations: int = 1000  # invocations in all (steady and sawtooth: at most this many)
    rate: float = 200.0  # invocations per second (steady: constant; sawtooth: the peak)
    duration: float = 10.0  # seconds over which invocations are started (not for spike)
    period: float = 2.0  # seconds of one sawtooth ramp, or between two cold-start waves
    waves: int = 4  # cold-start waves, each larger than the one before
    spread: float = 0.05  # seconds over which a spike's or a wave's invocations arrive
    seed: int = 1


def steady(shape: Shape) -> list[float]:
    """Evenly spaced arrivals at `rate` for `duration` seconds."""
    count = min(shape.invocations, int(shape.rate * shape.duration))
    return [i / shape.rate for i in range(count)]


def spike(shape: Shape) -> list[float]:
    """Every invocation at once (within `spread`): a burst of functions triggered together."""
    rng = random.Random(shape.seed)
    return sorted(rng.uniform(0.0, shape.spread) for _ in range(shape.invocations))


def sawtooth(shape: Shape) -> list[float]:
    """The rate climbs from 0 to `rate` over each `period`, then drops to 0 again, for `duration` seconds."""
    times: list[float] = []
    t, step = 0.0, 0.001
    owed = 0.0
    while t < shape.duration and len(times) < shape.invocations:
        owed += shape.rate * ((t % shape.period) / shape.period) * step
        while owed >= 1.0 and len(times) < shape.invocations:
            times.append(t)
            owed -= 1.0
        t += step
    return times


def cold_start(shape: Shape) -> list[float]:
    """Waves every `period` seconds, wave k holding k shares of `invocations` (1, 2, 3, ...): a platform
    scaling out, each new function instance opening its first connection at the same moment."""
    rng = random.Random(shape.seed)
    shares = shape.waves * (shape.waves + 1) // 2
    times: list[float] = []
    for wave in range(1, shape.waves + 1):
        size = shape.invocations * wave // shares
        start = (wave - 1) * shape.period
        times += [start + rng.uniform(0.0, shape.spread) for _ in range(size)]
    return sorted(times)


def arrivals(profile: str, shape: Shape) -> list[float]:
    """The start offsets of every invocation of `profile` (sorted)."""
    makers = {"steady": steady, "spike": spike, "sawtooth": sawtooth, "cold-start": cold_start}
    if profile not in makers:
        raise ValueError(f"unknown profile {profile!r}: one of {', '.join(PROFILES)}")
    return makers[profile](shape)
