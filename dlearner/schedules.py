"""Piecewise-linear schedules of a value (usually a learning rate) over environment steps."""

from __future__ import annotations

import bisect
import math
from typing import Sequence, Union

from dlearner.validation import is_real

ScheduleLike = Union[float, int, Sequence[Sequence[float]]]


class PiecewiseSchedule:
    """``[[timestep, value], ...]`` interpolated linearly; the first value before the first point
    and the last value past the end.

    Example::

        lr = PiecewiseSchedule([[0, 1e-3], [10_000, 1e-4]])
        lr.value(5_000)   # 5.5e-4
    """

    def __init__(self, points: ScheduleLike, *, name: str = "schedule"):
        if is_real(points):
            points = [[0, float(points)]]
        try:
            pairs = [(float(t), float(v)) for t, v in points]  # type: ignore[union-attr]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a number or a list of [timestep, value] pairs, got {points!r}.") from err
        if not pairs:
            raise ValueError(f"{name} must have at least one [timestep, value] pair.")
        times = [t for t, _ in pairs]
        if any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError(f"{name} timesteps must be strictly increasing, got {times}.")
        if not all(math.isfinite(v) for _, v in pairs) or not all(math.isfinite(t) for t in times):
            raise ValueError(f"{name} contains a non-finite value: {pairs}.")
        self.points = pairs
        self._times = times

    @property
    def is_constant(self) -> bool:
        return len(self.points) == 1

    def value(self, timestep: float) -> float:
        """The scheduled value at ``timestep``."""
        i = bisect.bisect_right(self._times, timestep)
        if i == 0:
            return self.points[0][1]
        if i == len(self.points):
            return self.points[-1][1]
        (t0, v0), (t1, v1) = self.points[i - 1], self.points[i]
        return v0 + (v1 - v0) * (timestep - t0) / (t1 - t0)

    def to_json(self) -> list:
        return [[t, v] for t, v in self.points]
