"""Whether drafting pays, measured: a method that decides it does not draft must cost
(almost) nothing against the engine without speculation.

- :class:`PayoffGate`: tokens per second of whole decoding cycles with each part of a
  method and without it, compared per batch-size class; the fastest runs;
- :class:`Backoff`: how often to try (draft, probe, re-measure) anyway when it does not
  pay, the wait doubling while it keeps not paying.

Engine-agnostic: the adapter session (``spec_plugins.adapter.session``) holds the one gate
of the method it serves.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable, Protocol, Sequence

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


# A cycle this many of the class's shortest typical cycles longer than its arm's typical
# cycle carries a prompt's prefill (or a pause), not decoding: it is not counted.
IDLE_EXCESS = 4.0
# What a class runs changes only for an arm this much faster (seconds per token).
SWITCH_MARGIN = 0.02
# The longest wait (cycles of a batch-size class) before an arm that was slower is
# re-measured (unless its cost bound asks for longer).
RETRY_CAP = 4096


class PayoffGate:
    """Which way of running a method pays, measured rather than modelled: wall seconds per
    committed token over whole decoding cycles (one ``propose`` call to the next: drafting
    plus the engine step), per batch-size class, for each *arm*: the method's parts
    (``parts``, fullest first, e.g. ``("the block pass", "the suffix side alone")``) and,
    last, running without it. The cost models behind :func:`best_length` miss what a step
    with drafts costs beyond its forward (rejection sampling, bookkeeping, a busy
    machine); this gate catches it.

    Every arm is first measured for ``window`` cycles (the fullest first); then the
    fastest runs. A class bigger than one that runs without the method measures only
    running without it first and takes the others to be as much slower as they were
    there, until their first burst. Each slower arm is re-measured in a burst of
    ``window`` cycles, after a wait that doubles while it stays slower (:class:`Backoff`)
    and that is never so short that bursts cost more than ``max_overhead`` of the time (a
    burst of an arm twice as slow waits ``window / max_overhead`` cycles): re-measuring a
    method that loses at 64 concurrent costs at most that share.

    Per ``propose``: ``arm = gate.begin(requests)`` (``gate.off``: do not run the method),
    run it, then ``gate.end(arm)`` (``None``: a cycle not to count). ``on_decision`` is
    called with a line saying what a batch-size class runs whenever that changes.

    Every cycle of a batch-size class counts, prefills and arrivals included: at 32 or 64
    concurrent a request joins or leaves nearly every step, and every arm sees the same
    mix of prefills per committed token over a window. Not counted: a cycle none of whose
    requests ran in the cycle before (it spans idle time: the server waited for a
    request), and a cycle longer than its arm's typical (median) cycle by more than
    ``IDLE_EXCESS`` times the class's shortest typical cycle (a long prompt's prefill
    chunk). The excess is measured in the same seconds for every arm, so a prefill that
    one arm drops the others drop too: a bound relative to each arm's own cycle would keep
    more of them in the slower arms."""

    def __init__(self, parts: Sequence[str] = ("the method",), window: int = 16,
                 retry_every: int = 16, max_overhead: float = 0.03,
                 on_decision: Callable[[str], None] | None = None):
        self.parts = tuple(parts)
        self.on_decision = on_decision
        self._best: dict[int, int] = {}                  # class -> arm it runs
        self.off = len(self.parts)          # the last arm: without the method
        self.window, self.max_overhead = window, max_overhead
        self.retry_every = retry_every
        self.cycles: dict[tuple[int, int], deque] = {}   # (arm, batch class) -> (s, tokens)
        self._waits: dict[tuple[int, int], Backoff] = {}
        self._due: dict[tuple[int, int], int] = {}       # (arm, class) -> cycle count due
        self._count: dict[int, int] = {}                 # class -> cycles so far
        self._burst: dict[int, tuple[int, int]] = {}     # class -> (arm, cycles left)
        self._class = 0                                  # this cycle's batch class
        self._ids: set = set()                           # the last cycle's requests
        self._start = 0.0
        self._last: tuple[float, int, int] | None = None # (start, arm, class)

    # Batch-size classes: 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64+ (a method that pays at 8
    # concurrent may not at 32: the step is compute-bound there).
    MAX_CLASS = 64

    @classmethod
    def _bucket(cls, batch: int) -> int:
        return min(batch, cls.MAX_CLASS).bit_length()

    def _rates(self, bucket: int) -> list[float | None]:
        """Per arm, seconds per token over its window in the class, None until the window
        is full; cycles that carried a long prefill (see the class docstring) left out."""
        windows = [self.cycles.get((arm, bucket)) or () for arm in range(self.off + 1)]
        typical = [sorted(s for s, _ in d)[len(d) // 2] if d else None for d in windows]
        known = [t for t in typical if t is not None]
        rates: list[float | None] = []
        for d, median in zip(windows, typical):
            if len(d) < self.window:
                rates.append(None)
                continue
            kept = [(s, t) for s, t in d if s - median < IDLE_EXCESS * min(known)]
            rates.append(sum(s for s, _ in kept) / max(sum(t for _, t in kept), 1))
        return rates

    def begin(self, requests: Sequence[CycleRequest]) -> int:
        now = clock.now()
        ids = {r.req_id for r in requests}
        if self._last is not None and not ids.isdisjoint(self._ids):
            t0, arm, bucket = self._last
            d = self.cycles.setdefault((arm, bucket), deque(maxlen=self.window))
            d.append((now - t0, sum(len(r.new_tokens) for r in requests)))
        self._start, self._class, self._ids = now, self._bucket(len(requests)), ids
        return self._choose(self._class)

    def end(self, arm: int | None) -> None:
        self._last = None if arm is None else (self._start, arm, self._class)

    def forget_drafting(self) -> None:
        """The drafter changed (e.g. a new layer set): measure its arms afresh."""
        for (arm, _), d in self.cycles.items():
            if arm != self.off:
                d.clear()
        self._burst.clear()

    def _choose(self, bucket: int) -> int:
        count = self._count[bucket] = self._count.get(bucket, 0) + 1
        burst = self._burst.get(bucket)
        if burst is not None:
            arm, left = burst
            if left > 1:
                self._burst[bucket] = (arm, left - 1)
            else:
                del self._burst[bucket]
            return arm
        rates = self._rates(bucket)
        estimated: dict[int, str] = {}      # arm -> " as at batch ..." (not measured here)
        if None in rates:
            inherited = self._smaller_without(bucket)
            if inherited is None:
                return rates.index(None)    # every arm measured once, the fullest first
            if rates[self.off] is None:
                return self.off
            # A smaller batch ran faster without the method: a bigger one (its step more
            # compute-bound) is taken to lose as much until a burst measures it.
            smaller, ratios = inherited
            estimated = {a: f" as at batch {self._size(smaller)}"
                         for a, r in enumerate(rates) if r is None}
            rates = [rates[self.off] * ratio if r is None else r
                     for r, ratio in zip(rates, ratios)]
        best = min(range(self.off + 1), key=rates.__getitem__)
        runs = self._best.get(bucket)
        if runs is not None and rates[runs] <= rates[best] * (1 + SWITCH_MARGIN):
            best = runs     # not measurably slower: keep it (no flapping at break-even)
        if runs != best:
            self._best[bucket] = best
            if self.on_decision is not None:
                self.on_decision(f"batch {self._size(bucket)} runs {self._arm(best)} ("
                                 + ", ".join(f"{self._arm(a)} {1 / r:.1f} tok/s"
                                             + estimated.get(a, "")
                                             for a, r in enumerate(rates)) + ")")
        for arm, rate in enumerate(rates):
            key = (arm, bucket)
            wait = self._waits.setdefault(key, Backoff(self.retry_every, cap=RETRY_CAP))
            if arm == best:
                wait.paid(True)
                self._due.pop(key, None)
                continue
            if key not in self._due:    # slower since its last burst: when to look again
                slower = rate / max(rates[best], 1e-12) - 1
                self._due[key] = count + max(
                    wait.every, int(self.window * slower / self.max_overhead))
                wait.paid(False)
            elif count >= self._due[key]:
                del self._due[key]
                self._burst[bucket] = (arm, self.window - 1)
                return arm
        return best

    def _smaller_without(self, bucket: int) -> tuple[int, list[float]] | None:
        """(class, each arm's seconds per token over running without the method) of the
        nearest smaller class that has decided, where that decision is to run without it
        and every arm there is measured; else None. A method that loses at batch b loses
        at any bigger batch (each verified draft token costs more of a step the more the
        step is compute-bound), so a class first reached after such a class starts without
        the method instead of spending a window on it."""
        for b in range(bucket - 1, 0, -1):
            if b not in self._best:
                continue
            rates = self._rates(b)
            if self._best[b] != self.off or None in rates:
                return None
            return b, [r / rates[self.off] for r in rates]
        return None

    def _size(self, bucket: int) -> str:
        lo = 1 << (bucket - 1)
        return f"{lo}+" if lo >= self.MAX_CLASS else f"{lo}-{2 * lo - 1}" if lo > 1 else "1"

    def _arm(self, arm: int) -> str:
        return "without it" if arm == self.off else f"with {self.parts[arm]}"

    def describe(self) -> str:
        parts = []
        for b in sorted({b for _, b in self.cycles}):
            for arm, spt in enumerate(self._rates(b)):
                if spt is not None:
                    parts.append(f"batch {self._size(b)} {self._arm(arm)} {1 / spt:.1f} tok/s")
        return "measured: " + (", ".join(parts) or "nothing yet")
