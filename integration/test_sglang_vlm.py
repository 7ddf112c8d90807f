"""Image requests through real SGLang servers of the VLM testbed (``spec-plugins-vlm``,
CI's size). SGLang has no Idefics3 model of its own: it serves the testbed through its
Transformers backend (``--model-impl transformers``), image processor included.

Suffix trees and token recycling (model-free, like every method this backend can run:
it captures no hidden states, so ``dflash`` refuses at start-up) give SGLang's own
outputs without speculation, token for token, at batch 1 and all concurrent over one
image, two images and an image in the middle of a chat, on a KV pool small enough that
the concurrent requests are retracted (SGLang's preemption) and with two of them aborted
mid-stream; seeded sampling is reproducible, also after other traffic.
"""

from __future__ import annotations

import json

import pytest

from integration.client import (SGLANG_IDS, assert_outputs_equal,
                                check_aborts_leave_others_intact, check_seeded, run_all,
                                sglang_complete)
from integration.prompts import prompts
from integration.sglang_server import SMALL_POOL, log_file, sglang_available, sglang_server
from integration.vllm_server import counter

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(sglang_available() is not None,
                                 reason=sglang_available() or "")]
openai = pytest.importorskip("openai")

TRANSFORMERS_BACKEND = SMALL_POOL + ["--model-impl", "transformers"]
# One image, two images, an image mid-chat, one image.
CONVS = prompts("image", 4)


# Model-free methods (the only ones this backend serves), pinned on: the test is about
# their verified drafts.
METHODS = {
    "suffix-trees": ("suffix", 17, {"tree": True, "payoff_gate": False}),
    "recycling": ("recycling", 9, {"tree": True, "payoff_gate": False, "budget": False}),
}


@pytest.fixture(scope="module")
def vanilla(vlm_model):
    with sglang_server(vlm_model, TRANSFORMERS_BACKEND) as url:
        return run_all(url, CONVS, extra_body=SGLANG_IDS)


@pytest.mark.parametrize("name", list(METHODS))
def test_images_equal_sglang_without_speculation(vlm_model, vanilla, name):
    method, width, options = METHODS[name]
    log = log_file(f"vlm-{name}")
    # A pool about two requests deep, admitted optimistically: decoding runs out and
    # retracts (as integration/load_suite.py does for SGLang).
    flags = TRANSFORMERS_BACKEND + ["--speculative-algorithm", f"spec_plugins.{method}",
                                    "--speculative-num-draft-tokens", str(width),
                                    "--max-total-tokens", "520",
                                    "--schedule-conservativeness", "0.05", "--enable-metrics"]
    with sglang_server(vlm_model, flags, env={"SPEC_PLUGINS_OPTIONS": json.dumps(options)},
                       log_path=log) as url:
        # All alone first: their prefixes cached, all four are admitted at once and
        # decoding outgrows the pool (without, the fourth waits and nothing retracts).
        batch1, batch8 = run_all(url, CONVS, send=sglang_complete)
        assert counter(url, "sglang:num_retracted_requests_total") > 0, "nothing was retracted"
        check_aborts_leave_others_intact(url, vanilla, CONVS, extra_body=SGLANG_IDS)
        check_seeded(url, seeded=prompts("image", 1, start=len(CONVS))[0], traffic=CONVS,
                     extra_body=SGLANG_IDS)
    assert_outputs_equal(vanilla[0], [b[0] for b in batch1], f"{name}, images, batch 1")
    assert_outputs_equal(vanilla[1], [b[0] for b in batch8], f"{name}, images, all concurrent")
    assert sum(b[1].get("spec_num_correct_drafts", 0) for b in batch1 + batch8) > 0
    with open(log, errors="replace") as f:
        assert "no draft carries its placeholder token ids [11, 12, 14]" in f.read()
