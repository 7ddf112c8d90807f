import itertools

import numpy as np
import pytest

from spec_plugins.builders import best_first, eagle2, union
from spec_plugins.cost import CostModel

# Measured on the 2-core AVX2 CPU, SmolLM2-135M fp32 (ms for 1/6/8/16 query tokens).
CPU = CostModel({1: 32, 6: 53, 8: 61, 16: 92})
# A GPU-like curve: memory bound, nearly flat up to 64 tokens.
GPU = CostModel({1: 10, 16: 10.3, 32: 10.8, 64: 12, 128: 16})


def synthetic(seed, branching=3, depth=4):
    """A drafter whose candidate probabilities are fixed per path."""
    rng = np.random.default_rng(seed)
    table = {}

    def expand(path):
        if len(path) >= depth:
            return []
        key = tuple(path)
        if key not in table:
            p = rng.dirichlet(np.ones(branching + 1))[:branching] * 0.95
            table[key] = [(10 * len(path) + i, float(p[i])) for i in range(branching)]
        return table[key]
    return expand


def expected_length(tree):
    return sum(tree.path_probs())


def all_nodes(expand, depth):
    nodes = []  # (path, path_prob)
    def rec(path, pp):
        for tok, p in expand(path):
            nodes.append((path + (tok,), pp * p))
            rec(path + (tok,), pp * p)
    rec((), 1.0)
    return nodes


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_best_first_is_the_optimal_tree_of_its_size(seed, k):
    expand = synthetic(seed, branching=2, depth=3)
    tree = best_first(expand, max_nodes=k)
    tree.validate()
    assert len(tree) == k
    # brute force over ancestor-closed node sets of size k
    nodes = all_nodes(expand, 3)
    paths = {p for p, _ in nodes}
    best = 0.0
    for combo in itertools.combinations(nodes, k):
        chosen = {p for p, _ in combo}
        if all(p[:-1] in chosen or len(p) == 1 for p in chosen):
            best = max(best, sum(pp for _, pp in combo))
    assert expected_length(tree) == pytest.approx(best)
    assert all(tuple(tree.tokens[i] for i in tree.path_to(n)) in paths for n in range(k))


def test_cost_model_sizes_the_tree_for_the_machine():
    expand = synthetic(1, branching=4, depth=8)
    cpu = best_first(expand, max_nodes=64, cost=CPU)
    gpu = best_first(expand, max_nodes=64, cost=GPU)
    assert 0 < len(cpu) < len(gpu)
    assert len(cpu) <= 8 and len(gpu) >= 24


def test_no_speculation_when_it_cannot_pay():
    weak = lambda path: [(1, 0.05)] if not path else []
    assert len(best_first(weak, max_nodes=8, cost=CPU)) == 0


def test_cost_model_interpolates_and_learns():
    assert CPU.time(1) == 32 and CPU.time(7) == pytest.approx(57)
    assert CPU.time(20) > CPU.time(16)
    m = CostModel({1: 30, 8: 60})
    m.observe(8, 80, weight=0.5)
    assert m.time(8) == pytest.approx(70)
    for _ in range(200):
        m.observe(4, 40)   # between the points: both move until the curve fits
    assert m.time(4) == pytest.approx(40, rel=0.01)
    with pytest.raises(ValueError):
        CostModel({0: 1})


def test_eagle2_is_a_beam_search_bounded_by_the_optimum():
    expand = synthetic(3, branching=3, depth=5)
    tree = eagle2(expand, top_k=2, depth=4, total_tokens=6)
    tree.validate()
    assert len(tree) == 6 and max(tree.depths()) <= 4
    assert expected_length(tree) <= expected_length(best_first(expand, max_nodes=6)) + 1e-9
    # With a beam wide enough to see every node it finds the optimal tree.
    wide = eagle2(expand, top_k=3 ** 5, depth=5, total_tokens=6)
    assert expected_length(wide) == pytest.approx(expected_length(best_first(expand, max_nodes=6)))


def test_fit_batch_keeps_fixed_trees_whole_and_cuts_the_others():
    from spec_plugins.builders import fit_batch
    from spec_plugins.cost import CostModel
    from spec_plugins.tree import DraftTree

    weak = DraftTree.chain([1, 2, 3, 4], [0.3, 0.3, 0.3, 0.3])
    cost = CostModel.linear(1.0, 0.5)  # an extra token costs half a step
    cut, kept = fit_batch([weak, weak], cost, batch_tokens=2, fixed=[False, True])
    assert len(cut) < len(weak)
    assert kept is weak


@pytest.mark.parametrize("seed", range(4))
def test_union_keeps_every_path_in_path_probability_order(seed):
    a = best_first(synthetic(seed, branching=3, depth=4), max_nodes=7)
    b = best_first(synthetic(seed + 10, branching=2, depth=5), max_nodes=6)
    both = union([a, b], max_nodes=64)
    both.validate()
    score = dict(zip(both.token_paths(), both.scores))
    for t in (a, b):
        for path, s in zip(t.token_paths(), t.scores):
            assert score[path] >= s
    assert len(both) == len(set(a.token_paths()) | set(b.token_paths()))
    pp = both.path_probs()
    assert all(x >= y for x, y in zip(pp, pp[1:]))
    assert expected_length(both) >= max(expected_length(a), expected_length(b))
    # Capped: the best prefix, still a tree.
    cut = union([a, b], max_nodes=5)
    cut.validate()
    assert cut.token_paths() == both.token_paths()[:5]
