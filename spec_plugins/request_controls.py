"""Per-request control of speculation, through an engine's own per-request channel.

One key, the same in every engine: ``spec_plugins_max_draft_tokens`` (an integer >= 0)
caps the draft tokens of that request per step; ``0`` turns speculation off for it.

- vLLM: ``vllm_xargs`` in the request (``SamplingParams.extra_args``), e.g. with the
  OpenAI client ``extra_body={"vllm_xargs": {"spec_plugins_max_draft_tokens": 0}}``;
- SGLang: ``custom_params`` in the sampling parameters.

A bad value is rejected when the request arrives (HTTP 400) with the field named.
"""

from __future__ import annotations

from typing import Any, Mapping

from spec_plugins.options import OptionError

MAX_DRAFT_KEY = "spec_plugins_max_draft_tokens"


def max_draft_tokens(extra: Mapping[str, Any] | None, where: str) -> int | None:
    """The request's cap (None: no cap). ``where`` names the channel in errors."""
    if not extra or MAX_DRAFT_KEY not in extra:
        return None
    value = extra[MAX_DRAFT_KEY]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(f"{where}.{MAX_DRAFT_KEY} must be an integer >= 0 (0 turns "
                          f"speculation off for the request), got {value!r}")
    return value
