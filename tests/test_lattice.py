"""Draft trees from block-drafter lattices: DDTree search, sampled trees (lossless under
the core verifier), adaptive length, causal-consistency path."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from spec_plugins.lattice import (AdaptiveLength, causal_consistency_path, greedy_tree,
                                  sampled_tree, topk_lattice)
from spec_plugins.verify import verify_stochastic


def lattice(L=4, V=12, seed=0, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(L, V, generator=g), dim=-1)


def test_topk_one_is_the_argmax_chain():
    q = lattice()
    ids, p = topk_lattice(q, 1)
    tree = greedy_tree(ids, p, max_nodes=10)
    assert tree.is_chain and tree.tokens == q.argmax(-1).tolist()
    assert tree.scores == pytest.approx(q.max(-1).values.tolist(), rel=1e-6)


def test_greedy_tree_is_the_best_tree_of_its_size():
    """Best first = the n-node subtree of the lattice with the largest expected accepted
    length (sum of path probabilities), checked against brute force."""
    q = lattice(L=3, V=6, seed=1, sharp=1.0)
    ids, p = topk_lattice(q, 3)
    for n in (1, 3, 5, 7):
        tree = greedy_tree(ids, p, max_nodes=n)
        pp = tree.path_probs()
        assert pp == sorted(pp, reverse=True)
        # Brute force over all connected subtrees of size n of the 3-ary lattice tree.
        nodes = [path for d in range(1, 4) for path in itertools.product(range(3), repeat=d)]
        prob = {path: float(np.prod([p[i][c] for i, c in enumerate(path)])) for path in nodes}
        best = max(sum(prob[x] for x in sub) for sub in itertools.combinations(nodes, n)
                   if all(len(x) == 1 or x[:-1] in sub for x in sub))
        assert sum(pp) == pytest.approx(best, rel=1e-6)


def test_sampled_tree_shape_and_rows():
    q = lattice(L=3, V=20)
    tree = sampled_tree(q, [3, 1, 2], torch.Generator().manual_seed(0))
    tree.validate(vocab_size=20)
    assert [d for d in tree.depths()].count(1) == 3
    assert len(tree) == 3 + 3 + 6
    assert all(r == d - 1 for r, d in zip(tree.dist_rows, tree.depths()))
    assert tree.draft_dists.shape == (3, 20)


@pytest.mark.parametrize("widths", [[1, 1], [3, 1], [2, 2]])
def test_sampled_lattice_trees_keep_the_target_distribution(widths):
    """Two tokens emitted per trial (accepted draft tokens, the verifier's bonus, then plain
    target sampling) are distributed as the target's own two-token distribution."""
    V = 5
    rng = np.random.default_rng(0)
    p1 = rng.dirichlet(np.ones(V))
    p2 = rng.dirichlet(np.ones(V), size=V)        # p(x2 | x1)
    q = lattice(L=2, V=V, seed=3, sharp=1.0)      # a drafter that knows nothing of p
    gen = torch.Generator().manual_seed(1)
    n = 12000
    counts = np.zeros((V, V))
    for _ in range(n):
        tree = sampled_tree(q, widths, gen)
        rows = [p1] + [p2[tree.tokens[i]] if d == 1 else np.ones(V) / V
                       for i, d in enumerate(tree.depths())]
        v = verify_stochastic(tree, np.array(rows), rng)
        out = v.emitted
        if len(out) < 2:
            out = out + [int(rng.choice(V, p=p2[out[0]]))]
        counts[out[0], out[1]] += 1
    expected = n * p1[:, None] * p2
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, V * V - 1) > 1e-3, chi2


def test_adaptive_length_follows_acceptance():
    adl = AdaptiveLength(lo=2, hi=12, margin=2, start=4)
    assert adl.length == 4
    for _ in range(20):
        adl.observe(adl.length)          # everything accepted: grow to the cap
    assert adl.length == 12
    for _ in range(20):
        adl.observe(0)                   # nothing accepted: shrink to the floor
    assert adl.length == 2


def test_causal_consistency_picks_the_path_the_causal_scorer_supports():
    # Position-wise best is 1 then 1, but the causal scorer says 1 is never followed by 1.
    ids = np.array([[1, 2], [1, 3]])
    probs = np.array([[0.6, 0.4], [0.6, 0.4]])
    causal = lambda prefix, x: -10.0 if prefix and prefix[-1] == 1 and x == 1 else 0.0
    assert causal_consistency_path(ids, probs, causal) == [1, 3]
    assert causal_consistency_path(ids, probs, lambda prefix, x: 0.0) == [1, 1]
