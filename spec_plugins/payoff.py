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
# The running arm's latest window commits this much fewer tokens per request and cycle
# than when it was chosen: the arms are measured again, together (the method stopped
# paying). Its seconds per token are no sign: they move with the batch size in a class.
DRIFT = 0.25
# The longest wait (cycles of a batch-size class) before an arm that was slower is
# re-measured (unless its cost bound asks for longer).
RETRY_CAP = 4096


# A timed cycle: (seconds, tokens committed, requests).
Cycle = tuple[float, int, int]


def _median(cycles: Sequence[Cycle]) -> float:
    return sorted(c[0] for c in cycles)[len(cycles) // 2]


def seconds_per_token(cycles: Sequence[Cycle], shortest: float) -> float:
    """Seconds per committed token over ``cycles``, leaving out those longer than their
    median by ``IDLE_EXCESS`` times ``shortest`` (a long prefill)."""
    median = _median(cycles)
    kept = [(s, t) for s, t, _ in cycles if s - median < IDLE_EXCESS * shortest]
    return sum(s for s, _ in kept) / max(sum(t for _, t in kept), 1)


def tokens_per_request(cycles: Sequence[Cycle]) -> float:
    """Tokens committed per request and cycle (1 without drafts)."""
    return sum(c[1] for c in cycles) / max(sum(c[2] for c in cycles), 1)


class _Round:
    """Arms measured together: alternated cycle by cycle until each has ``window``
    counted cycles, so every arm sees the same batch sizes, requests and moments."""

    def __init__(self, arms: Sequence[int], window: int, drift: bool = False):
        self.arms, self.window, self.drift = tuple(arms), window, drift
        self.cycles: dict[int, list[Cycle]] = {a: [] for a in self.arms}

    def next_arm(self) -> int | None:
        """The arm with the fewest counted cycles (None: the round is over)."""
        arm = min(self.arms, key=lambda a: len(self.cycles[a]))
        return arm if len(self.cycles[arm]) < self.window else None


class _ClassState:
    """What one batch-size class knows: what it runs, each arm's seconds per token (from
    the last round that measured it, or estimated from a smaller class), and when to
    measure again."""

    def __init__(self, window: int):
        self.runs: int | None = None
        self.rates: list[float] = []
        self.estimated: set[int] = set()         # arms not measured: taken from `prior`
        self.estimated_from = 0                  # that smaller class
        self.round: _Round | None = None
        self.prior: tuple[int, list[float]] | None = None   # (smaller class, ratios)
        self.live: deque = deque(maxlen=window)  # the running arm's cycles since its round
        self.count = 0                           # cycles of this class so far
        self.waits: dict[int, Backoff] = {}
        self.due: dict[int, int] = {}            # arm -> cycle count its next round is due
        self.accepted = 1.0                      # the running arm's, in its round
        self.drift_every, self.drift_due = window, 0


class PayoffGate:
    """Which way of running a method pays, measured rather than modelled: wall seconds per
    committed token over whole decoding cycles (one ``propose`` call to the next: drafting
    plus the engine step), per batch-size class, for each *arm*: the method's parts
    (``parts``, fullest first, e.g. ``("the block pass", "the suffix side alone")``) and,
    last, running without it. The cost models behind :func:`best_length` miss what a step
    with drafts costs beyond its forward (rejection sampling, bookkeeping, a busy
    machine); this gate catches it.

    Arms are compared only when measured in one *round*: alternated cycle by cycle until
    each has ``window`` cycles, so both sides of a comparison saw the same batch sizes
    (a class spans sizes up to 2x apart), the same requests and the same moment; windows
    measured at different moments disagree by more than what a method gains. A class
    first measures every arm in one round, then runs the fastest. A class bigger than one
    that runs without the method measures only running without it and takes the other
    arms to be as much slower as there (estimated the same way or measured), until they
    are measured. Each slower arm is measured again, in a round with the arm the class
    runs, after a wait that doubles while it stays slower (:class:`Backoff`) and that is
    never so short that its cycles cost more than ``max_overhead`` of the time (an arm
    twice as slow waits ``window / max_overhead`` cycles): re-measuring a method that
    loses at 64 concurrent costs at most that share. When the running arm's latest
    ``window`` cycles commit ``DRIFT`` fewer tokens per request than when it was chosen
    (the method stopped paying), every arm is measured again at once (a wait that doubles
    while that changes nothing).

    Per ``propose``: ``arm = gate.begin(requests)`` (``gate.off``: do not run the method),
    run it, then ``gate.end(arm)`` (``None``: a cycle not to count). ``on_decision`` is
    called with a line saying what a batch-size class runs whenever that changes.

    Every cycle of a batch-size class counts, prefills and arrivals included: at 32 or 64
    concurrent a request joins or leaves nearly every step, and every arm sees the same
    mix of prefills per committed token over a round. Not counted: a cycle none of whose
    requests ran in the cycle before (it spans idle time: the server waited for a
    request), and a cycle longer than its arm's typical (median) cycle by more than
    ``IDLE_EXCESS`` times the round's shortest typical cycle (a long prompt's prefill
    chunk). The excess is measured in the same seconds for every arm, so a prefill that
    one arm drops the others drop too: a bound relative to each arm's own cycle would keep
    more of them in the slower arms."""

    def __init__(self, parts: Sequence[str] = ("the method",), window: int = 16,
                 retry_every: int = 16, max_overhead: float = 0.03,
                 on_decision: Callable[[str], None] | None = None):
        self.parts = tuple(parts)
        self.on_decision = on_decision
        self.off = len(self.parts)          # the last arm: without the method
        self.window, self.max_overhead = window, max_overhead
        self.retry_every = retry_every
        self._classes: dict[int, _ClassState] = {}
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

    def begin(self, requests: Sequence[CycleRequest]) -> int:
        now = clock.now()
        ids = {r.req_id for r in requests}
        if self._last is not None and not ids.isdisjoint(self._ids):
            t0, arm, bucket = self._last
            self._record(self._classes[bucket], arm, (
                now - t0, sum(len(r.new_tokens) for r in requests), len(requests)))
        self._start, self._class, self._ids = now, self._bucket(len(requests)), ids
        return self._choose(self._class)

    def end(self, arm: int | None) -> None:
        self._last = None if arm is None else (self._start, arm, self._class)

    def forget_drafting(self) -> None:
        """The drafter changed (e.g. a new layer set): measure every arm afresh."""
        for c in self._classes.values():
            c.round, c.prior = _Round(range(self.off + 1), self.window), None
            c.estimated.clear()
            c.due.clear()

    @staticmethod
    def _record(c: _ClassState, arm: int, cycle: Cycle) -> None:
        if c.round is not None and arm in c.round.cycles:
            c.round.cycles[arm].append(cycle)
        elif arm == c.runs:
            c.live.append(cycle)

    def _choose(self, bucket: int) -> int:
        c = self._classes.get(bucket)
        if c is None:
            c = self._classes[bucket] = _ClassState(self.window)
            c.prior = self._smaller_without(bucket)
            # A smaller batch ran faster without the method: a bigger one (its step more
            # compute-bound) is taken to lose as much until a round measures it.
            arms = [self.off] if c.prior is not None else range(self.off + 1)
            c.round = _Round(arms, self.window)
        c.count += 1
        if c.round is None:
            arms = [a for a, due in c.due.items() if c.count >= due]
            if arms:        # a slower arm's wait is over: measure it beside the running one
                arm = min(arms)
                del c.due[arm]
                c.round = _Round(sorted({arm, c.runs}), self.window)
            elif (len(c.live) == self.window and c.count >= c.drift_due
                  and tokens_per_request(c.live) * (1 + DRIFT) < c.accepted):
                c.round = _Round(range(self.off + 1), self.window, drift=True)
        if c.round is not None:
            arm = c.round.next_arm()
            if arm is not None:
                return arm
            self._conclude(bucket, c)
        return c.runs

    def _conclude(self, bucket: int, c: _ClassState) -> None:
        """A round is over: each arm's rate from it, the decision, when to look again."""
        done, c.round = c.round, None
        shortest = min(_median(d) for d in done.cycles.values())
        measured = {a: seconds_per_token(d, shortest) for a, d in done.cycles.items()}
        rates = list(c.rates) or [0.0] * (self.off + 1)
        if c.runs in measured and c.rates:
            # Arms not in the round keep their ratio to the running arm, measured with it.
            scale = measured[c.runs] / c.rates[c.runs]
            rates = [r * scale for r in rates]
        for a, r in measured.items():
            rates[a] = r
            c.estimated.discard(a)
        if c.prior is not None:
            smaller, ratios = c.prior
            c.prior = None
            c.estimated = {a for a in range(self.off + 1) if a not in measured}
            c.estimated_from = smaller
            for a in c.estimated:
                rates[a] = rates[self.off] * ratios[a]
            best = self.off
        else:
            best = min(range(self.off + 1), key=rates.__getitem__)
        runs, c.rates = c.runs, rates
        if runs is not None and rates[runs] <= rates[best] * (1 + SWITCH_MARGIN):
            best = runs     # not measurably slower: keep it (no flapping at break-even)
        c.accepted = (tokens_per_request(done.cycles[best]) if best in done.cycles
                      else 1.0)
        if done.drift:      # look for drift less often while it changes nothing
            c.drift_every = (self.window if best != runs
                             else min(2 * c.drift_every, RETRY_CAP))
            c.drift_due = c.count + c.drift_every
        c.runs = best
        c.live.clear()
        if runs != best and self.on_decision is not None:
            source = f" as at batch {self._size(c.estimated_from)}" if c.estimated else ""
            self.on_decision(f"batch {self._size(bucket)} runs {self._arm(best)} ("
                             + ", ".join(f"{self._arm(a)} {1 / r:.1f} tok/s"
                                         + (source if a in c.estimated else "")
                                         for a, r in enumerate(rates)) + ")")
        for arm, rate in enumerate(rates):
            wait = c.waits.setdefault(arm, Backoff(self.retry_every, cap=RETRY_CAP))
            if arm == best:
                wait.paid(True)
                c.due.pop(arm, None)
            elif arm in measured or arm not in c.due:
                slower = rate / max(rates[best], 1e-12) - 1
                c.due[arm] = c.count + max(
                    wait.every, int(self.window * slower / self.max_overhead))
                wait.paid(False)

    def _smaller_without(self, bucket: int) -> tuple[int, list[float]] | None:
        """(class, each arm's seconds per token over running without the method) of the
        nearest smaller class that has decided, where that decision is to run without it
        (its rates measured, or estimated the same way from a smaller class); else None.
        A method that loses at batch b loses at any bigger batch (each verified draft
        token costs more of a step the more the step is compute-bound), so a class first
        reached after such a class starts without the method instead of spending cycles
        on it."""
        for b in range(bucket - 1, 0, -1):
            c = self._classes.get(b)
            if c is None or c.runs is None:
                continue
            if c.runs != self.off:
                return None
            return b, [r / c.rates[self.off] for r in c.rates]
        return None

    def _size(self, bucket: int) -> str:
        lo = 1 << (bucket - 1)
        return f"{lo}+" if lo >= self.MAX_CLASS else f"{lo}-{2 * lo - 1}" if lo > 1 else "1"

    def _arm(self, arm: int) -> str:
        return "without it" if arm == self.off else f"with {self.parts[arm]}"

    def describe(self) -> str:
        parts = []
        for b, c in sorted(self._classes.items()):
            for arm, spt in enumerate(c.rates):
                if arm not in c.estimated:
                    parts.append(f"batch {self._size(b)} {self._arm(arm)} {1 / spt:.1f} tok/s")
        return "measured: " + (", ".join(parts) or "nothing yet")
