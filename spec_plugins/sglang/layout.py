"""Draft trees laid out as SGLang's verify input (engine-free host arrays).

Per request ``n`` query rows: row 0 is the last committed token (the root), rows
``1..len(tree)`` the tree's nodes in order, the rest padding (children of the root that
see only the root and themselves, and that nobody reads). ``mask[i, j]``: row ``i`` sees
row ``j`` (the ``n x n`` tree part; every row also sees the committed prefix). Depths give
RoPE positions ``seq_len + depth``; ``next_token`` / ``next_sibling`` are SGLang's
first-child / next-sibling links (``retrieve_next_token`` / ``retrieve_next_sibling``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spec_plugins.tree import DraftTree


@dataclass
class VerifyStep:
    """One step's trees laid out as SGLang's verify input (host arrays)."""
    trees: list[DraftTree]
    width: int                                   # n: rows per request
    tokens: np.ndarray                           # [bs * n] int64
    mask: np.ndarray                             # [bs * n * n] bool: row i sees row j
    depths: np.ndarray                           # [bs * n] int64 (root 0)
    next_token: np.ndarray                       # [bs, n] first child row, -1 none
    next_sibling: np.ndarray                     # [bs, n] next sibling row, -1 none
    rows: list[np.ndarray] = field(default_factory=list)  # per request: its real rows


def layout(roots: list[int], trees: list[DraftTree]) -> VerifyStep:
    """Rows per request: the root then the tree's nodes; padding rows are root children
    that see only the root and themselves."""
    bs = len(trees)
    n = 1 + max((len(t) for t in trees), default=0)
    tokens = np.zeros((bs, n), dtype=np.int64)
    mask = np.zeros((bs, n, n), dtype=bool)
    depths = np.ones((bs, n), dtype=np.int64)
    next_token = np.full((bs, n), -1, dtype=np.int64)
    next_sibling = np.full((bs, n), -1, dtype=np.int64)
    step = VerifyStep(trees, n, tokens.reshape(-1), mask.reshape(-1), depths.reshape(-1),
                      next_token, next_sibling)
    for b, (root, tree) in enumerate(zip(roots, trees)):
        m = len(tree)
        tokens[b, 0] = root
        tokens[b, 1:m + 1] = tree.tokens
        tokens[b, m + 1:] = root
        mask[b, :, 0] = True
        mask[b, 1:m + 1, 1:m + 1] = tree.ancestor_mask()
        idx = np.arange(m + 1, n)
        mask[b, idx, idx] = True
        depths[b, 0] = 0
        depths[b, 1:m + 1] = tree.depths()
        last_child: dict[int, int] = {}
        for node, parent in enumerate(tree.parents):
            row, prow = node + 1, parent + 1
            if prow in last_child:
                next_sibling[b, last_child[prow]] = row
            else:
                next_token[b, prow] = row
            last_child[prow] = row
        step.rows.append(np.arange(m + 1))
    return step
