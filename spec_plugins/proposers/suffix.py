"""Suffix drafting (in the spirit of SuffixDecoding, Oliaro et al. 2024).

Two depth-limited suffix tries with occurrence counts: one over the request's own
prompt and output, one over recent requests' outputs (bounded by a token budget, oldest
evicted first). To draft, the longest suffix of the context that the tries have seen
followed by something gives a distribution over the next token (counts of what followed
it); the draft takes the most frequent continuation, appends it to the context and
matches again, so drafts can run past the trie depth. It stops when the product of
continuation frequencies (the estimated chance the whole draft is accepted) falls below
``min_token_prob`` or the draft reaches ``max_spec_factor x match length``: long,
confident matches speculate long, weak ones little or not at all.

With ``tree`` (the default, where the engine can verify trees) the draft keeps the
alternatives too: a node's children are the (up to ``max_branches``) continuations seen
after the longest followed suffix of context + path, scored by their share of the
counts there, and the tree grows best first (``builders.best_first``, OPT-Tree): the
nodes most likely to be accepted, up to ``max_draft_tokens``, ``max_spec_factor x match
length`` deep. Under greedy verification its expected accepted length is at least the
chain's for the same number of nodes (the chain is one of the trees it chooses from).

When the engine supplies a verify-cost model, the drafts of the whole batch are then
cut to the tokens that pay for their verify time (``builders.fit_batch``): generous at
batch 1, strict in a full batch.

Count shares overstate acceptance (a continuation seen once scores 1), so with
``calibrate`` each node's estimate is the acceptance observed for nodes like it
(``spec_plugins.calibration``: bucketed by rank, count share, support and match length,
scored from the tokens the engine committed next step). That estimate drives the stop
rule, the tree's shape and the batch budget. Seeded requests use the raw shares, so their
drafts depend on their own tokens alone.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from spec_plugins.builders import best_first, fit_batch
from spec_plugins.calibration import Calibrator
from spec_plugins.options import MethodOptions, opt
from spec_plugins.proposers.base import DraftRequest, ModelInfo, Proposer, StepContext
from spec_plugins.tree import DraftTree


class _Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] | None = None


class SuffixTrie:
    """Every substring of length <= ``max_depth`` of the inserted sequences, with the
    number of times it occurs. Appending a token updates the ``max_depth`` substrings
    that end at it, so building costs O(max_depth) per token. ``separators`` (a VLM's
    image placeholder ids) are never inserted and no substring spans one: a context
    that holds one matches only after it, and no draft carries one."""

    def __init__(self, max_depth: int, separators: frozenset[int] = frozenset()):
        self.max_depth = max_depth
        self.separators = separators
        self.root = _Node()

    def add_sequence(self, tokens: Sequence[int], sign: int = 1) -> None:
        """Insert (``sign=1``) or remove (``sign=-1``) every substring of ``tokens``."""
        cursor = self.cursor()
        for t in tokens:
            cursor.append(t, sign)

    def cursor(self) -> "_TrieCursor":
        return _TrieCursor(self)

    def lookup(self, pattern: Sequence[int]) -> _Node | None:
        node = self.root
        for t in pattern:
            if node.children is None:
                return None
            node = node.children.get(t)
            if node is None:
                return None
        return node

    def longest_match(self, context: Sequence[int], max_len: int) -> tuple[int, _Node | None]:
        """Longest ``m <= max_len`` such that ``context[-m:]`` was seen followed by a
        token; returns ``(m, node)`` or ``(0, None)``. The property is monotone in ``m``
        (a suffix of a followed pattern is followed too), so binary search applies."""
        lo, hi, best = 1, min(max_len, len(context), self.max_depth - 1), (0, None)
        while lo <= hi:
            mid = (lo + hi) // 2
            node = self.lookup(context[len(context) - mid:])
            if node is not None and node.children:
                best = (mid, node)
                lo = mid + 1
            else:
                hi = mid - 1
        return best


class _TrieCursor:
    """Incremental insertion: keeps the nodes of the substrings ending at the last token."""

    __slots__ = ("trie", "active")

    def __init__(self, trie: SuffixTrie):
        self.trie = trie
        self.active: list[_Node] = [trie.root]

    def append(self, token: int, sign: int = 1) -> None:
        if token in self.trie.separators:
            self.active = [self.trie.root]
            return
        nxt = [self.trie.root]
        for node in self.active:
            if node.children is None:
                node.children = {}
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
            child.count += sign
            if child.count <= 0:
                del node.children[token]
            elif len(nxt) < self.trie.max_depth:
                nxt.append(child)
        self.active = nxt


@dataclass(frozen=True)
class SuffixOptions(MethodOptions):
    max_depth: int = opt(24, lo=2, hi=256, help="longest context pattern matched, in tokens")
    max_spec_factor: float = opt(1.0, lo=0.0, hi=64.0,
                                 help="draft at most this many tokens per matched token")
    min_token_prob: float = opt(0.1, lo=0.0, hi=1.0,
                                help="stop when the estimated acceptance of the draft falls below")
    min_match: int = opt(1, lo=1, hi=256, help="shortest match that may start a draft")
    global_cache_tokens: int = opt(65536, lo=0, hi=1 << 24,
                                   help="output tokens of recent requests kept for cross-request matches")
    # Chains by default: on CPUs suffix trees are no faster than chains (integration/RESULTS.md).
    tree: bool = opt(False, help="draft trees of alternative continuations (False: chains)")
    max_branches: int = opt(4, lo=1, hi=64,
                            help="most continuations tried after one tree node (most frequent first)")
    calibrate: bool = opt(True, help="replace count-share estimates by the acceptance observed "
                                     "for similar nodes (not for seeded requests)")



class _RequestState:
    __slots__ = ("trie", "cursor", "num_tokens", "num_prompt_tokens", "output", "last")

    def __init__(self, max_depth: int, num_prompt_tokens: int, separators: frozenset[int]):
        self.trie = SuffixTrie(max_depth, separators)
        self.cursor = self.trie.cursor()
        self.num_tokens = 0
        self.num_prompt_tokens = num_prompt_tokens
        self.output: list[int] = []
        self.last: tuple[DraftTree, list] | None = None   # last draft, its nodes' buckets


def _bucket(rank: int, p: float, total: int, m: int) -> tuple[int, int, int, int]:
    """Calibration bucket of a continuation: whether it is the most frequent one, its
    count share, how often the matched pattern was followed at all, the match length."""
    support = 0 if total < 2 else 1 if total < 4 else 2 if total < 10 else 3
    match = 0 if m < 3 else 1 if m < 6 else 2 if m < 12 else 3
    return min(rank, 1), min(int(p * 5), 4), support, match


# Longest followed match in one trie: (match length, trie node), (0, None) for none.
_Match = tuple[int, "_Node | None"]


def _follow(trie: SuffixTrie, context: list[int], prev: _Match | None) -> _Match:
    """Longest followed suffix of ``context`` in ``trie``; ``prev`` is the match of
    ``context[:-1]`` when known. A followed suffix of ``context`` of length L makes its
    last L-1 tokens a followed suffix of ``context[:-1]``, so the match grows by at most
    one: extending ``prev`` by the new token is the answer whenever that is followed,
    else a search bounded by ``prev`` + 1 (same result as a full search, less work)."""
    if prev is None:
        return trie.longest_match(context, trie.max_depth - 1)
    m, node = prev
    if node is not None and m + 1 < trie.max_depth:
        child = node.children.get(context[-1])
        if child is not None and child.children:
            return m + 1, child
    return trie.longest_match(context, m + 1)


class SuffixProposer(Proposer):
    name = "suffix"
    makes_trees = True
    Options = SuffixOptions

    def __init__(self, options=None):
        super().__init__(options)
        o: SuffixOptions = self.options
        self._requests: dict[str, _RequestState] = {}
        self._separators: frozenset[int] = frozenset()
        self._global = SuffixTrie(o.max_depth)
        self._global_seqs: OrderedDict[str, list[int]] = OrderedDict()
        self._global_tokens = 0
        self.calibrator = Calibrator()

    def bind(self, model: ModelInfo) -> None:
        self._separators = frozenset(model.placeholder_token_ids)
        self._global = SuffixTrie(self.options.max_depth, self._separators)

    # ---- state -----------------------------------------------------------
    def _sync(self, req: DraftRequest) -> _RequestState:
        st = self._requests.get(req.req_id)
        if st is None:
            st = self._requests[req.req_id] = _RequestState(
                self.options.max_depth, req.num_prompt_tokens, self._separators)
        # Insert whatever the engine committed since the last call.
        toks = req.token_ids
        new = toks[st.num_tokens:len(toks)].tolist()
        for t in new:
            st.cursor.append(t)
        n_out = len(toks) - st.num_prompt_tokens
        if n_out > len(st.output):
            st.output.extend(new[len(new) - (n_out - len(st.output)):])
        st.num_tokens = len(toks)
        return st

    def finish(self, req_id: str) -> None:
        st = self._requests.pop(req_id, None)
        if st is None or self.options.global_cache_tokens == 0:
            return
        # Keep the output for cross-request matching; the prompt stays private.
        if st.output:
            self._remember(req_id, st.output)

    def _remember(self, req_id: str, out: list[int]) -> None:
        budget = self.options.global_cache_tokens
        out = out[-budget:]
        old = self._global_seqs.pop(req_id, None)
        if old is not None:
            self._global.add_sequence(old, -1)
            self._global_tokens -= len(old)
        self._global.add_sequence(out)
        self._global_seqs[req_id] = out
        self._global_tokens += len(out)
        while self._global_tokens > budget:
            _, seq = self._global_seqs.popitem(last=False)
            self._global.add_sequence(seq, -1)
            self._global_tokens -= len(seq)

    # ---- drafting ----------------------------------------------------------
    def propose(self, requests: Sequence[DraftRequest], ctx: StepContext) -> list[DraftTree]:
        drafts, buckets, states = [], [], []
        for req in requests:
            st = self._sync(req)
            if st.last is not None and self.options.calibrate and not req.isolated:
                self.calibrator.record(*st.last, req.new_tokens)
            tree = self.options.tree and req.tree_ok
            d, b = self._draft_tree(st, req) if tree else self._draft(st, req)
            drafts.append(d)
            buckets.append(b)
            states.append(st)
        # Chains and best-first trees both list nodes in decreasing path probability.
        out = fit_batch(drafts, ctx.cost, ctx.batch_tokens, [r.isolated for r in requests])
        for st, d, b in zip(states, out, buckets):
            st.last = (d, b[:len(d)]) if len(d) else None   # fit_batch keeps prefixes
        return out

    def _estimate(self, req: DraftRequest, rank: int, count: int, total: int,
                  m: int) -> tuple[float, tuple]:
        """Acceptance estimate of a continuation seen ``count`` of ``total`` times after
        a match of length ``m``, and its calibration bucket."""
        p = count / total
        b = _bucket(rank, p, total, m)
        if self.options.calibrate and not req.isolated:
            p = self.calibrator.prob(b, p)
        return p, b

    def _matches(self, st: _RequestState, req: DraftRequest, context: list[int],
                 prev: tuple[_Match, _Match] | None = None) -> tuple[_Match, _Match]:
        """Matches of ``context`` in the request's trie and the global trie (``prev``:
        those of ``context[:-1]``)."""
        own = _follow(st.trie, context, prev and prev[0])
        glob = (0, None)
        if self._global_tokens and not req.isolated:
            glob = _follow(self._global, context, prev and prev[1])
        return own, glob

    @staticmethod
    def _best(matches: tuple[_Match, _Match]) -> _Match:
        """The longer match; the request's own on a tie."""
        own, glob = matches
        return glob if glob[0] > own[0] else own

    def _context(self, req: DraftRequest) -> list[int]:
        return req.token_ids[-(self.options.max_depth - 1):].tolist()

    def _draft(self, st: _RequestState, req: DraftRequest) -> tuple[DraftTree, list]:
        o: SuffixOptions = self.options
        if req.max_draft_tokens <= 0:
            return DraftTree.empty(), []
        context = self._context(req)
        draft: list[int] = []
        scores: list[float] = []
        buckets: list[tuple] = []
        prob = 1.0
        limit = req.max_draft_tokens
        first = True
        matches = None
        while len(draft) < limit:
            matches = self._matches(st, req, context, matches)
            m, node = self._best(matches)
            if node is None or m < o.min_match:
                break
            if first:
                limit = min(limit, max(1, int(o.max_spec_factor * m)))
                first = False
            total = 0
            best_tok, best_cnt = -1, 0
            for tok, child in node.children.items():
                total += child.count
                if child.count > best_cnt:
                    best_tok, best_cnt = tok, child.count
            p, b = self._estimate(req, 0, best_cnt, total, m)
            if prob * p < o.min_token_prob:
                break
            prob *= p
            draft.append(best_tok)
            scores.append(p)
            buckets.append(b)
            context.append(best_tok)
        return DraftTree.chain(draft, scores), buckets

    def _draft_tree(self, st: _RequestState, req: DraftRequest) -> tuple[DraftTree, list]:
        o: SuffixOptions = self.options
        if req.max_draft_tokens <= 0:
            return DraftTree.empty(), []
        base = self._context(req)
        root = self._matches(st, req, base)
        m = self._best(root)[0]
        if m < o.min_match:
            return DraftTree.empty(), []
        # Matches per expanded path, so a child's match extends its parent's.
        seen: dict[tuple[int, ...], tuple[_Match, _Match]] = {(): root}
        buckets: dict[tuple[int, ...], tuple] = {}

        def expand(path: Sequence[int]) -> list[tuple[int, float]]:
            path = tuple(path)
            matches = seen.get(path)
            if matches is None:
                matches = seen[path] = self._matches(st, req, base + list(path), seen[path[:-1]])
            m, node = self._best(matches)
            if node is None or m < o.min_match:
                return []
            kids = node.children.items()
            total = sum(child.count for _, child in kids)
            # sorted() is stable: equal counts keep trie order, as the chain's argmax does.
            top = sorted(kids, key=lambda kv: -kv[1].count)[:o.max_branches]
            out = []
            for rank, (tok, child) in enumerate(top):
                p, buckets[path + (tok,)] = self._estimate(req, rank, child.count, total, m)
                out.append((tok, p))
            return out

        tree = best_first(expand, req.max_draft_tokens, min_path_prob=o.min_token_prob,
                          max_depth=max(1, int(o.max_spec_factor * m)))
        return tree, [buckets[path] for path in tree.token_paths()]
