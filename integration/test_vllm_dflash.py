"""The dflash method end to end: a real `vllm serve` whose drafter reads the target's
hidden states (captured in the target's own forward pass) and drafts blocks, as chains
and as DDTrees. Greedy outputs must equal the vanilla server's at batch 1 and 8
concurrent, also with requests aborted mid-generation and with preemption (a KV cache too
small for the batch). The drafter is trained here, small (``spec-plugins-train-drafter``
on the default model with CI-sized settings): its drafts are poor, which is fine: every
path (accepted drafts, rejected ones, trees) must keep the outputs exact.
"""

from __future__ import annotations

import pytest

from integration.client import check_aborts_leave_others_intact, check_greedy_equal, check_seeded
from integration.vllm_server import (PREEMPTING_CACHE, counter, log_file, run_to_exit,
                                     spec_metrics, trees_verified, vllm_server)

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")

DFLASH = {"model": "spec_plugins.vllm.dflash", "num_speculative_tokens": 6}
# ``dflash_drafter`` (conftest.py): a drafter trained here with CI-sized settings.

# Whole blocks drafted every step (the CI drafter's drafts seldom pay for their verify
# time, so the default budget and payoff gate would hardly draft them, and some must be
# accepted here). The chains server's KV cache preempts (dflash trees under preemption:
# the image server of integration/test_vllm_vlm.py).
ALWAYS = {"budget": False, "payoff_gate": False, "adaptive": False, "max_block": 4}
SHAPES = {"trees": ({"tree": True, **ALWAYS}, []),
          "chains": ({"tree": False, **ALWAYS}, PREEMPTING_CACHE)}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def dflash_server(request, default_model, dflash_drafter):
    log = log_file(f"dflash-{request.param}")
    options, cache = SHAPES[request.param]
    with vllm_server(default_model, DFLASH, {"spec_plugins": {"drafter": dflash_drafter, **options}},
                     extra=cache, log_path=log, keep_graph=True) as url:
        yield request.param, url, log


def test_greedy_outputs_equal_vanilla(vanilla, dflash_server):
    shape, url, log = dflash_server
    check_greedy_equal(url, vanilla, f"dflash {shape}")
    m = spec_metrics(url)
    assert m.get("num_drafts", 0) > 0 and m.get("num_accepted_tokens", 0) > 0, m
    text = open(log, errors="replace").read()
    assert "spec_plugins: dflash drafter" in text and "params" in text
    if shape == "trees":
        assert trees_verified(log) > 0, "no branching tree was verified"
    else:
        assert counter(url, "vllm:num_preemptions_total") > 0, \
            "the cache was large enough: nothing was preempted"


def test_aborts_leave_the_others_and_the_cache_intact(vanilla, dflash_server):
    _, url, _ = dflash_server
    # Re-sent prompts are prefix-cached: no hidden states for the cached part.
    check_aborts_leave_others_intact(url, vanilla)


def test_seeded_sampling_is_reproducible_after_other_traffic(dflash_server):
    _, url, _ = dflash_server
    check_seeded(url)


def test_a_missing_drafter_stops_the_server_at_start_up(default_model, tmp_path):
    code, log = run_to_exit(default_model, DFLASH,
                            {"spec_plugins": {"drafter": str(tmp_path)}}, timeout=600)
    assert code != 0
    assert f"dflash.drafter='{tmp_path}' is not a DFlash checkpoint directory" in log
