"""A CI-sized slice of the load and fault suite (``integration/load_suite.py``): vanilla
and a drafting method under the same mixed load (greedy, stop strings, logprobs, JSON
schema, a long prompt, penalties, seeded sampling, ``n=2``, streams abandoned
mid-flight) with a KV cache small enough to preempt: no request lost, every greedy
output equal to vanilla's, preemptions seen, the server healthy and its memory back."""

from __future__ import annotations

import pytest

from integration import load_suite

pytestmark = pytest.mark.e2e
pytest.importorskip("openai")


def test_mixed_load_with_preemption_matches_vanilla(default_model, tmp_path):
    mix = load_suite.request_mix(18, seed=3)   # every kind twice
    res = {c: load_suite.run_config(c, default_model, mix, clients=9, kv_bytes="104M",
                                    drafter="", log_dir=str(tmp_path))
           for c in ("vanilla", "suffix-tree")}
    problems = load_suite.report(res, ["vanilla", "suffix-tree"])
    assert not problems, problems
