"""vLLM adapter.

Users select a method with vLLM's own flags::

    vllm serve MODEL --speculative-config '{"model": "spec_plugins.vllm.suffix",
                                            "num_speculative_tokens": 8}' \
                     --additional-config '{"spec_plugins": {"min_token_prob": 0.1}}'

``model`` names ``spec_plugins.vllm.<method>`` (vLLM's ``custom_class`` proposer path);
``num_speculative_tokens`` caps the draft per step; method options travel in
``--additional-config`` under ``"spec_plugins"`` (vLLM's ``SpeculativeConfig`` forbids
unknown keys). :func:`register` is the ``vllm.general_plugins`` entry point.
"""

from __future__ import annotations

from spec_plugins.proposers import methods
from spec_plugins.vllm.hooks import ENGINE_FIXES, HOOKS, Seam

PREFIX = "spec_plugins.vllm."

# This process's seam: what is installed in vLLM and why not (one per process: vLLM calls
# the entry point with no arguments).
SEAM = Seam(HOOKS, ENGINE_FIXES)


def register() -> None:
    """Entry point: runs in every vLLM process, so it is idempotent and cheap, and never
    raises. On an unsupported vLLM, or one whose functions differ from what the hooks
    expect, it installs nothing and logs why, once per process."""
    SEAM.register()


def __getattr__(name: str):
    # ``spec_plugins.vllm.<method>`` is the class vLLM's custom_class loader builds.
    if name in methods():
        from spec_plugins.vllm.drafter import drafter_class

        return drafter_class(name)
    raise AttributeError(f"module 'spec_plugins.vllm' has no attribute {name!r}")
