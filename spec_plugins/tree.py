"""Draft trees: the one data model every proposer returns and every verifier reads.

A draft tree hangs below the request's last committed token (the *root*, which is not
part of the tree). Nodes are stored in topological order (a parent always precedes its
children), so index order is a valid order to schedule them as query tokens and the
attention mask of a node is "prefix + its ancestors". A chain is the special case where
node ``i``'s parent is ``i - 1``.

Per node the tree keeps:
- ``tokens[i]``: the drafted token id.
- ``parents[i]``: index of the parent node, ``-1`` for children of the root.
- ``scores[i]``: the drafter's confidence that the node is reached *given its parent*
  (count ratio for model-free drafters, draft probability for model drafters). Tree
  builders and adaptive controllers read it; verification never trusts it.
- ``dist_rows[i]`` (optional, with ``draft_dists``): for drafts *sampled* from a draft
  distribution q, the row of ``draft_dists`` holding the q at the node's parent that
  the node's token was drawn from (siblings share a row, drawn without replacement).
  Deterministic drafters (suffix trees, n-grams, argmax) leave it unset: for
  verification their drafts are one-hot proposals, which keeps rejection sampling exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    dist_rows: list[int] | None = None
    draft_dists: np.ndarray | None = None  # [num_rows, vocab] float, rows sum to 1

    # ---- construction -------------------------------------------------
    @classmethod
    def chain(cls, tokens: Sequence[int], scores: Sequence[float] | None = None) -> "DraftTree":
        tokens = [int(t) for t in tokens]
        return cls(
            tokens=tokens,
            parents=list(range(-1, len(tokens) - 1)),
            scores=[1.0] * len(tokens) if scores is None else [float(s) for s in scores],
        )

    @classmethod
    def empty(cls) -> "DraftTree":
        return cls()

    def add(self, parent: int, token: int, score: float = 1.0, dist_row: int | None = None) -> int:
        """Append a node under ``parent`` (-1 = root) and return its index."""
        if not -1 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} out of range for a tree of {len(self.tokens)} nodes")
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        self.scores.append(float(score))
        if dist_row is not None or self.dist_rows is not None:
            if self.dist_rows is None or dist_row is None:
                raise ValueError("either every node or no node of a tree has a dist_row")
            self.dist_rows.append(int(dist_row))
        return len(self.tokens) - 1

    def prefix(self, k: int) -> "DraftTree":
        """The first ``k`` nodes (a tree again: parents precede children)."""
        if k >= len(self.tokens):
            return self
        return DraftTree(self.tokens[:k], self.parents[:k], self.scores[:k],
                         None if self.dist_rows is None else self.dist_rows[:k],
                         self.draft_dists)

    def without_tokens(self, banned: frozenset[int] | set[int]) -> "DraftTree":
        """The tree without the nodes that carry a ``banned`` token and their subtrees
        (node order kept). A sampled tree (``dist_rows``) is cut before its first banned
        node instead: its later siblings were drawn without replacement after it, and
        dropping it alone would change the proposal the verifier assumes."""
        first = next((i for i, t in enumerate(self.tokens) if t in banned), None)
        if first is None:
            return self
        if self.dist_rows is not None:
            return self.prefix(first)
        out = DraftTree()
        new_index: dict[int, int] = {}
        for i, (t, p, s) in enumerate(zip(self.tokens, self.parents, self.scores)):
            if t not in banned and (p < 0 or p in new_index):
                new_index[i] = out.add(new_index[p] if p >= 0 else -1, t, s)
        return out

    # ---- queries ------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (-1 = root) in index order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def child_lists(self) -> list[list[int]]:
        """Children of every node; entry 0 is the root's, entry i+1 node i's."""
        out: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out

    def depths(self) -> list[int]:
        """Depth of every node; children of the root have depth 1."""
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p < 0 else d[p] + 1)
        return d

    def path_probs(self) -> list[float]:
        """Per node, the product of scores from the root down to it: the drafter's
        estimate that the node is accepted (for a chain, of the prefix up to it)."""
        pp: list[float] = []
        for p, s in zip(self.parents, self.scores):
            pp.append(s * (pp[p] if p >= 0 else 1.0))
        return pp

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node``."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def token_paths(self) -> list[tuple[int, ...]]:
        """Per node, the draft tokens from the root's child down to it."""
        paths: list[tuple[int, ...]] = []
        for p, t in zip(self.parents, self.tokens):
            paths.append((paths[p] if p >= 0 else ()) + (t,))
        return paths

    def ancestor_mask(self) -> np.ndarray:
        """``[n, n]`` bool: ``mask[i, j]`` is True when node j is node i or an ancestor of it."""
        n = len(self.tokens)
        mask = np.zeros((n, n), dtype=bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError when the tree breaks an invariant the verifiers rely on."""
        n = len(self.tokens)
        if len(self.parents) != n or len(self.scores) != n:
            raise ValueError("tokens, parents and scores must have one entry per node")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: nodes must follow their parent")
        for kids in self.child_lists():
            toks = [self.tokens[k] for k in kids]
            if len(set(toks)) != len(toks):
                raise ValueError("siblings must carry distinct tokens")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.tokens):
            raise ValueError(f"a draft token is outside the vocabulary [0, {vocab_size})")
        if self.dist_rows is not None:
            if self.draft_dists is None or len(self.dist_rows) != n:
                raise ValueError("dist_rows needs draft_dists and one row per node")
            d = np.asarray(self.draft_dists)
            if d.ndim != 2 or any(not 0 <= r < d.shape[0] for r in self.dist_rows):
                raise ValueError("dist_rows must index rows of a [rows, vocab] draft_dists")
            if vocab_size is not None and d.shape[1] != vocab_size:
                raise ValueError(f"draft_dists has {d.shape[1]} columns, the vocabulary "
                                 f"{vocab_size}")
            if not np.isfinite(d).all() or (d < 0).any():
                raise ValueError("draft_dists has NaN, inf or negative entries")
            if not np.allclose(d.sum(-1), 1.0, atol=1e-3):
                raise ValueError("draft_dists rows must sum to 1")
