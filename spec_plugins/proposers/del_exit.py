"""DEL (Entezari Zarch et al. 2025): early-exit self-speculation with the exit layer and
the speculation length chosen per context from acceptance tracked online.

The draft runs the target's first ``E`` layers, then its final norm and LM head
(through the adapter's ``TargetModel`` handle: same weights, target KV for the
context). For the first draft token of a step those ``E`` layers compute exactly what
the target computes for the last committed token, so their KV is the target's.

Acceptance per exit layer. A probe step runs the first draft token up to the deepest
candidate exit and reads the LM head after every candidate ``E`` (``exits`` of the
handle); the next step reveals the token the target committed there, and each
candidate scores a hit or a miss. Every real draft also scores its exit per reached
token. Estimates are kept for the stream (all requests) and per request (starting from
the stream's, with forgetting), so a request whose text is easy for shallow exits moves
to them: that is DEL's context awareness. Requests probe on every step of their first
``warmup_steps``; after that the batch probes every ``probe_every`` steps, an interval
that doubles (up to 256 steps) while no exit pays for any request.

Exit and length choice. Per request and candidate ``E``: the draft length that
maximises committed tokens per second given the acceptance at ``E``, the draft cost of
``E`` layers (timed online, ``a + b * E``) and the verify cost per draft token (the
adapter's cost model) (``layerskip.best_length``); the pair with the best rate wins,
no draft at all if none beats not drafting. Above that, the adapter session's payoff
gate turns the method off, probes included, in batch-size classes where decoding cycles
with it are measured to commit fewer tokens per second than cycles without (retrying
rarely). A draft also ends before its first token
below ``min_confidence`` (dynamic draft exit). Every ``log_every`` steps the exits
chosen and the acceptance per candidate are logged.

``exit_layer`` fixes ``E`` (no probes). Requests marked ``isolated`` (seeded sampling)
use the middle candidate and the longest allowed draft, without probes, so their drafts
depend on their own tokens only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from spec_plugins.options import MethodOptions, OptionError, opt
from spec_plugins.proposers.base import DraftRequest, ModelInfo, Proposer, StepContext
from spec_plugins.payoff import Backoff
from spec_plugins.proposers.layerskip import (Acceptance, DraftTimer, best_length,
                                              chains_to_trees, describe_costs, draft_chains,
                                              step_costs)
from spec_plugins.tree import DraftTree


@dataclass(frozen=True)
class DelOptions(MethodOptions):
    exit_layer: int = opt(0, lo=0, hi=10**4, help="fixed exit layer E (0: choose online)")
    min_exit: float = opt(0.2, lo=0.0, hi=1.0, help="shallowest candidate exit, share of layers")
    max_exit: float = opt(0.8, lo=0.0, hi=1.0, help="deepest candidate exit, share of layers")
    num_exits: int = opt(6, lo=1, hi=64, help="candidate exit layers, evenly spread")
    min_confidence: float = opt(0.5, lo=0.0, hi=1.0,
                                help="end a draft before a token less likely than this")
    warmup_steps: int = opt(4, lo=0, hi=10**6, help="steps a new request probes every step")
    probe_every: int = opt(8, lo=1, hi=10**6,
                           help="steps between probes afterwards (doubling, up to 256, "
                                "while no exit pays)")
    log_every: int = opt(256, lo=1, hi=10**9, help="steps between logs of the chosen exits")

    def validate(self, where: str) -> None:
        if self.min_exit > self.max_exit:
            raise OptionError(f"{where}.min_exit={self.min_exit} must not exceed "
                              f"{where}.max_exit={self.max_exit}")


# Weight (in tokens) of the stream's estimate when a request's own estimate starts.
_REQUEST_PRIOR_WEIGHT = 4.0


class DelProposer(Proposer):
    name = "del"
    needs = frozenset({"target_model"})
    Options = DelOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.timer = DraftTimer()
        self._num_layers = 0
        self._steps = 0
        self._chosen: Counter = Counter()
        self.probing = Backoff(self.options.probe_every)

    def bind(self, model: ModelInfo) -> None:
        self._setup(model.num_layers)

    def _setup(self, num_layers: int) -> None:
        o = self.options
        self._num_layers = num_layers
        if o.exit_layer:
            if not 1 <= o.exit_layer <= num_layers:
                raise OptionError(f"del.exit_layer={o.exit_layer} must be in [1, {num_layers}] "
                                  f"for this {num_layers}-layer model (0: choose online)")
            self.exits = [o.exit_layer]
        else:
            lo = max(1, round(o.min_exit * num_layers))
            hi = max(lo, round(o.max_exit * num_layers))
            self.exits = sorted({int(e) for e in np.linspace(lo, hi, o.num_exits).round()})
        self.stream = {e: Acceptance() for e in self.exits}
        # All probes so far: how often each exit's first draft token was the target's.
        self.probes, self.probe_hits = 0, Counter()
        self.per_req: dict[str, dict[int, Acceptance]] = {}
        self.age: dict[str, int] = {}
        self._probes: dict[str, tuple[int, dict[int, int]]] = {}  # req -> (index, exit -> token)
        self._pending: dict[str, tuple[int, int, bool]] = {}  # req -> (exit, drafted, probed)

    def finish(self, req_id: str) -> None:
        for d in (self.per_req, self.age, self._probes, self._pending):
            d.pop(req_id, None)

    def _stats(self, req_id: str) -> dict[int, Acceptance]:
        if req_id not in self.per_req:
            self.per_req[req_id] = {
                e: Acceptance(prior=a.rate, weight=_REQUEST_PRIOR_WEIGHT)
                for e, a in self.stream.items()}
        return self.per_req[req_id]

    def _learn(self, req: DraftRequest) -> None:
        own = self._stats(req.req_id)
        probe = self._probes.pop(req.req_id, None)
        if probe is not None:
            index, guesses = probe
            if index < len(req.token_ids):
                truth = int(req.token_ids[index])
                for e, tok in guesses.items():
                    hit = int(tok == truth)
                    for a in (own[e], self.stream[e]):
                        a.observe(1, hit)
                    self.probe_hits[e] += hit
                self.probes += 1
        prev = self._pending.pop(req.req_id, None)
        if prev is not None and req.num_accepted is not None:
            e, drafted, probed = prev
            acc = req.num_accepted
            if probed:  # its probe scored the first draft token already
                if acc == 0:
                    return
                drafted, acc = drafted - 1, acc - 1
            for a in (own[e], self.stream[e]):
                a.observe(drafted, acc)

    def _choose(self, req: DraftRequest, limit: int, t_step: float, t_token: float,
                t_draft: dict[int, float]) -> tuple[int, int]:
        """(exit, length) with the best expected rate for this request; ``t_draft[e]``:
        its share of a draft forward at exit ``e``."""
        own = self._stats(req.req_id)
        best = (self.exits[0], 0, 1.0)
        for e in self.exits:
            n, gain = best_length(own[e].rate, limit, t_step, t_draft[e], t_token)
            if n and gain > best[2]:
                best = (e, n, gain)
        return best[0], best[1]

    def propose(self, requests: Sequence[DraftRequest], ctx: StepContext) -> list[DraftTree]:
        model = ctx.target_model
        if model is None:
            raise RuntimeError("del needs StepContext.target_model")
        if self._num_layers != model.num_layers:
            raise RuntimeError(f"del was bound to a {self._num_layers}-layer model; "
                               f"the target model handle has {model.num_layers} layers")
        self._steps += 1
        o = self.options
        for req in requests:
            self._learn(req)
        limits = [min(r.max_draft_tokens, model.room(r.req_id)) for r in requests]

        # Probes: the first draft token up to the deepest exit, read at every exit.
        first: list[tuple[int, float] | None] = [None] * len(requests)
        probe_idx = []
        if not o.exit_layer:
            due = self.probing.due()
            for i, req in enumerate(requests):
                age = self.age[req.req_id] = self.age.get(req.req_id, 0) + 1
                if not req.isolated and limits[i] > 0 and (age <= o.warmup_steps or due):
                    probe_idx.append(i)
        probed: dict[int, dict[int, tuple[int, float]]] = {}
        if probe_idx:
            reqs = [requests[i] for i in probe_idx]
            outs = model.draft_forward(
                [r.req_id for r in reqs], [int(r.token_ids[-1]) for r in reqs],
                [len(r.token_ids) - 1 for r in reqs], list(range(self.exits[-1])),
                exits=self.exits[:-1])
            for e, logits in zip(self.exits, outs):
                conf, top = torch.softmax(logits.float(), dim=-1).max(dim=-1)
                for j, i in enumerate(probe_idx):
                    probed.setdefault(i, {})[e] = (int(top[j]), float(conf[j]))
            for i in probe_idx:
                req = requests[i]
                self._probes[req.req_id] = (len(req.token_ids),
                                            {e: t for e, (t, _) in probed[i].items()})

        t_step, t_token = step_costs(ctx)
        group = len(requests)
        # One fit of the draft-cost model per step; the batch shares each draft forward.
        t_draft = {e: self.timer.time(e, t_step * group / self._num_layers) / group
                   for e in self.exits}
        groups: dict[int, list[int]] = {}
        lengths = list(limits)
        middle = self.exits[len(self.exits) // 2]
        pays = False
        for i, req in enumerate(requests):
            if limits[i] <= 0:
                continue
            if req.isolated:
                e = middle
            elif o.exit_layer:
                e = o.exit_layer
            else:
                e, lengths[i] = self._choose(req, limits[i], t_step, t_token, t_draft)
                if lengths[i] == 0:
                    continue
                pays = True
                self._chosen[e] += 1
            groups.setdefault(e, []).append(i)
            if i in probed:
                first[i] = probed[i][e]

        if pays:
            self.probing.paid(True)
        elif not o.exit_layer and due:
            self.probing.paid(False)   # probed, still nothing pays: wait longer
        trees = [DraftTree.empty() for _ in requests]
        for e, idx in groups.items():
            chains = draft_chains(model, [requests[i] for i in idx], list(range(e)),
                                  [lengths[i] for i in idx], o.min_confidence, self.timer,
                                  first=[first[i] for i in idx])
            for i, tree in zip(idx, chains_to_trees(chains)):
                trees[i] = tree
                if len(tree):
                    self._pending[requests[i].req_id] = (e, len(tree), i in probed)
        if self._steps % o.log_every == 0 and not o.exit_layer:
            self.logger.info(
                "spec_plugins: del exit layers chosen (last %d steps): %s; acceptance per "
                "exit layer (recent): %s; first-token hit rate per exit layer (%d probes): "
                "%s; %s", o.log_every, dict(sorted(self._chosen.items())),
                {e: round(a.rate, 3) for e, a in self.stream.items()}, self.probes,
                {e: round(self.probe_hits[e] / max(self.probes, 1), 3) for e in self.exits},
                describe_costs(ctx, self.timer, self._num_layers))
            self._chosen.clear()
        return trees
