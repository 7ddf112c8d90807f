"""A toy engine for proposer tests: a deterministic target and a greedy speculative loop."""

import numpy as np
import pytest

from spec_plugins.proposers.base import DraftRequest, StepContext
from spec_plugins.verify import verify_greedy


class ToyTarget:
    """A fixed Markov "model": the logits after a context are ``A[last token] + mix *
    B[token before it]`` (``mix`` sets how often the last token alone does not decide)."""

    def __init__(self, vocab=32, mix=0.3, seed=0):
        rng = np.random.default_rng(seed)
        self.vocab, self.mix = vocab, mix
        self.A = rng.normal(size=(vocab, vocab))
        self.B = rng.normal(size=(vocab, vocab))

    def logits(self, context):
        return self.A[context[-1]] + self.mix * self.B[context[-2] if len(context) > 1 else 0]

    def greedy(self, prompt, n):
        out = list(prompt)
        for _ in range(n):
            out.append(int(self.logits(out).argmax()))
        return out[len(prompt):]


def speculate(proposer, target, prompts, max_new, max_draft=8, cost=None, isolated=(),
              tree_ok=True):
    """Greedy speculative decoding of ``prompts`` as one batch, the way an engine adapter
    drives a proposer (prefill, then propose / verify / commit steps; ``target_topk``
    for the root and every node). Returns the outputs and, per request, the draft
    tokens accepted at each step."""
    k = max(proposer.topk, 1)
    topk = lambda logits: np.argsort(-logits, axis=-1)[..., :k]
    ids = [f"r{i}" for i in range(len(prompts))]
    prompt = dict(zip(ids, map(list, prompts)))
    out, accepted, verified = {}, {r: [] for r in ids}, {}
    for r in ids:  # prefill: the first token; the top-k after the prompt's last token
        logits = target.logits(prompt[r])
        out[r] = [int(logits.argmax())]
        verified[r] = (np.array(prompt[r][-1:]), topk(logits)[None])
    live = list(ids)
    while live:
        reqs = [DraftRequest(r, np.array(prompt[r] + out[r]), len(prompt[r]), out[r][-1:] if not accepted[r]
                             else out[r][-accepted[r][-1] - 1:], max_draft,
                             accepted[r][-1] if accepted[r] else None,
                             isolated=r in isolated, tree_ok=tree_ok) for r in live]
        ctx = StepContext(cost=cost, batch_tokens=len(live),
                          target_topk=[verified.pop(r, None) for r in live])
        for req, tree in zip(reqs, proposer.propose(reqs, ctx)):
            tree.validate()
            assert tree_ok or tree.is_chain
            assert len(tree) <= req.max_draft_tokens
            pp = tree.path_probs()
            assert all(a >= b for a, b in zip(pp, pp[1:])), "nodes not in path-prob order"
            ctx_tokens = req.token_ids.tolist()
            logits = np.stack([target.logits(ctx_tokens)] + [
                target.logits(ctx_tokens + [tree.tokens[j] for j in tree.path_to(i)])
                for i in range(len(tree))])
            verdict = verify_greedy(tree, logits)
            r = req.req_id
            accepted[r].append(verdict.num_accepted)
            out[r] += verdict.emitted
            verified[r] = (np.array(ctx_tokens[-1:] + tree.tokens), topk(logits))
            if len(out[r]) >= max_new:
                out[r] = out[r][:max_new]
                live.remove(r)
                proposer.finish(r)
    return [out[r] for r in ids], [accepted[r] for r in ids]


@pytest.fixture
def toy():
    """The toy target class: ``toy(vocab=, mix=, seed=)``."""
    return ToyTarget


@pytest.fixture
def run():
    return speculate
