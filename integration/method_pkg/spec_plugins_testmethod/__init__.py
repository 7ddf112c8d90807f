"""A test-only spec_plugins method from another "package" (this folder is put on the
path with its dist-info, as an installed package would be): it registers through the
``spec_plugins.methods`` entry-point group, and its drafts are *sampled* for sampled
requests, from a fixed random draft distribution that knows nothing of the target, so
the verifiers must correct them to stay lossless.

Greedy requests get deterministic drafts (argmax of the same distributions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spec_plugins.lattice import greedy_tree, sampled_tree, topk_lattice
from spec_plugins.options import MethodOptions, opt
from spec_plugins.proposers.base import Proposer


@dataclass(frozen=True)
class SampledOptions(MethodOptions):
    tree: bool = opt(False, help="two branches at the first position (False: chains)")
    depth: int = opt(3, lo=1, hi=16, help="draft positions")
    seed: int = opt(0, lo=0, help="seed of the draft distribution")
    sharpness: float = opt(3.0, lo=0.0, hi=100.0, help="scale of the random draft logits")
    support: int = opt(0, lo=0, help="draft only the first `support` token ids (0: all)")


class SampledProposer(Proposer):
    name = "test_sampled"
    makes_trees = True
    Options = SampledOptions

    def bind(self, model) -> None:
        o = self.options
        g = torch.Generator().manual_seed(o.seed)
        logits = o.sharpness * torch.randn(o.depth, model.vocab_size, generator=g)
        if o.support:
            logits[:, o.support:] = -float("inf")
        self.q = torch.softmax(logits, dim=-1)           # [depth, vocab]
        self.gen = torch.Generator().manual_seed(o.seed + 1)

    def propose(self, requests, ctx):
        out = []
        for req in requests:
            depth = min(self.options.depth, req.max_draft_tokens)
            branches = 2 if self.options.tree and req.tree_ok and depth * 2 <= req.max_draft_tokens else 1
            if req.temperature > 0:
                gen = self.gen
                if req.seed is not None:
                    gen = torch.Generator().manual_seed(req.seed * 7919 + len(req.token_ids))
                out.append(sampled_tree(self.q[:depth], [branches] + [1] * (depth - 1), gen))
            else:
                ids, p = topk_lattice(self.q[:depth], branches)
                out.append(greedy_tree(ids, p, max_nodes=depth * branches))
        return out


@dataclass(frozen=True)
class FaultyOptions(MethodOptions):
    fault: str = opt("cycle", choices=("raise", "oov", "nan", "too_many", "cycle"),
                     help="the fault to inject (cycle: each kind in turn)")
    every: int = opt(2, lo=1, help="inject on every `every`-th step (1: every step)")


class FaultyProposer(Proposer):
    """Drafts the request's last token repeated (harmless chains), except on every
    ``every``-th step, when it injects ``fault``: an exception, a token outside the
    vocabulary, NaN draft distributions, or more nodes than allowed."""
    name = "test_faulty"
    Options = FaultyOptions
    KINDS = ("raise", "oov", "nan", "too_many")

    def bind(self, model) -> None:
        self.vocab = model.vocab_size
        self.calls = 0

    def propose(self, requests, ctx):
        from spec_plugins.tree import DraftTree

        self.calls += 1
        o = self.options
        chains = [DraftTree.chain([int(r.token_ids[-1])] * min(2, r.max_draft_tokens))
                  for r in requests]
        if self.calls % o.every:
            return chains
        kind = self.KINDS[(self.calls // o.every) % 4] if o.fault == "cycle" else o.fault
        if kind == "raise":
            raise RuntimeError("injected drafter failure")
        bad = chains[0]
        if kind == "oov":
            bad = DraftTree.chain([self.vocab + 5])
        elif kind == "nan":
            bad = DraftTree.chain([1])
            bad.dist_rows, bad.draft_dists = [0], torch.full((1, self.vocab), float("nan")).numpy()
        elif kind == "too_many":
            bad = DraftTree.chain([1] * (requests[0].max_draft_tokens + 1))
        return [bad] + chains[1:]
