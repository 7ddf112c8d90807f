"""SWIFT and DEL against a toy target whose accuracy depends on the layers run.

The toy language: the target's next token after ``t`` is ``(7 t + 3) mod V``. A draft
forward predicts it only if it runs every "critical" layer (SWIFT) or exits at or after
a given depth (DEL); otherwise it predicts a wrong token, with confidence either way.
The tests run the proposers through simulated decoding (greedy verification against
the toy target, on a simulated clock: a step costs 1 s plus 0.05 s per draft token, a
draft forward 0.02 s plus 0.01 s per layer) and check what they learn and choose.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spec_plugins.cost import CostModel
from spec_plugins.options import OptionError
from spec_plugins.proposers.base import DraftRequest, ModelInfo, StepContext
from spec_plugins.proposers.del_exit import DelProposer
from spec_plugins import clock
from spec_plugins.proposers.layerskip import Acceptance, DraftTimer, best_length, draft_chains
from spec_plugins.proposers.swift import SEARCH_REQUESTS, LayerSetSearch, SwiftProposer

V = 50


def toy_model_info(num_layers: int) -> ModelInfo:
    return ModelInfo(model_path="toy", tokenizer_path="toy", architecture="Toy",
                     num_layers=num_layers, hidden_size=16, vocab_size=64, max_model_len=4096)


class SimClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture(autouse=True)
def sim_clock(monkeypatch):
    sim = SimClock()
    monkeypatch.setattr(clock, "now", sim)
    return sim


def truth(tok: int) -> int:
    return (7 * tok + 3) % V


class ToyTarget:
    def __init__(self, num_layers=12, critical=(), min_exit=None, confidence=0.9, room=64):
        self.num_layers = num_layers
        self.critical, self.min_exit = set(critical), min_exit
        self.confidence, self._room = confidence, room
        self.calls: list[tuple[list[str], list[int], list[int]]] = []
        self.next_pos: dict[str, int] = {}

    def room(self, req_id):
        return self._room

    def _logits(self, tokens, right):
        out = torch.full((len(tokens), V), -30.0)
        # confidence c on the predicted token, the rest spread evenly
        c = self.confidence
        for j, (t, ok) in enumerate(zip(tokens, right)):
            guess = truth(t) if ok else (truth(t) + 1) % V
            out[j] = float(np.log((1 - c) / (V - 1)))
            out[j, guess] = float(np.log(c))
        return out

    def draft_forward(self, req_ids, token_ids, positions, layers, exits=()):
        self.calls.append((list(req_ids), list(positions), list(layers)))
        clock.now.t += 0.02 + 0.01 * len(layers)
        for r, p in zip(req_ids, positions):
            assert p == self.next_pos[r] or p == self.start[r], (r, p)
            self.next_pos[r] = p + 1
        outs = []
        for count in list(exits) + [len(layers)]:
            run = set(layers[:count])
            if self.min_exit is not None:
                ok = count >= self.min_exit and list(layers[:count]) == list(range(count))
            else:
                ok = self.critical <= run
            outs.append(self._logits(token_ids, [ok] * len(token_ids)))
        return outs

    def bind(self, requests):
        self.start = {r.req_id: len(r.token_ids) - 1 for r in requests}
        self.next_pos = dict(self.start)


class Decoder:
    """Greedy decoding of several requests against the toy target, verifying each
    step's drafts as vLLM's rejection sampler does (longest matching prefix + bonus)."""

    def __init__(self, proposer, target, n_reqs=2, k=4, cost=None, batch_tokens=None):
        self.p, self.t, self.k = proposer, target, k
        proposer.bind(toy_model_info(num_layers=target.num_layers))
        self.seqs = {f"r{i}": [i + 1, truth(i + 1)] for i in range(n_reqs)}
        self.accepted: dict[str, int | None] = {r: None for r in self.seqs}
        self.cost = cost
        self.drafted = self.accepted_total = 0

    def step(self):
        reqs = [DraftRequest(r, np.array(s), 1, s[-1 - (self.accepted[r] or 0):], self.k,
                             self.accepted[r]) for r, s in self.seqs.items()]
        self.t.bind(reqs)
        ctx = StepContext(cost=self.cost, batch_tokens=len(reqs), target_model=self.t)
        trees = self.p.propose(reqs, ctx)
        for req, tree in zip(reqs, trees):
            assert tree.is_chain and len(tree) <= self.k
            seq = self.seqs[req.req_id]
            n = 0
            for tok in tree.tokens:
                if tok != truth(seq[-1]):
                    break
                seq.append(tok)
                n += 1
            seq.append(truth(seq[-1]))  # bonus / corrected token
            self.accepted[req.req_id] = n if len(tree) else None
            self.drafted += len(tree)
            self.accepted_total += n
        clock.now.t += 1.0 + 0.05 * sum(len(t) for t in trees)
        return trees


def test_draft_chains_stops_at_low_confidence_and_at_limits():
    target = ToyTarget(critical=(), confidence=0.9)
    reqs = [DraftRequest("a", np.array([1, 2, 3]), 1, [3], 8),
            DraftRequest("b", np.array([4, 5]), 1, [5], 8)]
    target.bind(reqs)
    chains = draft_chains(target, reqs, list(range(12)), [3, 1], 0.5, DraftTimer())
    assert chains == [[truth(3), truth(truth(3)), truth(truth(truth(3)))], [truth(5)]]
    # positions start at the last committed token and advance one per forward
    assert target.calls[0][1] == [2, 1] and target.calls[1][1] == [3]
    low = ToyTarget(confidence=0.3)
    low.bind(reqs)
    assert draft_chains(low, reqs, list(range(12)), [3, 3], 0.5, DraftTimer()) == [[], []]


def test_best_length_drafts_only_when_it_pays():
    assert best_length(0.0, 8, 1.0, 0.01, 0.01) == (0, 1.0)
    n, gain = best_length(0.95, 8, 1.0, 0.01, 0.01)
    assert n == 8 and gain > 5
    # a draft token costing as much as a step never pays below 100% acceptance
    assert best_length(0.9, 8, 1.0, 1.0, 0.1)[0] == 0
    # brute force agrees
    a, t_step, t_draft, t_tok = 0.7, 1.0, 0.2, 0.1
    rates = [sum(a ** i for i in range(n + 1)) / (t_step + n * (t_draft + t_tok)) for n in range(9)]
    assert best_length(a, 8, t_step, t_draft, t_tok)[0] == int(np.argmax(rates))


def test_acceptance_timer_and_backoff():
    acc = Acceptance(prior=0.5, weight=2, decay=1.0)
    acc.observe(4, 4)   # reached 4, all accepted
    acc.observe(4, 1)   # reached 2, one accepted
    assert acc.rate == pytest.approx((1 + 4 + 1) / (2 + 4 + 2))
    timer = DraftTimer(decay=1.0)
    timer.observe(5, 0.5)   # a first call (kernel set-up) is not counted
    for layers in (5, 10, 20):
        timer.observe(layers, 0.002 + 0.001 * layers)
    assert timer.time(30, prior_per_layer=0.001) == pytest.approx(0.032, rel=1e-6)


def test_layer_set_search_finds_a_set_without_harmful_layers():
    layers = list(range(1, 21))
    bad = {3, 7, 11, 15, 19}
    search = LayerSetSearch(layers, 8, random_trials=6, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(30):
        skip = search.propose()
        assert len(skip) == 8 and set(skip) <= set(layers)
        search.record(skip, 0.9 - 0.15 * len(bad & set(skip)) + rng.normal(0, 0.01))
    best, score = search.best()
    assert not bad & set(best), best
    # random search alone rarely gets there: C(15, 8) / C(20, 8) = 5% of the sets
    assert score > 0.85


def test_swift_search_avoids_critical_layers_then_drafts_accurately(caplog):
    target = ToyTarget(num_layers=12, critical=(2, 5, 8), confidence=0.95)
    p = SwiftProposer({"skip_ratio": 0.34, "trial_steps": 2, "random_trials": 4,
                       "search_trials": 16, "seed": 3})
    dec = Decoder(p, target, n_reqs=6, cost=CostModel.linear(1.0, 0.05))
    searched = []
    with caplog.at_level("INFO", logger="spec_plugins"):
        for _ in range(60):
            # The session runs a searching method whatever its payoff gate says; the
            # search keeps its cost down by drafting for a few requests only.
            exploring = p.exploring
            trees = dec.step()
            if exploring and p.exploring:   # (a search that ends drafts in full)
                searched.append(sum(len(t) > 0 for t in trees))
    assert not p.exploring and p.drafter_version == 1   # the gate re-measures the set
    assert len(searched) >= 16 * 2 and max(searched) == SEARCH_REQUESTS
    assert len(p.skip) == 4 and not set(p.skip) & {0, 2, 5, 8, 11}
    assert "swift chose skip layers" in caplog.text
    drafted, accepted = dec.drafted, dec.accepted_total
    for _ in range(20):
        dec.step()
    assert dec.drafted - drafted >= 0.95 * 20 * 6 * 4   # full drafts for every request
    assert dec.accepted_total - accepted == dec.drafted - drafted


def test_swift_fixed_layers_and_isolated_requests():
    p = SwiftProposer({"skip_layers": [3, 4], "min_confidence": 0.0})
    target = ToyTarget(num_layers=12, critical=(4,))
    dec = Decoder(p, target, cost=CostModel.linear(1.0, 0.05))
    for _ in range(8):  # the prior says 10 of 12 layers do not pay: it explores at step 8
        dec.step()
    assert target.calls and target.calls[0][2] == [0, 1, 2, 5, 6, 7, 8, 9, 10, 11]
    # an isolated (seeded) request drafts at full length with the fixed spread set
    iso = SwiftProposer({"min_confidence": 0.0})
    target = ToyTarget(num_layers=12)
    req = DraftRequest("s", np.array([1, 2]), 1, [2], 3, isolated=True)
    iso.bind(toy_model_info(num_layers=12))
    target.bind([req])
    trees = iso.propose([req], StepContext(cost=CostModel.linear(1.0, 0.05),
                                           target_model=target))
    assert len(trees[0]) == 3
    assert all(c[2] == iso.layers(iso.fixed_isolated) for c in target.calls)
    assert len(iso.fixed_isolated) == round(0.45 * 12)
    with pytest.raises(OptionError, match="swift.skip_layers"):
        SwiftProposer({"skip_layers": [3, 40]}).bind(toy_model_info(num_layers=12))
    with pytest.raises(OptionError, match="swift.skip_layers must be tuple"):
        SwiftProposer({"skip_layers": "3,4"})
    with pytest.raises(OptionError, match="swift.skip_ratio"):
        SwiftProposer({"skip_ratio": 2.0})


def test_del_learns_the_shallowest_accurate_exit():
    target = ToyTarget(num_layers=30, min_exit=18, confidence=0.95)
    p = DelProposer({"min_exit": 0.2, "max_exit": 0.8, "num_exits": 7})
    assert p.options.exit_layer == 0
    dec = Decoder(p, target, cost=CostModel.linear(1.0, 0.05))
    for _ in range(40):
        dec.step()
    assert p.exits == [6, 9, 12, 15, 18, 21, 24]
    rates = {e: a.rate for e, a in p.stream.items()}
    assert rates[18] > 0.8 and rates[15] < 0.3, rates
    # drafting now uses exit 18 (probes run 24 layers): accepted, nearly every step
    calls, drafted, accepted = len(target.calls), dec.drafted, dec.accepted_total
    for _ in range(20):
        dec.step()
    assert {len(c[2]) for c in target.calls[calls:]} <= {18, 24}
    assert dec.drafted - drafted >= 0.8 * 20 * 2 * 4
    assert dec.accepted_total - accepted == dec.drafted - drafted


def test_del_stops_drafting_and_backs_off_probes_when_nothing_pays():
    target = ToyTarget(num_layers=30, min_exit=31, confidence=0.95)  # no exit is right
    p = DelProposer({"warmup_steps": 2, "probe_every": 2})
    dec = Decoder(p, target, cost=CostModel.linear(1.0, 0.05))
    for _ in range(60):
        dec.step()
    late = len(target.calls)
    for _ in range(20):
        dec.step()
    assert len(target.calls) - late <= 2          # probes only, rarely
    assert p.probing.every >= 16
    assert sum(a.rate for a in p.stream.values()) / len(p.stream) < 0.15


def test_del_options_are_validated():
    with pytest.raises(OptionError, match="del.min_exit"):
        DelProposer({"min_exit": 0.9, "max_exit": 0.5})
    with pytest.raises(OptionError, match="del.exit_layer=40"):
        DelProposer({"exit_layer": 40}).bind(toy_model_info(num_layers=30))
