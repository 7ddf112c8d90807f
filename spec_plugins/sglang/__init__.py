"""SGLang adapter.

Users select a method with SGLang's own flags::

    python -m sglang.launch_server --model-path MODEL \\
        --speculative-algorithm spec_plugins.suffix --speculative-num-draft-tokens 9
    SPEC_PLUGINS_OPTIONS='{"min_token_prob": 0.1}'     # optional method options (JSON)

:func:`register` is the ``sglang.srt.plugins`` entry point: SGLang runs it in every
process that loads plugins (launcher, scheduler, detokenizer). It registers every
spec_plugins method with ``SpeculativeAlgorithm.register`` under
``SPEC_PLUGINS.<METHOD>``; the worker (``worker.py``) drives the method's proposer through
the same interface as the vLLM adapter and verifies with the core verifiers.
"""

from __future__ import annotations

# The CPU platform's attention backend (``cpu_attention``), by its --attention-backend
# name; here, where the platform and the backend both read it without importing each other.
ATTENTION_BACKEND = "spec_plugins_cpu"

_registered: bool | None = None


def register() -> None:
    """Entry point: idempotent and cheap. On an unsupported SGLang it registers nothing
    and logs why, once per process; it never raises into SGLang."""
    global _registered
    if _registered is not None:
        return
    from spec_plugins.sglang.version import logger, unsupported_reason

    try:
        reason = unsupported_reason()
        if reason is not None:
            _registered = False
            logger.warning(reason)
            return
        from spec_plugins.sglang.algorithm import register_methods, register_request_validation

        register_methods()
        register_request_validation()
        _registered = True
    except Exception:  # installing the package must never break SGLang
        _registered = False
        logger.exception("spec_plugins: registering the SGLang methods failed; "
                         "registering nothing")
