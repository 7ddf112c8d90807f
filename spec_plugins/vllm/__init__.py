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

PREFIX = "spec_plugins.vllm."

_registered: bool | None = None
_unsupported: str | None = None   # why register() installed nothing


def register() -> None:
    """Entry point: runs in every vLLM process, so it is idempotent and cheap. On an
    unsupported vLLM it registers nothing and logs why, once per process."""
    global _registered, _unsupported
    if _registered is not None:
        return
    from spec_plugins.vllm.version import logger, unsupported_reason

    reason = unsupported_reason()
    if reason is not None:
        _registered, _unsupported = False, reason
        logger.warning(reason)
        return
    from spec_plugins.vllm import hooks

    hooks.install()
    _registered = True


def hooks_missing_reason() -> str | None:
    """None when this process has the hooks a spec_plugins drafter needs, else why not."""
    if _registered:
        return None
    if _registered is None:
        return ("the vllm.general_plugins entry point 'spec_plugins' was not loaded in this "
                "process (is it excluded by VLLM_PLUGINS?)")
    return _unsupported


def __getattr__(name: str):
    # ``spec_plugins.vllm.<method>`` is the class vLLM's custom_class loader builds.
    if name in methods():
        from spec_plugins.vllm.drafter import drafter_class

        return drafter_class(name)
    raise AttributeError(f"module 'spec_plugins.vllm' has no attribute {name!r}")
