"""The speculative worker SGLang builds for ``--speculative-algorithm spec_plugins.<m>``.

It follows SGLang's worker contract (``forward_batch_generation`` returning a
``GenerationBatchResult`` with ``accept_lens``; the shape of SGLang's own NGRAM worker) and
drives the method's proposer through the same interface as the vLLM adapter:

1. decode batch -> one ``DraftRequest`` per request -> ``proposer.propose`` (sized by the
   verify-cost model: ``StepContext.cost``, calibrated on this engine's verify steps);
2. the trees become one TARGET_VERIFY forward: per request ``n`` query rows (row 0 the
   last committed token, then the tree's nodes in order), ``n = 1 + the largest tree``
   this step (rows past a request's own tree are padding: children of the root that
   nobody reads), with the tree mask ``[n, n]`` and positions ``seq_len + depth``;
3. verification with the core verifiers (``spec_plugins.verify``): greedy requests follow
   the target's argmax (token for token what SGLang returns without speculation);
   sampled requests use recursive rejection sampling against the request's own
   distribution (temperature, top-k, top-p, min-p: ``spec_plugins.sampling``), so they
   keep the target distribution (SGLang's own verify on a CPU commits the argmax);
4. SGLang's helpers then keep the accepted rows' KV, compute logprobs and report the
   accepted lengths, which feed ``sglang:spec_accept_length`` and each request's
   ``meta_info`` like SGLang's own algorithms.

Methods that read the target's hidden states (``needs={"hidden_states"}``: dflash) get
them from the target's own forward passes: SGLang's auxiliary hidden-state capture (the
one its DFlash and EAGLE-3 workers use) at the method's layers, in FULL mode on prefill
and verify forwards only when such a method is served; per request the worker queues the
states of the tokens it committed (prefill chunks; per step the root and the accepted
rows) and hands them to the proposer as ``StepContext.hidden_states``.

Requests with frequency/presence/repetition penalties get no drafts (SGLang applies
penalties to every verify row as of the step's start, which is exact only for the first
row); grammars are applied over the tree with SGLang's own bitmask builder.
"""

from __future__ import annotations


import numpy as np
import torch

from spec_plugins.adapter.session import (AdapterSession, RequestRecord, model_info,
                                          placeholder_token_ids)
from spec_plugins.request_controls import max_draft_tokens
from spec_plugins.sampling import sampling_probs
from spec_plugins.sglang.config import SUPPORTED_NEEDS, settings_from
from spec_plugins.sglang.layout import VerifyStep, layout
from spec_plugins.sglang.version import logger
from spec_plugins.tree import DraftTree
from spec_plugins.verify import sample, verify_greedy_ids, verify_stochastic

from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.ngram_info import NgramVerifyInput

WHY_SKIPPED = "SGLang applies them to verify rows as of the step's start"


def target_info(server_args, model_runner):
    """What the proposer learns about the loaded target (``Proposer.bind``)."""
    mc = model_runner.model_config
    model = model_runner.model
    archs = getattr(mc.hf_config, "architectures", None) or [type(model).__name__]
    tokenizer_path = server_args.tokenizer_path or server_args.model_path
    placeholders = frozenset()
    if mc.is_multimodal:
        placeholders = placeholder_token_ids(mc.hf_config, tokenizer_path,
                                             server_args.trust_remote_code)
    return model_info(
        model, model_path=server_args.model_path, tokenizer_path=tokenizer_path,
        architecture=archs[0], num_layers=mc.num_hidden_layers, hidden_size=mc.hidden_size,
        vocab_size=mc.vocab_size, max_model_len=mc.context_len, dtype=model_runner.dtype,
        placeholder_token_ids=placeholders)


def request_record(req) -> RequestRecord:
    """Read a request's sampling parameters once."""
    sp = req.sampling_params
    reason = None
    if (sp.frequency_penalty or sp.presence_penalty
            or (sp.repetition_penalty is not None and sp.repetition_penalty != 1.0)):
        reason = "frequency, presence or repetition penalties"
    elif getattr(sp, "custom_logit_processor", None):
        reason = "a custom logit processor"
    greedy = sp.top_k == 1
    seed = getattr(sp, "sampling_seed", None)
    return RequestRecord(skip_reason=reason, tree_ok=True,
                         temperature=0.0 if greedy else float(sp.temperature),
                         seed=None if greedy else seed,
                         probs_args=(sp.temperature, sp.top_k, sp.top_p, sp.min_p),
                         max_draft=max_draft_tokens(sp.custom_params, "custom_params"))


class SpecPluginsWorker(BaseSpecWorker):
    def __init__(self, server_args, gpu_id, nccl_port, target_worker):
        super().__init__()
        settings = settings_from(server_args)
        assert settings is not None
        self.server_args = server_args
        self._target_worker = target_worker
        self._draft_worker = None
        self.model_runner = target_worker.model_runner
        self.device = self.model_runner.device
        self.method = settings.method
        # SGLang's verify width (root + drafts); outputs are padded to it.
        self.speculative_num_draft_tokens = settings.num_draft_tokens
        self.session = AdapterSession(self.method, settings.options, logger, "SGLang",
                                      SUPPORTED_NEEDS)
        self.session.bind(target_info(server_args, self.model_runner))
        self.wants_topk = self.session.wants_topk
        self.wants_states = self.session.wants_states
        self._capture = {}
        if self.wants_states:
            self._capture = {"capture_hidden_mode": CaptureHiddenMode.FULL}
            self._capture_layers(self.model_runner.model)
        self.rng = np.random.default_rng()
        self.vocab_size = self.model_runner.model_config.vocab_size
        logger.info("spec_plugins: method %s through SGLang, verify width %d (up to %d draft "
                    "tokens per step), options %s", self.method,
                    self.speculative_num_draft_tokens, self.speculative_num_draft_tokens - 1,
                    settings.options)

    def _capture_layers(self, model) -> None:
        """Have the target capture the residual stream after each of the method's layers
        in its forward passes (SGLang's DFlash capture: id ``l`` -> output of layer ``l``,
        as the vLLM adapter's auxiliary outputs)."""
        layers = list(self.session.hidden_layers())
        capture = getattr(model, "set_dflash_layers_to_capture", None)
        if capture is None:
            raise RuntimeError(
                f"spec_plugins method {self.method!r} reads the target's hidden states, which "
                f"SGLang captures only for models with set_dflash_layers_to_capture; "
                f"{type(model).__name__} has none")
        capture(layers)
        logger.info("spec_plugins: %s reads the target's hidden states at layers %s "
                    "(SGLang's auxiliary capture)", self.method, layers)

    # ---- SGLang's worker protocol -------------------------------------------
    def clear_cache_pool(self):
        self.session.retain(())

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        self.session.finish(rid)

    def forward_batch_generation(self, batch, on_publish=None, pp_proxy_tensors=None,
                                 **kwargs) -> GenerationBatchResult:
        if batch.forward_mode.is_decode():
            return self._decode(batch, on_publish)
        return self._extend(batch, on_publish, pp_proxy_tensors)

    # ---- prefill / idle: the target alone ------------------------------------
    def _extend(self, batch, on_publish, pp_proxy_tensors) -> GenerationBatchResult:
        result = self.target_worker.forward_batch_generation(
            batch, pp_proxy_tensors=pp_proxy_tensors, **self._capture)
        bs, N = len(batch.reqs), self.speculative_num_draft_tokens
        predict = result.next_token_ids
        logits = None if result.logits_output is None else result.logits_output.next_token_logits
        if logits is not None and bs:
            for req in batch.reqs:
                self._record(req)
            if predict is not None:
                self._sample_seeded_first_tokens(batch, logits, predict)
            if self.wants_topk:
                self._keep_topk_after_prefill(batch, logits)
            hidden = result.logits_output.hidden_states if self.wants_states else None
            if hidden is not None:
                # Every token this prefill (chunk) computed, request after request: [tokens, F].
                off = 0
                for req, start, n in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
                    self.session.queue_states(req.rid, int(start), hidden[off:off + int(n)])
                    off += int(n)
        accept_tokens = torch.zeros(bs, N, dtype=torch.int32, device=self.device)
        if predict is not None and bs:
            accept_tokens[:, 0] = predict
        accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        new_seq_lens = batch.seq_lens.clone()
        if on_publish is not None:
            on_publish(new_seq_lens)
        return GenerationBatchResult(
            logits_output=result.logits_output, next_token_ids=predict,
            can_run_cuda_graph=result.can_run_cuda_graph, accept_lens=accept_lens,
            new_seq_lens=new_seq_lens,
            next_draft_input=NgramVerifyInput(draft_token_num=N, new_seq_lens=new_seq_lens,
                                              accept_tokens=accept_tokens.flatten(),
                                              accept_lens=accept_lens),
            speculative_num_draft_tokens=N)

    def _keep_topk_after_prefill(self, batch, logits) -> None:
        """``target_topk`` for a request's first draft: the target's top-k after its
        last prompt token."""
        ids = logits.topk(self.session.proposer.topk, dim=-1).indices.cpu().numpy()
        for b, req in enumerate(batch.reqs):
            last = req.origin_input_ids_unpadded[-1:]
            self.session.requests[req.rid].topk = (np.asarray(last, dtype=np.int64),
                                                   ids[b:b + 1])

    def _sample_seeded_first_tokens(self, batch, logits, predict) -> None:
        """A seeded sampled request's first token, drawn from its seed like every later
        one (the verifier's), so the whole output is reproducible: SGLang's sampler
        ignores seeds unless deterministic inference is on. Requests with a logit bias,
        a grammar or logprobs keep SGLang's own draw (it applied those)."""
        for b, req in enumerate(batch.reqs):
            st = self.session.requests[req.rid]
            sp = req.sampling_params
            if (st.greedy or st.seed is None or sp.logit_bias or req.grammar is not None
                    or req.return_logprob):
                continue
            probs = sampling_probs(logits[b:b + 1], *st.probs_args)[0]
            rng = np.random.default_rng([st.seed & (2**63 - 1),
                                         len(req.origin_input_ids_unpadded)])
            predict[b] = sample(probs.double().cpu().numpy(), rng)

    # ---- decode: draft, verify, commit ----------------------------------------
    def _decode(self, batch, on_publish) -> GenerationBatchResult:
        reqs = batch.reqs
        bs, N = len(reqs), self.speculative_num_draft_tokens
        trees, roots = self._draft(batch)
        step = layout(roots, trees)
        n = step.width
        # Verify input: the query rows of every request, their KV slots right after the
        # committed tokens, RoPE positions by tree depth.
        dev = self.device
        draft_tokens = torch.from_numpy(step.tokens).to(dev)
        positions = (batch.seq_lens.to(torch.int64).repeat_interleave(n)
                     + torch.from_numpy(step.depths).to(dev))
        slots = (batch.seq_lens.to(torch.int64)[:, None]
                 + torch.arange(n, device=dev)[None, :])                   # [bs, n]
        out_cache_loc = batch.req_to_token_pool.req_to_token[
            batch.req_pool_indices.to(torch.int64)[:, None], slots].reshape(-1)
        retrieve_index = torch.arange(bs * n, device=dev).view(bs, n)
        verify_input = NgramVerifyInput(
            draft_token=draft_tokens, custom_mask=torch.from_numpy(step.mask).to(dev),
            positions=positions, retrieve_index=retrieve_index,
            retrieve_next_token=torch.from_numpy(step.next_token).to(dev),
            retrieve_next_sibling=torch.from_numpy(step.next_sibling).to(dev),
            draft_token_num=n)
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = draft_tokens
        batch.out_cache_loc = out_cache_loc.to(torch.int64)
        batch.spec_info = verify_input

        # Where each request's root sits (read before SGLang advances the lengths).
        seq_lens = batch.seq_lens.tolist() if self.wants_states else None
        self.session.timer.start()
        result = self.target_worker.forward_batch_generation(batch, is_verify=True,
                                                             **self._capture)
        logits_output = result.logits_output
        logits = logits_output.next_token_logits                            # [bs * n, V]
        self._process_logits(batch, step, verify_input, logits)
        verdicts = self._verify(reqs, step, logits)
        self.session.timer.stop(bs * n)

        # SGLang's layout of the outcome: per request the accepted rows (root first) and
        # the token emitted after each.
        predict = torch.zeros(bs * n, dtype=torch.int32)
        accept_index = torch.full((bs, n), -1, dtype=torch.int32)
        accept_lens = torch.zeros(bs, dtype=torch.int32)
        hidden = logits_output.hidden_states if self.wants_states else None  # [bs * n, F]
        for b, v in enumerate(verdicts):
            rows = [0] + [node + 1 for node in v.accepted]
            accept_index[b, :len(rows)] = torch.tensor(rows, dtype=torch.int32) + b * n
            predict[torch.tensor(rows) + b * n] = torch.tensor(v.emitted, dtype=torch.int32)
            accept_lens[b] = len(rows)
            if hidden is not None:
                # Rows of the root (position seq_len) and the accepted path after it.
                idx = torch.tensor(rows, dtype=torch.long, device=hidden.device) + b * n
                self.session.queue_states(reqs[b].rid, int(seq_lens[b]),
                                          hidden.index_select(0, idx))
        predict, accept_index, accept_lens = (predict.to(dev), accept_index.to(dev),
                                              accept_lens.to(dev))
        from sglang.srt.speculative.spec_utils import move_accept_tokens_to_target_kvcache

        move_accept_tokens_to_target_kvcache(batch, accept_index, accept_lens - 1,
                                             self.token_to_kv_pool_allocator)
        if batch.return_logprob:
            from sglang.srt.layers.logprob_processor import compute_spec_logprobs

            compute_spec_logprobs(batch, logits_output, predict, accept_index=accept_index)
        new_seq_lens = batch.seq_lens + accept_lens
        if on_publish is not None:
            on_publish(new_seq_lens)
        batch.forward_mode = ForwardMode.DECODE

        # Outputs padded to SGLang's fixed stride N.
        accept_tokens = torch.zeros(bs, N, dtype=torch.int32, device=dev)
        for b, v in enumerate(verdicts):
            accept_tokens[b, :len(v.emitted)] = torch.tensor(v.emitted, dtype=torch.int32)
        accept_tokens = accept_tokens.flatten()
        return GenerationBatchResult(
            logits_output=logits_output, next_token_ids=accept_tokens,
            can_run_cuda_graph=result.can_run_cuda_graph, accept_lens=accept_lens,
            new_seq_lens=new_seq_lens,
            next_draft_input=NgramVerifyInput(draft_token_num=N, new_seq_lens=new_seq_lens,
                                              accept_tokens=accept_tokens,
                                              accept_lens=accept_lens),
            speculative_num_draft_tokens=N)

    def _draft(self, batch) -> tuple[list[DraftTree], list[int]]:
        reqs = batch.reqs
        session = self.session
        # Aborted or retracted requests are finished (a resumed request starts over).
        session.retain(r.rid for r in reqs)
        N = self.speculative_num_draft_tokens
        max_len = self.model_runner.model_config.context_len
        trees = [DraftTree.empty() for _ in reqs]
        roots, requests, idx = [], [], []
        for b, req in enumerate(reqs):
            tokens = np.fromiter(req.origin_input_ids_unpadded, dtype=np.int64,
                                 count=len(req.origin_input_ids_unpadded))
            tokens = np.concatenate([tokens, np.asarray(req.output_ids, dtype=np.int64)])
            roots.append(int(tokens[-1]))
            st = self._record(req)
            new = tokens[st.num_tokens:].tolist() if st.num_tokens else req.output_ids[-1:]
            st.num_tokens = len(tokens)
            left = req.sampling_params.max_new_tokens
            left = N if left is None else left - len(req.output_ids)
            room = min(N - 1, max_len - len(tokens) - 1, left - 1)
            dr = session.draft_request(req.rid, tokens, len(req.origin_input_ids_unpadded),
                                       list(new), room)
            if dr is not None:
                requests.append(dr)
                idx.append(b)
        for b, tree in zip(idx, session.propose(requests, len(reqs))):
            trees[b] = tree
        for b, req in enumerate(reqs):
            session.drafted(req.rid, len(trees[b]))
        return trees, roots

    def _record(self, req) -> RequestRecord:
        rec = self.session.requests.get(req.rid)
        if rec is None:
            rec = self.session.admit(req.rid, request_record(req), WHY_SKIPPED)
        return rec

    def _process_logits(self, batch, step: VerifyStep, verify_input, logits) -> None:
        """What SGLang applies to logits before sampling, on every verify row: its
        (step-start) penalties, logit bias and the grammar bitmask over the tree."""
        info = batch.sampling_info
        n = step.width
        if info.acc_additive_penalties is not None:
            logits.add_(torch.repeat_interleave(info.acc_additive_penalties, n, dim=0))
        if info.acc_scaling_penalties is not None:
            from sglang.srt.sampling.penaltylib.repetition_penalty import (
                apply_scaling_penalties)

            apply_scaling_penalties(
                logits, torch.repeat_interleave(info.acc_scaling_penalties, n, dim=0))
        if info.logit_bias is not None:
            logits.add_(torch.repeat_interleave(info.logit_bias, n, dim=0))
        if batch.has_grammar:
            from sglang.srt.speculative.spec_utils import GrammarTree, build_grammar_vocab_mask

            bs = len(batch.reqs)
            mask = build_grammar_vocab_mask(
                reqs=batch.reqs,
                tree=GrammarTree.from_host(torch.from_numpy(step.next_token),
                                           torch.from_numpy(step.next_sibling),
                                           torch.from_numpy(step.tokens).view(bs, -1)),
                sampling_info=info, device=logits.device, barrier=None)
            if mask is not None:
                mask.apply(logits)

    def _verify(self, reqs, step: VerifyStep, logits: torch.Tensor) -> list:
        """Core verifiers, per request; also keeps ``target_topk`` for the next draft."""
        n = step.width
        argmax = logits.argmax(dim=-1).view(len(reqs), n).cpu().numpy()
        topk = None
        if self.wants_topk:
            topk = logits.topk(self.session.proposer.topk, dim=-1).indices.view(len(reqs), n, -1)
            topk = topk.cpu().numpy()
        verdicts = []
        for b, req in enumerate(reqs):
            st = self.session.requests[req.rid]
            tree = step.trees[b]
            m = len(tree)
            if st.greedy:
                v = verify_greedy_ids(tree, argmax[b, :m + 1])
            else:
                probs = sampling_probs(logits[b * n:b * n + m + 1], *st.probs_args)
                rng = self.rng if st.seed is None else np.random.default_rng(
                    [st.seed & (2**63 - 1), st.num_tokens])
                v = verify_stochastic(tree, probs.double().cpu().numpy(), rng)
            verdicts.append(v)
            st.accepted = v.num_accepted
            if topk is not None:
                st.topk = (step.tokens[b * n:b * n + m + 1].copy(), topk[b, :m + 1])
        return verdicts
