"""SWIFT (Xia et al. 2024): self-speculation by skipping intermediate layers of the
target, with the skipped set optimised on the fly for the current input stream.

The draft runs the target with ``round(skip_ratio * L)`` of its layers skipped (the
first and last layer always run), through the adapter's ``TargetModel`` handle: the
same weights, the target's KV for the context, its own KV for the draft tokens.

Layer-set search (the optimisation phase). While the server decodes, candidate skip
sets take turns drafting for the whole batch, ``trial_steps`` steps each, and are
scored by their per-token acceptance (accepted / reached draft tokens); all candidates
have the same size, hence the same draft cost. The first ``random_trials`` candidates
are random; later ones come from Bayesian optimisation with a Bayesian linear
surrogate (acceptance ~ intercept + sum of per-layer effects of skipping it): a
Thompson sample of the effects is drawn and its best set (the layers whose skipping
hurts least) is tried next. After ``search_trials`` candidates the best observed set is
kept (the acceleration phase) and logged; with ``search_every`` > 0 the search runs
again after that many steps, for a stream whose content has changed.

Confidence early stop: a draft ends before its first token whose top-1 probability is
below ``min_confidence``. Draft length: once the adapter's verify-cost model is
calibrated, each request drafts the length that maximises committed tokens per second
given the set's acceptance, draft and verify costs (``layerskip.best_length``), which is
0 when drafting does not pay; it then drafts anyway after ``explore_every`` steps, so the
acceptance estimate stays current, at intervals that double (up to 256 steps) while
drafting keeps not paying. Above both, the adapter session's payoff gate compares
measured tokens per second of decoding cycles with the method and without it and turns
the method off (retrying rarely) where it is slower; every ``log_every`` steps the set,
its acceptance and its costs are logged. The search runs whatever the gate says
(``exploring``), but drafts for at most ``SEARCH_REQUESTS`` requests per step, so that at
64 concurrent it costs little more than at 4.

``skip_layers`` fixes the set (no search). Requests marked ``isolated`` (seeded
sampling) always use a fixed, evenly spread set and the longest allowed draft, so
their drafts depend on their own tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from spec_plugins.options import MethodOptions, OptionError, opt
from spec_plugins.proposers.base import DraftRequest, ModelInfo, Proposer, StepContext
from spec_plugins.payoff import Backoff
from spec_plugins.proposers.layerskip import (Acceptance, DraftTimer, best_length,
                                              chains_to_trees, describe_costs, draft_chains,
                                              step_costs)
from spec_plugins.tree import DraftTree


@dataclass(frozen=True)
class SwiftOptions(MethodOptions):
    skip_ratio: float = opt(0.45, lo=0.0, hi=0.9, help="share of the layers the draft skips")
    skip_layers: tuple[int, ...] = opt((), lo=0, help="layer indices to skip (no search); "
                                                       "empty: search")
    min_confidence: float = opt(0.6, lo=0.0, hi=1.0,
                                help="end a draft before a token less likely than this")
    trial_steps: int = opt(4, lo=1, hi=1000, help="steps each candidate set drafts in the search "
                                                  "(a step without a confident draft counts)")
    random_trials: int = opt(6, lo=1, hi=1000, help="random candidates before Bayesian ones")
    search_trials: int = opt(24, lo=1, hi=10000, help="candidates tried per search")
    search_every: int = opt(0, lo=0, hi=10**9,
                            help="steps after a search before searching again (0: never)")
    explore_every: int = opt(8, lo=1, hi=10**6,
                             help="when drafting does not pay, draft anyway after this many "
                                  "steps (doubling while it still does not pay, up to 256)")
    seed: int = opt(0, lo=0, hi=2**31 - 1, help="seed of the random search")
    log_every: int = opt(256, lo=1, hi=10**9, help="steps between logs of what it measured")



# Requests a search step drafts for (the first in the batch): enough to score a set.
SEARCH_REQUESTS = 4


def spread(candidates: Sequence[int], m: int) -> tuple[int, ...]:
    """``m`` of ``candidates`` spread evenly (the fixed set of isolated requests)."""
    if m <= 0:
        return ()
    idx = np.linspace(0, len(candidates) - 1, m).round().astype(int)
    return tuple(sorted({candidates[i] for i in idx}))


class LayerSetSearch:
    """Random search, then Thompson sampling from a Bayesian linear surrogate, over skip
    sets of a fixed size; :meth:`best` is the best set observed (a set whose drafts all
stopped at low confidence scores 0)."""

    def __init__(self, candidates: Sequence[int], size: int, random_trials: int, seed: int,
                 noise: float = 0.05, prior_var: float = 0.05):
        self.candidates = list(candidates)
        self.size = min(size, len(self.candidates))
        self.random_trials = random_trials
        self.rng = np.random.default_rng(seed)
        self.noise, self.prior_var = noise, prior_var
        self.tried: list[tuple[tuple[int, ...], float]] = []

    def _features(self, skip: Sequence[int]) -> np.ndarray:
        x = np.zeros(len(self.candidates) + 1)
        x[0] = 1.0
        for layer in skip:
            x[1 + self.candidates.index(layer)] = 1.0
        return x

    def propose(self) -> tuple[int, ...]:
        if len(self.tried) < self.random_trials:
            pick = self.rng.choice(len(self.candidates), self.size, replace=False)
            return tuple(sorted(self.candidates[i] for i in pick))
        x = np.array([self._features(s) for s, _ in self.tried])
        y = np.array([a for _, a in self.tried])
        # Posterior of the weights under a N(0, prior_var) prior (the intercept's prior
        # is centred on the mean acceptance) and Gaussian noise.
        prec = np.eye(x.shape[1]) / self.prior_var + x.T @ x / self.noise ** 2
        cov = np.linalg.inv(prec)
        mean_prior = np.zeros(x.shape[1])
        mean_prior[0] = y.mean()
        mean = cov @ (mean_prior / self.prior_var + x.T @ y / self.noise ** 2)
        w = self.rng.multivariate_normal(mean, (cov + cov.T) / 2)
        order = np.argsort(-w[1:], kind="stable")
        return tuple(sorted(self.candidates[i] for i in order[: self.size]))

    def record(self, skip: tuple[int, ...], acceptance: float) -> None:
        self.tried.append((skip, acceptance))

    def best(self) -> tuple[tuple[int, ...], float]:
        return max(self.tried, key=lambda t: t[1])


class SwiftProposer(Proposer):
    name = "swift"
    needs = frozenset({"target_model"})
    Options = SwiftOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.timer = DraftTimer()
        self._num_layers = 0
        self._pending: dict[str, tuple[tuple[int, ...], int]] = {}  # req -> (skip, drafted)
        self._steps = 0
        self.explore = Backoff(self.options.explore_every)

    def bind(self, model: ModelInfo) -> None:
        self._setup(model.num_layers)

    def _setup(self, num_layers: int) -> None:
        o = self.options
        self._num_layers = num_layers
        middle = list(range(1, num_layers - 1))
        m = min(round(o.skip_ratio * num_layers), len(middle))
        self.fixed_isolated = spread(middle, m)
        self.search = None
        self.searching = False
        self._search_done_at = 0
        if o.skip_layers:
            skip = tuple(sorted(set(o.skip_layers)))
            if any(v >= num_layers for v in skip) or len(skip) >= num_layers:
                raise OptionError(
                    f"swift.skip_layers={list(o.skip_layers)} must list distinct layer indices "
                    f"in [0, {num_layers - 1}], fewer than all {num_layers} layers")
            self.skip = skip
        else:
            self.search = LayerSetSearch(middle, m, o.random_trials, o.seed)
            self._start_search()
        self.stats: dict[tuple[int, ...], Acceptance] = {}

    def _start_search(self) -> None:
        self.searching = True
        self.search.tried.clear()
        self.skip = self.search.propose()
        self._trial = [0, 0, 0]  # steps, reached draft tokens, accepted

    def _end_trial(self, ctx: StepContext) -> None:
        _, reached, accepted = self._trial
        self.search.record(self.skip, accepted / max(reached, 1))
        if len(self.search.tried) >= self.options.search_trials:
            self.skip, score = self.search.best()
            self.searching = False
            self.drafter_version += 1   # the gate measures the chosen set afresh
            self._search_done_at = self._steps
            self.logger.info(
                "spec_plugins: swift chose skip layers %s (%d of %d layers run; acceptance "
                "%.2f in the search over %d sets, from %.2f to %.2f; %s)", list(self.skip),
                self._num_layers - len(self.skip), self._num_layers, score,
                len(self.search.tried), min(a for _, a in self.search.tried),
                max(a for _, a in self.search.tried),
                describe_costs(ctx, self.timer, self._num_layers))
        else:
            self.skip = self.search.propose()
        self._trial = [0, 0, 0]

    def layers(self, skip: Sequence[int]) -> list[int]:
        s = set(skip)
        return [i for i in range(self._num_layers) if i not in s]

    @property
    def exploring(self) -> bool:
        return self.searching

    def finish(self, req_id: str) -> None:
        self._pending.pop(req_id, None)

    def propose(self, requests: Sequence[DraftRequest], ctx: StepContext) -> list[DraftTree]:
        model = ctx.target_model
        if model is None:
            raise RuntimeError("swift needs StepContext.target_model")
        if self._num_layers != model.num_layers:
            raise RuntimeError(f"swift was bound to a {self._num_layers}-layer model; "
                               f"the target model handle has {model.num_layers} layers")
        self._steps += 1
        # Credit last step's drafts to the sets that made them.
        for req in requests:
            prev = self._pending.pop(req.req_id, None)
            if prev is None or req.num_accepted is None:
                continue
            skip, drafted = prev
            self.stats.setdefault(skip, Acceptance()).observe(drafted, req.num_accepted)
            if self.search is not None and self.searching and skip == self.skip:
                acc = req.num_accepted
                self._trial[1] += acc + (1 if acc < drafted else 0)
                self._trial[2] += acc
        if self.search is not None:
            if self.searching and self._trial[0] >= self.options.trial_steps:
                self._end_trial(ctx)
            elif (not self.searching and self.options.search_every
                  and self._steps - self._search_done_at >= self.options.search_every):
                self._start_search()

        limits = []
        t_step, t_token = step_costs(ctx)
        stats = self.stats.setdefault(self.skip, Acceptance())
        explore = not self.searching and self.explore.due()
        t_draft = self.timer.time(len(self.layers(self.skip)), t_step * ctx.batch_tokens / self._num_layers)
        searched = 0
        for req in requests:
            lim = min(req.max_draft_tokens, model.room(req.req_id))
            if req.isolated:
                pass
            elif self.searching:
                searched += 1
                lim = lim if searched <= SEARCH_REQUESTS else 0
            elif not explore:
                lim = min(lim, best_length(stats.rate, lim, t_step,
                                           t_draft / len(requests), t_token)[0])
            limits.append(lim)
        if explore:
            self.explore.paid(False)   # wait longer before the next try
        elif any(limits):
            self.explore.paid(True)

        trees = [DraftTree.empty() for _ in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(self.fixed_isolated if req.isolated else self.skip, []).append(i)
        for skip, idx in groups.items():
            chains = draft_chains(model, [requests[i] for i in idx], self.layers(skip),
                                  [limits[i] for i in idx], self.options.min_confidence,
                                  self.timer)
            for i, tree in zip(idx, chains_to_trees(chains)):
                trees[i] = tree
                if len(tree):
                    self._pending[requests[i].req_id] = (skip, len(tree))
        if self.searching:
            self._trial[0] += 1   # the search lasts search_trials * trial_steps steps
        if self._steps % self.options.log_every == 0 and not self.searching:
            self.logger.info(
                "spec_plugins: swift skips layers %s; acceptance %.2f; %s",
                list(self.skip), stats.rate,
                describe_costs(ctx, self.timer, self._num_layers))
        return trees
