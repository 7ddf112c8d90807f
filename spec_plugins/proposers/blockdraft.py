"""What the block-drafting methods (``dflash``, ``diffuspec``) share.

A block drafter proposes the next ``L`` positions in one pass; its per-position
distributions form a lattice (``spec_plugins.lattice``). :class:`BlockProposer` turns the
lattice into drafts, whatever produced it:

- greedy requests get a DDTree: the best-first tree over the lattice by path probability,
  under the node budget the adapter's verify-cost model pays for (``builders.fit_batch``
  over the whole batch); ``tree: false`` (or a request that needs a chain) gives the
  argmax chain, or the subclass's own chain search (:meth:`BlockProposer._chain`). With
  ``calibrate`` the draft probabilities are replaced by the acceptance observed for nodes
  of the same depth and probability (``calibration.Calibrator``), which is what the budget
  needs;
- sampled requests get drafts *drawn* from the temperature-scaled lattice, carried with
  their distributions so the verifiers stay lossless (chains through vLLM's rejection
  sampler, trees through the core verifier); seeded requests draw from their own seed;
- the block length follows each request's recent acceptance (DiffuSpec's ADL,
  ``lattice.AdaptiveLength``) within ``[min_block, max_block]``;
- with ``suffix``, a suffix drafter (``proposers.suffix``) drafts too and greedy requests
  verify the union of both trees (``builders.union``), the union cut by the same budget:
  the suffix tries reach repeats far past the block, the block drafts what was never
  seen before; a request whose suffix draft is expected to commit a token or more skips
  the block pass;
- the draft pass itself is priced by measurement: the method's ``parts`` are the block
  pass (with the suffix side, if on) and, with ``suffix``, the suffix side alone; the
  adapter session's payoff gate times whole cycles of each and without the method, per
  batch-size class, and runs the fastest (the verify-cost model prices only the verified
  tokens, not the drafter's forward), so a weak drafter leaves the method at its suffix
  side's speed. The drafter's per-request state still takes every committed token
  meanwhile;
- isolated requests (seeded sampling) draft from their own tokens and seed alone: past
  the gate, uncalibrated, uncut, each in a drafter pass of its own at its own block
  length, so a seeded request's draws do not depend on what else the server serves.

Subclasses produce the lattice: :meth:`BlockProposer._lattice` returns logits over the
drafter's vocabulary, with :meth:`_to_target_ids` / :meth:`_to_target_logits` mapping a
trimmed vocabulary back to the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from spec_plugins.builders import fit_batch, union
from spec_plugins.calibration import Calibrator
from spec_plugins.lattice import AdaptiveLength, greedy_tree, sampled_tree, topk_lattice
from spec_plugins.options import MethodOptions, OptionError, budget_opt, opt
from spec_plugins.proposers.base import DraftRequest, ModelInfo, Proposer, StepContext
from spec_plugins.proposers.suffix import SuffixOptions, SuffixProposer
from spec_plugins.tree import DraftTree


@dataclass(frozen=True)
class BlockOptions(MethodOptions):
    tree: bool = opt(True, help="DDTree draft trees over the block's per-position "
                                "distributions (False: chains)")
    topk: int = opt(4, lo=1, hi=1024, help="candidate tokens per block position in a tree "
                                           "(and in diffuspec's chain search)")
    max_block: int = opt(0, lo=0, hi=64, help="most positions drafted per step "
                                              "(0: the drafter's trained block)")
    min_block: int = opt(1, lo=1, hi=64, help="fewest positions drafted per step")
    adaptive: bool = opt(True, help="block length from recent acceptance (ADL); "
                                    "False: always max_block")
    calibrate: bool = opt(True, help="replace draft probabilities by the acceptance observed "
                                     "for nodes of the same depth and probability")
    sample: bool = opt(True, help="sampled requests get drafts drawn from the draft "
                                  "distributions (False: argmax drafts)")
    suffix: bool = opt(True, help="also draft from suffix tries over the request's own "
                                   "tokens and recent outputs (method suffix) and verify the "
                                   "union of both drafters' trees: long repeats the block "
                                   "cannot reach, alternatives it did not rank")
    budget: bool = budget_opt("block")

    def validate(self, where: str) -> None:
        if self.max_block and self.min_block > self.max_block:
            raise OptionError(f"{where}.min_block={self.min_block} must not exceed "
                              f"{where}.max_block={self.max_block}")


class BlockState:
    """Per-request state of a block proposer (subclasses add their drafter's)."""

    def __init__(self, adl: AdaptiveLength):
        self.adl = adl
        self.last: DraftTree | None = None
        # Calibration buckets of ``last``'s nodes (None: not a greedy lattice draft).
        self.buckets: list | None = None


# Expected accepted tokens of a request's suffix draft from which its block pass is
# skipped: the pass costs about a tenth of a step on a 2-core CPU, about what the block
# adds to a confident suffix draft (integration/RESULTS.md, issue 10, fourth run).
SUFFIX_ENOUGH = 1.0


def _bucket(depth: int, p: float) -> tuple[int, int]:
    return min(depth, 8), min(int(p * 10), 9)


class BlockProposer(Proposer):
    makes_trees = True
    parts = ("the block pass",)
    #: The longest block (set by ``bind`` from the drafter and ``max_block``).
    max_block: int = 0

    def __init__(self, options=None):
        super().__init__(options)
        self.calibrator = Calibrator()
        self._requests: dict[str, BlockState] = {}
        self._gen = torch.Generator()
        self._placeholders = np.empty(0, dtype=np.int64)
        # Chains where this method drafts chains: the union of two chains is then their
        # better one (``_with_suffix``), never a branching suffix tree.
        self._suffix = (SuffixProposer(SuffixOptions(tree=self.options.tree,
                                                     calibrate=self.options.calibrate))
                        if self.options.suffix else None)
        if self._suffix is not None:
            self.parts = ("the block pass", "the suffix side alone")

    def bind(self, model: ModelInfo) -> None:
        """Subclasses load their drafter after calling this."""
        self._placeholders = np.array(sorted(model.placeholder_token_ids), dtype=np.int64)
        if self._suffix is not None:
            self._suffix.bind(model)

    def _shareable_prefix(self, tokens: np.ndarray) -> int:
        """Length of ``tokens`` before the first image placeholder (all if none)."""
        if not len(self._placeholders):
            return len(tokens)
        hits = np.flatnonzero(np.isin(tokens, self._placeholders))
        return int(hits[0]) if len(hits) else len(tokens)

    def _set_max_block(self, trained: int) -> None:
        """Called by ``bind`` with the drafter's trained block length."""
        o = self.options
        self.max_block = o.max_block or trained
        if o.min_block > self.max_block:
            raise OptionError(f"{self.name}.min_block={o.min_block} exceeds the block length "
                              f"{self.max_block} ({self.name}.max_block or the drafter's)")

    # ---- what a subclass supplies ------------------------------------------
    def _new_state(self, req: DraftRequest) -> BlockState:
        return BlockState(self._adl())

    def _update(self, st: BlockState, req: DraftRequest, extra: Any) -> BlockState:
        """Take what the engine committed for ``req`` (``extra``: its hidden states, for
        drafters that read them); return the state to use (a fresh one to start over)."""
        return st

    def _lattice(self, reqs: Sequence[DraftRequest], states: Sequence[BlockState],
                 length: int) -> torch.Tensor:
        """Draft logits ``[B, length, Vd]`` for the next ``length`` positions."""
        raise NotImplementedError

    def _to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def _to_target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def _chain(self, req: DraftRequest, ids: np.ndarray, probs: np.ndarray) -> DraftTree | None:
        """A chain for a greedy request from the top-k lattice, or None for the argmax."""
        return None

    # ---- shared ------------------------------------------------------------
    def _adl(self) -> AdaptiveLength:
        return AdaptiveLength(self.options.min_block, self.max_block, start=self.max_block)

    def finish(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
        if self._suffix is not None:
            self._suffix.finish(req_id)

    def _learn(self, st: BlockState, req: DraftRequest) -> None:
        if st.last is None or req.num_accepted is None:
            return
        st.adl.observe(req.num_accepted)
        if st.buckets is not None and self.options.calibrate and not req.isolated:
            self.calibrator.record(st.last, st.buckets, list(req.new_tokens))
        st.last = st.buckets = None

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest], ctx: StepContext) -> list[DraftTree]:
        o = self.options
        extras = ctx.hidden_states or [None] * len(requests)
        sts, lens = [], []
        for req, extra in zip(requests, extras):
            st = self._requests.get(req.req_id) or self._new_state(req)
            st = self._requests[req.req_id] = self._update(st, req, extra)
            self._learn(st, req)
            n = st.adl.length if o.adaptive else self.max_block
            sts.append(st)
            lens.append(max(0, min(n, req.max_draft_tokens)))
        # The suffix drafter's trees, uncut (the union is cut below).
        side = (self._suffix.propose(requests, StepContext(batch_tokens=ctx.batch_tokens))
                if self._suffix is not None else [DraftTree.empty()] * len(requests))
        trees = [DraftTree.empty() for _ in requests]
        raws: list[dict | None] = [None] * len(requests)
        fixed = [r.isolated for r in requests]
        live = [i for i, n in enumerate(lens)
                if n > 0 and self._can_draft(sts[i]) and not self._suffix_suffices(side[i])]
        # Isolated requests get the block pass whatever part the (timed) gate chose.
        block_pass = ctx.part == 0
        shared = [i for i in live if block_pass and not requests[i].isolated]
        lattices = {}
        if shared:
            logits = self._lattice([requests[i] for i in shared], [sts[i] for i in shared],
                                   max(lens[i] for i in shared))
            lattices = {i: logits[row, :lens[i]] for row, i in enumerate(shared)}
        # Each isolated request in a pass of its own, of its own length: the block's
        # slots attend to each other (a longer block changes every row), and a batched
        # pass's numerics depend on its other rows.
        for i in live:
            if requests[i].isolated:
                lattices[i] = self._lattice([requests[i]], [sts[i]], lens[i])[0]
        for i, lg in lattices.items():
            req, n = requests[i], lens[i]
            lg = lg.float()                                       # [n, Vd]
            if req.temperature > 0 and o.sample:
                trees[i] = self._sampled(req, lg, n)
                fixed[i] = True   # a drawn shape is kept whole (its nodes are not ranked)
            else:
                trees[i], raws[i] = self._greedy(req, lg)
        for i, req in enumerate(requests):
            if len(side[i]) and trees[i].draft_dists is None:
                trees[i] = self._with_suffix(req, trees[i], side[i])
        trees = fit_batch(trees, ctx.cost if o.budget else None, ctx.batch_tokens, fixed=fixed)
        for st, tree, raw in zip(sts, trees, raws):
            st.last = tree if len(tree) else None
            st.buckets = None if raw is None else [
                _bucket(d, raw[(d - 1, t)]) if (d - 1, t) in raw else None
                for d, t in zip(tree.depths(), tree.tokens)]
        return trees

    @staticmethod
    def _suffix_suffices(suffix: DraftTree) -> bool:
        """The suffix draft alone is expected to commit at least ``SUFFIX_ENOUGH`` tokens
        (calibrated): a long repeat, where the block pass would cost more than it adds."""
        return len(suffix) > 0 and sum(suffix.path_probs()) >= SUFFIX_ENOUGH

    def _with_suffix(self, req: DraftRequest, block: DraftTree, suffix: DraftTree) -> DraftTree:
        """Greedy drafts of both drafters for one request: their union as a tree, or where
        the request needs a chain, the chain with the longer expected accepted length."""
        if self.options.tree and req.tree_ok:
            return union([block, suffix], req.max_draft_tokens)
        return max((block, suffix), key=lambda t: sum(t.path_probs()))

    def _can_draft(self, st: BlockState) -> bool:
        return True

    def _greedy(self, req: DraftRequest, lg: torch.Tensor) -> tuple[DraftTree, dict]:
        o = self.options
        ids, probs = topk_lattice(torch.softmax(lg, dim=-1), o.topk)
        ids = self._to_target_ids(torch.from_numpy(ids)).numpy()   # [n, k] target ids
        calibrated = o.calibrate and not req.isolated
        scores = (lambda d, p: np.array([self.calibrator.prob(_bucket(d + 1, x), x) for x in p])
                  ) if calibrated else None
        if o.tree and req.tree_ok:
            tree = greedy_tree(ids, probs, req.max_draft_tokens, scores=scores)
        else:
            tree = self._chain(req, ids, probs) or greedy_tree(
                ids[:, :1], probs[:, :1], req.max_draft_tokens, scores=scores)
        # Each lattice candidate's raw draft probability (the calibrator's buckets).
        raw = {(d, int(t)): float(p) for d in range(len(ids)) for t, p in zip(ids[d], probs[d])}
        return tree, raw

    def _sampled(self, req: DraftRequest, lg: torch.Tensor, n: int) -> DraftTree:
        o = self.options
        q = torch.softmax(self._to_target_logits(lg) / req.temperature, dim=-1)  # [n, V]
        gen = self._gen
        if req.seed is not None:
            gen = torch.Generator().manual_seed(req.seed * 1_000_003 + len(req.token_ids))
        width = 2 if (o.tree and req.tree_ok and o.topk > 1 and 2 * n <= req.max_draft_tokens) else 1
        return sampled_tree(q.cpu(), [width] + [1] * (n - 1), gen)
