"""A method from another package, registered through the ``spec_plugins.methods`` entry
point (``method_pkg/``: a module and its dist-info, put on the engine's path as an
installed package would be), is selected with ``--speculative-config`` like ours and
served: greedy output equals vanilla's (its greedy drafts are deterministic), seeded
sampling (its drafts are *sampled*, carried with their distributions) is reproducible."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.client import check_greedy_equal, check_seeded
from integration.vllm_server import spec_metrics, vllm_server

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")

METHOD_PKG = str(Path(__file__).parent / "method_pkg")
SPEC = {"model": "spec_plugins.vllm.test_sampled", "num_speculative_tokens": 6}


@pytest.fixture(scope="module")
def plugin_server(default_model):
    # Draft from the 256 most common ids of the tokenizer's merges (low ids): some accepted.
    with vllm_server(default_model, SPEC, {"spec_plugins": {"tree": True, "support": 256}},
                     extra_path=METHOD_PKG) as url:
        yield url


def test_entry_point_method_is_served_and_lossless(vanilla, plugin_server):
    check_greedy_equal(plugin_server, vanilla, "entry-point method")
    assert spec_metrics(plugin_server).get("num_drafts", 0) > 0


def test_entry_point_method_sampled_drafts_are_reproducible(plugin_server):
    before = spec_metrics(plugin_server)
    check_seeded(plugin_server)
    after = spec_metrics(plugin_server)
    assert after["num_draft_tokens"] > before.get("num_draft_tokens", 0)
