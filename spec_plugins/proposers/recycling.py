"""Token Recycling (Luo et al. 2024): draft from the target's own past top-k candidates.

Every verify pass computes the target's distribution after every draft node, accepted
or not, and throws most of it away. Token recycling keeps, per token id, the target's
top-k next tokens the last time that token was verified (an adjacency table: newer
entries overwrite older ones, whatever the context was; within one step, positions on
the path the request committed win over rejected branches). A draft needs no model:
from the request's last token, a node's children are the table successors of its
token, and the tree grows best first (``builders.best_first``) on per-rank acceptance
estimates; the whole batch is cut to the draft tokens that pay for their verify time
(``builders.fit_batch``).

Acceptance estimates: each step, before the table takes the new verify results, every
newly committed token is looked up in its predecessor's row; how often rank ``j`` held
the token estimates the chance that a child at rank ``j`` is accepted (a smoothed
frequency starting from a prior that decays with rank). Measured on the committed
stream, that is the conditional acceptance of a reached node, as the builders want.
The estimates are the ``scores`` of the tree's nodes.

The table is shared by all requests: that is the point of the method (candidates
recycled across requests). Requests marked ``isolated`` draft from a private table
built from their own verify passes only (with their own estimates), dropped when they
finish; their passes also feed the shared table, as any finished output feeds the
suffix method's global cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from spec_plugins.builders import best_first, fit_batch
from spec_plugins.options import MethodOptions, budget_opt, opt
from spec_plugins.proposers.base import DraftRequest, Proposer, StepContext
from spec_plugins.tree import DraftTree

# Prior acceptance of the successor at rank j, worth _PRIOR_WEIGHT observations.
_PRIOR_TOP = 0.4
_PRIOR_DECAY = 0.5
_PRIOR_WEIGHT = 8.0


class SuccessorTable:
    """``rows[t]``: the target's top-k next tokens after token ``t`` (best first, -1
    where nothing is known), int32, grown on demand past the largest token id seen
    (about vocab x k x 4 bytes: 4.8 MB for a 150k vocabulary at k = 8; an isolated
    request's private table is as large as the ids it has seen)."""

    def __init__(self, k: int):
        self.k = k
        self.rows = np.full((0, k), -1, dtype=np.int32)
        # Per rank: how often a committed token was that successor of its predecessor,
        # out of `lookups` predecessors with a row.
        self.hits = np.zeros(k, dtype=np.float64)
        self.lookups = 0

    def _grow(self, max_token: int) -> None:
        if max_token < len(self.rows):
            return
        # Whole 4096-row blocks: few copies (token ids soon span the vocabulary), and
        # never more than a block beyond the largest id.
        rows = np.full((-(-(max_token + 1) // 4096) * 4096, self.k), -1, dtype=np.int32)
        rows[:len(self.rows)] = self.rows
        self.rows = rows

    def observe(self, prev: np.ndarray, nxt: np.ndarray) -> None:
        """Score the table on committed pairs: token ``nxt[i]`` followed ``prev[i]``."""
        prev, nxt = prev[prev < len(self.rows)], nxt[prev < len(self.rows)]
        rows = self.rows[prev]
        known = rows[:, 0] >= 0
        self.hits += (rows[known] == nxt[known, None]).sum(axis=0)
        self.lookups += int(known.sum())

    def update(self, tokens: np.ndarray, topk: np.ndarray) -> None:
        """``tokens [m]``, ``topk [m, k]`` (int, -1 = none): the target's successors
        after each token, best first; later rows win for repeated tokens."""
        if not len(tokens):
            return
        self._grow(int(max(tokens.max(), topk.max())))
        # Last occurrence of each token (fancy assignment does not promise which wins).
        last = len(tokens) - 1 - np.unique(tokens[::-1], return_index=True)[1]
        self.rows[tokens[last]] = topk[last]

    def successors(self, token: int) -> np.ndarray:
        """Known successors of ``token``, best first (may be empty)."""
        if not 0 <= token < len(self.rows):
            return self.rows[:0, 0]
        row = self.rows[token]
        return row[row >= 0]

    def rank_probs(self) -> np.ndarray:
        """Estimated acceptance of the successor at each rank."""
        prior = _PRIOR_TOP * _PRIOR_DECAY ** np.arange(self.k)
        return (self.hits + _PRIOR_WEIGHT * prior) / (self.lookups + _PRIOR_WEIGHT)


def _learn(table: SuccessorTable, steps) -> None:
    """Feed ``table`` one step of requests: ``(prev, next, tokens, ids)`` each, the
    committed pairs and the verified positions with the target's top-k after them."""
    prev, nxt, tokens, ids = (np.concatenate(x) for x in zip(*steps))
    # Score the table before it learns this step: the drafts it made did not know it.
    table.observe(prev, nxt)
    # Within a step every position is equally new; those on a committed path (the
    # token and the target's choice after it are a committed pair) go last and win
    # over rejected branches, whose contexts no request took.
    on_path = np.isin(tokens << 32 | ids[:, 0], prev << 32 | nxt)
    order = np.argsort(on_path, kind="stable")
    table.update(tokens[order], ids[order])


@dataclass(frozen=True)
class RecyclingOptions(MethodOptions):
    topk: int = opt(8, lo=1, hi=32, help="successors kept per token (the target's top-k)")
    tree: bool = opt(True, help="draft trees over all ranks (False: chains of rank-0 successors)")
    max_depth: int = opt(8, lo=1, hi=64, help="deepest draft node")
    min_token_prob: float = opt(0.02, lo=0.0, hi=1.0,
                                help="drop nodes whose estimated acceptance falls below")
    budget: bool = budget_opt("tree")



class RecyclingProposer(Proposer):
    name = "recycling"
    needs = frozenset({"target_topk"})
    makes_trees = True
    Options = RecyclingOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.topk = self.options.topk
        self.table = SuccessorTable(self.topk)
        self._private: dict[str, SuccessorTable] = {}   # isolated requests' tables

    def finish(self, req_id: str) -> None:
        self._private.pop(req_id, None)

    def _learn(self, requests: Sequence[DraftRequest], ctx: StepContext) -> None:
        steps = []
        for req, entry in zip(requests, ctx.target_topk or [None] * len(requests)):
            # The tokens committed last step, each with its predecessor.
            seq = np.asarray(req.token_ids, dtype=np.int64)
            n = max(0, min(len(req.new_tokens), len(seq) - 1))
            step = (seq[len(seq) - n - 1:-1], seq[len(seq) - n:], *self._verified(entry))
            steps.append(step)
            if req.isolated:
                private = self._private.get(req.req_id)
                if private is None:
                    private = self._private[req.req_id] = SuccessorTable(self.topk)
                _learn(private, [step])
        if steps:
            _learn(self.table, steps)

    def _verified(self, entry) -> tuple[np.ndarray, np.ndarray]:
        """One request's ``target_topk`` entry as int64 ``tokens [m]``, ``ids [m, topk]``."""
        if entry is None:
            return np.empty(0, np.int64), np.empty((0, self.topk), np.int64)
        tokens = np.asarray(entry[0], dtype=np.int64).reshape(-1)
        ids = np.asarray(entry[1], dtype=np.int64).reshape(len(tokens), -1)[:, :self.topk]
        if ids.shape[1] < self.topk:
            ids = np.pad(ids, ((0, 0), (0, self.topk - ids.shape[1])), constant_values=-1)
        return tokens, ids

    def propose(self, requests: Sequence[DraftRequest], ctx: StepContext) -> list[DraftTree]:
        self._learn(requests, ctx)
        drafts = [self._draft(req) for req in requests]
        # best_first lists nodes in decreasing path probability, as fit_batch needs.
        return fit_batch(drafts, ctx.cost if self.options.budget else None, ctx.batch_tokens,
                         [r.isolated for r in requests])

    def _draft(self, req: DraftRequest) -> DraftTree:
        o: RecyclingOptions = self.options
        if req.max_draft_tokens <= 0 or not len(req.token_ids):
            return DraftTree.empty()
        table = self._private[req.req_id] if req.isolated else self.table
        probs = table.rank_probs().tolist()
        branches = o.topk if o.tree and req.tree_ok else 1  # chains follow rank 0
        last = int(req.token_ids[-1])

        def expand(path: Sequence[int]) -> list[tuple[int, float]]:
            succ = table.successors(path[-1] if path else last)[:branches].tolist()
            return list(zip(succ, probs))

        return best_first(expand, req.max_draft_tokens, min_path_prob=o.min_token_prob,
                          max_depth=o.max_depth)
