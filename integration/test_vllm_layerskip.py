"""Layer-skip self-speculation end to end: real `vllm serve` processes drafting with the
target's own layers (SWIFT, DEL).

Greedy outputs must equal the vanilla server's token for token at batch 1 and with 8
concurrent requests. A DEL server that exits after all 30 layers drafts with the full
model, so every draft token must be accepted: that pins the draft's KV handling (the
target's KV for the context, draft KV beyond it) as exact, and its speed shows what
drafting through the eager per-layer path costs. Seeded sampling stays reproducible,
and full-depth drafting under preemption still equals vanilla. A tiny random Qwen2
checkpoint shows the drafter is not Llama-only.
"""

from __future__ import annotations

import re
import pytest

from integration.client import (ALONE, CONVERSATIONS, assert_outputs_equal,
                                check_greedy_equal, check_seeded, complete, run_all)
from integration.vllm_server import PREEMPTING_CACHE, counter, log_file, spec_metrics, vllm_server

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")

SERVERS = {
    # Defaults: the method decides how much to draft (little, on this model). swift's
    # search is short and always runs to its end here (no payoff gate).
    "swift": ({"model": "spec_plugins.vllm.swift", "num_speculative_tokens": 4},
              {"spec_plugins": {"trial_steps": 2, "search_trials": 8, "payoff_gate": False}}),
    "del": ({"model": "spec_plugins.vllm.del", "num_speculative_tokens": 4}, None),
}
# (DEL at full depth: its own server below, on a KV cache that preempts)
FULL_DEPTH = ({"model": "spec_plugins.vllm.del", "num_speculative_tokens": 4},
              {"spec_plugins": {"exit_layer": 30, "min_confidence": 0.0, "payoff_gate": False}})


@pytest.fixture(scope="module", params=sorted(SERVERS))
def layerskip_server(request, default_model):
    spec, extra = SERVERS[request.param]
    log = log_file(request.param)
    with vllm_server(default_model, spec, extra, log_path=log) as url:
        yield request.param, url, log


def test_layerskip_greedy_outputs_equal_vanilla_and_seeded_sampling_reproducible(
        vanilla, layerskip_server):
    name, url, log = layerskip_server
    check_greedy_equal(url, vanilla, name)
    m = spec_metrics(url)
    with open(log, errors="replace") as f:
        text = f.read()
    assert "layer-skip drafter bound to LlamaForCausalLM (30 layers)" in text
    if name == "swift":
        # The search ran and logged its choice (8 candidate sets of 2 steps each;
        # skip_ratio 0.45 of 30 layers skips 14).
        assert re.search(r"swift chose skip layers \[[\d, ]+\] \(16 of 30 layers run", text)
        assert m["num_draft_tokens"] > 0
    check_seeded(url)




def test_full_depth_drafts_accepted_alone_and_equal_vanilla_with_preemption(vanilla,
                                                                           default_model):
    """DEL exiting after all 30 layers drafts with the full model: alone, every draft is
    accepted (the draft's KV handling, the target's KV for the context and its own beyond,
    is exact). Then 8 concurrent requests on a cache too small for them: drafting writes
    KV into slots the scheduler allocated but the target has not computed; the scheduler
    preempts and recomputes requests, and drafts run up to block boundaries (``room``)."""
    spec, extra_cfg = FULL_DEPTH
    with vllm_server(default_model, spec, extra_cfg, extra=PREEMPTING_CACHE,
                     keep_graph=True) as url:
        batch1 = [complete(url, CONVERSATIONS[i], temperature=0) for i in ALONE]
        alone = spec_metrics(url)
        _, outs = run_all(url, alone=())
        preempted = counter(url, "vllm:num_preemptions_total")
        m = spec_metrics(url)
    assert_outputs_equal([vanilla[0][i] for i in ALONE], batch1, "full depth, batch 1")
    assert alone["num_draft_tokens"] > 100
    assert alone["num_accepted_tokens"] == alone["num_draft_tokens"], alone
    assert preempted > 0, "the cache was large enough: nothing was preempted"
    assert_outputs_equal(vanilla[1], outs, "full-depth drafts after preemption")
    # Under preemption nearly every full-depth draft is accepted, not all: a fresh-clone
    # CI run on a busy machine saw 318 of 322 (where this machine, quiet, accepts all):
    # preemption reshuffles the batch step by step, the eager per-layer draft and the
    # fused verify then run different batch shapes, and a near-tie argmax can flip.
    drafted = m["num_draft_tokens"] - alone["num_draft_tokens"]
    assert drafted > 100
    assert m["num_accepted_tokens"] - alone["num_accepted_tokens"] >= 0.97 * drafted, m


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, default_model):
    """A Qwen2-family checkpoint (random weights, 6 layers) with the default model's
    tokenizer: the layer-skip drafter must work beyond Llama."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    tok = AutoTokenizer.from_pretrained(default_model)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_qwen2_family_drafts_equal_vanilla(tiny_qwen2):
    small = ["--max-model-len", "1024", "--kv-cache-memory-bytes", "256M"]
    convs = CONVERSATIONS[:4]
    with vllm_server(tiny_qwen2, extra=small) as url:
        want = run_all(url, convs, max_tokens=40)
    full = {"model": "spec_plugins.vllm.del", "num_speculative_tokens": 4}
    log = log_file("qwen2-del")
    with vllm_server(tiny_qwen2, full, {"spec_plugins": {"exit_layer": 6, "min_confidence": 0.0,
                                                         "payoff_gate": False}},
                     extra=small, log_path=log) as url:
        got = run_all(url, convs, max_tokens=40)
        m = spec_metrics(url)
    assert_outputs_equal(want[0], got[0], "qwen2 full-depth del, batch 1")
    assert_outputs_equal(want[1], got[1], "qwen2 full-depth del, 4 concurrent")
    assert m["num_accepted_tokens"] == m["num_draft_tokens"] > 50, m
    with open(log, errors="replace") as f:
        assert "layer-skip drafter bound to Qwen2ForCausalLM (6 layers)" in f.read()
