"""Tree builders: grow a draft tree from a drafter's per-node candidate distributions.

A drafter exposes ``expand(path) -> [(token, prob), ...]``: the continuations it
proposes after the root followed by the draft tokens in ``path``, with its estimate of
each one's acceptance probability given the path. The *path probability* of a node (the
product along its path) is then the chance it is accepted, and the expected accepted
length of a tree is the sum of its nodes' path probabilities.

- :func:`best_first` (OPT-Tree): nodes in decreasing path probability. Because a path
  probability never exceeds its parent's, the first ``k`` nodes form the tree of ``k``
  nodes with the largest expected accepted length; with a :class:`~spec_plugins.cost.
  CostModel` the size ``k`` is the one that maximises tokens per second of verify time.
- :func:`eagle2` (EAGLE-2): expand the ``top_k`` best nodes of each depth by their
  top-``top_k`` candidates for ``depth`` levels, then keep the best ``total_tokens``
  nodes by path probability.
- :func:`union`: one tree holding every path of several drafters' trees (e.g. a block
  drafter's DDTree and a suffix trie's), nodes in decreasing path probability.
- :func:`fit_batch`: cut the trees of a whole batch (nodes in decreasing path
  probability, as :func:`best_first` returns them) to the draft tokens that pay for
  their verify time (:func:`~spec_plugins.budget.allocate`).
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

from spec_plugins.budget import allocate
from spec_plugins.cost import CostModel
from spec_plugins.tree import DraftTree

Expand = Callable[[Sequence[int]], Sequence[tuple[int, float]]]


def _tree_from(nodes: list[tuple[float, int, int, float]]) -> DraftTree:
    """``nodes``: (path_prob, parent_key, token, prob) with parent before child,
    keyed by position in the list (-1 = root)."""
    tree = DraftTree()
    for _, parent, token, prob in nodes:
        tree.add(parent, token, prob)
    return tree


def best_first(expand: Expand, max_nodes: int, cost: CostModel | None = None,
               min_path_prob: float = 0.0, max_depth: int = 64) -> DraftTree:
    picked: list[tuple[float, int, int, float]] = []
    paths: list[tuple[int, ...]] = []
    heap: list[tuple[float, int, int, int, float]] = []  # (-pp, tiebreak, parent, token, p)
    counter = 0

    def push_children(parent: int, path: tuple[int, ...], pp: float) -> None:
        nonlocal counter
        if len(path) >= max_depth:
            return
        for token, p in expand(path):
            if p > 0 and pp * p >= min_path_prob:
                heapq.heappush(heap, (-pp * p, counter, parent, int(token), float(p)))
                counter += 1

    push_children(-1, (), 1.0)
    while heap and len(picked) < max_nodes:
        neg_pp, _, parent, token, p = heapq.heappop(heap)
        picked.append((-neg_pp, parent, token, p))
        path = (paths[parent] if parent >= 0 else ()) + (token,)
        paths.append(path)
        push_children(len(picked) - 1, path, -neg_pp)
    if cost is not None and picked:
        # Picked in decreasing path probability: the size is a one-request budget.
        picked = picked[:allocate([[pp for pp, *_ in picked]], 1, 1, cost)[0]]
    return _tree_from(picked)


def fit_batch(trees: Sequence[DraftTree], cost: CostModel | None, batch_tokens: int,
              fixed: Sequence[bool] | None = None) -> list[DraftTree]:
    """Cut each request's tree to its share of the batch's draft budget. Each tree's
    nodes must be in decreasing path probability (then every kept prefix is a tree and
    the gains are non-increasing, as ``allocate`` requires); ``batch_tokens`` are the
    tokens the step computes anyway, one output each. No cost model: trees as given.
    ``fixed[i]``: keep tree ``i`` as built (isolated requests: their drafts must not
    depend on timing or on other requests, or seeded sampling is not reproducible)."""
    if cost is None:
        return list(trees)
    fixed = fixed or [False] * len(trees)
    gains = [[] if f else t.path_probs() for t, f in zip(trees, fixed)]
    keep = allocate(gains, batch_tokens, batch_tokens, cost)
    return [t if f else t.prefix(k) for t, k, f in zip(trees, keep, fixed)]


def union(trees: Sequence[DraftTree], max_nodes: int) -> DraftTree:
    """Every path of ``trees`` (deterministic drafts: no ``draft_dists``) in one tree of at
    most ``max_nodes`` nodes, in decreasing path probability (the order ``fit_batch``
    cuts). A path drafted by several trees takes the highest of their scores: each is an
    estimate of the same acceptance, and the union is at least as good as any one of
    them."""
    score: dict[tuple[int, ...], float] = {}
    for t in trees:
        for path, s in zip(t.token_paths(), t.scores):
            score[path] = max(score.get(path, 0.0), s)
    pp: dict[tuple[int, ...], float] = {}
    for path in sorted(score, key=len):
        pp[path] = score[path] * pp.get(path[:-1], 1.0)
    # Scores are at most 1, so a child never outranks its parent; on a tie the
    # shorter path (the parent) comes first.
    order = sorted(score, key=lambda path: (-pp[path], len(path)))[:max_nodes]
    index: dict[tuple[int, ...], int] = {(): -1}
    out = DraftTree()
    for path in order:
        index[path] = out.add(index[path[:-1]], path[-1], score[path])
    return out


def eagle2(expand: Expand, top_k: int, depth: int, total_tokens: int) -> DraftTree:
    # Every candidate ever generated: (path_prob, parent index in `cands`, token, prob).
    cands: list[tuple[float, int, int, float]] = []
    paths: list[tuple[int, ...]] = []
    frontier = [(-1, (), 1.0)]
    for _ in range(depth):
        new = []
        for parent, path, pp in frontier:
            best = sorted(expand(path), key=lambda c: -c[1])[:top_k]
            for token, p in best:
                cands.append((pp * p, parent, int(token), float(p)))
                paths.append(path + (int(token),))
                new.append((len(cands) - 1, paths[-1], pp * p))
        new.sort(key=lambda x: -x[2])
        frontier = new[:top_k]
        if not frontier:
            break
    # Rerank: the best `total_tokens` by path probability (ancestors always rank at
    # least as high as descendants, so the kept set is a tree); ties keep index order.
    keep = sorted(range(len(cands)), key=lambda i: (-cands[i][0], i))[:total_tokens]
    keep.sort()
    remap = {-1: -1}
    out = []
    for i in keep:
        pp, parent, token, p = cands[i]
        if parent not in remap:
            continue  # parent lost a tie at the cut: drop the orphan
        remap[i] = len(out)
        out.append((pp, remap[parent], token, p))
    return _tree_from(out)
