"""Registration of every spec_plugins method as an SGLang speculative algorithm.

``SpeculativeAlgorithm.register`` is SGLang's own extension point. Its default algorithm
object (``CustomSpecAlgo``) lacks methods the 0.5.23 scheduler calls
(``create_future_map``, ``carries_draft_hidden_states``, ``need_topk``):
:class:`SpecPluginsAlgo` supplies them, says the method keeps no draft KV cache, and sets
the server arguments it needs (no overlap scheduling: drafts read the tokens the last
step committed; no mixed chunks; the verify width default).
"""

from __future__ import annotations

from spec_plugins.proposers import methods
from spec_plugins.sglang.config import (DEFAULT_NUM_DRAFT_TOKENS, PREFIX, algorithm_name,
                                        settings_from, unknown_method_message)
from spec_plugins.sglang.version import logger


def _algo_class():
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class SpecPluginsAlgo(CustomSpecAlgo):
        def carries_draft_hidden_states(self) -> bool:
            return False

        def need_topk(self) -> bool:
            return False

        def has_draft_kv(self) -> bool:
            return False

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens=True,
                              needs_confidence_relay=False):
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens,
                             needs_confidence_relay)

        def handle_server_args(self, server_args) -> None:
            server_args.disable_overlap_schedule = True
            server_args.enable_mixed_chunk = False
            if server_args.speculative_num_draft_tokens is None:
                server_args.speculative_num_draft_tokens = DEFAULT_NUM_DRAFT_TOKENS
            n = server_args.speculative_num_draft_tokens
            if server_args.speculative_num_steps is None:
                server_args.speculative_num_steps = max(n - 1, 1)
            if server_args.speculative_eagle_topk is None:
                server_args.speculative_eagle_topk = 1

    return SpecPluginsAlgo


def _validate(server_args) -> None:
    """At launch (SGLang's argument resolution): a bad method, option or width stops
    the server with a message naming the field and the allowed values."""
    settings_from(server_args)


def _factory(server_args):
    from spec_plugins.sglang.worker import SpecPluginsWorker

    return SpecPluginsWorker


def register_methods() -> None:
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import get_spec

    algo_class = _algo_class()
    names = []
    for method in sorted(methods()):
        name = algorithm_name(method)
        if get_spec(name) is not None:
            continue  # registered earlier in this process
        SpeculativeAlgorithm.register(name, supports_overlap=False,
                                      validate_server_args=_validate,
                                      spec_class=algo_class)(_factory)
        names.append(name.lower())
    if names:
        logger.info("spec_plugins: registered speculative algorithms %s", ", ".join(names))
    _name_unknown_methods(SpeculativeAlgorithm, get_spec)


def _name_unknown_methods(algorithm_enum, get_spec) -> None:
    """SGLang rejects an unregistered name with "Unknown speculative algorithm name"; for
    a misspelt spec_plugins method, say which methods exist instead (one wrapper around
    ``SpeculativeAlgorithm.from_string``, installed once)."""
    orig = algorithm_enum.from_string.__func__
    if getattr(orig, "_spec_plugins", False):
        return

    def from_string(cls, name):
        if name and name.upper().startswith(PREFIX) and get_spec(name.upper()) is None:
            raise ValueError(unknown_method_message(name))
        return orig(cls, name)

    from_string._spec_plugins = True
    algorithm_enum.from_string = classmethod(from_string)


def _validate_request(params, *args, **kwargs):
    """Before SGLang's own ``SamplingParams.verify`` (a ValueError there is an HTTP 400):
    the per-request control in ``custom_params`` (``spec_plugins.request_controls``)."""
    from spec_plugins.options import OptionError
    from spec_plugins.request_controls import max_draft_tokens

    try:
        max_draft_tokens(getattr(params, "custom_params", None), "custom_params")
    except OptionError as e:
        raise ValueError(str(e)) from None


def register_request_validation() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify",
                          _validate_request, HookType.BEFORE)
