"""Verifiers: from target scores at the tree's nodes to the accepted path and bonus token.

Row convention for ``target`` arrays (logits or probabilities), ``[len(tree) + 1, vocab]``:
row 0 is the target's prediction at the root (the last committed token), row ``i + 1``
its prediction after node ``i``. Both verifiers return a :class:`Verdict`: the accepted
node indices (a root-to-node path) and the bonus token sampled or chosen after the last
accepted node. The tokens a request gains in the step are ``accepted_tokens + [bonus]``.

- :func:`verify_greedy`: follow the child whose token is the target's argmax. The result
  is token for token what non-speculative greedy decoding produces.
- :func:`verify_stochastic`: recursive rejection sampling over siblings. At a node with
  target distribution ``p`` the children are tried in order; child ``x`` with proposal
  ``q`` is accepted with probability ``min(1, p(x) / q(x))``; on rejection
  ``p <- norm(max(0, p - q))`` and, for sampled drafts, ``q`` loses ``x`` (siblings are
  drawn without replacement). Deterministic drafts use one-hot ``q``. When no child is
  accepted the bonus is drawn from the residual ``p``. The emitted tokens are then
  distributed exactly as sampling from the target (Leviathan et al. 2023 for chains;
  Jeon et al. 2024, recursive speculative decoding, for trees).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spec_plugins.tree import DraftTree


@dataclass(frozen=True)
class Verdict:
    accepted: list[int]          # node indices, root to leaf
    accepted_tokens: list[int]
    bonus_token: int

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)

    @property
    def emitted(self) -> list[int]:
        return self.accepted_tokens + [self.bonus_token]


def _check_rows(tree: DraftTree, target: np.ndarray) -> None:
    if target.ndim != 2 or target.shape[0] != len(tree) + 1:
        raise ValueError(
            f"target scores must be [len(tree) + 1, vocab] = [{len(tree) + 1}, V], "
            f"got {list(target.shape)}"
        )


def verify_greedy(tree: DraftTree, target_logits: np.ndarray) -> Verdict:
    target_logits = np.asarray(target_logits)
    _check_rows(tree, target_logits)
    return verify_greedy_ids(tree, target_logits.argmax(axis=-1))


def verify_greedy_ids(tree: DraftTree, argmax: "np.ndarray | list[int]") -> Verdict:
    """:func:`verify_greedy` from the target's argmax at the root and every node
    (``len(tree) + 1`` token ids), for engines that reduce logits on the device."""
    if len(argmax) != len(tree) + 1:
        raise ValueError(f"need {len(tree) + 1} argmax ids, got {len(argmax)}")
    children = tree.child_lists()
    node, accepted = -1, []
    while True:
        want = int(argmax[node + 1])
        nxt = next((c for c in children[node + 1] if tree.tokens[c] == want), None)
        if nxt is None:
            return Verdict(accepted, [tree.tokens[i] for i in accepted], want)
        accepted.append(nxt)
        node = nxt


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from ``p`` (unnormalised weights)."""
    c = np.cumsum(p, dtype=np.float64)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def verify_stochastic(
    tree: DraftTree, target_probs: np.ndarray, rng: np.random.Generator
) -> Verdict:
    """``target_probs`` are the target's sampling distributions (after temperature,
    top-k/top-p) at the root and every node."""
    target_probs = np.asarray(target_probs, dtype=np.float64)
    _check_rows(tree, target_probs)
    children = tree.child_lists()
    node, accepted = -1, []
    while True:
        p = target_probs[node + 1].copy()
        q_row = None
        nxt = None
        for c in children[node + 1]:
            x = tree.tokens[c]
            if tree.dist_rows is None:
                # One-hot proposal: accept with p(x); residual removes x.
                if rng.random() < p[x] / p.sum():
                    nxt = c
                    break
                p[x] = 0.0
            else:
                if q_row is None:
                    q_row = np.asarray(tree.draft_dists[tree.dist_rows[c]], dtype=np.float64).copy()
                pn = p / p.sum()
                qn = q_row / q_row.sum()
                if qn[x] > 0 and rng.random() * qn[x] < pn[x]:
                    nxt = c
                    break
                p = np.maximum(pn - qn, 0.0)
                q_row[x] = 0.0
            if p.sum() <= 0.0:
                # Can only happen through rounding when p was (nearly) one-hot on x.
                p = target_probs[node + 1].copy()
        if nxt is None:
            return Verdict(accepted, [tree.tokens[i] for i in accepted], sample(p, rng))
        accepted.append(nxt)
        node = nxt
