"""Reading and validating the user's spec_plugins settings from a ``VllmConfig``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from spec_plugins.options import OptionError
from spec_plugins.proposers import methods, proposer_class
from spec_plugins.vllm import PREFIX

ADDITIONAL_KEY = "spec_plugins"


@dataclass(frozen=True)
class PluginSettings:
    method: str
    options: Any           # the method's parsed Options dataclass
    num_speculative_tokens: int


def is_ours(spec_config) -> bool:
    model = getattr(spec_config, "model", None) or ""
    return getattr(spec_config, "method", None) == "custom_class" and model.startswith(PREFIX)


def method_of(spec_config) -> str:
    """The spec_plugins method a speculative config selects (``is_ours`` holds)."""
    return spec_config.model[len(PREFIX):]


@functools.cache
def reads_hidden_states(method: str) -> bool:
    """The method drafts from the target's hidden states, which a prompt served from the
    engine's prefix cache lacks."""
    return "hidden_states" in proposer_class(method).needs


def settings_from(vllm_config) -> PluginSettings | None:
    """None when speculation is off or uses another method; raises OptionError (naming
    the field and the allowed values) on a bad spec_plugins configuration."""
    spec = vllm_config.speculative_config
    extra = (vllm_config.additional_config or {})
    extra = extra.get(ADDITIONAL_KEY) if isinstance(extra, dict) else None
    if spec is None or not is_ours(spec):
        if extra is not None:
            raise OptionError(
                f"--additional-config has {ADDITIONAL_KEY!r} options but --speculative-config "
                f"does not select a spec_plugins method; set speculative_config.model to one of: "
                + ", ".join(PREFIX + m for m in sorted(methods())))
        return None
    method = method_of(spec)
    if method not in methods():
        raise OptionError(
            f"speculative_config.model={spec.model!r} is not a spec_plugins method; "
            f"allowed values: {', '.join(PREFIX + m for m in sorted(methods()))}")
    cls = proposer_class(method)
    if cls.Options is not None:
        options = cls.Options.parse(extra, where=f"additional_config.{ADDITIONAL_KEY}")
    elif extra:
        raise OptionError(f"additional_config.{ADDITIONAL_KEY}: method {method!r} takes no "
                          f"options, got {sorted(extra)}")
    else:
        options = None
    k = spec.num_speculative_tokens
    if not isinstance(k, int) or k < 1:
        raise OptionError(
            f"speculative_config.num_speculative_tokens must be an integer >= 1 for "
            f"{spec.model}, got {k!r}")
    return PluginSettings(method, options, k)
