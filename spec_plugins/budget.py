"""Batch-level draft budget: how many draft tokens each request gets this step.

Every draft token makes the verify pass longer for the whole batch, and pays only if it
is accepted. With ``gains[r][j]`` the estimated probability that request ``r``'s draft
token ``j`` is accepted (non-increasing in ``j``: a token counts only if all before it
are accepted), a step that verifies ``n`` extra tokens yields ``base_outputs + sum of the
chosen gains`` tokens in ``cost.time(base_tokens + n)``. :func:`allocate` picks the
tokens in decreasing gain across the batch and keeps the count that maximises tokens
per second. At batch 1 on a CPU a weak guess is worth verifying; at batch 8 only
confident ones are; on a GPU nearly all are: the same rule, different cost curves.
"""

from __future__ import annotations

import heapq
from typing import Sequence

from spec_plugins.cost import CostModel


def allocate(gains: Sequence[Sequence[float]], base_tokens: int, base_outputs: int,
             cost: CostModel) -> list[int]:
    """Draft tokens to keep per request (a prefix of each request's candidates)."""
    heap = [(-g[0], r, 0) for r, g in enumerate(gains) if len(g)]
    heapq.heapify(heap)
    order: list[int] = []
    total, best_n = 0.0, 0
    best_rate = base_outputs / cost.time(max(base_tokens, 1))
    while heap:
        neg, r, j = heapq.heappop(heap)
        order.append(r)
        total += -neg
        rate = (base_outputs + total) / cost.time(base_tokens + len(order))
        if rate > best_rate:
            best_rate, best_n = rate, len(order)
        if j + 1 < len(gains[r]):
            heapq.heappush(heap, (-gains[r][j + 1], r, j + 1))
    keep = [0] * len(gains)
    for r in order[:best_n]:
        keep[r] += 1
    return keep
