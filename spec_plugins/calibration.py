"""Online calibration of a drafter's acceptance estimates against what the target accepts.

Model-free drafters score a draft node with a statistic (a continuation's share of the
counts in a suffix trie) that is a poor estimate of the chance the target accepts it:
measured on SmolLM2-135M, suffix drafts estimated near 1 were accepted at 0.35, 0.16,
0.10 by position. Tree builders and the batch budget size drafts from these estimates,
so overconfident ones buy verify tokens that do not pay, and trees branch where they
should not.

A drafter gives each node a *bucket* (a small hashable key from its own features: the
raw estimate's bin, the match length, ...). After the step, the tokens the engine
committed say which nodes were *reached* (their parent was accepted) and which of those
were *accepted* (:func:`walk`). The calibrated estimate of a bucket is the posterior mean
of a Beta whose prior mean is the raw estimate (``prior`` pseudo-observations), with
counts capped at ``memory`` so the map follows a changing workload.
"""

from __future__ import annotations

from typing import Hashable, Sequence

from spec_plugins.tree import DraftTree


def walk(tree: DraftTree, committed: Sequence[int]) -> list[tuple[int, bool]]:
    """``(node, accepted)`` for every node the verifier reached, given the tokens it
    committed (accepted draft tokens, then the bonus token). Exact under greedy
    verification: a reached node is accepted iff its token is the committed one at its
    depth."""
    out: list[tuple[int, bool]] = []
    kids = tree.child_lists()      # kids[i + 1]: node i's children, kids[0]: the root's
    level = kids[0]
    for tok in committed:
        nxt = None
        for node in level:
            hit = tree.tokens[node] == tok
            out.append((node, hit))
            if hit:
                nxt = node
        if nxt is None:
            break
        level = kids[nxt + 1]
    return out


class Calibrator:
    def __init__(self, prior: float = 2.0, memory: float = 500.0):
        self.prior = prior
        self.memory = memory
        self._stats: dict[Hashable, list[float]] = {}   # bucket -> [accepted, reached]

    def prob(self, bucket: Hashable, raw: float) -> float:
        """Calibrated acceptance for a node in ``bucket`` whose raw estimate is ``raw``."""
        acc, n = self._stats.get(bucket, (0.0, 0.0))
        return (acc + self.prior * raw) / (n + self.prior)

    def record(self, tree: DraftTree, buckets: Sequence[Hashable],
               committed: Sequence[int]) -> None:
        """Score the previous step's ``tree`` (``buckets[i]``: node ``i``'s bucket; None:
        a node this calibrator does not score, e.g. another drafter's)."""
        for node, hit in walk(tree, committed):
            if buckets[node] is None:
                continue
            s = self._stats.setdefault(buckets[node], [0.0, 0.0])
            if s[1] >= self.memory:
                f = (self.memory - 1) / s[1]
                s[0] *= f
                s[1] *= f
            s[0] += hit
            s[1] += 1

    def rates(self) -> dict[Hashable, tuple[float, int]]:
        """Per bucket: observed acceptance rate and (decayed) number of observations."""
        return {b: (a / n, int(n)) for b, (a, n) in self._stats.items() if n}
