"""Fault containment end to end: a test-only method (``method_pkg``, registered through the
``spec_plugins.methods`` entry point like ours) injects each fault into a real vLLM
server: an exception in the drafter, a token outside the vocabulary, NaN draft
distributions, more nodes than allowed. The server answers every request with vanilla's
greedy output, logs each kind once, and a method that keeps failing is switched off with
one line while the server keeps serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.client import check_greedy_equal
from integration.vllm_server import vllm_server

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")

METHOD_PKG = str(Path(__file__).parent / "method_pkg")
SPEC = {"model": "spec_plugins.vllm.test_faulty", "num_speculative_tokens": 4}
KINDS = ["exception", "token outside the vocabulary", "bad draft distributions",
         "too many nodes"]


def fault_lines(log: str, what: str) -> list[str]:
    return [line for line in Path(log).read_text(errors="replace").splitlines()
            if "spec_plugins: method test_faulty" in line and what in line]


def test_each_injected_fault_is_contained(vanilla, default_model, tmp_path):
    """Faults on every other step, each kind in turn: every output is vanilla's, each
    kind is logged once, and after the guard's limit of faulty steps the method is
    switched off with one line (the server keeps serving)."""
    log = str(tmp_path / "faulty.log")
    # No payoff gate: a method whose drafts fail is slower, and the gate would call it
    # only as often as timing says, too rarely to reach the guard's limit for sure.
    with vllm_server(default_model, SPEC, {"spec_plugins": {"fault": "cycle", "every": 2,
                                                            "payoff_gate": False}},
                     extra_path=METHOD_PKG, log_path=log) as url:
        check_greedy_equal(url, vanilla, "faults injected")
    for kind in KINDS:
        assert len(fault_lines(log, kind + " (")) == 1, kind
    assert len(fault_lines(log, "switched off")) == 1
