"""Whether drafting pays, measured: a method that decides it does not draft must cost
(almost) nothing against the engine without speculation.

- :class:`PayoffGate`: tokens per second of whole decoding cycles with drafts and
  without, compared per batch-size class; drafting stops when it is measured slower;
- :class:`Backoff`: how often to try (draft, probe, search) anyway when it does not pay,
  the wait doubling while it keeps not paying.

Engine-agnostic: a proposer calls ``gate.begin`` at the top of ``propose`` and
``gate.end`` with whether it drafted.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Protocol, Sequence

from spec_plugins import clock


class CycleRequest(Protocol):
    """What the gate reads of a request (``proposers.base.DraftRequest`` has it)."""
    req_id: Hashable
    new_tokens: Sequence[int]


class Backoff:
    """When drafting does not pay, try it (or probe for it) ever more rarely: :meth:`due`
    every ``start`` steps; ``paid(False)`` after a try doubles the wait (up to ``cap``),
    ``paid(True)`` (drafting pays again) resets it."""

    def __init__(self, start: int, cap: int = 256):
        self.start, self.cap = start, max(cap, start)
        self.every, self._count = start, 0

    def due(self) -> bool:
        self._count += 1
        if self._count >= self.every:
            self._count = 0
            return True
        return False

    def paid(self, yes: bool) -> None:
        self.every = self.start if yes else min(self.every * 2, self.cap)


class PayoffGate:
    """Whether drafting pays, measured rather than modelled: wall seconds per committed
    token over whole decoding cycles (one ``propose`` call to the next: drafting plus
    the engine step), over the last ``window`` cycles with drafts and without, per
    batch-size class. The cost models behind :func:`best_length` miss what a step with
    drafts costs beyond its forward (rejection sampling, bookkeeping, a busy machine);
    this gate catches it. Drafting runs until cycles without drafts are measured to be
    faster; then a burst of ``window`` cycles with drafts re-measures it, after waits
    that double while it stays slower (:class:`Backoff`). While drafting pays, one
    cycle in ``plain_every`` runs without drafts to keep the comparison current.

    Per ``propose``: ``allow = gate.begin(requests, batch_tokens)``, draft (or not), then
    ``gate.end(drafted)``."""

    def __init__(self, window: int = 8, retry_every: int = 16, plain_every: int = 16):
        self.window, self.plain_every = window, plain_every
        self.retry = Backoff(retry_every)
        self.cycles: dict[tuple[bool, int], deque] = {}  # (drafted, batch class) -> (s, tokens)
        self._ids: frozenset = frozenset()
        self._start = 0.0
        self._last: tuple[float, bool, int] | None = None
        self._burst = 0
        self._count = 0

    @staticmethod
    def _bucket(batch: int) -> int:
        return min(batch, 8).bit_length()   # 1, 2-3, 4-7, 8+

    def _rate(self, drafted: bool, bucket: int) -> float | None:
        """Seconds per token over the window, None until the window is full."""
        d = self.cycles.get((drafted, bucket))
        if d is None or len(d) < self.window:
            return None
        return sum(s for s, _ in d) / max(sum(t for _, t in d), 1)

    def begin(self, requests: Sequence[CycleRequest], batch_tokens: int) -> bool:
        now = clock.now()
        ids = frozenset(r.req_id for r in requests)
        # Comparable cycles only: the same requests, none of them prefilling.
        if self._last is not None and ids == self._ids and batch_tokens == len(requests):
            t0, drafted, b = self._last
            tokens = sum(len(r.new_tokens) for r in requests)
            d = self.cycles.setdefault((drafted, self._bucket(b)),
                                       deque(maxlen=self.window))
            if not d or (now - t0) < 5 * d[-1][0]:   # longer: idle server, not decoding
                d.append((now - t0, tokens))
        self._ids, self._start = ids, now
        return self._allow(self._bucket(len(requests)))

    def end(self, drafted: bool) -> None:
        self._last = (self._start, drafted, len(self._ids))

    def forget_drafting(self) -> None:
        """The drafter changed (e.g. a new layer set): measure it afresh."""
        for (drafted, _), d in self.cycles.items():
            if drafted:
                d.clear()
        self._burst = 0

    def _allow(self, bucket: int) -> bool:
        self._count += 1
        if self._burst:
            self._burst -= 1
            return True
        draft, plain = self._rate(True, bucket), self._rate(False, bucket)
        if draft is None:
            return True             # measure drafting first
        if plain is None:
            return False            # then cycles without
        if draft <= plain:
            self.retry.paid(True)
            return self._count % self.plain_every != 0
        if self.retry.due():
            self.retry.paid(False)
            self._burst = self.window - 1
            return True
        return False

    def describe(self) -> str:
        parts = []
        for drafted, b in sorted(self.cycles, key=lambda k: (k[1], k[0])):
            spt = self._rate(drafted, b)
            if spt is not None:
                size = {1: "1", 2: "2-3", 3: "4-7", 4: "8+"}[b]
                parts.append(f"batch {size} {'with' if drafted else 'without'} drafts "
                             f"{1 / spt:.1f} tok/s")
        return "measured: " + (", ".join(parts) or "nothing yet")
