"""The drafter vLLM's model runner builds for ``spec_plugins.vllm.<method>``.

It translates the runner's batch (rows of ``InputBatch``) into core
:class:`~spec_plugins.proposers.base.DraftRequest` objects, calls the method's proposer
and hands vLLM back each draft's nodes as the request's speculative tokens.

- Chains are verified by vLLM's own rejection sampler. Drafts that a method *sampled*
  carry their draft distributions, handed to vLLM as ``draft_probs`` (deterministic drafts
  are one-hot), so sampled verification stays lossless.
- Branching trees are remembered (``pending_trees``) and verified in the next step by
  ``tree_step.py``: this drafter owns that step's :class:`~spec_plugins.vllm.tree_step.
  TreeStep` and hands it to the tree attention builders and to the verifier.
- Methods that read the target's hidden states get them at the tokens each request
  committed, from the target's own forward pass (on CPU ``capture.HiddenCapture``; else
  vLLM's auxiliary hidden-state outputs).

vLLM reaches this object only through ``spec_plugins.vllm.hooks``: ``load_model``,
``aux_hidden_state_layers``, ``on_inputs_prepared``, ``on_logits``, ``on_verified``,
``on_step_sampled`` and ``propose_for_runner``.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import numpy as np
import torch

from spec_plugins.cost import StepTimer
from spec_plugins.proposers import proposer_class
from spec_plugins.guard import GuardedProposer
from spec_plugins.proposers.base import (CommittedStatesQueue, DraftRequest, ModelInfo,
                                         StepContext)
from spec_plugins.request_controls import max_draft_tokens
from spec_plugins.tree import DraftTree
from spec_plugins.vllm import tree_step
from spec_plugins.vllm.capture import HiddenCapture
from spec_plugins.vllm.config import settings_from
from spec_plugins.vllm.version import logger

# Prior slope of the step-time curve, as a fraction of a one-token step per extra query
# token (float32 on a CPU: ~0.1); online calibration replaces it within a few steps.
PRIOR_PER_TOKEN = 0.1
SUPPORTED_NEEDS = frozenset({"target_topk", "target_model", "hidden_states"})


class TreeStats:
    """Counts of verified branching trees, logged like vLLM's SpecDecoding metrics."""

    INTERVAL = 10.0

    def __init__(self) -> None:
        self.trees = self.nodes = self.accepted = 0
        self._last_log = time.monotonic()

    def record(self, trees, verdicts) -> None:
        self.trees += len(trees)
        self.nodes += sum(len(t) for t in trees)
        self.accepted += sum(v.num_accepted for v in verdicts)
        now = time.monotonic()
        if now - self._last_log >= self.INTERVAL:
            self._last_log = now
            logger.info("spec_plugins: draft trees verified: %d, mean nodes per tree: %.1f, "
                        "mean accepted tokens per tree: %.2f", self.trees,
                        self.nodes / self.trees, self.accepted / self.trees)


class RequestInfo(NamedTuple):
    """What the drafter reads once from a request's sampling parameters."""
    skip_reason: str | None   # why it is never drafted for (options drafts cannot honour)
    seeded: bool              # seeded sampling: drafts from its own tokens only
    tree_ok: bool             # a branching tree can be verified for it
    temperature: float
    seed: int | None
    max_draft: int | None     # the client's cap (vllm_xargs), 0: no speculation

    @property
    def never_drafted(self) -> bool:
        return self.skip_reason is not None or self.max_draft == 0


def model_info(vllm_config, model) -> ModelInfo:
    """What the proposer learns about the loaded target (``Proposer.bind``)."""
    mc = vllm_config.model_config
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    param = next(model.parameters(), None)
    return ModelInfo(
        model_path=mc.model, tokenizer_path=mc.tokenizer or mc.model,
        architecture=type(model).__name__, num_layers=mc.get_total_num_hidden_layers(),
        hidden_size=mc.get_hidden_size(), vocab_size=mc.get_vocab_size(),
        max_model_len=mc.max_model_len, dtype=mc.dtype,
        device=None if param is None else param.device,
        embed_tokens=embed, lm_head_weight=getattr(head, "weight", None))


class VllmDrafter:
    method: str = ""

    def __init__(self, vllm_config):
        from spec_plugins.vllm import hooks_missing_reason

        missing = hooks_missing_reason()
        if missing is not None:
            # Stop at start-up, not at the first step that drafts.
            raise RuntimeError(f"spec_plugins method {self.method!r} cannot run here: "
                               f"{missing}; serve without --speculative-config, or on a "
                               "supported vLLM")
        settings = settings_from(vllm_config)
        assert settings is not None and settings.method == self.method
        self.k = settings.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.vllm_config = vllm_config
        self.proposer = proposer_class(self.method)(settings.options)
        self.proposer.logger = logger
        # Every call into the method goes through the guard: its faults never reach vLLM.
        self.guard = GuardedProposer(self.proposer, self.method, logger)
        needs = set(self.proposer.needs)
        if needs - SUPPORTED_NEEDS:
            raise NotImplementedError(
                f"spec_plugins method {self.method!r} needs {sorted(needs - SUPPORTED_NEEDS)}, "
                "which the vLLM adapter does not supply")
        self.wants_topk = "target_topk" in needs
        self.wants_model = "target_model" in needs
        self.wants_states = "hidden_states" in needs
        self.makes_trees = bool(self.proposer.makes_trees)
        self.target_model = None
        # Trees drafted last step, verified in this one (req_id -> tree), and the step
        # that verifies them (None in steps without a branching tree).
        self.pending_trees: dict[str, DraftTree] = {}
        self.step: tree_step.TreeStep | None = None
        self._tree_builders: list | None = None
        self.tree_stats = TreeStats()
        self.rng = np.random.default_rng()
        self._topk: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._active: set[str] = set()
        self._last_len: dict[str, int] = {}
        # Hidden states of committed tokens not yet handed to the proposer, and the next
        # position each request's states continue from.
        self._states = CommittedStatesQueue()
        self._aux_order: list[int] | None = None
        # Where the states come from on CPU (hooks install it; None: vLLM's auxiliary
        # hidden-state outputs).
        self.capture: HiddenCapture | None = None
        self._req_info: dict[str, RequestInfo] = {}
        self._logged_reasons: set[str] = set()
        self.timer = StepTimer(PRIOR_PER_TOKEN)
        logger.info("spec_plugins: method %s, up to %d draft tokens per step, options %s",
                    self.method, self.k, settings.options)

    # custom_class protocol -------------------------------------------------
    def load_model(self, target_model=None, *args, **kwargs) -> None:
        """vLLM passes the loaded target: the proposer learns about it once (``bind``);
        model-dependent mistakes fail here, at start-up."""
        info = model_info(self.vllm_config, target_model)
        self.guard.bind(info)
        if self.wants_model:
            from spec_plugins.vllm.target_model import VllmTargetModel

            self.target_model = VllmTargetModel(target_model, self.vllm_config)

    def propose(self, *args, **kwargs):
        raise RuntimeError("spec_plugins drafters are driven through spec_plugins.vllm.hooks, "
                           "which are not installed in this process (is the vllm.general_plugins "
                           "entry point allowed by VLLM_PLUGINS?)")

    # driven by spec_plugins.vllm.hooks --------------------------------------
    def aux_hidden_state_layers(self) -> tuple[int, ...] | None:
        """vLLM's auxiliary hidden-state ids for the proposer's layers (id ``i + 1`` is the
        output of layer ``i``; vLLM returns them sorted, without repeats)."""
        if not self.wants_states:
            return None
        layers = tuple(self.proposer.hidden_layers)
        if not layers:
            raise RuntimeError(f"spec_plugins method {self.method!r} needs hidden states but "
                               "lists no hidden_layers after bind()")
        ids = sorted({i + 1 for i in layers})
        self._aux_order = [ids.index(i + 1) for i in layers]
        return tuple(ids)

    def on_inputs_prepared(self, runner, scheduler_output) -> None:
        if not self.makes_trees:
            return
        self.step = tree_step.begin(runner, scheduler_output, self.pending_trees)
        for builder in self._builders(runner):
            builder.tree_step = self.step

    def _builders(self, runner) -> list:
        if self._tree_builders is None:
            from spec_plugins.vllm.attention import TreeCPUAttentionMetadataBuilder

            self._tree_builders = [b for groups in runner.attn_groups for g in groups
                                   for b in g.metadata_builders
                                   if isinstance(b, TreeCPUAttentionMetadataBuilder)]
        return self._tree_builders

    def on_logits(self, runner, logits, spec_decode_metadata) -> None:
        """Keep the target's top-k next tokens at every position it just scored, with
        the token at that position, per request (``StepContext.target_topk``). Rows are
        the root and every draft node of a request, or its last scheduled token."""
        if not self.wants_topk or logits is None:
            return
        num_reqs = runner.input_batch.num_reqs
        req_ids = runner.input_batch.req_ids[:num_reqs]
        if all(self._classify(runner, r).never_drafted for r in req_ids):
            return   # nobody here is drafted for: the top-k would go unread
        if spec_decode_metadata is not None:
            idx = spec_decode_metadata.logits_indices
            counts = [n + 1 for n in spec_decode_metadata.num_draft_tokens]
        else:
            idx = torch.from_numpy(runner.query_start_loc.np[1:num_reqs + 1] - 1)
            counts = [1] * num_reqs
        ids = logits[: len(idx)].topk(self.proposer.topk, dim=-1).indices.cpu().numpy()
        tokens = runner.input_ids.gpu[idx].cpu().numpy()
        start = 0
        for req_id, n in zip(req_ids, counts):
            self._topk[req_id] = (tokens[start:start + n], ids[start:start + n])
            start += n

    def on_verified(self, out, num_draft_tokens, target_logits, bonus_token_ids,
                    sampling_metadata) -> None:
        """Inside vLLM's rejection sampler: verify this step's trees with the core
        verifiers (overwriting their rows of ``out``) and compact their KV."""
        step = self.step
        if step is None:
            return
        step.verdicts = tree_step.verify(step, out, num_draft_tokens, target_logits,
                                         bonus_token_ids, sampling_metadata, self.rng)
        tree_step.compact_kv(step, step.verdicts, step.runner.kv_caches)
        self.tree_stats.record(step.trees, step.verdicts)

    def on_step_sampled(self) -> None:
        for builder in self._tree_builders or ():
            builder.tree_step = None

    # request bookkeeping ------------------------------------------------------
    def _classify(self, runner, req_id: str) -> RequestInfo:
        """Read a request's sampling parameters once. vLLM applies penalties, bad words,
        min_tokens, grammars and logprobs to draft positions as if they were a chain, so
        such requests get chains; min_p and logit_bias are not applied to drafts at all,
        so such requests get none."""
        if req_id not in self._req_info:
            state = runner.requests.get(req_id)
            sp = getattr(state, "sampling_params", None)
            temperature = float(sp.temperature) if sp is not None else 0.0
            seeded = bool(sp is not None and sp.seed is not None and temperature > 0)
            reason = None
            if sp is not None and sp.min_p and sp.min_p > 0:
                reason = "min_p"
            elif sp is not None and sp.logit_bias:
                reason = "logit_bias"
            tree_ok = self.makes_trees and sp is not None and not (
                sp.presence_penalty or sp.frequency_penalty
                or (sp.repetition_penalty and sp.repetition_penalty != 1.0)
                or sp.logprobs is not None or sp.bad_words or sp.min_tokens
                or getattr(sp, "structured_outputs", None) is not None)
            cap = max_draft_tokens(getattr(sp, "extra_args", None), "vllm_xargs")
            self._req_info[req_id] = RequestInfo(reason, seeded, tree_ok, temperature,
                                                 sp.seed if seeded else None, cap)
            if reason and reason not in self._logged_reasons:
                self._logged_reasons.add(reason)
                logger.info("spec_plugins: requests with %s are served without speculation "
                            "(vLLM's rejection sampler does not apply it to draft tokens)", reason)
        return self._req_info[req_id]

    def _calibrate(self, scheduler_output) -> None:
        """Time from the end of one drafting call to the start of the next = one engine
        step of the tokens it scheduled."""
        self.timer.stop(int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0))

    def _collect_states(self, runner, scheduler_output, sampled_token_ids, aux) -> None:
        """Queue, per request, the target hidden states of the tokens it committed in this
        step: every scheduled token of a prefill chunk or plain decode step; in a verify
        step the root and the accepted draft tokens (tree rows: the accepted path)."""
        if self.capture is not None:
            aux = self.capture.outputs()
        if aux is None:
            raise RuntimeError("spec_plugins: the runner passed no auxiliary hidden states")
        batch = runner.input_batch
        qsl = runner.query_start_loc.np
        spec = scheduler_output.scheduled_spec_decode_tokens
        accepted_paths = {}
        if self.step is not None and self.step.verdicts is not None:
            accepted_paths = {int(r): v.accepted for r, v in zip(self.step.rows,
                                                                   self.step.verdicts)}
        rows, owners = [], []
        for i, sampled in enumerate(sampled_token_ids):
            req_id = batch.req_ids[i]
            n = int(scheduler_output.num_scheduled_tokens.get(req_id, 0))
            if n == 0 or self._classify(runner, req_id).never_drafted:
                continue  # nothing computed, or never drafted for (min_p, logit_bias, cap 0)
            if not spec.get(req_id):
                local = range(n)
            elif i in accepted_paths:
                local = [0] + [1 + node for node in accepted_paths[i]]
            else:
                local = range(len(sampled))
            start, p0 = int(qsl[i]), int(batch.num_computed_tokens_cpu[i])
            end = self._states.end(req_id)
            if end is not None and p0 < end:
                # Recomputed from an earlier position (preempted and resumed): start over.
                self._finish(req_id)
            rows.extend(start + j for j in local)
            owners.append((req_id, p0, len(local)))
        if not rows:
            return
        idx = torch.tensor(rows, dtype=torch.long, device=aux[0].device)
        states = torch.cat([aux[j].index_select(0, idx) for j in self._aux_order], dim=-1)
        off = 0
        for req_id, p0, n in owners:
            self._states.put(req_id, p0, states[off:off + n])
            off += n

    def propose_for_runner(self, runner, scheduler_output, sampled_token_ids,
                           aux_hidden_states=None) -> list[list[int]]:
        self._calibrate(scheduler_output)
        batch = runner.input_batch
        k = getattr(scheduler_output, "num_spec_tokens_to_schedule", 0) or self.k
        k = min(k, self.k)
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        requests, rows = [], []
        seen = set(batch.req_ids[:len(sampled_token_ids)])
        for req_id in self._active - seen:
            self._finish(req_id)
        self._active = seen
        if self.wants_states:
            self._collect_states(runner, scheduler_output, sampled_token_ids, aux_hidden_states)
        for i, sampled in enumerate(sampled_token_ids):
            req_id = batch.req_ids[i]
            if not sampled:
                continue  # partial prefill: nothing committed yet
            n = int(batch.num_tokens_no_spec[i])
            room = min(k, self.max_model_len - n - 1)
            if room <= 0:
                continue
            info = self._classify(runner, req_id)
            if info.never_drafted:
                continue
            if info.max_draft is not None:
                room = min(room, info.max_draft)
            last = self._last_len.get(req_id)
            requests.append(DraftRequest(
                req_id=req_id,
                token_ids=batch.token_ids_cpu[i, :n],
                num_prompt_tokens=int(batch.num_prompt_tokens[i]),
                new_tokens=sampled,
                max_draft_tokens=room,
                num_accepted=None if not last else len(sampled) - 1,
                isolated=info.seeded,
                tree_ok=info.tree_ok,
                temperature=info.temperature,
                seed=info.seed,
            ))
            rows.append(i)
        self.pending_trees.clear()
        self.step = None
        trees: list[DraftTree | None] = [None] * len(sampled_token_ids)
        if requests:
            ctx = StepContext(cost=self.timer.cost, batch_tokens=len(sampled_token_ids))
            if self.wants_topk:
                ctx.target_topk = [self._topk.get(r.req_id) for r in requests]
            if self.wants_model:
                self.target_model.bind(runner, {r.req_id: i for r, i in zip(requests, rows)})
                ctx.target_model = self.target_model
            if self.wants_states:
                ctx.hidden_states = [self._states.take(r.req_id) for r in requests]
            proposed = self.guard.propose(requests, ctx)
            for i, req, tree in zip(rows, requests, proposed):
                if not tree.is_chain:
                    self.pending_trees[req.req_id] = tree
                drafts[i] = list(tree.tokens)
                trees[i] = tree
        self._hand_draft_probs(runner, trees)
        self._topk.clear()
        for i, req_id in enumerate(batch.req_ids[:len(drafts)]):
            self._last_len[req_id] = len(drafts[i])
        # The next step's time is measured from here: drafting is not part of it.
        self.timer.start()
        return drafts

    def _hand_draft_probs(self, runner, trees) -> None:
        """Sampled chain drafts: give vLLM's rejection sampler the distributions they were
        drawn from, ``[num_reqs, max_draft, vocab]`` (vLLM takes rows for every request
        with drafts or none: deterministic drafts and tree rows, which the tree verifier
        overwrites, get one-hot rows)."""
        if not any(t is not None and t.is_chain and t.draft_dists is not None and len(t)
                   for t in trees):
            return
        width = max(len(t) for t in trees if t is not None)
        vocab = self.vllm_config.model_config.get_vocab_size()
        probs = torch.zeros(len(trees), width, vocab, dtype=torch.float32, device=runner.device)
        for i, t in enumerate(trees):
            if t is None or not len(t):
                continue
            if t.is_chain and t.draft_dists is not None:
                dists = torch.as_tensor(t.draft_dists, dtype=torch.float32)
                probs[i, :len(t)] = dists[torch.as_tensor(t.dist_rows)].to(probs.device)
            else:
                probs[i, torch.arange(len(t)), torch.as_tensor(t.tokens)] = 1.0
        runner._draft_probs = probs
        runner._draft_prob_req_ids = list(runner.input_batch.req_ids[:len(trees)])

    def _finish(self, req_id: str) -> None:
        self.guard.finish(req_id)
        self._last_len.pop(req_id, None)
        self._req_info.pop(req_id, None)
        self._states.drop(req_id)


@functools.cache
def drafter_class(method: str) -> type[VllmDrafter]:
    return type(method, (VllmDrafter,), {"method": method, "__module__": __name__,
                                         "__qualname__": method})
