"""Reading and validating the user's spec_plugins settings from SGLang's server args.

The method comes from ``--speculative-algorithm spec_plugins.<method>`` (SGLang upper-cases
algorithm names; any case works). SGLang has no per-algorithm options flag, so the
method's options travel as JSON in the environment variable ``SPEC_PLUGINS_OPTIONS`` (the
same keys as vLLM's ``--additional-config '{"spec_plugins": {...}}'``), which SGLang's
scheduler processes inherit. ``--speculative-num-draft-tokens`` is SGLang's verify width:
the last committed token plus up to ``N - 1`` draft tokens (vLLM's
``num_speculative_tokens`` is ``N - 1``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from spec_plugins.options import OptionError
from spec_plugins.proposers import methods, proposer_class

PREFIX = "SPEC_PLUGINS."
OPTIONS_ENV = "SPEC_PLUGINS_OPTIONS"
DEFAULT_NUM_DRAFT_TOKENS = 9       # the root + up to 8 drafts, vLLM's usual 8
# What the SGLang worker can hand a proposer (StepContext fields).
SUPPORTED_NEEDS = frozenset({"target_topk", "hidden_states"})
# Why it cannot hand the others, as the launch error says.
UNSUPPORTED_NEEDS = {
    "target_model": (
        "running a subset of the target's layers: SGLang 0.5.23's decoder layers take "
        "no residual argument but read and write a residual stream owned by the "
        "ForwardBatch (layers/layer_boundary: stage boundaries with deferred residual "
        "updates, one final norm that ends the stream), which the adapter does not drive "
        "for draft forwards or for logits after an intermediate layer"),
}


@dataclass(frozen=True)
class PluginSettings:
    method: str
    options: Any              # the method's parsed Options dataclass (or None)
    num_draft_tokens: int     # SGLang's verify width (root + drafts)


def algorithm_name(method: str) -> str:
    return PREFIX + method.upper()


def method_of(algorithm: str | None) -> str | None:
    """The spec_plugins method an ``--speculative-algorithm`` value selects, or None."""
    if not algorithm or not algorithm.upper().startswith(PREFIX):
        return None
    return algorithm[len(PREFIX):].lower()


def unknown_method_message(algo: str) -> str:
    allowed = ", ".join(algorithm_name(m).lower() for m in sorted(methods()))
    return (f"--speculative-algorithm={algo.lower()!r} is not a spec_plugins method; "
            f"allowed values: {allowed}")


def unsupported_needs(method: str) -> list[str]:
    return sorted(set(proposer_class(method).needs) - SUPPORTED_NEEDS)


def parse_options(method: str, environ=os.environ):
    raw = environ.get(OPTIONS_ENV, "").strip()
    values: dict = {}
    if raw:
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as e:
            raise OptionError(f"{OPTIONS_ENV} is not valid JSON ({e}): {raw!r}") from e
        if not isinstance(values, dict):
            raise OptionError(f"{OPTIONS_ENV} must be a JSON object, got {raw!r}")
    cls = proposer_class(method)
    if cls.Options is not None:
        return cls.Options.parse(values, where=OPTIONS_ENV)
    if values:
        raise OptionError(f"{OPTIONS_ENV}: method {method!r} takes no options, "
                          f"got {sorted(values)}")
    return None


def settings_from(server_args, environ=os.environ) -> PluginSettings | None:
    """None when speculation is off or uses another algorithm; raises OptionError (naming
    the field and the allowed values) on a bad spec_plugins configuration."""
    algo = getattr(server_args, "speculative_algorithm", None)
    method = method_of(algo)
    if method is None:
        return None
    if method not in methods():
        raise OptionError(unknown_method_message(algo))
    missing = unsupported_needs(method)
    if missing:
        why = "; ".join(f"{need}: {UNSUPPORTED_NEEDS.get(need, 'not built')}"
                        for need in missing)
        raise OptionError(
            f"--speculative-algorithm={algo.lower()!r}: method {method!r} needs {missing}, "
            f"which the SGLang adapter does not supply yet ({why}; it supplies: "
            f"{', '.join(sorted(SUPPORTED_NEEDS))}); methods served through SGLang: "
            + ", ".join(algorithm_name(m).lower() for m in sorted(methods())
                        if not unsupported_needs(m)))
    options = parse_options(method, environ)
    n = getattr(server_args, "speculative_num_draft_tokens", None)
    n = DEFAULT_NUM_DRAFT_TOKENS if n is None else n
    if not isinstance(n, int) or n < 2:
        raise OptionError(f"--speculative-num-draft-tokens must be an integer >= 2 (the last "
                          f"token plus at least one draft) for {algo}, got {n!r}")
    return PluginSettings(method, options, n)
