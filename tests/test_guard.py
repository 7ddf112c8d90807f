"""Fault containment: whatever a proposer does wrong, the engine gets empty drafts for
the affected requests, one log line per kind, and the method is switched off after
repeated faults."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from spec_plugins.adapter.guard import GuardedProposer
from spec_plugins.proposers.base import DraftRequest, ModelInfo, Proposer, StepContext
from spec_plugins.tree import DraftTree

V = 50


class Scripted(Proposer):
    """Returns what the test sets for the next call (a callable raises)."""
    name = "scripted"

    def __init__(self):
        super().__init__()
        self.next = None

    def propose(self, requests, ctx):
        if callable(self.next):
            self.next()
        return self.next


def req(rid="a", max_draft=4, tree_ok=True):
    return DraftRequest(rid, np.arange(5), 3, [4], max_draft, tree_ok=tree_ok)


@pytest.fixture
def guard(caplog):
    g = GuardedProposer(Scripted(), "scripted", logging.getLogger("test.guard"),
                        max_consecutive=3, max_total=100)
    g.bind(ModelInfo(model_path="m", tokenizer_path="m", architecture="A", num_layers=2,
                     hidden_size=8, vocab_size=V, max_model_len=64))
    caplog.set_level(logging.ERROR, logger="test.guard")
    return g


def sampled_chain(dists):
    t = DraftTree.chain([3, 4])
    t.dist_rows, t.draft_dists = [0, 1], dists
    return t


def branching():
    t = DraftTree.empty()
    t.add(-1, 1)
    t.add(-1, 2)
    return t


def boom():
    raise ZeroDivisionError("drafter blew up")


BAD = {
    "exception": boom,
    "token outside the vocabulary": [DraftTree.chain([1, V + 3])],
    "bad draft distributions": [sampled_chain(np.full((2, V), np.nan))],
    "too many nodes": [DraftTree.chain([1, 2, 3, 4, 5])],
    "tree for a chain request": [branching()],
    "malformed tree": [DraftTree([1, 2], [-1, 5], [1.0, 1.0])],
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_fault_gives_empty_drafts_and_one_log_line(guard, caplog, kind):
    guard.proposer.next = BAD[kind]
    tree_ok = kind != "tree for a chain request"
    for _ in range(2):
        (t,) = guard.propose([req(tree_ok=tree_ok)], StepContext())
        assert len(t) == 0
    lines = [r for r in caplog.records if kind in r.getMessage()]
    assert len(lines) == 1 and "scripted" in lines[0].getMessage()
    assert not guard.disabled


def test_a_bad_draft_costs_only_its_own_request(guard):
    good = DraftTree.chain([7, 8])
    guard.proposer.next = [good, DraftTree.chain([V])]
    a, b = guard.propose([req("a"), req("b")], StepContext())
    assert a.tokens == [7, 8] and len(b) == 0


def test_repeated_faults_switch_the_method_off(guard, caplog):
    guard.proposer.next = boom
    for _ in range(3):
        guard.propose([req()], StepContext())
    assert guard.disabled
    assert sum("switched off" in r.getMessage() for r in caplog.records) == 1
    guard.proposer.next = [DraftTree.chain([1])]        # healthy again: stays off
    (t,) = guard.propose([req()], StepContext())
    assert len(t) == 0


def test_good_steps_reset_the_consecutive_count(guard):
    for _ in range(5):
        guard.proposer.next = boom
        guard.propose([req()], StepContext())
        guard.proposer.next = [DraftTree.chain([1])]
        (t,) = guard.propose([req()], StepContext())
        assert t.tokens == [1]
    assert not guard.disabled and guard.faults_total == 5


def test_placeholder_tokens_are_cut_out_of_drafts_without_a_fault(caplog):
    """A VLM's image placeholder ids never reach the engine as draft tokens: a deterministic
    tree loses those nodes and their subtrees, a sampled one is cut before the first."""
    g = GuardedProposer(Scripted(), "scripted", logging.getLogger("test.guard"))
    g.bind(ModelInfo(model_path="m", tokenizer_path="m", architecture="A", num_layers=2,
                     hidden_size=8, vocab_size=V, max_model_len=64,
                     placeholder_token_ids=frozenset({7})))
    tree = DraftTree.empty()
    a = tree.add(-1, 1)
    img = tree.add(-1, 7)
    tree.add(a, 2)
    tree.add(img, 3)       # below a placeholder: goes with it
    tree.add(a, 7)
    sampled = sampled_chain(np.full((2, V), 1.0 / V))
    sampled.tokens = [7, 4]
    g.proposer.next = [tree, sampled, DraftTree.chain([5, 6])]
    out = g.propose([req("a", max_draft=8), req("b"), req("c")], StepContext())
    assert (out[0].tokens, out[0].parents) == ([1, 2], [-1, 0])
    assert len(out[1]) == 0
    assert out[2].tokens == [5, 6]
    assert g.faults_total == 0 and not caplog.records
