"""The engine-neutral adapter session both engine adapters drive."""

import logging

import numpy as np
import pytest

from spec_plugins.adapter.session import AdapterSession, RequestRecord
from spec_plugins.proposers.base import ModelInfo

INFO = ModelInfo(model_path="m", tokenizer_path="m", architecture="toy", num_layers=2,
                 hidden_size=8, vocab_size=100, max_model_len=64)


def session(supplies=frozenset()):
    s = AdapterSession("suffix", {}, logging.getLogger("test"), "TestEngine", supplies)
    s.bind(INFO)
    return s


def test_draft_requests_follow_the_record():
    s = session()
    s.admit("a", RequestRecord(max_draft=2))
    s.admit("b", RequestRecord(max_draft=0))
    s.admit("c", RequestRecord(temperature=0.7, seed=5, tree_ok=False))
    tokens = np.arange(10)
    a = s.draft_request("a", tokens, 4, [9], room=8)
    assert a.max_draft_tokens == 2 and a.num_accepted is None
    assert s.draft_request("b", tokens, 4, [9], room=8) is None      # cap 0: never
    c = s.draft_request("c", tokens, 4, [9], room=8)
    assert c.isolated and c.seed == 5 and not c.tree_ok and c.temperature == 0.7
    s.drafted("a", 2)
    s.requests["a"].accepted = 1
    assert s.draft_request("a", tokens, 4, [9], room=8).num_accepted == 1
    assert s.draft_request("a", tokens, 4, [9], room=0) is None


def test_drafts_of_repeated_text_and_finishing_requests():
    s = session()
    s.admit("a", RequestRecord())
    tokens = np.array([5, 6, 7, 8] * 6)
    (tree,) = s.propose([s.draft_request("a", tokens, 4, [8], room=4)], batch_tokens=1)
    assert tree.tokens[:3] == [5, 6, 7]        # the suffix trie continues the repeat
    s.admit("b", RequestRecord())
    s.retain(["b"])
    assert set(s.requests) == {"b"}


def test_skip_reasons_are_logged_once(caplog):
    s = session()
    with caplog.at_level(logging.INFO, logger="test"):
        for i in range(3):
            s.admit(str(i), RequestRecord(skip_reason="min_p"), "the engine ignores it")
    assert len([r for r in caplog.records if "min_p" in r.getMessage()]) == 1
    assert s.requests["0"].never_drafted


def test_a_method_needing_more_than_the_engine_supplies_stops_start_up():
    with pytest.raises(NotImplementedError, match="'dflash' needs \\['hidden_states'\\], "
                                                  "which the TestEngine adapter"):
        AdapterSession("dflash", {}, logging.getLogger("test"), "TestEngine", frozenset())


class Clock:
    """Simulated clock (``spec_plugins.clock``)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def counting(s: AdapterSession) -> list[list[str]]:
    """Per call of the session's proposer, the requests it was asked to draft for."""
    calls, inner = [], s.guard.propose

    def propose(requests, ctx):
        calls.append([r.req_id for r in requests])
        return inner(requests, ctx)
    s.guard.propose = propose
    return calls


def run_steps(s, clock, calls, ids, steps, seconds_with, seconds_without):
    """``steps`` decoding cycles of requests ``ids`` (one token each): a cycle takes
    ``seconds_with`` when the method drafted for the whole batch, else
    ``seconds_without``."""
    tokens = np.array([5, 6, 7, 8] * 6)
    for _ in range(steps):
        reqs = [s.draft_request(i, tokens, 4, [8], room=4) for i in ids]
        before = len(calls)
        s.propose(reqs, batch_tokens=len(reqs))
        whole = len(calls) > before and len(calls[-1]) == len(ids)
        clock.t += seconds_with if whole else seconds_without


def test_payoff_gate_turns_a_losing_method_off_per_batch_class_and_keeps_seeded_requests(
        monkeypatch):
    from spec_plugins import clock as clock_module

    clock = Clock()
    monkeypatch.setattr(clock_module, "now", clock)
    s = session()
    calls = counting(s)
    small = [f"a{i}" for i in range(2)]
    big = [f"b{i}" for i in range(40)] + ["seeded"]
    for i in small + big:
        s.admit(i, RequestRecord(temperature=0.8, seed=1) if i == "seeded"
                else RequestRecord())
    # At batch 2 cycles with the method are faster (it pays): it runs but for the 16
    # cycles that measure the method's absence and one in 16 after, to keep measuring.
    run_steps(s, clock, calls, small, 200, 1.0, 1.5)
    assert len(calls) > 160
    # At batch 41 slower: measured (16 cycles with it, 16 without), then off but for
    # retries that grow rarer; the seeded request is drafted for in every cycle all the
    # same (its drafts must not depend on timing).
    start = len(calls)
    run_steps(s, clock, calls, big, 400, 1.5, 1.0)
    whole = sum(len(c) == len(big) for c in calls[start:])
    assert whole < 100
    assert len(calls) - start == 400 and all("seeded" in c for c in calls[start:])
    # The batch thins again: the method is back where it pays.
    start = len(calls)
    run_steps(s, clock, calls, small, 50, 1.0, 1.5)
    assert len(calls) - start > 40


def test_the_gate_runs_the_fastest_part_of_a_method_and_seeded_requests_in_full(
        monkeypatch):
    """A method with two parts (e.g. dflash's block pass and its suffix side alone): the
    session runs the part whose cycles are fastest, and seeded requests always in full."""
    from spec_plugins import clock as clock_module
    from spec_plugins.payoff import PayoffGate

    clock = Clock()
    monkeypatch.setattr(clock_module, "now", clock)
    s = session()
    s.gate = PayoffGate(("block pass", "suffix side alone"), window=16)
    parts, inner = [], s.guard.propose

    def propose(requests, ctx):
        parts.append((ctx.part, [r.req_id for r in requests]))
        return inner(requests, ctx)
    s.guard.propose = propose
    ids = ["a", "b", "seeded"]
    for i in ids:
        s.admit(i, RequestRecord(temperature=0.8, seed=1) if i == "seeded" else RequestRecord())
    tokens = np.array([5, 6, 7, 8] * 6)
    seconds = {0: 2.0, 1: 1.0}   # the block pass costs a step and commits nothing more
    for _ in range(300):
        before = len(parts)
        s.propose([s.draft_request(i, tokens, 4, [8], room=4) for i in ids], batch_tokens=3)
        ran = parts[-1] if len(parts) > before else None
        clock.t += 1.5 if ran is None or ran[1] == ["seeded"] else seconds[ran[0]]
    # The parts and running without it (only the seeded request drafted) are measured
    # together, alternated cycle by cycle.
    assert [(p, len(r)) for p, r in parts[:6]] == [(0, 3), (1, 3), (0, 1)] * 2
    assert sum(p == 1 and len(r) == 3 for p, r in parts[-200:]) > 180
    assert all(p == 0 and r == ["seeded"] for p, r in parts if len(r) == 1)
    assert "with suffix side alone 3.0 tok/s" in s.gate.describe()


def test_payoff_gate_can_be_turned_off():
    s = AdapterSession("suffix", {"payoff_gate": False}, logging.getLogger("test"),
                       "TestEngine", frozenset())
    assert s.gate is None
    with pytest.raises(Exception, match="payoff_gate must be bool"):
        AdapterSession("suffix", {"payoff_gate": 3}, logging.getLogger("test"),
                       "TestEngine", frozenset())
