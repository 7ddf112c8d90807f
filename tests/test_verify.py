"""The verifiers: greedy equals plain argmax decoding; stochastic keeps the target
distribution (chi-square against the exact distribution of generated sequences)."""

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from spec_plugins.tree import DraftTree
from spec_plugins.verify import verify_greedy, verify_stochastic

V = 5  # vocabulary of the toy target


def markov_target(seed):
    """A toy target: the next-token distribution depends on the previous token."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(V, 0.7), size=V)
    return p


def target_rows(tree, last_token, p):
    rows = [p[last_token]] + [p[t] for t in tree.tokens]
    return np.stack(rows)


def test_greedy_follows_argmax_through_the_tree():
    logits = np.zeros((5, V))
    t = DraftTree()
    a = t.add(-1, 1)
    t.add(-1, 2)
    c = t.add(a, 3)
    t.add(a, 4)
    logits[0, 1] = 5   # root -> 1 (node a)
    logits[1, 3] = 5   # a -> 3 (node c)
    logits[3, 0] = 5   # c -> 0: no such child, bonus 0
    v = verify_greedy(t, logits)
    assert v.accepted == [a, c] and v.accepted_tokens == [1, 3] and v.bonus_token == 0
    assert v.emitted == [1, 3, 0]


def test_greedy_rejects_everything_when_root_argmax_is_not_drafted():
    logits = np.zeros((3, V))
    logits[0, 4] = 1
    v = verify_greedy(DraftTree.chain([1, 2]), logits)
    assert v.accepted == [] and v.bonus_token == 4


def test_greedy_equals_plain_decoding_on_random_trees():
    p = markov_target(0)
    rng = np.random.default_rng(1)
    for _ in range(200):
        last = int(rng.integers(V))
        tree = random_tree(rng, sampled=False)
        v = verify_greedy(tree, np.log(target_rows(tree, last, p)))
        # plain greedy decoding from `last` for len(emitted) tokens
        seq, cur = [], last
        for _ in v.emitted:
            cur = int(np.argmax(p[cur]))
            seq.append(cur)
        assert seq == v.emitted


def test_rows_must_match_tree():
    with pytest.raises(ValueError, match="len\\(tree\\) \\+ 1"):
        verify_greedy(DraftTree.chain([1]), np.zeros((1, V)))


def random_tree(rng, sampled, q_table=None, max_nodes=6):
    """Random tree; with ``sampled`` the children of a node are drawn without
    replacement from a draft distribution q (rows of ``q_table`` by parent token)."""
    tree = DraftTree(dist_rows=[] if sampled else None)
    dists = []
    frontier = [(-1, None)]
    while frontier and len(tree) < max_nodes:
        parent, _ = frontier.pop(0)
        k = int(rng.integers(0, 3))
        if sampled:
            q = q_table[int(rng.integers(V))] if q_table is not None else rng.dirichlet(np.ones(V))
            row = len(dists)
            dists.append(q)
            toks = rng.choice(V, size=min(k, V), replace=False, p=q) if k else []
        else:
            toks = rng.choice(V, size=k, replace=False)
        for tok in toks:
            if len(tree) >= max_nodes:
                break
            n = tree.add(parent, int(tok), dist_row=row if sampled else None)
            frontier.append((n, None))
    if sampled:
        tree.draft_dists = np.array(dists) if dists else np.zeros((0, V))
    return tree


def generate(p, start, length, rng, sampled):
    """Generate ``length`` tokens with speculative steps over random draft trees."""
    out, last = [], start
    while len(out) < length:
        tree = random_tree(rng, sampled)
        tree.validate(V)
        v = verify_stochastic(tree, target_rows(tree, last, p), rng)
        out.extend(v.emitted)
        last = out[-1]
    return tuple(out[:length])


@pytest.mark.parametrize("sampled", [False, True], ids=["deterministic", "sampled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stochastic_tree_verifier_is_lossless(sampled, seed):
    """Sequences of 3 tokens from speculative steps follow the target's joint law."""
    p = markov_target(100 + seed)
    rng = np.random.default_rng(seed)
    n = 6000
    counts = {}
    for _ in range(n):
        s = generate(p, 0, 3, rng, sampled)
        counts[s] = counts.get(s, 0) + 1
    seqs = list(itertools.product(range(V), repeat=3))
    exp = np.array([p[0, a] * p[a, b] * p[b, c] for a, b, c in seqs]) * n
    obs = np.array([counts.get(s, 0) for s in seqs], dtype=float)
    # Pool rare cells so the chi-square approximation holds.
    keep = exp >= 5
    obs_k = np.append(obs[keep], obs[~keep].sum())
    exp_k = np.append(exp[keep], exp[~keep].sum())
    assert chisquare(obs_k, exp_k).pvalue > 1e-3


def test_misstated_draft_distribution_is_detected():
    """The chi-square test has power: drafts sampled from one q but verified as if
    drawn from another (uniform) break losslessness, and the test sees it."""
    p = markov_target(7)
    q_true = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    rng = np.random.default_rng(3)
    n = 6000
    counts = np.zeros(V)
    for _ in range(n):
        tok = int(rng.choice(V, p=q_true))
        tree = DraftTree(dist_rows=[], draft_dists=np.full((1, V), 1.0 / V))
        tree.add(-1, tok, dist_row=0)
        counts[verify_stochastic(tree, target_rows(tree, 0, p), rng).emitted[0]] += 1
    assert chisquare(counts, p[0] * n).pvalue < 1e-6


def test_chain_acceptance_rate_matches_theory():
    """One-hot drafts: P(accept first token) = p(x)."""
    p = markov_target(11)
    rng = np.random.default_rng(4)
    tree = DraftTree.chain([2])
    acc = sum(verify_stochastic(tree, target_rows(tree, 0, p), rng).num_accepted
              for _ in range(20000))
    assert abs(acc / 20000 - p[0, 2]) < 0.015
