"""Cost model of a verify pass: seconds for a forward with ``n`` query tokens per step.

Tree builders trade accepted length against verify cost with it: on a CPU in float32
each extra query token costs ~10% of a decode step, on a GPU almost nothing up to
dozens of tokens, and the builder must pick the tree size from these numbers, not from
a constant. The model is piecewise linear through measured points (flat extrapolation
of the last slope) and can be refined online with observed step times.
"""

from __future__ import annotations

import bisect
from typing import Mapping

from spec_plugins import clock


class CostModel:
    def __init__(self, points: Mapping[int, float]):
        if not points or any(n < 1 or t <= 0 for n, t in points.items()):
            raise ValueError("cost points must map query-token counts >= 1 to positive times")
        self._n = sorted(points)
        self._t = [float(points[n]) for n in self._n]

    @classmethod
    def linear(cls, t1: float, per_token: float, max_n: int = 1024) -> "CostModel":
        """A prior ``t1 + per_token * (n - 1)`` on a power-of-two grid, for online
        calibration to refine (observations move the grid points they land on)."""
        points, n = {}, 1
        while n <= max_n:
            points[n] = t1 + per_token * (n - 1)
            n *= 2
        return cls(points)

    def time(self, n: int) -> float:
        """Estimated seconds for ``n`` query tokens (``n >= 1``)."""
        ns, ts = self._n, self._t
        if len(ns) == 1:
            return ts[0] * max(n, 1) / ns[0] if n > ns[0] else ts[0]
        i = bisect.bisect_left(ns, n)
        if i < len(ns) and ns[i] == n:
            return ts[i]
        lo = min(max(i - 1, 0), len(ns) - 2)
        n0, n1, t0, t1 = ns[lo], ns[lo + 1], ts[lo], ts[lo + 1]
        return max(t0 + (t1 - t0) * (n - n0) / (n1 - n0), 1e-9)

    def observe(self, n: int, seconds: float, weight: float = 0.1) -> None:
        """Move the curve toward an observed step time: the error at ``n`` is shared by
        the two points around ``n`` in proportion to their interpolation weights (a
        stochastic-gradient fit of the piecewise-linear curve); beyond the last point,
        the last point moves."""
        ns, ts = self._n, self._t
        err = seconds - self.time(n)
        i = bisect.bisect_left(ns, n)
        if i < len(ns) and ns[i] == n:
            ts[i] += weight * err
        elif i == 0:
            ts[0] += weight * err
        elif i == len(ns):
            ts[-1] += weight * err
        else:
            lam = (n - ns[i - 1]) / (ns[i] - ns[i - 1])
            ts[i - 1] += weight * (1 - lam) * err
            ts[i] += weight * lam * err
        for j in range(len(ts)):
            ts[j] = max(ts[j], 1e-9)


class StepTimer:
    """Calibrates a :class:`CostModel` online from an engine's step times.

    ``observe(n, seconds)``: a step of ``n`` query tokens took ``seconds``. The first
    observation sets a linear prior (``prior_per_token`` of a one-token step per extra
    token); later ones refine it; a step much longer than the model predicts is idle
    time, not compute, and is dropped. ``start``/``stop`` time a step the caller
    brackets (``stop`` returns whether the step was recorded)."""

    def __init__(self, prior_per_token: float = 0.1, max_n: int = 4096):
        self.prior_per_token, self.max_n = prior_per_token, max_n
        self.cost: CostModel | None = None
        self._t0: float | None = None

    def observe(self, n: int, seconds: float) -> None:
        if n <= 0 or seconds <= 0:
            return
        if self.cost is None:
            t1 = seconds / (1 + self.prior_per_token * (n - 1))
            self.cost = CostModel.linear(t1, self.prior_per_token * t1, max_n=self.max_n)
        elif seconds < 3 * self.cost.time(n):
            self.cost.observe(n, seconds)

    def start(self) -> None:
        self._t0 = clock.now()

    def stop(self, n: int) -> None:
        """The step started by :meth:`start` computed ``n`` query tokens."""
        if self._t0 is not None:
            self.observe(n, clock.now() - self._t0)
        self._t0 = None
