import pytest

from spec_plugins.tree import DraftTree


def test_chain_is_a_tree_with_one_child_per_node():
    t = DraftTree.chain([5, 6, 7])
    assert t.parents == [-1, 0, 1]
    assert t.is_chain and t.depths() == [1, 2, 3]
    assert t.path_to(2) == [0, 1, 2]
    t.validate(vocab_size=8)


def test_tree_queries_and_ancestor_mask():
    t = DraftTree()
    a = t.add(-1, 1)
    b = t.add(-1, 2)
    c = t.add(a, 3)
    d = t.add(c, 4)
    assert not t.is_chain
    assert t.children(-1) == [a, b] and t.children(a) == [c]
    assert t.depths() == [1, 1, 2, 3]
    assert t.path_to(d) == [a, c, d]
    m = t.ancestor_mask()
    assert m[d].tolist() == [True, False, True, True]
    assert m[b].tolist() == [False, True, False, False]


@pytest.mark.parametrize("tokens,parents,msg", [
    ([1, 2], [-1, 1], "must follow their parent"),
    ([1, 1], [-1, -1], "distinct tokens"),
    ([1, 9], [-1, 0], "outside the vocabulary"),
])
def test_validate_rejects_broken_trees(tokens, parents, msg):
    t = DraftTree(tokens=tokens, parents=parents, scores=[1.0] * len(tokens))
    with pytest.raises(ValueError, match=msg):
        t.validate(vocab_size=8)


def test_add_rejects_bad_parent():
    with pytest.raises(ValueError, match="out of range"):
        DraftTree().add(0, 1)


def test_without_tokens_keeps_node_order_and_drops_subtrees():
    t = DraftTree.empty()
    a = t.add(-1, 10, 0.9)
    b = t.add(-1, 99, 0.5)
    c = t.add(a, 11, 0.8)
    t.add(b, 12, 0.7)
    t.add(c, 13, 0.6)
    out = t.without_tokens(frozenset({99}))
    assert out.tokens == [10, 11, 13]
    assert out.parents == [-1, 0, 1]
    assert out.scores == [0.9, 0.8, 0.6]
    out.validate()
    assert t.without_tokens(frozenset({5})) is t
