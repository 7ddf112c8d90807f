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
