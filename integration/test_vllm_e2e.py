"""End to end against real `vllm serve` processes, over HTTP with the OpenAI client.

Greedy outputs of a spec_plugins server must equal a vanilla server's token for token,
at batch 1 and with 8 concurrent requests, and vLLM's spec-decode metrics must count
accepted draft tokens. Servers start once per module (each start compiles the model).
"""

from __future__ import annotations

import pytest

from integration.client import (ALONE, CONVERSATIONS, MAX_TOKENS, assert_outputs_equal,
                                banned_token, check_seeded, complete, run_all)
from integration.vllm_server import mean_acceptance_length, run_to_exit, spec_metrics, vllm_server

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")

SUFFIX = {"model": "spec_plugins.vllm.suffix", "num_speculative_tokens": 8}
# The chain mode: trees have their own tests (test_vllm_trees.py).
CHAIN = {"spec_plugins": {"tree": False}}
# What the server below runs and deploy/k8s/vllm.yaml deploys: tests/test_deploy.py checks
# that the manifest passes exactly these flags (``vllm_server``'s keyword arguments).
SUFFIX_CHAIN_SERVER = {"speculative_config": SUFFIX, "additional_config": CHAIN,
                       "extra": ["--per-request-spec-decode-metrics", "summary"]}


@pytest.fixture(scope="module")
def suffix_server(default_model):
    with vllm_server(default_model, **SUFFIX_CHAIN_SERVER) as url:
        yield url


def test_greedy_outputs_equal_vanilla_at_batch_1_and_8(vanilla, suffix_server):
    before = spec_metrics(suffix_server)
    batch1, batch8 = run_all(suffix_server, alone=ALONE)
    after = spec_metrics(suffix_server)
    assert all(isinstance(t, list) and t for t in batch1), "token ids expected in responses"
    assert_outputs_equal([vanilla[0][i] for i in ALONE], batch1, "suffix chains, batch 1")
    assert_outputs_equal(vanilla[1], batch8, "suffix chains, 8 concurrent")
    accepted = after.get("num_accepted_tokens", 0) - before.get("num_accepted_tokens", 0)
    drafts = after.get("num_drafts", 0) - before.get("num_drafts", 0)
    assert drafts > 0 and accepted > 0, f"spec metrics did not count accepted tokens: {after}"
    # Code editing repeats its input: the method must do clearly better than 1 token/step.
    assert mean_acceptance_length(after) > 1.5


def test_seeded_sampling_is_reproducible_after_other_traffic(suffix_server):
    check_seeded(suffix_server)


def test_min_p_and_logit_bias_are_served_without_speculation(suffix_server, vanilla):
    # Stock vLLM rejects these with speculation on; spec_plugins serves them undrafted.
    out = complete(suffix_server, CONVERSATIONS[0], temperature=0, extra_body={"min_p": 0.05})
    assert out == vanilla[0][0]
    # Drafts verified without the bias would let the banned token back in.
    ban = banned_token(vanilla[0][0])
    biased = complete(suffix_server, CONVERSATIONS[0], temperature=0, logit_bias={str(ban): -100})
    assert ban not in biased
    assert biased == vanilla[2]


def request_spec_metrics(url, messages, xargs=None):
    """(token ids, the response's per-request ``metrics.speculative_decoding``)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600)
    extra = {"return_token_ids": True}
    if xargs is not None:
        extra["vllm_xargs"] = xargs
    r = client.chat.completions.create(model="default", messages=messages, temperature=0,
                                       max_tokens=MAX_TOKENS, extra_body=extra)
    metrics = (r.model_extra.get("metrics") or {}).get("speculative_decoding") or {}
    return list(r.choices[0].token_ids), metrics


def test_per_request_control_caps_or_turns_off_drafting(suffix_server, vanilla):
    """``vllm_xargs``: spec_plugins_max_draft_tokens caps one request's drafts, 0 turns
    speculation off for it; outputs stay vanilla's and the per-request acceptance
    figures vLLM reports follow the cap. A bad value is a 400 naming the field."""
    msgs = CONVERSATIONS[0]
    full_tokens, full = request_spec_metrics(suffix_server, msgs)
    assert full_tokens == vanilla[0][0] and full.get("num_draft_tokens", 0) > 0
    off_tokens, off = request_spec_metrics(suffix_server, msgs,
                                           {"spec_plugins_max_draft_tokens": 0})
    assert off_tokens == vanilla[0][0]
    assert off.get("num_draft_tokens", 0) == 0 and off.get("num_accepted_draft_tokens", 0) == 0
    capped_tokens, capped = request_spec_metrics(suffix_server, msgs,
                                                 {"spec_plugins_max_draft_tokens": 2})
    assert capped_tokens == vanilla[0][0]
    assert 0 < capped["num_draft_tokens"] <= 2 * capped["num_spec_steps"]
    assert not any(capped["acceptance_histogram"][3:]), "more than 2 drafts accepted in a step"
    assert 0 < capped["num_accepted_draft_tokens"] <= capped["num_draft_tokens"]
    with pytest.raises(openai.BadRequestError,
                       match="vllm_xargs.spec_plugins_max_draft_tokens must be an integer >= 0"):
        request_spec_metrics(suffix_server, msgs, {"spec_plugins_max_draft_tokens": -3})


@pytest.mark.parametrize("spec,extra,expect", [
    ({"model": "spec_plugins.vllm.sufix", "num_speculative_tokens": 4}, None,
     "speculative_config.model='spec_plugins.vllm.sufix' is not a spec_plugins method; "
     "allowed values: spec_plugins.vllm.del, spec_plugins.vllm.dflash, "
     "spec_plugins.vllm.diffuspec, spec_plugins.vllm.recycling, spec_plugins.vllm.suffix, "
     "spec_plugins.vllm.swift"),
    (SUFFIX, {"spec_plugins": {"min_token_prob": 3}},
     "additional_config.spec_plugins.min_token_prob=3.0 is out of range"),
    (SUFFIX, {"spec_plugins": {"depth": 3}},
     "unknown option additional_config.spec_plugins.depth; allowed options: max_depth"),
])
def test_bad_configuration_fails_at_startup(default_model, spec, extra, expect):
    code, log = run_to_exit(default_model, spec, extra, timeout=300)
    assert code != 0
    assert expect in log
