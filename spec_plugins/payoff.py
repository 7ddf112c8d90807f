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
    ``gate.end(drafted)``.

    ``same_requests``: a cycle counts only when the same requests ran in it as in the one
    before and none prefilled (exact, and enough at low concurrency). False: every cycle
    of a batch-size class counts, prefills and arrivals included; at 32 or 64 concurrent a
    request joins or leaves nearly every step, and both kinds of cycle see the same mix of
    prefills per committed token, so the comparison stays fair over a longer window."""

    def __init__(self, window: int = 8, retry_every: int = 16, plain_every: int = 16,
                 same_requests: bool = True):
        self.window, self.plain_every = window, plain_every
        self.same_requests = same_requests
        self.retry = Backoff(retry_every)
        self.cycles: dict[tuple[bool, int], deque] = {}  # (drafted, batch class) -> (s, tokens)
        self._ids: frozenset = frozenset()
        self._batch = 0
        self._start = 0.0
        self._last: tuple[float, bool, int] | None = None
        self._burst = 0
        self._count = 0

    # Batch-size classes: 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64+ (a method that pays at 8
    # concurrent may not at 32: the step is compute-bound there).
    MAX_CLASS = 64

    @classmethod
    def _bucket(cls, batch: int) -> int:
        return min(batch, cls.MAX_CLASS).bit_length()

    def _rate(self, drafted: bool, bucket: int) -> float | None:
        """Seconds per token over the window, None until the window is full."""
        d = self.cycles.get((drafted, bucket))
        if d is None or len(d) < self.window:
            return None
        return sum(s for s, _ in d) / max(sum(t for _, t in d), 1)

    def begin(self, requests: Sequence[CycleRequest], batch_tokens: int) -> bool:
        now = clock.now()
        # Comparable cycles only: the same requests, none of them prefilling (membership is
        # not read at all without same_requests: it would cost a set per step).
        ids = frozenset(r.req_id for r in requests) if self.same_requests else self._ids
        comparable = not self.same_requests or (ids == self._ids
                                                and batch_tokens == len(requests))
        if self._last is not None and comparable:
            t0, drafted, b = self._last
            tokens = sum(len(r.new_tokens) for r in requests)
            d = self.cycles.setdefault((drafted, self._bucket(b)),
                                       deque(maxlen=self.window))
            if not d or (now - t0) < 5 * d[-1][0]:   # longer: idle server, not decoding
                d.append((now - t0, tokens))
        self._ids, self._start, self._batch = ids, now, len(requests)
        return self._allow(self._bucket(len(requests)))

    def end(self, drafted: bool) -> None:
        self._last = (self._start, drafted, self._batch)

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
                lo = 1 << (b - 1)
                size = (f"{lo}+" if lo >= self.MAX_CLASS else
                        f"{lo}-{2 * lo - 1}" if lo > 1 else "1")
                parts.append(f"batch {size} {'with' if drafted else 'without'} drafts "
                             f"{1 / spt:.1f} tok/s")
        return "measured: " + (", ".join(parts) or "nothing yet")
