"""The per-request queue of captured hidden states both engine adapters use."""

import torch

from spec_plugins.proposers.base import CommittedStatesQueue


def test_queue_hands_over_rows_in_position_order_once():
    q = CommittedStatesQueue()
    assert q.take("a") is None and q.end("a") is None
    q.put("a", 0, torch.zeros(5, 3))           # a prefill chunk
    q.put("a", 5, torch.ones(2, 3))            # then a step's root + accepted token
    q.put("b", 7, torch.full((1, 3), 2.0))
    q.put("b", 8, torch.zeros(0, 3))           # nothing committed: ignored
    a = q.take("a")
    assert a.positions.tolist() == list(range(7))
    assert a.states[:5].eq(0).all() and a.states[5:].eq(1).all()
    assert q.take("a") is None and q.end("a") == 7   # handed over once, the end remains
    b = q.take("b")
    assert b.positions.tolist() == [7] and q.end("b") == 8
    q.put("b", 8, torch.ones(1, 3))
    q.drop("b")
    assert q.take("b") is None and q.end("b") is None
