"""The verify layout the SGLang worker hands SGLang: rows, tree mask, depths, links."""

from __future__ import annotations

import numpy as np

from spec_plugins.sglang.layout import layout
from spec_plugins.tree import DraftTree


def tree_from(parents, tokens):
    t = DraftTree.empty()
    for p, tok in zip(parents, tokens):
        t.add(p, tok)
    return t


def test_rows_mask_depths_and_links_follow_the_tree():
    #        root(9)
    #       /       \
    #     a(1)      b(2)
    #    /   \
    #  c(3)  d(4)
    big = tree_from([-1, -1, 0, 0], [1, 2, 3, 4])
    step = layout([9, 7], [big, DraftTree.chain([5])])
    n = step.width
    assert n == 5
    tok = step.tokens.reshape(2, n)
    assert tok[0].tolist() == [9, 1, 2, 3, 4]
    assert tok[1, :2].tolist() == [7, 5] and (tok[1, 2:] == 7).all()   # padding: root token
    mask = step.mask.reshape(2, n, n)
    # Row i sees exactly the root, its ancestors and itself.
    want = np.zeros((n, n), dtype=bool)
    for row, anc in {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 1, 4]}.items():
        want[row, anc] = True
    assert (mask[0] == want).all()
    pad = np.eye(n, dtype=bool)
    pad[:, 0] = True
    pad[1, :2] = True
    assert (mask[1] == pad).all()
    assert step.depths.reshape(2, n)[0].tolist() == [0, 1, 1, 2, 2]
    assert step.next_token[0].tolist() == [1, 3, -1, -1, -1]
    assert step.next_sibling[0].tolist() == [-1, 2, -1, 4, -1]
    # Padding rows are nobody's child: the tree of request 1 is root -> 5 only.
    assert step.next_token[1].tolist() == [1, -1, -1, -1, -1]
    assert (step.next_sibling[1] == -1).all()
    assert [r.tolist() for r in step.rows] == [[0, 1, 2, 3, 4], [0, 1]]


def test_no_drafts_is_one_row_per_request():
    step = layout([3, 4], [DraftTree.empty(), DraftTree.empty()])
    assert step.width == 1 and step.tokens.tolist() == [3, 4] and step.mask.all()
