"""Stock SGLang on a CPU-only machine through spec_plugins' CPU platform, end to end:
SGLang's own ``--speculative-algorithm NGRAM`` (its defaults; tree verification runs in
the platform's attention backend) must return SGLang's output without speculation token
for token, 4 requests concurrent (the batch thins to one as they finish) and one alone,
and accept drafts: that pins TARGET_VERIFY on this platform as exact."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from integration.client import (CONVERSATIONS, SGLANG_IDS, assert_outputs_equal, complete,
                                sglang_complete)
from integration.sglang_server import SMALL_POOL, sglang_available, sglang_server

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(sglang_available() is not None,
                                 reason=sglang_available() or "")]
openai = pytest.importorskip("openai")


def test_sglang_ngram_greedy_equals_sglang_without_speculation(sglang_vanilla, default_model):
    with sglang_server(default_model, SMALL_POOL + ["--speculative-algorithm", "NGRAM"]) as url:
        # The four code edits (NGRAM's case: they repeat their input) concurrently.
        with ThreadPoolExecutor(4) as pool:
            batch4 = list(pool.map(lambda m: complete(url, m, temperature=0,
                                                      extra_body=SGLANG_IDS), CONVERSATIONS[:4]))
        assert all(isinstance(t, list) and t for t in batch4), "token ids expected"
        assert_outputs_equal(sglang_vanilla[1][:4], batch4, "NGRAM, 4 concurrent")
        # Alone; the code edit repeats its input: NGRAM must do clearly better than 1
        # token a step.
        alone, details = sglang_complete(url, CONVERSATIONS[0], temperature=0)
        assert alone == sglang_vanilla[0][0]
        assert details["spec_num_correct_drafts"] > 0 and details["spec_accept_length"] > 1.5
