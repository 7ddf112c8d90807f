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
