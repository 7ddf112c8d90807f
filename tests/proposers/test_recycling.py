import numpy as np
import pytest

from spec_plugins.cost import CostModel
from spec_plugins.options import OptionError
from spec_plugins.proposers import proposer_class
from spec_plugins.proposers.base import DraftRequest, StepContext
from spec_plugins.proposers.recycling import RecyclingProposer


def req(rid, tokens, k=8, new=1, **kw):
    tokens = np.asarray(tokens, dtype=np.int64)
    return DraftRequest(rid, tokens, 1, tokens[-new:].tolist(), k, **kw)


def topk(tokens, rows):
    return np.asarray(tokens), np.asarray(rows)


def step(prop, reqs, entries, **kw):
    return prop.propose(reqs, StepContext(target_topk=entries, **kw))


def test_registered_and_declares_what_it_needs():
    cls = proposer_class("recycling")
    assert cls is RecyclingProposer
    prop = cls({"topk": 4})
    assert prop.needs == {"target_topk"} and prop.makes_trees and prop.topk == 4
    with pytest.raises(OptionError, match="allowed methods: del, dflash, diffuspec, recycling, suffix, swift"):
        proposer_class("recyling")


def test_table_keeps_the_newest_topk_per_token_in_rank_order():
    prop = RecyclingProposer({"topk": 3})
    r = req("a", [0, 1])
    step(prop, [r], [topk([5, 7, 5], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])])
    assert prop.table.successors(5).tolist() == [7, 8, 9]     # the later row wins
    assert prop.table.successors(7).tolist() == [4, 5, 6]
    step(prop, [r], [topk([7], [[9, 8, 7]])])
    assert prop.table.successors(7).tolist() == [9, 8, 7]     # a newer step overwrites
    # Wider rows are cut to topk, narrower ones leave the rest unknown.
    step(prop, [r], [topk([7], [[1, 2, 3, 4]])])
    step(prop, [r], [topk([4], [[3]])])
    assert prop.table.successors(7).tolist() == [1, 2, 3]
    assert prop.table.successors(4).tolist() == [3]
    assert prop.table.successors(123456).tolist() == []       # never seen: grows on demand
    step(prop, [r], [topk([123456], [[1, 2, 3]])])
    assert prop.table.successors(123456).tolist() == [1, 2, 3]


def test_a_committed_path_wins_over_rejected_branches_in_the_same_step():
    prop = RecyclingProposer({"topk": 2})
    # The request committed 3 -> 4; token 3 was verified twice this step: on the
    # committed path (target chose 4) and below a rejected sibling (target chose 9).
    r = req("a", [0, 3, 4], new=1)
    step(prop, [r], [topk([3, 3], [[4, 1], [9, 8]])])
    assert prop.table.successors(3).tolist() == [4, 1]


def test_rank_estimates_follow_the_committed_stream():
    prop = RecyclingProposer({"topk": 2})
    prior = prop.table.rank_probs()
    assert 0 < prior[1] < prior[0] < 1
    # The table predicts 1 -> 2 at rank 0 and 2 -> 1 at rank 1; the request then
    # commits 1, 2, 1, 2, ...: rank 0 is right after 1, rank 1 after 2.
    step(prop, [req("a", [1])], [topk([1, 2], [[2, 0], [0, 1]])])
    seq = [1]
    for _ in range(200):
        seq.append(3 - seq[-1])
        step(prop, [req("a", seq)], [None])
    p = prop.table.rank_probs()
    assert p[0] == pytest.approx(0.5, abs=0.02) and p[1] == pytest.approx(0.5, abs=0.02)


def fill(prop, rows):
    prop.propose([req("fill", [0])], StepContext(target_topk=[topk(list(rows), list(rows.values()))]))


TABLE = {1: [2, 3, 4], 2: [3, 5, 1], 3: [1, 6, 2], 4: [6, 1, 2], 5: [6, 2, 4], 6: [1, 2, 3]}


def test_tree_children_are_the_table_successors_in_rank_order():
    prop = RecyclingProposer({"topk": 3, "min_token_prob": 0.0})
    fill(prop, TABLE)
    (tree,) = step(prop, [req("a", [9, 1], k=20)], [None])
    tree.validate()
    assert len(tree) == 20 and not tree.is_chain
    pp = tree.path_probs()
    assert all(a >= b for a, b in zip(pp, pp[1:]))
    probs = prop.table.rank_probs()
    for node in range(-1, len(tree)):
        kids = tree.children(node)
        token = 1 if node < 0 else tree.tokens[node]
        assert [tree.tokens[c] for c in kids] == TABLE[token][:len(kids)]
        assert [tree.scores[c] for c in kids] == pytest.approx(probs[:len(kids)])
    assert max(tree.depths()) <= prop.options.max_depth


def test_chain_mode_follows_rank_zero():
    prop = RecyclingProposer({"topk": 3, "min_token_prob": 0.0, "tree": False, "max_depth": 5})
    fill(prop, TABLE)
    (chain,) = step(prop, [req("a", [9, 1], k=20)], [None])
    assert chain.is_chain and chain.tokens == [2, 3, 1, 2, 3]   # max_depth 5
    tree_prop = RecyclingProposer({"topk": 3, "min_token_prob": 0.0, "max_depth": 5})
    fill(tree_prop, TABLE)
    (no_tree,) = step(tree_prop, [req("a", [9, 1], k=20, tree_ok=False)], [None])
    assert no_tree.is_chain and no_tree.tokens == chain.tokens


def test_isolated_requests_draft_from_their_own_verify_passes_only():
    prop = RecyclingProposer({"topk": 2, "min_token_prob": 0.0})
    fill(prop, {1: [2, 3], 2: [3, 4]})
    (shared,) = step(prop, [req("a", [5, 1], k=4)], [None])
    assert shared.tokens[0] == 2
    (private,) = step(prop, [req("b", [5, 1], k=4, isolated=True)], [None])
    assert len(private) == 0                         # nothing of its own yet
    (private,) = step(prop, [req("b", [5, 1], k=4, isolated=True)], [topk([1], [[7, 8]])])
    assert [private.tokens[i] for i in private.children(-1)] == [7, 8]
    assert 2 not in private.tokens and 3 not in private.tokens
    assert prop.table.successors(1).tolist() == [7, 8]   # it still feeds the shared table
    prop.finish("b")
    (private,) = step(prop, [req("b", [5, 1], k=4, isolated=True)], [None])
    assert len(private) == 0                         # a new request starts afresh


@pytest.mark.parametrize("opts,msg", [
    ({"topk": 64}, r"recycling.topk=64 is out of range \[1, 32\]"),
    ({"topk": 0}, r"recycling.topk=0 is out of range \[1, 32\]"),
    ({"tree": "yes"}, "recycling.tree must be bool"),
    ({"max_depth": 1.5}, "recycling.max_depth must be int"),
    ({"top_k": 4}, "unknown option recycling.top_k; allowed options: topk"),
])
def test_bad_options_name_the_field_and_the_allowed_values(opts, msg):
    with pytest.raises(OptionError, match=msg):
        RecyclingProposer(opts)


def test_no_table_no_draft_and_no_budget_no_draft():
    prop = RecyclingProposer()
    (tree,) = step(prop, [req("a", [1, 2])], [None])
    assert len(tree) == 0
    fill(prop, {2: [3]})
    (tree,) = step(prop, [req("a", [1, 2], k=0)], [None])
    assert len(tree) == 0


def test_the_verify_cost_model_cuts_drafts_unless_the_budget_is_off():
    # Verify tokens as dear as a whole step: no draft pays for itself.
    dear = CostModel.linear(1.0, 1.0)
    for budget, drafted in ((True, False), (False, True)):
        prop = RecyclingProposer({"topk": 3, "min_token_prob": 0.0, "budget": budget})
        fill(prop, TABLE)
        (tree,) = step(prop, [req("a", [9, 1], k=20)], [None], cost=dear, batch_tokens=1)
        assert (len(tree) == 20) is drafted, (budget, len(tree))


def test_recycled_drafts_decode_exactly_like_greedy(run, toy):
    target = toy(vocab=32, mix=0.3, seed=0)
    rng = np.random.default_rng(1)
    prop = RecyclingProposer()
    gpu = CostModel.linear(10.0, 0.05)
    for warm in (True, False):   # the second batch drafts from what the first verified
        prompts = [rng.integers(0, 32, size=20).tolist() for _ in range(4)]
        outs, accepted = run(prop, target, prompts, 40, max_draft=16, cost=gpu)
        assert outs == [target.greedy(p, 40) for p in prompts]
    mean = np.mean([a for steps in accepted for a in steps])
    print(f"mean accepted after warm-up: {mean:.2f}")
    assert mean > 1.0
    # Chains (and trees the engine cannot take) decode exactly too.
    outs, _ = run(RecyclingProposer({"tree": False}), target, prompts, 40)
    assert outs == [target.greedy(p, 40) for p in prompts]
    outs, _ = run(RecyclingProposer(), target, prompts, 40, tree_ok=False, isolated={"r1"})
    assert outs == [target.greedy(p, 40) for p in prompts]
