"""Image requests through real `vllm serve` processes of the VLM testbed (Idefics3 with
the default model as its language model, ``spec-plugins-vlm``; CI's size: a few dozen
alignment steps, so answers depend on the image without describing it).

Every method serves image requests losslessly, each on a server whose KV cache is small
enough to preempt: greedy outputs equal the vanilla server's token for token at batch 1
and 8 concurrent (preempted; the prompts sent alone first hit vLLM's prefix cache when
re-sent, images included), over one image, two images in one message, and an image in
the middle of a multi-turn chat; aborted requests leave the others intact; seeded
sampling is reproducible, also after other traffic. DEL drafting with all of the
language model's layers has its drafts accepted, which pins the draft KV beside the
image's; dflash reads the target's states at image positions through a vision adaptor
trained by the drafter trainer's image stage (msd: image rows from the target's input
embeddings, which vLLM's auxiliary outputs hand over as layer -1).
"""

from __future__ import annotations

import pytest

from integration.client import (check_aborts_leave_others_intact, check_greedy_equal,
                                check_seeded, run_all)
from integration.prompts import prompts
from integration.vllm_server import (PREEMPTING_CACHE, counter, log_file, spec_metrics,
                                     trees_verified, vllm_server)

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")

CONVS = prompts("image", 8)
# Sent alone too: one image, two images, an image mid-chat.
ALONE = (0, 1, 2)
# Every server runs on a KV cache small enough that the concurrent image requests preempt.
SERVERS = {
    "suffix-trees": ({"model": "spec_plugins.vllm.suffix", "num_speculative_tokens": 8},
                     {"spec_plugins": {"tree": True, "payoff_gate": False}}),
    "recycling": ({"model": "spec_plugins.vllm.recycling", "num_speculative_tokens": 8},
                  {"spec_plugins": {"payoff_gate": False, "budget": False}}),
    "del-full-depth": ({"model": "spec_plugins.vllm.del", "num_speculative_tokens": 4},
                       {"spec_plugins": {"exit_layer": 30, "min_confidence": 0.0,
                                         "payoff_gate": False}}),
    # The CI drafter after the image stage with the msd adaptor (integration/conftest.py:
    # vision_drafter): its rows at image positions need the target's input embeddings,
    # the one engine-side difference of a vision drafter (vispec's serving path is the
    # proposer's alone: tests/proposers/test_dflash.py).
    "dflash-msd": ({"model": "spec_plugins.vllm.dflash", "num_speculative_tokens": 8}, None),
}


@pytest.fixture(scope="module")
def vlm_vanilla(vlm_model):
    with vllm_server(vlm_model) as url:
        # Alone: the first half, which covers ALONE and the requests the abort test aborts.
        return run_all(url, CONVS, alone=range(len(CONVS) // 2))


@pytest.fixture(scope="module", params=sorted(SERVERS))
def vlm_server(request, vlm_model):
    spec, extra = SERVERS[request.param]
    if request.param == "dflash-msd":
        # The default model's drafter: the testbed's language model is that model.
        extra = {"spec_plugins": {"drafter": request.getfixturevalue("vision_drafter"),
                                  "payoff_gate": False}}
    log = log_file("vlm-" + request.param)
    # dflash reads states the traced forward hands over (conftest.py: keep_graph).
    with vllm_server(vlm_model, spec, extra, extra=PREEMPTING_CACHE, log_path=log,
                     keep_graph=request.param.startswith("dflash")) as url:
        yield request.param, url, log


# Whether image requests preempt depends on how their admission interleaves with decoding
# (the front end prepares the images on the same CPU, beside the other test worker): one
# fresh-clone run admitted them two at a time and nothing was preempted. The concurrent
# batch is then sent again, equal to vanilla's each time, at most this many times more.
PREEMPTION_RETRIES = 2


def test_image_requests_greedy_equal_vanilla_alone_and_preempted(vlm_vanilla, vlm_server):
    name, url, log = vlm_server
    check_greedy_equal(url, vlm_vanilla, name, CONVS, alone=ALONE)
    for attempt in range(PREEMPTION_RETRIES):
        if counter(url, "vllm:num_preemptions_total") > 0:
            break
        check_greedy_equal(url, vlm_vanilla, f"{name}, again ({attempt + 1})", CONVS, alone=())
    assert counter(url, "vllm:num_preemptions_total") > 0, "nothing was preempted"
    m = spec_metrics(url)
    assert m.get("num_drafts", 0) > 0, f"{name} drafted nothing on image requests"
    with open(log, errors="replace") as f:
        text = f.read()
    assert "no draft carries its placeholder token ids [11, 12, 14]" in text
    if name == "del-full-depth":
        # The draft reads the target's KV of the prompt (image positions included) and
        # its own beyond: with every layer it is the target, so (nearly, see
        # test_vllm_layerskip) every draft token is accepted.
        assert "layer-skip drafter bound to Idefics3ForConditionalGeneration" in text
        assert m["num_accepted_tokens"] >= 0.95 * m["num_draft_tokens"], m
    else:
        assert m["num_accepted_tokens"] > 0, m
    if name == "suffix-trees":
        assert trees_verified(log) > 0, "no branching tree was verified on image requests"
    if name.startswith("dflash-"):
        style = name.removeprefix("dflash-")
        assert f"vision adaptor {style}" in text
        if style == "msd":  # the input embeddings too (vLLM's auxiliary id 0)
            assert "target layers [-1, " in text, text[-3000:]


def test_image_aborts_leave_the_others_and_the_cache_intact(vlm_vanilla, vlm_server):
    _, url, _ = vlm_server
    check_aborts_leave_others_intact(url, vlm_vanilla, CONVS)


def test_image_seeded_sampling_is_reproducible_after_other_traffic(vlm_server):
    _, url, _ = vlm_server
    check_seeded(url, seeded=prompts("image", 1, start=len(CONVS))[0], traffic=CONVS[:4])
