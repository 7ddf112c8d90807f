"""spec_plugins methods through SGLang's own flags, on real ``sglang.launch_server``
processes (SGLang's own environment, ``scripts/setup-sglang.sh``): greedy outputs of the
model-free methods, chains and trees, equal SGLang's own output without speculation at
batch 1 and 8 concurrent; seeded sampling is reproducible, also after other traffic, for
every method; bad configuration stops the launch naming the field; on an unsupported SGLang
nothing is registered."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from integration.client import (ALONE, CONVERSATIONS, SGLANG_IDS, assert_outputs_equal,
                                check_seeded, run_all, sglang_complete)
from integration.sglang_server import (SMALL_POOL, engine_env, sglang_available, sglang_python,
                                       sglang_server)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(sglang_available() is not None,
                                 reason=sglang_available() or "")]
openai = pytest.importorskip("openai")

BASE = SMALL_POOL


def spec_flags(method: str, width: int) -> list[str]:
    return BASE + ["--speculative-algorithm", f"spec_plugins.{method}",
                   "--speculative-num-draft-tokens", str(width)]


# Chains and trees of suffix. Recycling through SGLang: integration/test_sglang_vlm.py
# (image and text turns, retraction, aborts, seeded sampling after traffic); its verify
# path here is suffix-tree's.
CONFIGS = {
    "suffix-chain": (spec_flags("suffix", 9), {"tree": False}),
    "suffix-tree": (spec_flags("suffix", 17), {"tree": True}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_sglang_without_speculation(sglang_vanilla, default_model, name):
    flags, options = CONFIGS[name]
    with sglang_server(default_model, flags,
                       env={"SPEC_PLUGINS_OPTIONS": json.dumps(options)}) as url:
        batch1, batch8 = run_all(url, alone=ALONE, send=sglang_complete)
        assert_outputs_equal([sglang_vanilla[0][i] for i in ALONE], [b[0] for b in batch1],
                             f"{name}, batch 1")
        assert_outputs_equal(sglang_vanilla[1], [b[0] for b in batch8], f"{name}, 8 concurrent")
        # Drafts were verified and accepted: suffix copies the code edits' input.
        assert batch1[0][1]["spec_num_correct_drafts"] > 0
        assert batch1[0][1]["spec_accept_length"] > 1.2
        check_seeded(url, extra_body=SGLANG_IDS)
        if name == "suffix-chain":
            check_per_request_control(url, sglang_vanilla[0][0])


# Trees only: the adapter's chain path is suffix-chain's, and dflash's chains differ from
# its trees only in the core (tests/proposers/test_dflash.py); one server less in CI.
@pytest.mark.parametrize("tree", [True], ids=["trees"])
def test_dflash_reads_sglang_hidden_states(sglang_vanilla, default_model, dflash_drafter, tree):
    """The block drafter through SGLang: its context is the target's hidden states from
    SGLang's own forward passes; whole blocks are drafted every step (the CI drafter's
    drafts do not pay for themselves) and outputs stay SGLang's, token for token."""
    options = {"drafter": dflash_drafter, "tree": tree, "budget": False, "payoff_gate": False,
               "adaptive": False, "max_block": 4}
    log = str(Path(dflash_drafter).parent / f"sglang-dflash-{tree}.log")
    with sglang_server(default_model, spec_flags("dflash", 9),
                       env={"SPEC_PLUGINS_OPTIONS": json.dumps(options)}, log_path=log) as url:
        batch1, batch8 = run_all(url, alone=ALONE, send=sglang_complete)
        check_seeded(url, extra_body=SGLANG_IDS)
    shape = "trees" if tree else "chains"
    assert_outputs_equal([sglang_vanilla[0][i] for i in ALONE], [b[0] for b in batch1],
                         f"dflash {shape}, batch 1")
    assert_outputs_equal(sglang_vanilla[1], [b[0] for b in batch8], f"dflash {shape}, 8 concurrent")
    assert sum(b[1]["spec_num_correct_drafts"] for b in batch1) > 0
    text = Path(log).read_text(errors="replace")
    assert "reads the target's hidden states at layers" in text and "dflash drafter" in text


def check_per_request_control(url, expected):
    """``custom_params``: spec_plugins_max_draft_tokens 0 turns speculation off for one
    request, 1 caps it; outputs stay SGLang's; a bad value is a 400 naming the field."""
    def run(cap):
        return sglang_complete(url, CONVERSATIONS[0], temperature=0,
                               extra_body={"custom_params": {"spec_plugins_max_draft_tokens": cap}})
    off_ids, off = run(0)
    assert off_ids == expected and off.get("spec_num_correct_drafts", 0) == 0
    one_ids, one = run(1)
    # At most one accepted draft per verify step: at most 2 tokens per step.
    assert one_ids == expected and 1.0 < one["spec_accept_length"] <= 2.0
    with pytest.raises(openai.BadRequestError,
                       match="custom_params.spec_plugins_max_draft_tokens must be an integer"):
        run(-1)


@pytest.mark.parametrize("flags,env,msg", [
    (["--speculative-algorithm", "spec_plugins.nosuch"], {},
     "--speculative-algorithm='spec_plugins.nosuch' is not a spec_plugins method; "
     "allowed values: spec_plugins.del"),
    (["--speculative-algorithm", "spec_plugins.suffix"],
     {"SPEC_PLUGINS_OPTIONS": '{"min_token_prob": 5}'}, "SPEC_PLUGINS_OPTIONS.min_token_prob"),
    (["--speculative-algorithm", "spec_plugins.suffix", "--speculative-num-draft-tokens", "1"],
     {}, "--speculative-num-draft-tokens must be an integer >= 2"),
])
def test_bad_configuration_stops_the_launch_naming_the_field(default_model, flags, env, msg):
    with pytest.raises(RuntimeError, match="exited") as err:
        with sglang_server(default_model, BASE + flags, env=env, timeout=300):
            pass
    assert msg in str(err.value)


def test_unsupported_sglang_registers_nothing():
    """The real entry point, on an SGLang whose version the adapter does not list."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import spec_plugins.sglang.version as v; v.SUPPORTED = {(0, 0, 1)}\n"
        "from sglang.srt.plugins import load_plugins; load_plugins()\n"
        "from sglang.srt.speculative.spec_registry import get_spec\n"
        "print('REGISTERED', get_spec('SPEC_PLUGINS.SUFFIX') is not None)\n")
    r = subprocess.run([sglang_python(), "-c", code], capture_output=True, text=True,
                       env=engine_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "REGISTERED False" in r.stdout
    assert "is not supported (supported: 0.0.1); registering nothing" in r.stderr
