"""End to end against real `vllm serve` processes, over HTTP with the OpenAI client.

Greedy outputs of a spec_plugins server must equal a vanilla server's token for token,
at batch 1 and with 8 concurrent requests, and vLLM's spec-decode metrics must count
accepted draft tokens. Servers start once per module (each start compiles the model).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from prompts import prompts
from vllm_server import mean_acceptance_length, run_to_exit, spec_metrics, vllm_server

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")

SUFFIX = {"model": "spec_plugins.vllm.suffix", "num_speculative_tokens": 8}
MAX_TOKENS = 96
CONVERSATIONS = prompts("code_edit", 4) + prompts("humaneval", 2) + prompts("chat", 2)


def complete(url, messages, **kw):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600)
    extra = {"return_token_ids": True, **kw.pop("extra_body", {})}
    r = client.chat.completions.create(model="default", messages=messages,
                                       max_tokens=kw.pop("max_tokens", MAX_TOKENS),
                                       extra_body=extra, **kw)
    choice = r.choices[0]
    return list(choice.token_ids or []) or choice.message.content


def run_all(url, **kw):
    batch1 = [complete(url, m, temperature=0, **kw) for m in CONVERSATIONS]
    with ThreadPoolExecutor(8) as pool:
        batch8 = list(pool.map(lambda m: complete(url, m, temperature=0, **kw), CONVERSATIONS))
    return batch1, batch8


def banned_token(tokens):
    """The most frequent token of an output: banning it changes the output early."""
    return max(set(tokens), key=tokens.count)


@pytest.fixture(scope="module")
def vanilla(default_model):
    with vllm_server(default_model) as url:
        batch1, batch8 = run_all(url)
        ban = banned_token(batch1[0])
        biased = complete(url, CONVERSATIONS[0], temperature=0, logit_bias={str(ban): -100})
        yield batch1, batch8, biased


@pytest.fixture(scope="module")
def suffix_server(default_model):
    with vllm_server(default_model, SUFFIX) as url:
        yield url


def test_greedy_outputs_equal_vanilla_at_batch_1_and_8(vanilla, suffix_server):
    before = spec_metrics(suffix_server)
    batch1, batch8 = run_all(suffix_server)
    after = spec_metrics(suffix_server)
    assert all(isinstance(t, list) and t for t in batch1), "token ids expected in responses"
    for i, (v, s) in enumerate(zip(vanilla[0], batch1)):
        assert s == v, f"batch 1, prompt {i}: speculative output differs from vanilla"
    for i, (v, s) in enumerate(zip(vanilla[1], batch8)):
        assert s == v, f"8 concurrent, prompt {i}: speculative output differs from vanilla"
    accepted = after.get("num_accepted_tokens", 0) - before.get("num_accepted_tokens", 0)
    drafts = after.get("num_drafts", 0) - before.get("num_drafts", 0)
    assert drafts > 0 and accepted > 0, f"spec metrics did not count accepted tokens: {after}"
    # Code editing repeats its input: the method must do clearly better than 1 token/step.
    assert mean_acceptance_length(after) > 1.5


def test_seeded_sampling_is_reproducible(suffix_server):
    msgs = CONVERSATIONS[0]
    a = complete(suffix_server, msgs, temperature=0.8, seed=1234)
    b = complete(suffix_server, msgs, temperature=0.8, seed=1234)
    assert a == b


def test_min_p_and_logit_bias_are_served_without_speculation(suffix_server, vanilla):
    # Stock vLLM rejects these with speculation on; spec_plugins serves them undrafted.
    out = complete(suffix_server, CONVERSATIONS[0], temperature=0, extra_body={"min_p": 0.05})
    assert out == vanilla[0][0]
    # Drafts verified without the bias would let the banned token back in.
    ban = banned_token(vanilla[0][0])
    biased = complete(suffix_server, CONVERSATIONS[0], temperature=0, logit_bias={str(ban): -100})
    assert ban not in biased
    assert biased == vanilla[2]


@pytest.mark.parametrize("spec,extra,expect", [
    ({"model": "spec_plugins.vllm.sufix", "num_speculative_tokens": 4}, None,
     "speculative_config.model='spec_plugins.vllm.sufix' is not a spec_plugins method; "
     "allowed values: spec_plugins.vllm.suffix"),
    (SUFFIX, {"spec_plugins": {"min_token_prob": 3}},
     "additional_config.spec_plugins.min_token_prob=3.0 is out of range"),
    (SUFFIX, {"spec_plugins": {"depth": 3}},
     "unknown option additional_config.spec_plugins.depth; allowed options: max_depth"),
])
def test_bad_configuration_fails_at_startup(default_model, spec, extra, expect):
    code, log = run_to_exit(default_model, spec, extra, timeout=300)
    assert code != 0
    assert expect in log
