"""The drafter vLLM's model runner builds for ``spec_plugins.vllm.<method>``.

It translates the runner's batch (rows of ``InputBatch``) into core
:class:`~spec_plugins.proposers.base.DraftRequest` objects, calls the method's proposer
and hands vLLM back each draft's nodes as the request's speculative tokens. Chains are
verified by vLLM's own rejection sampler, which for chains from a deterministic drafter
is the lossless verifier of ``spec_plugins.verify`` (greedy: longest prefix equal to the
target argmax; sampling: accept with p(x), resample from the residual). Branching trees
are remembered here (``pending_trees``) and verified in the next step by the tree
machinery of ``tree_step.py``. Both are counted in ``vllm:spec_decode_*``.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch

from spec_plugins.cost import CostModel
from spec_plugins.proposers import proposer_class
from spec_plugins.proposers.base import DraftRequest, StepContext
from spec_plugins.tree import DraftTree
from spec_plugins.vllm.config import settings_from
from spec_plugins.vllm.version import logger


# Prior slope of the step-time curve, as a fraction of a one-token step per extra query
# token (float32 on a CPU: ~0.1); online calibration replaces it within a few steps.
PRIOR_PER_TOKEN = 0.1


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


class VllmDrafter:
    method: str = ""

    def __init__(self, vllm_config):
        from spec_plugins.vllm import patches

        patches.install_runner_hook()  # raises on an unsupported vLLM
        settings = settings_from(vllm_config)
        assert settings is not None and settings.method == self.method
        self.k = settings.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.proposer = proposer_class(self.method)(settings.options)
        self.proposer.logger = logger
        missing = set(self.proposer.needs) - {"target_topk", "target_model"}
        if missing:
            raise NotImplementedError(
                f"spec_plugins method {self.method!r} needs {sorted(missing)}, "
                "which the vLLM adapter does not supply yet")
        self.wants_topk = "target_topk" in self.proposer.needs
        self.wants_model = "target_model" in self.proposer.needs
        self.target_model = None
        self.vllm_config = vllm_config
        self.trees = bool(self.proposer.makes_trees)
        if self.trees:
            patches.install_tree_hooks()
        # Trees drafted last step, verified by tree_step in this one (req_id -> tree).
        self.pending_trees: dict[str, DraftTree] = {}
        self.tree_stats = TreeStats()
        self.rng = np.random.default_rng()
        self._topk: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._active: set[str] = set()
        self._last_len: dict[str, int] = {}
        # req_id -> (why it is never drafted for, or None; whether it is seeded;
        #            whether a branching tree can be verified for it)
        self._req_info: dict[str, tuple[str | None, bool, bool]] = {}
        self._logged_reasons: set[str] = set()
        self.cost: CostModel | None = None
        self._t_last: float | None = None
        logger.info("spec_plugins: method %s, up to %d draft tokens per step, options %s",
                    self.method, self.k, settings.options)

    # custom_class protocol -------------------------------------------------
    def load_model(self, target_model=None, *args, **kwargs) -> None:
        """vLLM passes the loaded target; self-speculative methods draft with it."""
        if self.wants_model:
            from spec_plugins.vllm.target_model import VllmTargetModel

            self.target_model = VllmTargetModel(target_model, self.vllm_config)

    def propose(self, *args, **kwargs):
        raise RuntimeError("spec_plugins drafters are driven through the runner hook "
                           "(spec_plugins.vllm.patches); it was not installed")

    # driven by patches.install_runner_hook ---------------------------------
    def _classify(self, runner, req_id: str) -> tuple[str | None, bool, bool]:
        """Read a request's sampling parameters once: why it must not be drafted for
        (options our drafts cannot honour, else None), whether it is seeded, and whether
        it may get a branching tree: vLLM applies penalties, bad words, min_tokens,
        grammars and logprobs to draft positions as if they were a chain, so such
        requests get chains."""
        if req_id not in self._req_info:
            state = runner.requests.get(req_id)
            sp = getattr(state, "sampling_params", None)
            seeded = bool(sp is not None and sp.seed is not None and sp.temperature > 0)
            reason = None
            if sp is not None and sp.min_p and sp.min_p > 0:
                reason = "min_p"
            elif sp is not None and sp.logit_bias:
                reason = "logit_bias"
            tree_ok = self.trees and sp is not None and not (
                sp.presence_penalty or sp.frequency_penalty
                or (sp.repetition_penalty and sp.repetition_penalty != 1.0)
                or sp.logprobs is not None or sp.bad_words or sp.min_tokens
                or getattr(sp, "structured_outputs", None) is not None)
            self._req_info[req_id] = (reason, seeded, tree_ok)
            if reason and reason not in self._logged_reasons:
                self._logged_reasons.add(reason)
                logger.info("spec_plugins: requests with %s are served without speculation "
                            "(vLLM's rejection sampler does not apply it to draft tokens)", reason)
        return self._req_info[req_id]

    def _calibrate(self, scheduler_output) -> None:
        """Time from the end of one drafting call to the start of the next = one engine
        step of the tokens it scheduled."""
        now = time.perf_counter()
        n = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)
        if self._t_last is not None and n > 0:
            dt = now - self._t_last
            if self.cost is None:
                t1 = dt / (1 + PRIOR_PER_TOKEN * (n - 1))
                self.cost = CostModel.linear(t1, PRIOR_PER_TOKEN * t1, max_n=4096)
            elif dt < 3 * self.cost.time(n):  # longer gaps are idle time, not compute
                self.cost.observe(n, dt)
        self._t_last = now

    def propose_for_runner(self, runner, scheduler_output, sampled_token_ids) -> list[list[int]]:
        self._calibrate(scheduler_output)
        batch = runner.input_batch
        k = getattr(scheduler_output, "num_spec_tokens_to_schedule", 0) or self.k
        k = min(k, self.k)
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        requests, rows = [], []
        seen = set()
        for i, sampled in enumerate(sampled_token_ids):
            req_id = batch.req_ids[i]
            seen.add(req_id)
            if not sampled:
                continue  # partial prefill: nothing committed yet
            n = int(batch.num_tokens_no_spec[i])
            room = min(k, self.max_model_len - n - 1)
            if room <= 0:
                continue
            skip_reason, seeded, tree_ok = self._classify(runner, req_id)
            if skip_reason:
                continue
            last = self._last_len.get(req_id)
            requests.append(DraftRequest(
                req_id=req_id,
                token_ids=batch.token_ids_cpu[i, :n],
                num_prompt_tokens=int(batch.num_prompt_tokens[i]),
                new_tokens=sampled,
                max_draft_tokens=room,
                num_accepted=None if not last else len(sampled) - 1,
                isolated=seeded,
                tree_ok=tree_ok,
            ))
            rows.append(i)
        for req_id in self._active - seen:
            self._finish(req_id)
        self._active = seen
        self.pending_trees.clear()
        if requests:
            ctx = StepContext(cost=self.cost, batch_tokens=len(sampled_token_ids))
            if self.wants_topk:
                ctx.target_topk = [self._topk.get(r.req_id) for r in requests]
            if self.wants_model:
                self.target_model.bind(runner, {r.req_id: i for r, i in zip(requests, rows)})
                ctx.target_model = self.target_model
            for i, req, tree in zip(rows, requests, self.proposer.propose(requests, ctx)):
                if len(tree) > req.max_draft_tokens:
                    raise RuntimeError(
                        f"spec_plugins method {self.method!r} drafted {len(tree)} tokens "
                        f"for a request allowed {req.max_draft_tokens}")
                if not tree.is_chain:
                    if not req.tree_ok:
                        raise RuntimeError(
                            f"spec_plugins method {self.method!r} returned a tree for a "
                            "request that needs a chain (DraftRequest.tree_ok is False)")
                    self.pending_trees[req.req_id] = tree
                drafts[i] = list(tree.tokens)
        self._topk.clear()
        for i, req_id in enumerate(batch.req_ids[:len(drafts)]):
            self._last_len[req_id] = len(drafts[i])
        # The next step's time is measured from here: drafting is not part of it.
        self._t_last = time.perf_counter()
        return drafts

    def observe_logits(self, runner, logits, spec_decode_metadata) -> None:
        """Keep the target's top-k next tokens at every position it just scored, with
        the token at that position, per request (``StepContext.target_topk``). Rows are
        the root and every draft node of a request, or its last scheduled token."""
        if logits is None:
            return
        num_reqs = runner.input_batch.num_reqs
        if spec_decode_metadata is not None:
            idx = spec_decode_metadata.logits_indices
            counts = [n + 1 for n in spec_decode_metadata.num_draft_tokens]
        else:
            idx = torch.from_numpy(runner.query_start_loc.np[1:num_reqs + 1] - 1)
            counts = [1] * num_reqs
        ids = logits[: len(idx)].topk(self.proposer.topk, dim=-1).indices.cpu().numpy()
        tokens = runner.input_ids.gpu[idx].cpu().numpy()
        start = 0
        for req_id, n in zip(runner.input_batch.req_ids, counts):
            self._topk[req_id] = (tokens[start:start + n], ids[start:start + n])
            start += n

    def _finish(self, req_id: str) -> None:
        self.proposer.finish(req_id)
        self._last_len.pop(req_id, None)
        self._req_info.pop(req_id, None)


@functools.cache
def drafter_class(method: str) -> type[VllmDrafter]:
    return type(method, (VllmDrafter,), {"method": method, "__module__": __name__,
                                         "__qualname__": method})
