"""The drafter vLLM's model runner builds for ``spec_plugins.vllm.<method>``.

It translates the runner's batch (rows of ``InputBatch``) into calls on the engine-neutral
:class:`~spec_plugins.adapter.session.AdapterSession` (which owns the per-request records,
the proposer behind its guard, the step timer and the committed hidden states) and the
session's drafts back into what vLLM takes.

- Chains are verified by vLLM's own rejection sampler. Drafts that a method *sampled*
  carry their draft distributions, handed to vLLM as ``draft_probs`` (deterministic drafts
  are one-hot), so sampled verification stays lossless.
- Branching trees are remembered (``pending_trees``) and verified in the next step
  through ``tree_step``'s phases: :meth:`begin_step` -> plan, :meth:`verify` -> verdicts,
  then the proposal reads the verdicts. Each phase returns a value; ``hooks`` writes what
  vLLM must see (positions, the plan for the attention builders, verified rows, KV moves,
  draft probabilities), nothing here writes into a vLLM object.
- Methods that read the target's hidden states get them at the tokens each request
  committed, from the target's own forward pass (on CPU ``capture.HiddenCapture``; else
  vLLM's auxiliary hidden-state outputs).

vLLM reaches this object only through ``spec_plugins.vllm.hooks``: ``load_model``,
``aux_hidden_state_layers``, ``begin_step``, ``on_logits``, ``verify``, ``end_step`` and
``propose_for_runner``.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import numpy as np
import torch

from spec_plugins.adapter.session import (AdapterSession, RequestRecord, model_info,
                                          placeholder_token_ids)
from spec_plugins.request_controls import max_draft_tokens
from spec_plugins.tree import DraftTree
from spec_plugins.verify import Verdict
from spec_plugins.vllm import tree_step
from spec_plugins.vllm.capture import HiddenCapture
from spec_plugins.vllm.config import settings_from
from spec_plugins.vllm.target_model import language_model
from spec_plugins.vllm.version import logger

SUPPORTED_NEEDS = frozenset({"target_topk", "target_model", "hidden_states"})
WHY_SKIPPED = "vLLM's rejection sampler does not apply it to draft tokens"


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


class Proposal(NamedTuple):
    """What a drafting call hands vLLM: per batch row its draft tokens, and the draft
    distributions ``[num_reqs, max_draft, vocab]`` for vLLM's rejection sampler (None
    when no chain was sampled)."""
    drafts: list[list[int]]
    draft_probs: torch.Tensor | None


def request_record(sp, makes_trees: bool) -> RequestRecord:
    """Read a request's sampling parameters once. vLLM applies penalties, bad words,
    min_tokens, grammars and logprobs to draft positions as if they were a chain, so
    such requests get chains; min_p and logit_bias are not applied to drafts at all,
    so such requests get none."""
    temperature = float(sp.temperature) if sp is not None else 0.0
    seeded = bool(sp is not None and sp.seed is not None and temperature > 0)
    reason = None
    if sp is not None and sp.min_p and sp.min_p > 0:
        reason = "min_p"
    elif sp is not None and sp.logit_bias:
        reason = "logit_bias"
    tree_ok = makes_trees and sp is not None and not (
        sp.presence_penalty or sp.frequency_penalty
        or (sp.repetition_penalty and sp.repetition_penalty != 1.0)
        or sp.logprobs is not None or sp.bad_words or sp.min_tokens
        or getattr(sp, "structured_outputs", None) is not None)
    return RequestRecord(skip_reason=reason, tree_ok=tree_ok, temperature=temperature,
                         seed=sp.seed if seeded else None,
                         max_draft=max_draft_tokens(getattr(sp, "extra_args", None),
                                                    "vllm_xargs"))


class VllmDrafter:
    method: str = ""

    def __init__(self, vllm_config):
        from spec_plugins.vllm import SEAM

        missing = SEAM.missing_reason()
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
        self.session = AdapterSession(self.method, settings.options, logger, "vLLM",
                                      SUPPORTED_NEEDS)
        self.makes_trees = self.session.makes_trees
        self.target_model = None
        # Trees drafted last step, verified in this one (req_id -> tree), and the plan of
        # the step that verifies them (None in steps without a branching tree).
        self.pending_trees: dict[str, DraftTree] = {}
        self.plan: tree_step.TreePlan | None = None
        self.verdicts: list[Verdict] | None = None
        self.tree_stats = TreeStats()
        self.rng = np.random.default_rng()
        self._live: set[str] = set()
        self._aux_order: list[int] | None = None
        # Where the states come from on CPU (hooks install it; None: vLLM's auxiliary
        # hidden-state outputs).
        self.capture: HiddenCapture | None = None
        logger.info("spec_plugins: method %s, up to %d draft tokens per step, options %s",
                    self.method, self.k, settings.options)

    # custom_class protocol -------------------------------------------------
    def load_model(self, target_model=None, *args, **kwargs) -> None:
        """vLLM passes the loaded target: the proposer learns about it once (``bind``);
        model-dependent mistakes fail here, at start-up."""
        mc = self.vllm_config.model_config
        placeholders = frozenset()
        if mc.is_multimodal_model:
            placeholders = placeholder_token_ids(mc.hf_config, mc.tokenizer or mc.model,
                                                 mc.trust_remote_code)
            if mc.uses_mrope and self.makes_trees:
                # Tree positions are 1-D (tree_step); M-RoPE needs 3-D ones.
                self.makes_trees = False
                logger.info("spec_plugins: %s uses M-RoPE: drafts are chains, not trees",
                            type(target_model).__name__)
        self.session.bind(model_info(
            target_model, decoder=language_model(target_model), model_path=mc.model,
            tokenizer_path=mc.tokenizer or mc.model, architecture=type(target_model).__name__,
            num_layers=mc.get_total_num_hidden_layers(), hidden_size=mc.get_hidden_size(),
            vocab_size=mc.get_vocab_size(), max_model_len=mc.max_model_len, dtype=mc.dtype,
            placeholder_token_ids=placeholders))
        if self.session.wants_model:
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
        if not self.session.wants_states:
            return None
        layers = self.session.hidden_layers()
        ids = sorted({i + 1 for i in layers})
        self._aux_order = [ids.index(i + 1) for i in layers]
        return tuple(ids)

    def begin_step(self, runner, scheduler_output) -> tree_step.TreePlan | None:
        """After the runner prepared its inputs: the plan of this step's branching trees."""
        self.verdicts = None
        pending, self.pending_trees = self.pending_trees, {}
        self.plan = None
        if not self.makes_trees or not pending:
            return None
        batch = runner.input_batch
        req_ids = batch.req_ids[:batch.num_reqs]
        table = batch.block_table[0]
        q_lens = np.array([scheduler_output.num_scheduled_tokens[r] for r in req_ids],
                          dtype=np.int64)
        self.plan = tree_step.begin(
            pending, scheduler_output.scheduled_spec_decode_tokens, req_ids, q_lens,
            batch.num_computed_tokens_cpu[:len(req_ids)], table.slot_mapping.gpu[:int(q_lens.sum())],
            table.block_size)
        return self.plan

    def on_logits(self, runner, logits, spec_decode_metadata) -> None:
        """Keep the target's top-k next tokens at every position it just scored, with
        the token at that position, per request (``StepContext.target_topk``). Rows are
        the root and every draft node of a request, or its last scheduled token."""
        if not self.session.wants_topk or logits is None:
            return
        num_reqs = runner.input_batch.num_reqs
        req_ids = runner.input_batch.req_ids[:num_reqs]
        records = [self._record(runner, r) for r in req_ids]
        if all(rec.never_drafted for rec in records):
            return   # nobody here is drafted for: the top-k would go unread
        if spec_decode_metadata is not None:
            idx = spec_decode_metadata.logits_indices
            counts = [n + 1 for n in spec_decode_metadata.num_draft_tokens]
        else:
            idx = torch.from_numpy(runner.query_start_loc.np[1:num_reqs + 1] - 1)
            counts = [1] * num_reqs
        ids = logits[: len(idx)].topk(self.session.proposer.topk, dim=-1).indices.cpu().numpy()
        tokens = runner.input_ids.gpu[idx].cpu().numpy()
        start = 0
        for rec, n in zip(records, counts):
            rec.topk = (tokens[start:start + n], ids[start:start + n])
            start += n

    def verify(self, num_draft_tokens, target_logits, bonus_token_ids,
               sampling_metadata) -> list[Verdict] | None:
        """Inside vLLM's rejection sampler: the verdicts on this step's trees (core
        verifiers), None in a step without a branching tree."""
        if self.plan is None:
            return None
        self.verdicts = tree_step.verify(self.plan, num_draft_tokens, target_logits,
                                         bonus_token_ids, sampling_metadata, self.rng)
        self.tree_stats.record(self.plan.trees, self.verdicts)
        return self.verdicts

    # request bookkeeping ------------------------------------------------------
    def _record(self, runner, req_id: str) -> RequestRecord:
        rec = self.session.requests.get(req_id)
        if rec is None:
            state = runner.requests.get(req_id)
            rec = self.session.admit(
                req_id, request_record(getattr(state, "sampling_params", None),
                                       self.makes_trees), WHY_SKIPPED)
        return rec

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
        if self.plan is not None and self.verdicts is not None:
            accepted_paths = {int(r): v.accepted for r, v in zip(self.plan.rows, self.verdicts)}
        rows, owners = [], []
        for i, sampled in enumerate(sampled_token_ids):
            req_id = batch.req_ids[i]
            n = int(scheduler_output.num_scheduled_tokens.get(req_id, 0))
            if n == 0 or self._record(runner, req_id).never_drafted:
                continue  # nothing computed, or never drafted for (min_p, logit_bias, cap 0)
            if not spec.get(req_id):
                local = range(n)
            elif i in accepted_paths:
                local = [0] + [1 + node for node in accepted_paths[i]]
            else:
                local = range(len(sampled))
            start, p0 = int(qsl[i]), int(batch.num_computed_tokens_cpu[i])
            end = self.session.states.end(req_id)
            if end is not None and p0 < end:
                # Recomputed from an earlier position (preempted and resumed): start over.
                self.session.finish(req_id)
                self._record(runner, req_id)
            rows.extend(start + j for j in local)
            owners.append((req_id, p0, len(local)))
        if not rows:
            return
        idx = torch.tensor(rows, dtype=torch.long, device=aux[0].device)
        states = torch.cat([aux[j].index_select(0, idx) for j in self._aux_order], dim=-1)
        off = 0
        for req_id, p0, n in owners:
            self.session.queue_states(req_id, p0, states[off:off + n])
            off += n

    def propose_for_runner(self, runner, scheduler_output, sampled_token_ids,
                           aux_hidden_states=None) -> Proposal:
        session = self.session
        # Time from the end of one drafting call to the start of the next = one engine
        # step of the tokens it scheduled.
        session.timer.stop(int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0))
        batch = runner.input_batch
        k = getattr(scheduler_output, "num_spec_tokens_to_schedule", 0) or self.k
        k = min(k, self.k)
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        live = batch.req_ids[:len(sampled_token_ids)]
        session.retain(live)
        if session.wants_states:
            self._collect_states(runner, scheduler_output, sampled_token_ids, aux_hidden_states)
        requests, rows = [], []
        for i, sampled in enumerate(sampled_token_ids):
            req_id = batch.req_ids[i]
            if not sampled:
                continue  # partial prefill: nothing committed yet
            n = int(batch.num_tokens_no_spec[i])
            room = min(k, self.max_model_len - n - 1)
            if room <= 0:
                continue
            rec = self._record(runner, req_id)
            rec.accepted = len(sampled) - 1
            req = session.draft_request(req_id, batch.token_ids_cpu[i, :n],
                                        int(batch.num_prompt_tokens[i]), sampled, room)
            if req is not None:
                requests.append(req)
                rows.append(i)
        trees: list[DraftTree | None] = [None] * len(sampled_token_ids)
        if requests:
            target_model = None
            if session.wants_model:
                target_model = self.target_model
                target_model.bind(runner, {r.req_id: i for r, i in zip(requests, rows)})
            for i, req, tree in zip(rows, requests,
                                    session.propose(requests, len(sampled_token_ids),
                                                    target_model)):
                if not tree.is_chain:
                    self.pending_trees[req.req_id] = tree
                drafts[i] = list(tree.tokens)
                trees[i] = tree
        for req_id, d in zip(live, drafts):
            session.drafted(req_id, len(d))
        # The next step's time is measured from here: drafting is not part of it.
        session.timer.start()
        return Proposal(drafts, self._draft_probs(trees, runner.device))

    def _draft_probs(self, trees, device) -> torch.Tensor | None:
        """Sampled chain drafts: the distributions they were drawn from, ``[num_reqs,
        max_draft, vocab]`` (vLLM takes rows for every request with drafts or none:
        deterministic drafts and tree rows, which the tree verifier overwrites, get
        one-hot rows)."""
        if not any(t is not None and t.is_chain and t.draft_dists is not None and len(t)
                   for t in trees):
            return None
        width = max(len(t) for t in trees if t is not None)
        vocab = self.vllm_config.model_config.get_vocab_size()
        probs = torch.zeros(len(trees), width, vocab, dtype=torch.float32, device=device)
        for i, t in enumerate(trees):
            if t is None or not len(t):
                continue
            if t.is_chain and t.draft_dists is not None:
                dists = torch.as_tensor(t.draft_dists, dtype=torch.float32)
                probs[i, :len(t)] = dists[torch.as_tensor(t.dist_rows)].to(probs.device)
            else:
                probs[i, torch.arange(len(t)), torch.as_tensor(t.tokens)] = 1.0
        return probs


@functools.cache
def drafter_class(method: str) -> type[VllmDrafter]:
    return type(method, (VllmDrafter,), {"method": method, "__module__": __name__,
                                         "__qualname__": method})
