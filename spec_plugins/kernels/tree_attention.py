"""Tree attention over a paged KV cache: plan once per step, run once per layer.

A request with a draft tree is scheduled as ``1 + len(tree)`` query tokens: the root
(its last committed token) then the tree's nodes in topological order. Their K/V are
already in the paged cache at logical positions ``prefix_len + j`` (``j`` = query index),
so every query token sees the ``prefix_len`` cached tokens plus the tree tokens that are
its ancestors or itself: the tree mask. (RoPE positions are ``prefix_len + depth``,
not ``prefix_len + j``: the caller sets them before the layers run.)

The cache layout is vLLM's CPU one (``CPU_ATTN``, x86 ``vec`` ISA): per block and KV
head, ``block_size`` keys stored transposed (``[head_dim, block_size]``), then
``block_size`` values (``[block_size, head_dim]``); :func:`split_cache` gives the two
views. Keys being transposed is what makes the score product a plain matmul.

Like FlashInfer's wrappers, the work splits in two:

- :func:`plan` (once per step, on the host): ragged trees of the whole batch -> padded
  index tensors, the blocks each request reads, and the boolean mask;
- :func:`run` (once per layer): gather the blocks, two batched matmuls and a softmax
  for the whole batch (the query heads of a KV group stacked, so K/V are not
  expanded), scatter back.

:func:`reference` is the definition, token by token, for tests. A GPU path (FlashInfer's
``BatchPrefillWithPagedKVCacheWrapper`` with a custom mask) plugs in behind the same
``plan``/``run`` pair; it is not written yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class TreePlan:
    q_lens: np.ndarray           # [R] query tokens per request (root + nodes)
    prefix_lens: np.ndarray      # [R] cached tokens before the root
    rows: torch.Tensor           # [R * Qmax] packed row of each padded slot (T = padding)
    valid: torch.Tensor          # [R, Qmax] bool, slot holds a real query token
    packed: torch.Tensor         # [T] padded slot of each packed query token
    blocks: torch.Tensor         # [R, nblk] KV blocks read per request
    bias: torch.Tensor           # [R, 1, 1, Qmax, nblk * block_size]: 0 = attend, -inf = not
    num_tokens: int              # T

    @property
    def max_q(self) -> int:
        return int(self.valid.shape[1])


def ancestor_masks(parents: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per request, ``[1 + n, 1 + n]`` bool: query token ``i`` sees token ``j``. Token 0
    is the root, token ``i + 1`` is node ``i`` (parent ``-1`` = the root)."""
    out = []
    for par in parents:
        n = len(par)
        m = np.zeros((n + 1, n + 1), dtype=bool)
        m[0, 0] = True
        for i, p in enumerate(par):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: nodes must follow their parents")
            m[i + 1] = m[p + 1]
            m[i + 1, i + 1] = True
        out.append(m)
    return out


def plan(prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
         block_table: torch.Tensor, block_size: int) -> TreePlan:
    """``block_table[r]``: the physical blocks of request ``r``'s logical positions."""
    anc = ancestor_masks(parents)
    R = len(anc)
    q_lens = np.array([m.shape[0] for m in anc], dtype=np.int64)
    prefix = np.asarray(prefix_lens, dtype=np.int64)
    qmax = int(q_lens.max())
    seq = prefix + q_lens
    nblk = int((seq.max() + block_size - 1) // block_size)
    S = nblk * block_size

    mask = np.zeros((R, qmax, S), dtype=bool)
    mask[:, :, :] = np.arange(S)[None, None, :] < prefix[:, None, None]
    valid = np.arange(qmax)[None, :] < q_lens[:, None]
    rows = np.full((R, qmax), int(q_lens.sum()), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    for r, m in enumerate(anc):
        q, p0 = m.shape[0], prefix[r]
        mask[r, :q, p0:p0 + q] = m
        rows[r, :q] = starts[r] + np.arange(q)
    # Padding slots attend to something, so softmax stays finite; they are dropped.
    mask[~valid, 0] = True
    bias = np.where(mask, np.float32(0), np.float32(-np.inf))
    return TreePlan(
        q_lens=q_lens, prefix_lens=prefix,
        rows=torch.from_numpy(rows.reshape(-1)), valid=torch.from_numpy(valid),
        packed=torch.from_numpy(np.flatnonzero(valid.reshape(-1))),
        blocks=block_table[:R, :nblk].to(torch.long),
        bias=torch.from_numpy(bias)[:, None, None], num_tokens=int(q_lens.sum()))


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[num_blocks, kv_heads, block_size, 2 * D]`` -> keys ``[num_blocks, kv_heads, D,
    block_size]`` and values ``[num_blocks, kv_heads, block_size, D]`` (views)."""
    nb, h, bs, d2 = kv_cache.shape
    c = kv_cache.view(nb, h, 2, bs * (d2 // 2))
    return c[:, :, 0].view(nb, h, d2 // 2, bs), c[:, :, 1].view(nb, h, bs, d2 // 2)


def _gather_keys(key_t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """-> [R, kv_heads, D, nblk * block_size]"""
    R, nblk = blocks.shape
    g = key_t.index_select(0, blocks.reshape(-1))            # [R*nblk, H, D, bs]
    H, D, bs = g.shape[1:]
    return g.view(R, nblk, H, D, bs).permute(0, 2, 3, 1, 4).reshape(R, H, D, nblk * bs)


def _gather_values(value: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """-> [R, kv_heads, nblk * block_size, D]"""
    R, nblk = blocks.shape
    g = value.index_select(0, blocks.reshape(-1))            # [R*nblk, H, bs, D]
    H, bs, D = g.shape[1:]
    return g.view(R, nblk, H, bs, D).transpose(1, 2).reshape(R, H, nblk * bs, D)


def run(p: TreePlan, query: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor,
        scale: float) -> torch.Tensor:
    """``query``: [T, heads, D] packed (request by request, root first); ``key_t`` and
    ``value`` from :func:`split_cache`. Returns [T, heads, D]."""
    T, H, D = query.shape
    R, qmax = p.valid.shape
    kvh = key_t.shape[1]
    g = H // kvh
    padded = torch.cat([query, query.new_zeros(1, H, D)]).index_select(0, p.rows)
    # Heads of one KV group side by side: [R, kvh, g * Q, D] against [R, kvh, D, S].
    q = padded.view(R, qmax, kvh, g, D).permute(0, 2, 3, 1, 4).reshape(R, kvh, g * qmax, D)
    s = torch.matmul(q, _gather_keys(key_t, p.blocks).to(query.dtype))
    S = s.shape[-1]
    s.view(R, kvh, g, qmax, S).mul_(scale).add_(p.bias)
    a = torch.softmax(s, dim=-1)
    o = torch.matmul(a, _gather_values(value, p.blocks).to(query.dtype))
    o = o.view(R, kvh, g, qmax, D).permute(0, 3, 1, 2, 4).reshape(R * qmax, H, D)
    return o.index_select(0, p.packed)


def reference(prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
              block_table: torch.Tensor, block_size: int, query: torch.Tensor,
              key_t: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Token by token in float64: softmax(q . K_visible) V_visible."""
    anc = ancestor_masks(parents)
    T, H, D = query.shape
    kvh = key_t.shape[1]
    out = torch.empty(T, H, D, dtype=torch.float64)
    t = 0
    for r, m in enumerate(anc):
        p0 = int(prefix_lens[r])
        for i in range(m.shape[0]):
            cols = list(range(p0)) + [p0 + j for j in np.flatnonzero(m[i])]
            blk = block_table[r, torch.tensor(cols) // block_size].long()
            off = torch.tensor(cols) % block_size
            K = key_t[blk, :, :, off].double()       # [L, kvh, D]
            V = value[blk, :, off].double()
            for h in range(H):
                g = h // (H // kvh)
                s = (K[:, g] @ query[t, h].double()) * scale
                out[t, h] = torch.softmax(s, 0) @ V[:, g]
            t += 1
    return out
