"""A toy target for unit tests: its next token after ``t`` is ``table[t]``."""

from __future__ import annotations

import numpy as np

from spec_plugins.tree import DraftTree
from spec_plugins.verify import Verdict, verify_greedy


def verify_on_table(tree: DraftTree, last: int, table: np.ndarray) -> Verdict:
    """Greedy verification against a toy target whose next token after ``t`` is
    ``table[t]`` (its logits peak there), for the tree drafted after token ``last``."""
    logits = np.full((len(tree) + 1, len(table)), -1.0)
    for row, tok in enumerate([last] + tree.tokens):
        logits[row, table[tok]] = 1.0
    return verify_greedy(tree, logits)
