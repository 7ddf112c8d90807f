import numpy as np
import pytest

from spec_plugins.options import OptionError
from spec_plugins.proposers.base import DraftRequest, StepContext
from spec_plugins.proposers.suffix import SuffixProposer, SuffixTrie


def req(rid, tokens, n_prompt, k=8, new=None):
    tokens = np.asarray(tokens, dtype=np.int64)
    return DraftRequest(rid, tokens, n_prompt, new or [int(tokens[-1])], k)


def brute_counts(seqs, max_depth):
    counts = {}
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(len(s), i + max_depth) + 1):
                counts[tuple(s[i:j])] = counts.get(tuple(s[i:j]), 0) + 1
    return counts


def test_trie_counts_every_substring_up_to_depth():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 4, size=30).tolist() for _ in range(3)]
    trie = SuffixTrie(max_depth=5)
    for s in seqs:
        trie.add_sequence(s)
    for sub, c in brute_counts(seqs, 5).items():
        assert trie.lookup(sub).count == c
    assert trie.lookup([0] * 6) is None  # deeper than max_depth is never stored


def test_trie_removal_restores_previous_counts():
    trie = SuffixTrie(max_depth=4)
    trie.add_sequence([1, 2, 3, 1, 2])
    trie.add_sequence([2, 3, 4])
    trie.add_sequence([2, 3, 4], sign=-1)
    for sub, c in brute_counts([[1, 2, 3, 1, 2]], 4).items():
        assert trie.lookup(sub).count == c
    assert trie.lookup([3, 4]) is None


def test_longest_match_is_longest_followed_suffix():
    trie = SuffixTrie(max_depth=8)
    trie.add_sequence([9, 1, 2, 3, 4, 7, 2, 3, 5])
    m, node = trie.longest_match([0, 1, 2, 3], max_len=7)
    assert m == 3 and set(node.children) == {4}
    m, node = trie.longest_match([0, 8, 2, 3], max_len=7)
    assert m == 2 and set(node.children) == {4, 5}
    assert trie.longest_match([6], max_len=7) == (0, None)


def test_drafts_the_repeated_continuation_from_the_prompt():
    prop = SuffixProposer()
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 5, 6, 7]
    (tree,) = prop.propose([req("a", prompt, len(prompt))], StepContext())
    assert tree.is_chain
    assert tree.tokens[:3] == [8, 9, 10]


def test_draft_length_follows_match_length_and_confidence():
    prop = SuffixProposer({"max_spec_factor": 1.0, "min_token_prob": 0.1})
    # A match of one token drafts at most one token.
    (short,) = prop.propose([req("a", [1, 2, 3, 4, 9, 1], 6)], StepContext())
    assert short.tokens == [2]
    # An ambiguous continuation (2 of 3 times 4, once 5) has score 2/3.
    seq = [2, 3, 4, 0, 2, 3, 4, 0, 2, 3, 5, 9, 2, 3]
    (amb,) = prop.propose([req("b", seq, len(seq))], StepContext())
    assert amb.tokens[0] == 4 and amb.scores[0] == pytest.approx(2 / 3)
    # A strict threshold stops it before drafting anything.
    strict = SuffixProposer({"min_token_prob": 0.9})
    (none,) = strict.propose([req("b", seq, len(seq))], StepContext())
    assert none.tokens == []


def test_respects_max_draft_tokens():
    prop = SuffixProposer({"max_spec_factor": 8.0})
    seq = list(range(20)) * 3
    (tree,) = prop.propose([req("a", seq[:45], 45, k=3)], StepContext())
    assert tree.tokens == [5, 6, 7]


def test_incremental_updates_match_a_fresh_build():
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3] * 2
    inc = SuffixProposer()
    for n in range(10, len(seq)):
        (t_inc,) = inc.propose([req("r", seq[:n], 10)], StepContext())
    (t_new,) = SuffixProposer().propose([req("r", seq[:n], 10)], StepContext())
    assert t_inc.tokens == t_new.tokens


def test_finished_outputs_serve_later_requests():
    prop = SuffixProposer()
    out = [40, 41, 42, 43, 44, 45, 46, 47]
    prop.propose([req("a", [1, 2] + out, 2)], StepContext())
    prop.finish("a")
    # A different prompt whose output starts like request a's output.
    (tree,) = prop.propose([req("b", [7, 8, 40, 41, 42], 2)], StepContext())
    assert tree.tokens[:3] == [43, 44, 45]
    # Prompts are not shared across requests.
    (tree,) = prop.propose([req("c", [9, 1], 1)], StepContext())
    assert tree.tokens == []


def test_global_cache_is_bounded():
    prop = SuffixProposer({"global_cache_tokens": 10})
    for i in range(5):
        prop.propose([req(f"r{i}", [0] + [100 + i] * 3 + [200 + i] * 3, 1)], StepContext())
        prop.finish(f"r{i}")
    assert prop._global_tokens <= 10
    assert prop._global.lookup([100]) is None      # the oldest outputs were evicted
    assert prop._global.lookup([104]) is not None


@pytest.mark.parametrize("opts,msg", [
    ({"max_depht": 3}, "unknown option suffix.max_depht; allowed options: max_depth"),
    ({"min_token_prob": 2.0}, "suffix.min_token_prob=2.0 is out of range"),
    ({"max_depth": "long"}, "suffix.max_depth must be int"),
])
def test_bad_options_name_the_field(opts, msg):
    with pytest.raises(OptionError, match=msg):
        SuffixProposer(opts)


def test_isolated_requests_ignore_other_requests_outputs():
    prop = SuffixProposer()
    prop.propose([req("a", [1, 2, 40, 41, 42, 43, 44], 2)], StepContext())
    prop.finish("a")
    r = req("b", [7, 8, 40, 41], 2)
    r.isolated = True
    (tree,) = prop.propose([r], StepContext())
    assert tree.tokens == []


# ---- trees ----------------------------------------------------------------------

from spec_plugins.builders import fit_batch  # noqa: E402
from spec_plugins.cost import CostModel  # noqa: E402
from spec_plugins.proposers.suffix import _follow  # noqa: E402

AMBIGUOUS = [2, 3, 4, 0, 2, 3, 4, 0, 2, 3, 5, 9, 2, 3]  # after [2, 3]: 4 twice, 5 once


def paths(tree):
    """{root-to-node token path: node score}"""
    return {tuple(tree.tokens[j] for j in tree.path_to(i)): s for i, s in enumerate(tree.scores)}


def check_tree(tree, max_nodes):
    tree.validate()
    assert len(tree) <= max_nodes
    pp = tree.path_probs()
    assert all(a >= b for a, b in zip(pp, pp[1:]))   # decreasing path probability


def test_tree_keeps_the_alternatives_scored_by_count_share():
    prop = SuffixProposer({"tree": True, "max_spec_factor": 1.0})   # a match of 2: two levels
    (tree,) = prop.propose([req("a", AMBIGUOUS, len(AMBIGUOUS))], StepContext())
    check_tree(tree, 8)
    assert paths(tree) == pytest.approx({(4,): 2 / 3, (4, 0): 1.0, (5,): 1 / 3, (5, 9): 1.0})
    assert tree.tokens[0] == 4 and not tree.is_chain
    # The chain keeps only the most frequent continuation.
    (chain,) = SuffixProposer({"tree": False}).propose(
        [req("a", AMBIGUOUS, len(AMBIGUOUS))], StepContext())
    assert chain.is_chain and chain.tokens == [4, 0]


def test_max_branches_and_min_token_prob_prune_the_tree():
    seq = [1, 7, 1, 7, 1, 7, 1, 8, 1, 9, 1]   # after 1: 7 three times, 8 and 9 once
    (tree,) = SuffixProposer({"tree": True, "max_branches": 2}).propose([req("a", seq, len(seq))], StepContext())
    assert [tree.tokens[i] for i in tree.children(-1)] == [7, 8]
    assert [tree.scores[i] for i in tree.children(-1)] == pytest.approx([3 / 5, 1 / 5])
    (tree,) = SuffixProposer({"tree": True, "min_token_prob": 0.3}).propose([req("a", seq, len(seq))], StepContext())
    assert [tree.tokens[i] for i in tree.children(-1)] == [7]


def random_requests(seed, n=6):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seq = rng.integers(0, 4, size=int(rng.integers(20, 80))).tolist()
        out.append(req(f"r{i}", seq, len(seq) // 2, k=int(rng.integers(1, 24))))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_tree_beats_or_equals_the_chain_and_one_branch_is_the_chain(seed):
    opts = {"max_spec_factor": 4.0, "min_token_prob": 0.01}
    reqs = random_requests(seed)
    trees = SuffixProposer({"tree": True, **opts}).propose(reqs, StepContext())
    chains = SuffixProposer({**opts, "tree": False}).propose(reqs, StepContext())
    narrow = SuffixProposer({"tree": True, **opts, "max_branches": 1}).propose(reqs, StepContext())
    for r, tree, chain, one in zip(reqs, trees, chains, narrow):
        check_tree(tree, r.max_draft_tokens)
        assert chain.is_chain and len(chain) <= r.max_draft_tokens
        assert sum(tree.path_probs()) >= sum(chain.path_probs()) - 1e-9
        assert (one.tokens, one.parents, one.scores) == (chain.tokens, chain.parents, chain.scores)


def test_chains_when_trees_are_off_or_not_verifiable():
    r = req("a", AMBIGUOUS, len(AMBIGUOUS))
    (off,) = SuffixProposer({"tree": False}).propose([r], StepContext())
    r.tree_ok = False
    (no_tree,) = SuffixProposer({"tree": True}).propose([r], StepContext())
    assert off.is_chain and no_tree.is_chain and len(off) == 2
    assert (off.tokens, off.scores) == (no_tree.tokens, no_tree.scores)


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_tree_respects_max_draft_tokens(k):
    seq = np.random.default_rng(0).integers(0, 3, size=200).tolist()
    (tree,) = SuffixProposer({"tree": True, "max_spec_factor": 8.0, "min_token_prob": 0.0}).propose(
        [req("a", seq, 100, k=k)], StepContext())
    check_tree(tree, k)
    assert len(tree) == k   # plenty of candidates: the budget binds


def test_incremental_match_equals_a_full_search():
    rng = np.random.default_rng(1)
    trie = SuffixTrie(max_depth=6)
    trie.add_sequence(rng.integers(0, 3, size=300).tolist())
    for _ in range(200):
        ctx = rng.integers(0, 4, size=int(rng.integers(1, 12))).tolist()
        prev = trie.longest_match(ctx, 5)
        for t in range(4):
            assert _follow(trie, ctx + [t], prev) == trie.longest_match(ctx + [t], 5)


def test_the_cost_model_cuts_trees_to_prefixes_across_the_batch():
    opts = {"max_spec_factor": 4.0, "min_token_prob": 0.0}
    reqs = random_requests(5, n=8)
    full = SuffixProposer({"tree": True, **opts}).propose(reqs, StepContext())
    cpu = CostModel({1: 32, 6: 53, 8: 61, 16: 92})
    cut = SuffixProposer({"tree": True, **opts}).propose(reqs, StepContext(cost=cpu, batch_tokens=8))
    assert sum(map(len, cut)) < sum(map(len, full))
    for f, c in zip(full, cut):
        assert (c.tokens, c.parents) == (f.tokens[:len(c)], f.parents[:len(c)])
    assert fit_batch(full, None, 8) == full


def sampled_text(target, rng, n, temperature=1.0):
    out = rng.integers(0, target.vocab, size=2).tolist()
    for _ in range(n):
        logits = target.logits(out) / temperature
        p = np.exp(logits - logits.max())
        out.append(int(rng.choice(target.vocab, p=p / p.sum())))
    return out


def test_trees_decode_exactly_like_greedy_and_accept_more_than_chains(run, toy):
    """Prompts sampled from the toy target hold several continuations per context;
    greedy decoding follows the argmax, which is not always the most frequent."""
    acc = {"tree": [], "chain": []}
    for seed in range(3):
        target = toy(vocab=32, mix=0.5, seed=seed)
        rng = np.random.default_rng(seed)
        prompts = [sampled_text(target, rng, 300) for _ in range(2)]
        for mode, opts in [("tree", {"tree": True}), ("chain", {"tree": False})]:
            outs, accepted = run(SuffixProposer({"tree": True, **opts}), target, prompts, 60, max_draft=8)
            assert outs == [target.greedy(p, 60) for p in prompts]
            acc[mode] += [a for steps in accepted for a in steps]
    tree, chain = np.mean(acc["tree"]), np.mean(acc["chain"])
    print(f"mean accepted: tree {tree:.2f}, chain {chain:.2f}")
    assert tree > chain + 0.2 and chain > 1.0


def test_calibration_learns_that_the_target_rejects_what_the_counts_predict():
    """The prompt says 6 always follows 5; the target commits 8 instead, every time.
    Each rejection lowers the estimate for such nodes until the proposer no longer
    drafts them; seeded (isolated) requests keep their count-based drafts, and so does
    a proposer with calibration off."""
    prompt = [5, 6] * 20 + [5]
    prop = SuffixProposer({"min_token_prob": 0.1})
    first = None
    for i in range(30):
        (d,) = prop.propose([req(f"r{i}", prompt, len(prompt))], StepContext())
        if i == 0:
            first = d
        if not len(d):
            break
        assert d.tokens[0] == 6
        assert d.scores[0] == pytest.approx(2 / (i + 2))   # Beta(prior 2 x raw 1) posterior
        prop.propose([req(f"r{i}", prompt + [8], len(prompt), new=[8])], StepContext())
        prop.finish(f"r{i}")
    assert first.scores[0] == 1.0 and not len(d) and i > 10
    isolated = req("seeded", prompt, len(prompt))
    isolated.isolated = True
    (s,) = prop.propose([isolated], StepContext())
    assert s.tokens[:2] == [6, 5] and s.scores[0] == 1.0
    (raw,) = SuffixProposer({"calibrate": False}).propose([req("x", prompt, len(prompt))],
                                                           StepContext())
    assert raw.scores[0] == 1.0


@pytest.mark.parametrize("tree", [False, True])
def test_image_placeholders_are_never_matched_across_or_drafted(tree):
    """Two images are the same run of placeholder ids whatever they show: what followed
    one image must not be drafted after another, and no draft carries a placeholder."""
    from spec_plugins.proposers.base import ModelInfo

    IMG = 7
    span = [IMG] * 6
    prompt = [1, 2] + span + [20, 21, 22, 23] + [3] + span
    plain = SuffixProposer({"tree": tree, "min_token_prob": 0.0})
    seeing = SuffixProposer({"tree": tree, "min_token_prob": 0.0})
    seeing.bind(ModelInfo(model_path="m", tokenizer_path="m", architecture="A", num_layers=2,
                          hidden_size=8, vocab_size=32, max_model_len=64,
                          placeholder_token_ids=frozenset({IMG})))
    # Without separators the second image's span matches the first and drafts its text.
    assert 20 in plain.propose([req("a", prompt, len(prompt))], StepContext())[0].tokens
    assert len(seeing.propose([req("a", prompt, len(prompt))], StepContext())[0]) == 0
    # Text after an image matches only text: "20 21" was seen followed by 22.
    ctx = prompt + [20, 21]
    out = seeing.propose([req("b", ctx, len(ctx))], StepContext())[0]
    assert out.tokens[:2] == [22, 23] and IMG not in out.tokens
