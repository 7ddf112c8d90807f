"""Draft trees from a *lattice*: per-position draft distributions of a block drafter.

A block drafter (DFlash, a diffusion LM) proposes the next ``L`` positions in one pass:
position ``j``'s distribution ``q_j`` does not depend on the tokens drafted before it.
So the distribution of a node at depth ``d`` over its children is ``q_{d+1}`` whatever the
path, and:

- :func:`greedy_tree` (DDTree, Ringel & Romano 2026): best-first over the lattice by path
  probability (product of the ``q`` of the tokens along the path) under a node budget,
  with the top ``topk`` tokens of each position as the candidates; a chain is the
  ``topk = 1`` case. The builders' machinery (``builders.best_first``) does the search.
- :func:`sampled_tree`: for sampled requests, tokens *drawn* from ``q`` into a shape fixed
  before drawing (``widths[d]`` children per node at depth ``d``: siblings drawn without
  replacement, each group independently), with ``q`` kept as the nodes' draft
  distributions. Because ``q_{d+1}`` is the drafter's distribution given any path, this
  is the proposal the recursive rejection verifier needs: lossless.
- :class:`AdaptiveLength` (DiffuSpec's ADL): the next block length from the recent
  accepted lengths.
- :func:`causal_consistency_path` (DiffuSpec's CPS): the left-to-right path through the
  lattice that best agrees with a causal scorer, for drafters whose per-position
  marginals are not causally consistent on their own.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from spec_plugins.builders import best_first
from spec_plugins.tree import DraftTree


def topk_lattice(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``probs`` [L, V] -> (token ids [L, k], probabilities [L, k]), best first, on the
    host (the only copy the tree search needs: k numbers per position)."""
    p, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return ids.cpu().numpy(), p.float().cpu().numpy()


def greedy_tree(ids: np.ndarray, probs: np.ndarray, max_nodes: int,
                scores: Callable[[int, np.ndarray], np.ndarray] | None = None) -> DraftTree:
    """Best-first DDTree over a top-k lattice (``ids``, ``probs`` [L, k]); nodes come out
    in decreasing path probability (the order ``builders.fit_batch`` cuts). ``scores(d,
    p)`` may map position ``d``'s draft probabilities to acceptance estimates
    (calibration); the tree's node scores are those estimates."""
    est = probs if scores is None else np.stack([scores(d, probs[d]) for d in range(len(probs))])

    def expand(path: Sequence[int]):
        d = len(path)
        return list(zip(ids[d].tolist(), est[d].tolist())) if d < len(ids) else []

    return best_first(expand, max_nodes, max_depth=len(ids))


def sampled_tree(q: torch.Tensor, widths: Sequence[int], generator: torch.Generator | None
                 ) -> DraftTree:
    """Draw a tree from the lattice ``q`` [L, V] (rows sum to 1): ``widths[d]`` children
    under each node of depth ``d`` (the root has depth 0), drawn without replacement from
    ``q[d]``. Every node gets ``dist_rows = depth - 1`` into ``draft_dists = q``."""
    tree = DraftTree(dist_rows=[])
    level = [-1]
    for d, w in enumerate(widths[:q.shape[0]]):
        nxt = []
        for parent in level:
            toks = torch.multinomial(q[d], w, replacement=False, generator=generator)
            for t in toks.tolist():
                nxt.append(tree.add(parent, t, float(q[d, t]), dist_row=d))
        level = nxt
    tree.draft_dists = q.float().cpu().numpy()
    return tree


class AdaptiveLength:
    """DiffuSpec's adaptive draft length: an exponential average of the accepted lengths
    of recent drafts, plus ``margin`` so the length can grow when everything was
    accepted, clipped to ``[lo, hi]``."""

    def __init__(self, lo: int, hi: int, margin: int = 2, decay: float = 0.7,
                 start: int | None = None):
        self.lo, self.hi, self.margin, self.decay = lo, hi, margin, decay
        self.avg = float(hi if start is None else start) - margin

    def observe(self, accepted: int) -> None:
        self.avg = self.decay * self.avg + (1 - self.decay) * accepted

    @property
    def length(self) -> int:
        return max(self.lo, min(self.hi, round(self.avg) + self.margin))


def causal_consistency_path(ids: np.ndarray, probs: np.ndarray,
                            causal: Callable[[Sequence[int], int], float],
                            beam: int = 4, weight: float = 1.0) -> list[int]:
    """A left-to-right path through the top-k lattice (``ids``, ``probs`` [L, k]) by beam
    search on ``log q_d(x) + weight * causal(prefix, x)``, where ``causal(prefix, x)`` is
    a causal log-score of token ``x`` after the path ``prefix`` (e.g. an n-gram model of
    the request's own tokens): the marginals of a diffusion drafter are not jointly
    consistent (position 2's best token may not follow position 1's best), a causal
    scorer repairs that."""
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    for d in range(len(ids)):
        cand = []
        for s, path in beams:
            for x, p in zip(ids[d].tolist(), probs[d].tolist()):
                if p <= 0:
                    continue
                cand.append((s + math.log(p) + weight * causal(path, x), path + [x]))
        if not cand:
            break
        cand.sort(key=lambda c: -c[0])
        beams = cand[:beam]
    return beams[0][1]
