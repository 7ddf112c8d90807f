"""Suffix drafting (in the spirit of SuffixDecoding, Oliaro et al. 2024).

Two depth-limited suffix tries with occurrence counts: one over the request's own
prompt and output, one over recent requests' outputs (bounded by a token budget, oldest
evicted first). To draft, the longest suffix of the context that the tries have seen
followed by something gives a distribution over the next token (counts of what followed
it); the draft takes the most frequent continuation, appends it to the context and
matches again, so drafts can run past the trie depth. It stops when the product of
continuation frequencies (the estimated chance the whole draft is accepted) falls below
``min_token_prob`` or the draft reaches ``max_spec_factor x match length``: long,
confident matches speculate long, weak ones little or not at all. When the engine
supplies a verify-cost model, the drafts of the whole batch are then cut to the tokens
that pay for their verify time (``spec_plugins.budget``): generous at batch 1, strict
in a full batch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from spec_plugins.budget import allocate
from spec_plugins.options import opt, parse_options
from spec_plugins.proposers.base import DraftRequest, Proposer, StepContext
from spec_plugins.tree import DraftTree


class _Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] | None = None


class SuffixTrie:
    """Every substring of length <= ``max_depth`` of the inserted sequences, with the
    number of times it occurs. Appending a token updates the ``max_depth`` substrings
    that end at it, so building costs O(max_depth) per token."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
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
class SuffixOptions:
    max_depth: int = opt(24, lo=2, hi=256, help="longest context pattern matched, in tokens")
    max_spec_factor: float = opt(1.0, lo=0.0, hi=64.0,
                                 help="draft at most this many tokens per matched token")
    min_token_prob: float = opt(0.1, lo=0.0, hi=1.0,
                                help="stop when the estimated acceptance of the draft falls below")
    min_match: int = opt(1, lo=1, hi=256, help="shortest match that may start a draft")
    global_cache_tokens: int = opt(65536, lo=0, hi=1 << 24,
                                   help="output tokens of recent requests kept for cross-request matches")

    @classmethod
    def parse(cls, values, where="suffix"):
        return parse_options(cls, values, where)


class _RequestState:
    __slots__ = ("trie", "cursor", "num_tokens", "num_prompt_tokens", "output")

    def __init__(self, max_depth: int, num_prompt_tokens: int):
        self.trie = SuffixTrie(max_depth)
        self.cursor = self.trie.cursor()
        self.num_tokens = 0
        self.num_prompt_tokens = num_prompt_tokens
        self.output: list[int] = []


class SuffixProposer(Proposer):
    name = "suffix"
    Options = SuffixOptions

    def __init__(self, options=None):
        super().__init__(options)
        o: SuffixOptions = self.options
        self._requests: dict[str, _RequestState] = {}
        self._global = SuffixTrie(o.max_depth)
        self._global_seqs: OrderedDict[str, list[int]] = OrderedDict()
        self._global_tokens = 0

    # ---- state -----------------------------------------------------------
    def _sync(self, req: DraftRequest) -> _RequestState:
        st = self._requests.get(req.req_id)
        if st is None:
            st = self._requests[req.req_id] = _RequestState(
                self.options.max_depth, req.num_prompt_tokens)
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
        chains = [self._draft(self._sync(req), req) for req in requests]
        if ctx.cost is not None:
            gains = [tree.path_probs() for tree in chains]
            keep = allocate(gains, ctx.batch_tokens, ctx.batch_tokens, ctx.cost)
            chains = [DraftTree.chain(t.tokens[:k], t.scores[:k]) for t, k in zip(chains, keep)]
        return chains

    def _draft(self, st: _RequestState, req: DraftRequest) -> DraftTree:
        o: SuffixOptions = self.options
        if req.max_draft_tokens <= 0:
            return DraftTree.empty()
        context = req.token_ids[-(o.max_depth - 1):].tolist()
        draft: list[int] = []
        scores: list[float] = []
        prob = 1.0
        limit = req.max_draft_tokens
        first = True
        while len(draft) < limit:
            m, node = st.trie.longest_match(context, o.max_depth - 1)
            if self._global_tokens and not req.isolated:
                gm, gnode = self._global.longest_match(context, o.max_depth - 1)
                if gm > m:
                    m, node = gm, gnode
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
            p = best_cnt / total
            if prob * p < o.min_token_prob:
                break
            prob *= p
            draft.append(best_tok)
            scores.append(p)
            context.append(best_tok)
        return DraftTree.chain(draft, scores)
