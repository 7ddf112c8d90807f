"""The payoff gate on a simulated clock: each arm (a part of a method, or running
without it) costs a fixed time per cycle and commits a fixed number of tokens."""

from __future__ import annotations

import re
from dataclasses import dataclass

from spec_plugins import clock
from spec_plugins.payoff import Backoff, PayoffGate


@dataclass
class Req:
    req_id: str
    new_tokens: list


class Sim:
    """Decoding cycles of one batch of ``batch`` requests; ``costs[arm]`` = (seconds,
    tokens per request) of a cycle that ran ``arm``."""

    def __init__(self, monkeypatch, gate: PayoffGate, batch: int = 1):
        self.t, self.gate, self.batch = 0.0, gate, batch
        self.tokens = 1
        monkeypatch.setattr(clock, "now", lambda: self.t)

    def run(self, cycles: int, costs: dict[int, tuple[float, int]], prefill: float = 0.0,
            every: int = 0) -> tuple[list[int], float]:
        """``prefill``: seconds one cycle in ``every`` spends on a prompt besides."""
        arms, start = [], self.t
        for i in range(cycles):
            arm = self.gate.begin([Req(f"r{i}", [0] * self.tokens)
                                   for i in range(self.batch)])
            self.gate.end(arm)
            seconds, self.tokens = costs[arm]
            self.t += seconds + (prefill if every and i % every == every - 1 else 0.0)
            arms.append(arm)
        return arms, self.t - start


def test_the_fastest_part_runs_and_the_others_are_remeasured_rarely(monkeypatch):
    decisions = []
    gate = PayoffGate(("block pass", "suffix side"), window=4, on_decision=decisions.append)
    assert gate.off == 2
    sim = Sim(monkeypatch, gate)
    # The arms are measured together, alternated cycle by cycle, the fullest first.
    costs = {0: (1.5, 3), 1: (1.2, 3), 2: (1.0, 1)}    # 0.5, 0.4 and 1.0 s per token
    arms, _ = sim.run(12, costs)
    assert arms == [0, 1, 2] * 4
    arms, seconds = sim.run(2000, costs)
    assert arms.count(1) > 0.95 * len(arms)
    # What re-measuring the others cost against running the fastest alone.
    assert seconds < 1.04 * 2000 * 1.2
    assert "batch 1 with suffix side 2.5 tok/s" in gate.describe()
    assert decisions == ["batch 1 runs with suffix side (with block pass 2.0 tok/s, with "
                         "suffix side 2.5 tok/s, without it 1.0 tok/s)"]


def test_a_method_that_loses_costs_at_most_the_overhead_bound(monkeypatch):
    decisions = []
    gate = PayoffGate(window=16, max_overhead=0.03, on_decision=decisions.append)
    sim = Sim(monkeypatch, gate, batch=40)
    costs = {0: (2.0, 1), 1: (1.0, 1)}       # drafting twice as slow, nothing accepted
    sim.run(64, costs)                        # measured once each, then a few bursts
    arms, seconds = sim.run(4000, costs)
    assert arms.count(0) < 0.04 * len(arms)
    assert seconds < 1.04 * 4000
    assert "batch 32-63 without it 40.0 tok/s" in gate.describe()
    # Drafting gets cheap: a burst finds out within the wait the cost bound allows.
    cheap = {0: (1.2, 4), 1: (1.0, 1)}
    arms, _ = sim.run(2000, cheap)
    assert arms[-200:].count(0) > 0.9 * 200
    # and when it loses again, it is off after its next window.
    arms, _ = sim.run(100, costs)
    assert arms[-50:].count(0) < 5
    assert [d.split(" (")[0] for d in decisions] == [
        "batch 32-63 runs without it", "batch 32-63 runs with the method",
        "batch 32-63 runs without it"]


def test_at_break_even_the_class_keeps_what_it_runs(monkeypatch):
    decisions = []
    gate = PayoffGate(window=16, on_decision=decisions.append)
    sim = Sim(monkeypatch, gate, batch=20)
    # 1% apart either way, turn by turn: within the margin, no switch back and forth.
    for cost in [(1.01, 1), (0.99, 1)] * 10:
        sim.run(200, {0: cost, 1: (1.0, 1)})
    assert len(decisions) <= 2


def test_long_prefills_are_dropped_from_every_arm_alike(monkeypatch):
    """A long prompt's prefill every 5th cycle (8 s, where decoding takes 1-2 s) is not
    counted in either arm, so the comparison is of decoding; a short one (0.5 s) counts in
    both."""
    gate = PayoffGate(window=16)
    sim = Sim(monkeypatch, gate)
    sim.run(400, {0: (2.0, 3), 1: (1.0, 1)}, prefill=8.0, every=5)
    assert "with the method 1.5 tok/s" in gate.describe()
    assert "without it 1.0 tok/s" in gate.describe()
    sim.run(400, {0: (2.0, 3), 1: (1.0, 1)}, prefill=1.0, every=5)
    rates = dict(re.findall(r"(with the method|without it) ([\d.]+) tok/s", gate.describe()))
    assert 1.3 < float(rates["with the method"]) < 1.45     # 3 tokens in about 2.2 s
    assert 0.75 < float(rates["without it"]) < 0.95           # 1 token in about 1.2 s


def test_cycles_not_counted_and_a_changed_drafter(monkeypatch):
    gate = PayoffGate(window=4)
    sim = Sim(monkeypatch, gate)
    sim.run(8, {0: (3.0, 1), 1: (1.0, 1)})
    assert gate.begin([Req("r0", [0])]) == 1  # measured slower: off
    gate.end(None)                             # e.g. a search ran: not timed
    sim.t += 100.0
    assert gate.begin([Req("r0", [0] * 50)]) == 1
    gate.end(1)
    # The server idles; the next request's cycle spans the wait: not timed either.
    sim.t += 100.0
    assert gate.begin([Req("r1", [0])]) == 1
    assert "without it 1.0 tok/s" in gate.describe()
    gate.end(1)
    gate.forget_drafting()                     # a new drafter is measured first
    arms, _ = sim.run(6, {0: (3.0, 1), 1: (1.0, 1)})
    assert arms == [0, 1] * 3


def test_backoff_doubles_while_it_does_not_pay():
    b = Backoff(2, cap=8)
    assert [b.due() for _ in range(4)] == [False, True, False, True]
    for _ in range(3):
        b.paid(False)
    assert b.every == 8
    b.paid(True)
    assert b.every == 2


def test_a_bigger_batch_starts_without_a_method_that_lost_at_a_smaller_one(monkeypatch):
    decisions = []
    gate = PayoffGate(window=16, max_overhead=0.03, on_decision=decisions.append)
    sim = Sim(monkeypatch, gate, batch=4)
    sim.run(40, {0: (2.0, 1), 1: (1.0, 1)})              # loses at 4-7
    sim.batch = 8
    arms, _ = sim.run(40, {0: (3.0, 1), 1: (1.5, 1)})
    assert arms == [1] * 40                              # no window spent drafting at 8-15
    assert decisions[-1].startswith("batch 8-15 runs without it (with the method ")
    assert decisions[-1].endswith(" tok/s as at batch 4-7, without it 5.3 tok/s)")
    # It is measured there all the same, in a burst after the wait its cost bound allows,
    # and runs where it pays.
    arms, _ = sim.run(1000, {0: (1.5, 4), 1: (1.5, 1)})
    assert arms[-100:].count(0) > 90
    assert decisions[-1].startswith("batch 8-15 runs with the method (")
    # A smaller class that pays says nothing about a bigger one: it is measured first.
    sim.batch = 16
    arms, _ = sim.run(16, {0: (1.5, 4), 1: (1.5, 1)})
    assert arms == [0, 1] * 8


def test_the_estimate_of_a_bigger_class_chains_to_the_next(monkeypatch):
    decisions = []
    gate = PayoffGate(window=16, on_decision=decisions.append)
    sim = Sim(monkeypatch, gate, batch=2)
    sim.run(40, {0: (2.0, 1), 1: (1.0, 1)})              # loses at 2-3, measured
    sim.batch = 4
    sim.run(40, {0: (3.0, 1), 1: (1.5, 1)})              # 4-7: estimated from 2-3
    sim.batch = 8
    arms, _ = sim.run(40, {0: (3.0, 1), 1: (1.5, 1)})    # 8-15: estimated from 4-7
    assert arms == [1] * 40
    assert decisions[-1] == ("batch 8-15 runs without it (with the method 2.7 tok/s as at "
                             "batch 4-7, without it 5.3 tok/s)")

def test_arms_are_compared_at_the_same_batch_sizes(monkeypatch):
    """A class spans batch sizes up to 2x apart, and its batch changes as requests come
    and go: an arm measured at batch 7 and another at batch 4 differ by more than what a
    method gains. Measured together, the method that pays (1.25x at any size) runs."""
    decisions = []
    gate = PayoffGate(window=16, on_decision=decisions.append)
    sim = Sim(monkeypatch, gate)
    costs = {0: (1.6, 2), 1: (1.0, 1)}
    ran = []
    for size in [7, 4, 4, 7, 5, 7, 4, 6] * 6:
        sim.batch = size
        arms, _ = sim.run(24, costs)
        ran += arms
    assert ran[32:].count(0) > 0.9 * len(ran[32:])     # the rest: re-measuring (3%)
    assert [d.split(" (")[0] for d in decisions] == ["batch 4-7 runs with the method"]
    # It stops paying: the running arm's cycles commit fewer tokens than when it was
    # chosen, and the arms are measured again at once, not after a slower arm's wait.
    arms, _ = sim.run(80, {0: (2.4, 1), 1: (1.0, 1)})
    assert arms[-30:].count(1) == 30
    assert decisions[-1].startswith("batch 4-7 runs without it")
