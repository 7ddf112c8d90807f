"""What the layer-skip (self-speculative) methods share: SWIFT (``swift.py``) and DEL
(``del_exit.py``) draft with a subset of the target's own layers through the adapter's
:class:`~spec_plugins.proposers.base.TargetModel` handle, and differ in how they pick
the subset.

- :func:`draft_chains`: greedy chains for a group of requests that use the same
  layers, one batched draft forward per position, each request stopping at its length
  limit or at the first token whose draft confidence (top-1 probability) is below a
  threshold (the token is dropped: its acceptance chance is about that confidence);
- :class:`DraftTimer`: seconds per draft forward as ``a + b * layers``, fitted online;
- :class:`Acceptance`: per-token acceptance with forgetting (accepted / reached: a draft
  token is reached when all before it were accepted);
- :func:`best_length`: the draft length that maximises committed tokens per second
  under the i.i.d. acceptance model, 0 when drafting does not pay;

When drafting does not pay at all, ``spec_plugins.payoff`` (``PayoffGate``, ``Backoff``)
decides how rarely to try again.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from spec_plugins import clock
from spec_plugins.proposers.base import DraftRequest, StepContext, TargetModel
from spec_plugins.tree import DraftTree


def draft_chains(model: TargetModel, requests: Sequence[DraftRequest], layers: Sequence[int],
                 limits: Sequence[int], min_confidence: float, timer: "DraftTimer",
                 first: Sequence[tuple[int, float] | None] | None = None) -> list[list[int]]:
    """Greedy drafts of up to ``limits[i]`` tokens. ``first[i]``, when given, is the first
    draft token and its confidence, already computed (e.g. by a probe pass that wrote the
    KV of the last committed token in at least ``layers``)."""
    chains: list[list[int]] = [[] for _ in requests]
    active = []
    for i, (req, lim) in enumerate(zip(requests, limits)):
        if lim <= 0:
            continue
        if first is not None and first[i] is not None:
            tok, conf = first[i]
            if conf < min_confidence:
                continue
            chains[i].append(tok)
            if lim == 1:
                continue
        active.append(i)
    while active:
        ids = [requests[i].req_id for i in active]
        last = [chains[i][-1] if chains[i] else int(requests[i].token_ids[-1]) for i in active]
        pos = [len(requests[i].token_ids) - 1 + len(chains[i]) for i in active]
        t0 = clock.now()
        logits = model.draft_forward(ids, last, pos, layers)[-1]
        conf, top = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        conf, top = conf.tolist(), top.tolist()
        timer.observe(len(layers), clock.now() - t0, len(active))
        still = []
        for j, i in enumerate(active):
            if conf[j] < min_confidence:
                continue
            chains[i].append(top[j])
            if len(chains[i]) < limits[i]:
                still.append(i)
        active = still
    return chains


def chains_to_trees(chains: Sequence[Sequence[int]]) -> list[DraftTree]:
    return [DraftTree.chain(c) for c in chains]


class DraftTimer:
    """Seconds per draft forward ``a + b * layers`` (ridge fit pulled toward a prior slope,
    recent calls weighted most), so that one layer count suffices to predict others."""

    def __init__(self, decay: float = 0.98):
        self.decay = decay
        self.s = np.zeros(5)  # sums of w, w*x, w*x*x, w*y, w*x*y
        self._warm: set[int] = set()

    def observe(self, layers: int, seconds: float, batch: int = 1) -> None:
        # The first call at a batch size sets up kernels (measured: 165 ms against
        # ~15 ms after); counting it would price drafting out for good.
        if batch not in self._warm:
            self._warm.add(batch)
            return
        x, y = float(layers), float(seconds)
        self.s = self.s * self.decay + np.array([1.0, x, x * x, y, x * y])

    def fit(self, prior_per_layer: float) -> tuple[float, float] | None:
        """``(a, b)``, or None before the first observation."""
        w, sx, sxx, sy, sxy = self.s
        if w < 1e-9:
            return None
        lam = w  # the prior slope weighs as much as one unit of layer-count spread
        # minimise sum w (y - a - b x)^2 + lam (b - b0)^2
        a_mat = np.array([[w, sx], [sx, sxx + lam]])
        rhs = np.array([sy, sxy + lam * prior_per_layer])
        a, b = np.linalg.solve(a_mat, rhs)
        return float(a), float(b)

    def time(self, layers: int, prior_per_layer: float) -> float:
        """Seconds for a draft forward of ``layers`` layers (the prior before any call)."""
        ab = self.fit(prior_per_layer)
        if ab is None:
            return prior_per_layer * layers
        return max(ab[0] + ab[1] * layers, 1e-6)

    def describe(self, prior_per_layer: float) -> str:
        ab = self.fit(prior_per_layer)
        if ab is None:
            return "draft forward not timed yet"
        return f"draft forward {ab[0] * 1e3:.1f} ms + {ab[1] * 1e3:.2f} ms per layer"


class Acceptance:
    """Per-token acceptance rate with forgetting, from a prior worth ``weight`` tokens."""

    def __init__(self, prior: float = 0.5, weight: float = 4.0, decay: float = 0.98):
        self.hits, self.reached = prior * weight, weight
        self.decay = decay

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        reached = accepted + (1 if accepted < drafted else 0)
        d = self.decay ** reached
        self.hits = self.hits * d + accepted
        self.reached = self.reached * d + reached

    @property
    def rate(self) -> float:
        return self.hits / self.reached


def best_length(alpha: float, max_len: int, t_step: float, t_draft: float,
                t_token: float) -> tuple[int, float]:
    """``(n, gain)``: the draft length in ``0..max_len`` maximising expected committed
    tokens ``1 + alpha + ... + alpha^n`` per second of ``t_step + n * (t_draft +
    t_token)`` (a step without drafts, plus per draft token its draft forward and its
    verify cost), and that rate relative to not drafting."""
    base = 1.0 / t_step
    best_n, best = 0, base
    tokens, p = 1.0, 1.0
    for n in range(1, max_len + 1):
        p *= alpha
        tokens += p
        rate = tokens / (t_step + n * (t_draft + t_token))
        if rate > best:
            best_n, best = n, rate
    return best_n, best / base


# Before the adapter's cost model is calibrated: a step is the unit of time and each
# verified draft token costs a tenth of it (float32 on a CPU).
PRIOR_TOKEN_COST = 0.1


def describe_costs(ctx: StepContext, timer: DraftTimer, num_layers: int) -> str:
    t_step, t_token = step_costs(ctx)
    b = max(ctx.batch_tokens, 1)
    return (f"{timer.describe(t_step * b / num_layers)}; verify step {t_step * b * 1e3:.1f} ms "
            f"for {b} requests, +{t_token * 1e3:.1f} ms per draft token")


def step_costs(ctx: StepContext) -> tuple[float, float]:
    """Per request: the share of a step without drafts, and the verify cost of one more
    draft token, from the adapter's cost model (in step units before it is calibrated;
    draft timings are then on another scale until the model arrives, a few steps)."""
    if ctx.cost is None:
        return 1.0, PRIOR_TOKEN_COST
    b = max(ctx.batch_tokens, 1)
    t_batch = ctx.cost.time(b)
    return t_batch / b, max(ctx.cost.time(b + 1) - t_batch, 0.0)
